import dataclasses
import io
import math

import pytest
import torch

from mmrec.config import ModelParams, RungParams
from mmrec.errors import UserError
from mmrec.model.lm import ModelConfig, build_model, count_params, flops_per_token, param_groups, uboo_loss
from mmrec.model.scan import FLA_AVAILABLE, sequential_scan


def config(arch="mmrec", width=32, layers=2, memories=4, vocab=64, **model) -> ModelConfig:
    return ModelConfig.from_params(ModelParams(arch=arch, **model), RungParams(width=width, layers=layers,
                                                                               memories=memories), vocab)


ARCHS = [pytest.param(dict(arch="mmrec"), id="mmrec"), pytest.param(dict(arch="mmrec", uboo_weight=0.5), id="uboo"),
         pytest.param(dict(arch="gpt"), id="gpt"), pytest.param(dict(arch="mmrec", ffn="gelu"), id="gelu")]


@pytest.mark.parametrize("kw", ARCHS)
def test_causal(kw):
    torch.manual_seed(0)
    model = build_model(config(**kw, chunk_size=8)).double().eval()
    idx = torch.randint(0, 64, (2, 40))
    base = model(idx).logits
    for t in (0, 7, 8, 21, 38):  # inside and at the edges of scan chunks
        changed = idx.clone()
        changed[:, t + 1:] = torch.randint(0, 64, changed[:, t + 1:].shape)
        changed[:, t + 1] = (idx[:, t + 1] + 1) % 64  # surely different
        logits = model(changed).logits
        torch.testing.assert_close(logits[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-12)
        assert (logits[:, t + 1] - base[:, t + 1]).abs().max() > 1e-6


@pytest.mark.parametrize("kw", ARCHS)
def test_every_parameter_gets_a_gradient(kw):
    torch.manual_seed(0)
    model = build_model(config(**kw))
    idx = torch.randint(0, 64, (2, 24))
    out = model(idx, torch.roll(idx, -1, 1))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_is_ce_plus_weighted_aux_logged_apart():
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (2, 24))
    out = build_model(config(uboo_weight=0.5))(idx, idx)
    assert out.aux is not None and out.aux.item() > 0
    torch.testing.assert_close(out.loss, out.ce + 0.5 * out.aux)
    off = build_model(config())
    assert off(idx, idx).aux is None and not any("predict" in n for n, _ in off.named_parameters())
    assert build_model(config())(idx).loss is None


def test_uboo_target_is_detached():
    torch.manual_seed(0)
    predict = torch.nn.Linear(8, 8, bias=False)
    h = torch.randn(2, 10, 8, requires_grad=True)
    uboo_loss(predict, h).backward()
    assert h.grad[:, -1].abs().max() == 0  # the last state is only ever a target
    assert h.grad[:, :-1].abs().min(dim=-1).values.gt(0).all()  # earlier states are trained as inputs


@pytest.mark.parametrize("arch", ["mmrec", "gpt"])
def test_tiny_model_overfits_one_batch(arch):
    torch.manual_seed(0)
    model = build_model(config(arch=arch, width=32, layers=2, vocab=32))
    x = torch.randint(0, 32, (4, 33))
    idx, targets = x[:, :-1], x[:, 1:]
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-2)
    for _ in range(300):
        loss = model(idx, targets).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.5:
            break
    assert loss.item() < 0.5


@pytest.mark.parametrize("arch", ["mmrec", "gpt"])
def test_recompute_gives_the_same_weights_with_less_kept_for_backward(arch):
    """train.recompute: the same losses and weights bit for bit (dropout masks included), fewer saved tensors."""
    runs = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = build_model(config(arch, uboo_weight=0.5 if arch == "mmrec" else 0.0, dropout=0.1))
        model.recompute = recompute
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
        saved, losses = [], []
        for _ in range(3):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
                out = model(x[:, :-1], x[:, 1:])
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(out.loss.item())
        runs[recompute] = losses, [p.detach().clone() for p in model.parameters()], sum(saved)
    (loss_a, weights_a, saved_a), (loss_b, weights_b, saved_b) = runs[False], runs[True]
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))
    assert saved_b < saved_a / 2, (saved_a, saved_b)


