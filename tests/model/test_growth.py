from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmrec.config import ModelParams, RungParams
from mmrec.errors import UserError
from mmrec.model.growth import grow_state_dict, growth_error
from mmrec.model.lm import ModelConfig, build_model

VOCAB = 50


def config(width, layers, memories=4, **model) -> ModelConfig:
    return ModelConfig.from_params(ModelParams(**model), RungParams(width=width, layers=layers, memories=memories),
                                   VOCAB)


def trained_like(cfg: ModelConfig, dtype=torch.float64) -> torch.nn.Module:
    """A parent whose norms, floors and matrices are all off their init, so every growth rule is exercised."""
    torch.manual_seed(0)
    model = build_model(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.05))
    return model


def grow(parent, pcfg, ccfg, dtype=torch.float64, **kw):
    child = build_model(ccfg).to(dtype).eval()
    child.load_state_dict(grow_state_dict(parent.state_dict(), pcfg, ccfg, **kw))
    return child


SHAPES = {"width x2": (64, 2), "depth +2": (32, 4), "both": (64, 4), "width x3": (96, 3)}
KINDS = [pytest.param({}, id="mmrec"), pytest.param(dict(ffn="gelu"), id="gelu"),
         pytest.param(dict(uboo_weight=0.3), id="uboo"), pytest.param(dict(arch="gpt", head_dim=8), id="gpt"),
         pytest.param(dict(tie_head=False), id="untied")]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_growth_preserves_logits(shape, kind):
    pcfg, ccfg = config(32, 2, **kind), config(*shape, **kind)
    parent = trained_like(pcfg)
    child = grow(parent, pcfg, ccfg)
    idx = torch.randint(0, VOCAB, (2, 70))  # longer than a scan chunk
    assert growth_error(parent, child, idx) < 1e-12  # the uneven shares (on by default) sum to 1 exactly
    if kind.get("uboo_weight") and ccfg.layers == pcfg.layers:  # UBOO heads are grown too
        torch.testing.assert_close(child(idx, idx).aux, parent(idx, idx).aux)


def test_float32_validation_loss_is_unchanged():
    pcfg, ccfg = config(32, 2), config(64, 4)
    parent = trained_like(pcfg, torch.float32)
    child = grow(parent, pcfg, ccfg, torch.float32)
    x = torch.randint(0, VOCAB, (4, 129))
    ce_parent = parent(x[:, :-1], x[:, 1:]).ce.item()
    ce_child = child(x[:, :-1], x[:, 1:]).ce.item()
    assert abs(ce_parent - ce_child) < 1e-5
    assert growth_error(parent, child, x) < 1e-5


def test_default_ladder_step_tiny_to_mini():
    pcfg, ccfg = config(128, 4), config(256, 6)
    assert ccfg.ffn_hidden >= 2 * pcfg.ffn_hidden
    parent = trained_like(pcfg)
    assert growth_error(parent, grow(parent, pcfg, ccfg), torch.randint(0, VOCAB, (1, 40))) < 1e-12


def test_new_blocks_are_identity_but_trainable():
    pcfg, ccfg = config(32, 2), config(32, 3)
    sd = grow_state_dict(trained_like(pcfg).state_dict(), pcfg, ccfg)
    assert sd["blocks.2.out.weight"].abs().max() == 0 and sd["blocks.2.ffn.down.weight"].abs().max() == 0
    assert sd["blocks.2.hem.weight"].std() > 0  # fresh init, not copies of zero
    assert sd["head.weight"] is sd["wte.weight"]


def test_an_untied_head_grows_as_its_own_tensor_and_cannot_grow_into_a_tied_one():
    pcfg, ccfg = config(32, 2, tie_head=False), config(64, 2, tie_head=False)
    sd = grow_state_dict(trained_like(pcfg).state_dict(), pcfg, ccfg)
    assert sd["head.weight"] is not sd["wte.weight"] and not torch.equal(sd["head.weight"], sd["wte.weight"])
    with pytest.raises(UserError, match="tie_head differs"):
        grow_state_dict(trained_like(pcfg).state_dict(), pcfg, config(64, 2))


def test_noise_breaks_symmetry_and_zero_noise_is_exact():
    pcfg, ccfg = config(32, 2), config(64, 2)
    parent = trained_like(pcfg)
    sd = parent.state_dict()
    even = dict(split=0.0)  # even shares: the copies are exact tiles, so only the noise tells them apart
    exact = grow_state_dict(sd, pcfg, ccfg, noise=0.0, generator=torch.Generator().manual_seed(1), **even)
    exact2 = grow_state_dict(sd, pcfg, ccfg, noise=0.0, generator=torch.Generator().manual_seed(2), **even)
    noisy = grow_state_dict(sd, pcfg, ccfg, noise=0.01, generator=torch.Generator().manual_seed(1), **even)
    noisy2 = grow_state_dict(sd, pcfg, ccfg, noise=0.01, generator=torch.Generator().manual_seed(1), **even)
    for name in exact:
        assert torch.equal(noisy[name], noisy2[name]), name  # seeded: reproducible
        if "ffn.up" not in name:  # spare FFN units are fresh init and depend on the seed
            assert torch.equal(exact[name], exact2[name]), name
    w = "blocks.0.hem.weight"
    half = exact[w].shape[1] // 2
    assert torch.equal(exact[w][:, :half], exact[w][:, half:])  # copies are identical...
    assert not torch.equal(noisy[w][:, :half], noisy[w][:, half:])  # ...until noise breaks the symmetry
    assert (noisy[w] - exact[w]).std() < 0.02 * exact[w].std()  # scaled by the grown tensor, not the parent's
    child = grow(parent, pcfg, ccfg, noise=0.01, generator=torch.Generator().manual_seed(1), **even)
    assert 1e-8 < growth_error(parent, child, torch.randint(0, VOCAB, (1, 20))) < 0.5


