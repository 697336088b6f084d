import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_newton_schulz

from mmrec.config import ModelParams, RungParams, TrainParams
from mmrec.model.lm import ModelConfig, build_model
from mmrec.training.optim import Muon, build_optimizers, orthogonalise

NS = (3.4445, -4.775, 2.0315), 5, 1e-7  # torch's defaults: coefficients, steps, eps


def tiny_model(**model) -> torch.nn.Module:
    return build_model(ModelConfig.from_params(ModelParams(head_dim=16, dpg_rank=4, **model), RungParams(width=32, layers=2),
                                               300))


@pytest.mark.parametrize("shape", [(24, 80), (80, 24)])
def test_orthogonalise_pushes_every_singular_value_near_1_as_torchs_bf16_iteration_does(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.logspace(-1, 1, shape[1])
    ours = orthogonalise(g, *NS)
    assert ours.dtype == torch.float32 and ours.shape == g.shape
    s = torch.linalg.svdvals(ours)
    assert s.min() > 0.3 and s.max() < 1.3  # the quintic's band, whatever the columns' scales (1e-1..1e1)
    assert torch.allclose(ours, torch_newton_schulz(g, *NS).float(), atol=0.02)  # bf16's rounding apart


def test_muon_steps_as_torchs_muon_with_the_adamw_matched_scale():
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(32, 48)), torch.nn.Parameter(torch.zeros(32, 48))
    theirs.data.copy_(ours.data)
    a = Muon([ours], lr=0.01, weight_decay=0.1, momentum=0.95)
    b = torch.optim.Muon([theirs], lr=0.01, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    start = ours.detach().clone()
    for _ in range(3):
        g = torch.randn(32, 48)
        ours.grad, theirs.grad = g.clone(), g.clone()
        a.step(), b.step()
    moved = (ours - start).norm()
    assert moved > 0.1 and (ours - theirs).norm() < 0.01 * moved  # the same steps, up to bf16's rounding
    assert a.state_dict()["state"][0].keys() == b.state_dict()["state"][0].keys()  # checkpoints look alike


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_model()
    optimizers = build_optimizers(model, TrainParams(optimizer="muon"), 1e-3, torch.device("cpu"))
    muon = {id(p) for g in optimizers["muon"].param_groups for p in g["params"]}
    adamw = {id(p) for g in optimizers["optimizer"].param_groups for p in g["params"]}
    assert not muon & adamw and muon | adamw == {id(p) for p in model.parameters()}
    for name, p in model.named_parameters():
        assert (id(p) in muon) == (p.dim() == 2 and not name.startswith("wte")), name  # the tied embedding/head: AdamW
    untied = tiny_model(tie_head=False)
    optimizers = build_optimizers(untied, TrainParams(optimizer="muon"), 1e-3, torch.device("cpu"))
    assert id(untied.head.weight) not in {id(p) for g in optimizers["muon"].param_groups for p in g["params"]}
    assert list(build_optimizers(model, TrainParams(optimizer="adamw"), 1e-3, torch.device("cpu"))) == ["optimizer"]  # AdamW alone