def test_default_tiny_parameter_count():
    for arch in ("mmrec", "gpt"):
        cfg = ModelConfig.from_params(ModelParams(arch=arch), RungParams(width=128, layers=4), 5000)
        D, H, V, L, r, M = cfg.width, cfg.ffn_hidden, cfg.vocab_size, cfg.layers, cfg.dpg_rank, cfg.memories
        ffn = 3 * D * H
        block = (D * (3 * D + r) + r * D + M + D * D + 3 * D) if arch == "mmrec" else (4 * D * D + 2 * D)
        expected = V * D + L * (block + ffn) + D  # tied head counted once
        n = count_params(build_model(cfg))
        assert n == expected and 1.2e6 < n < 2.5e6


def test_param_groups_decay_matrices_only():
    model = build_model(config(uboo_weight=0.1))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]).isdisjoint(ids(no_decay["params"]))
    assert ids(decay["params"]) | ids(no_decay["params"]) == ids(model.parameters())
    assert id(model.wte.weight) in ids(no_decay["params"])
    assert id(model.blocks[0].floor_logit) in ids(no_decay["params"])
    assert id(model.blocks[0].hem.weight) in ids(decay["params"])
    assert all(p.dim() >= 2 for p in decay["params"])


def test_an_untied_head_is_its_own_zero_matrix_kept_out_of_the_decay():
    model = build_model(config(tie_head=False))
    assert model.head.weight is not model.wte.weight and model.head.weight.abs().max() == 0
    assert count_params(model) == count_params(build_model(config())) + model.head.weight.numel()
    decay, no_decay = param_groups(model, 0.1)
    assert id(model.head.weight) in {id(p) for p in no_decay["params"]}
    idx = torch.randint(0, model.cfg.vocab_size, (2, 9))
    torch.testing.assert_close(model(idx, idx).ce.item(), math.log(model.cfg.vocab_size))  # uniform at the start