@pytest.mark.parametrize("child, match", [
    (dict(width=48, layers=2), r"integer multiple .*1\.5x"),
    (dict(width=16, layers=2), "integer multiple"),
    (dict(width=64, layers=1), "at least as many"),
    (dict(width=64, layers=2, memories=8), "memories differs"),
    (dict(width=64, layers=2, arch="gpt", head_dim=8), "arch differs"),
    (dict(width=64, layers=2, dpg_rank=8), "dpg_rank differs"),
    (dict(width=64, layers=2, ffn_mult=1.0), "ffn_mult must not shrink"),
])
def test_bad_growth_is_a_one_line_user_error(child, match):
    pcfg = config(32, 2)
    with pytest.raises(UserError, match=match) as err:
        grow_state_dict(build_model(pcfg).state_dict(), pcfg, config(**child))
    assert "\n" not in str(err.value)


def test_grown_child_trains():
    pcfg, ccfg = config(32, 2), config(64, 3)
    parent = trained_like(pcfg, torch.float32)
    child = grow(parent, pcfg, ccfg, torch.float32).train()
    x = torch.randint(0, VOCAB, (4, 33))
    opt = torch.optim.AdamW(child.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(child(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def markov_batches(n: int, batch: int = 8, seq: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """A learnable stream: each token is followed by one of 3 fixed successors."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, VOCAB, (VOCAB, 3), generator=g)
    out = []
    for _ in range(n):
        x = torch.empty(batch, seq + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, VOCAB, (batch,), generator=g)
        for t in range(seq):
            x[:, t + 1] = successors[x[:, t], torch.randint(0, 3, (batch,), generator=g)]
        out.append(x)
    return out


def train_steps(model, batches, lr):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for x in batches:
        loss = model(x[:, :-1], x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def copy_gap(model, x, width: int) -> float:
    """How far the two copies of the residual stream (read by the final norm) are apart, relative to it."""
    seen = {}
    hook = model.norm_f.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    model(x)
    hook.remove()
    h = seen["x"]
    return ((h[..., :width] - h[..., width:]).norm() / h.norm()).item()


def test_width_only_growth_breaks_symmetry_and_beats_the_parent():
    pcfg, ccfg = config(32, 2), config(64, 2)  # width only: no new layer to break the symmetry for us
    data = markov_batches(71)
    held = data.pop()
    torch.manual_seed(0)
    parent = train_steps(build_model(pcfg), data[:40], lr=1e-2).eval()
    with torch.no_grad():
        parent_loss = parent(held[:, :-1], held[:, 1:]).ce.item()
    gaps, losses = {}, {}
    for split in (0.0, 0.5):
        child = grow(parent, pcfg, ccfg, torch.float32, split=split)
        assert copy_gap(child, held[:, :-1], 32) < 1e-6  # the function (and so the stream) is the parent's
        train_steps(child.train(), data[40:70], lr=3e-3)
        gaps[split] = copy_gap(child.eval(), held[:, :-1], 32)
        with torch.no_grad():
            losses[split] = child(held[:, :-1], held[:, 1:]).ce.item()
    assert gaps[0.0] < 1e-6  # even shares: after 30 AdamW steps the copies are still one unit
    assert gaps[0.5] > 0.05  # uneven shares: the copies have gone their own ways
    assert losses[0.5] < parent_loss - 0.1  # and the child has learned past its parent


def test_a_grown_rung_gets_the_lower_post_growth_peak_and_its_rewarmup():
    from mmrec.training.schedule import budget_for
    from tests.conftest import tiny_params

    params = tiny_params(Path("."), train={"lr": 0.01, "growth_lr_scale": 0.25, "warmup_steps": 7, "rewarmup_steps": 3})
    assert (budget_for(params, "tiny").lr, budget_for(params, "tiny").warmup) == (0.01, 7)
    assert (budget_for(params, "mini").lr, budget_for(params, "mini").warmup) == (pytest.approx(0.0025), 3)
    explicit = tiny_params(Path("."), ladder={"tiny": {"width": 32, "layers": 1, "memories": 2},
                                              "mini": {"width": 64, "layers": 2, "memories": 2, "lr": 0.004,
                                                       "after": "models/tiny/handoff.json"}})
    assert budget_for(explicit, "mini").lr == 0.004  # a rung's own lr is taken as is
