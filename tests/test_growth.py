import pytest
import torch
import torch.nn.functional as F

from mmrec.config import ModelParams, RungParams
from mmrec.errors import UserError
from mmrec.growth import grow_state_dict, growth_error
from mmrec.model import ModelConfig, build_model

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
         pytest.param(dict(uboo_weight=0.3), id="uboo"), pytest.param(dict(arch="gpt", head_dim=8), id="gpt")]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_growth_preserves_logits(shape, kind):
    pcfg, ccfg = config(32, 2, **kind), config(*shape, **kind)
    parent = trained_like(pcfg)
    child = grow(parent, pcfg, ccfg)
    idx = torch.randint(0, VOCAB, (2, 70))  # longer than a scan chunk
    assert growth_error(parent, child, idx) < 1e-10
    if kind.get("uboo_weight") and ccfg.layers == pcfg.layers:  # UBOO heads are grown too
        torch.testing.assert_close(child(idx, idx).aux, parent(idx, idx).aux)


def test_float32_validation_loss_is_unchanged():
    pcfg, ccfg = config(32, 2), config(64, 4)
    parent = trained_like(pcfg, torch.float32)
    child = grow(parent, pcfg, ccfg, torch.float32)
    x = torch.randint(0, VOCAB, (4, 129))
    ce_parent = parent(x[:, :-1], x[:, 1:]).ce.item()
    ce_child = child(x[:, :-1], x[:, 1:]).ce.item()
    assert abs(ce_parent - ce_child) < 1e-4
    assert growth_error(parent, child, x) < 1e-4


def test_default_ladder_step_tiny_to_mini():
    pcfg, ccfg = config(128, 4), config(256, 6)
    assert ccfg.ffn_hidden >= 2 * pcfg.ffn_hidden
    parent = trained_like(pcfg)
    assert growth_error(parent, grow(parent, pcfg, ccfg), torch.randint(0, VOCAB, (1, 40))) < 1e-10


def test_new_blocks_are_identity_but_trainable():
    pcfg, ccfg = config(32, 2), config(32, 3)
    sd = grow_state_dict(trained_like(pcfg).state_dict(), pcfg, ccfg)
    assert sd["blocks.2.out.weight"].abs().max() == 0 and sd["blocks.2.ffn.down.weight"].abs().max() == 0
    assert sd["blocks.2.hem.weight"].std() > 0  # fresh init, not copies of zero
    assert sd["head.weight"] is sd["wte.weight"]


def test_noise_breaks_symmetry_and_zero_noise_is_exact():
    pcfg, ccfg = config(32, 2), config(64, 2)
    parent = trained_like(pcfg)
    sd = parent.state_dict()
    exact = grow_state_dict(sd, pcfg, ccfg, noise=0.0, generator=torch.Generator().manual_seed(1))
    exact2 = grow_state_dict(sd, pcfg, ccfg, noise=0.0, generator=torch.Generator().manual_seed(2))
    noisy = grow_state_dict(sd, pcfg, ccfg, noise=0.01, generator=torch.Generator().manual_seed(1))
    noisy2 = grow_state_dict(sd, pcfg, ccfg, noise=0.01, generator=torch.Generator().manual_seed(1))
    for name in exact:
        assert torch.equal(noisy[name], noisy2[name]), name  # seeded: reproducible
        if "ffn.up" not in name:  # spare FFN units are fresh init and depend on the seed
            assert torch.equal(exact[name], exact2[name]), name
    w = "blocks.0.hem.weight"
    half = exact[w].shape[1] // 2
    assert torch.equal(exact[w][:, :half], exact[w][:, half:])  # copies are identical...
    assert not torch.equal(noisy[w][:, :half], noisy[w][:, half:])  # ...until noise breaks the symmetry
    assert (noisy[w] - exact[w]).std() < 0.02 * sd[w].std()
    child = grow(parent, pcfg, ccfg, noise=0.01, generator=torch.Generator().manual_seed(1))
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