def test_config_round_trips_through_a_checkpoint():
    cfg = config(arch="gpt", ffn="gelu", dropout=0.1)
    buf = io.BytesIO()
    torch.save({"config": cfg.to_dict()}, buf)
    buf.seek(0)
    back = ModelConfig.from_dict(torch.load(buf, weights_only=True)["config"])
    assert back == cfg and back is not cfg
    with pytest.raises(UserError, match="unknown keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "heads": 4})


@pytest.mark.parametrize("change, match", [(dict(arch="gpt", head_dim=24), "head_dim"),
                                           (dict(arch="gpt", uboo_weight=0.1), "uboo_weight"),
                                           (dict(width=30), "multiple of memories"), (dict(ffn="relu"), "ffn")])
def test_bad_configs_are_one_line_user_errors(change, match):
    with pytest.raises(UserError, match=match) as err:
        dataclasses.replace(config(), **change)
    assert "\n" not in str(err.value)


def test_floors_bound_gamma_and_span_timescales():
    cfg = config(memories=4)
    logits = build_model(cfg).blocks[0].floor_logit
    floors = cfg.min_floor + (cfg.max_floor - cfg.min_floor) * torch.sigmoid(logits)
    assert (floors.diff() > 0).all() and floors[0] > cfg.min_floor and floors[-1] < cfg.max_floor
    assert 1 / (1 - floors[-1]) > 20 / (1 - floors[0])  # short to long memories
    assert config(min_floor=0.01, max_floor=0.5).scan_chunk < 32  # |log A| <= 40 in a chunk


def test_carried_state_matches_one_long_forward():
    torch.manual_seed(0)
    model = build_model(config(chunk_size=8)).double().eval()
    idx = torch.randint(0, 64, (2, 30))
    whole = model(idx).logits
    first = model(idx[:, :13])
    second = model(idx[:, 13:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole, rtol=0, atol=1e-10)


def test_uboo_is_summed_over_layers_as_the_design_note_defines_it():
    torch.manual_seed(0)
    model = build_model(config(layers=3, uboo_weight=0.5))
    per_layer = []
    for block in model.blocks:
        block.register_forward_hook(lambda _m, _i, out: per_layer.append(out[2]))
    idx = torch.randint(0, 64, (2, 24))
    out = model(idx, idx)
    assert len(per_layer) == 3 and all(a > 0 for a in per_layer)
    torch.testing.assert_close(out.aux, sum(per_layer))


@pytest.mark.parametrize("arch", ["mmrec", "gpt"])
def test_flops_per_token_matches_the_counted_matmuls(arch):
    """6N (+ attention for GPT) against PyTorch's own FLOP counter over a real forward + backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = config(arch=arch, width=64, layers=2, vocab=256, head_dim=16)
    model = build_model(cfg)
    T = 128
    idx = torch.randint(0, 256, (2, T + 1))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # attention as plain matmuls
        model(idx[:, :-1], idx[:, 1:]).loss.backward()
    counted = counter.get_total_flops() / (2 * T)
    assert flops_per_token(cfg, count_params(model), T) == pytest.approx(counted, rel=0.03)


def reference_hgrn(log_gamma, b, h0=None):
    """The fused kernel's contract, on the CPU: stands in for the GPU in the test below."""
    return sequential_scan(log_gamma.exp(), b, h0)


def test_log_space_gates_of_the_fused_path_give_the_same_model(monkeypatch):
    """The CUDA path computes log gamma = logaddexp(log f, log(1 - f) + logsigmoid(a)) for fla's kernel;
    with a CPU stand-in for the kernel the model must compute what our scan computes."""
    import mmrec.model.lm as model_module

    torch.manual_seed(0)
    model = build_model(config(layers=2, chunk_size=8)).double().eval()
    idx = torch.randint(0, 64, (2, 40))
    ours = model(idx)
    monkeypatch.setattr(model_module, "scan_backend", lambda device_type: "fla")
    monkeypatch.setattr(model_module, "hgrn_scan", reference_hgrn)
    fused = model(idx)
    torch.testing.assert_close(fused.logits, ours.logits, rtol=1e-10, atol=1e-10)
    for a, b in zip(fused.state, ours.state):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_log_gamma_stays_finite_where_gamma_rounds_to_one():
    f = torch.tensor([0.996])
    a = torch.tensor([40.0])  # sigmoid(a) == 1 in fp32: log(gamma) would be exactly 0
    log_gamma = torch.logaddexp(torch.log(f), torch.log1p(-f) + torch.nn.functional.logsigmoid(a))
    assert log_gamma < 0 and torch.isfinite(log_gamma).all()


@pytest.mark.skipif(not FLA_AVAILABLE, reason="needs CUDA and fla (pip install -r requirements-gpu.txt)")
def test_cuda_fused_model_matches_our_scan_on_cuda(monkeypatch):
    import mmrec.model.scan as scan

    torch.manual_seed(0)
    model = build_model(config(width=64, layers=2, chunk_size=16)).cuda()
    idx = torch.randint(0, 64, (4, 200), device="cuda")
    runs = {}
    for backend in ("torch", "fla"):
        monkeypatch.setattr(scan, "REQUESTED", backend)
        model.zero_grad()
        out = model(idx, idx)
        out.loss.backward()
        runs[backend] = (out.logits.detach(), [p.grad.clone() for p in model.parameters()])
    for a, b in zip([runs["fla"][0], *runs["fla"][1]], [runs["torch"][0], *runs["torch"][1]]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * float(b.abs().max()))
