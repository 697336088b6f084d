"""The optimizers of a training: AdamW for every weight (the default), or Muon for the hidden matrices and
AdamW for the rest (embeddings and the tied head, norms, floor logits), as the nanoGPT speedruns train.

Muon orthogonalises each matrix's momentum (Newton-Schulz), so every direction of the update moves at one
rate; its update is scaled to AdamW's typical size (torch's `match_rms_adamw`, Liu et al. 2025, "Muon is
Scalable for LLM Training"), so train.lr and train.weight_decay mean the same for both and one schedule
drives both.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from mmrec.config import TrainParams
from mmrec.model.lm import param_groups


def orthogonalise(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """Newton-Schulz's quintic iteration towards U V^T of g = U S V^T (its singular values pushed near 1)."""
    a, b, c = coefficients
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    wide = x.size(0) > x.size(1)
    x = x.T if wide else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if wide else x).to(g.dtype)


class Muon(torch.optim.Muon):
    """torch's Muon, its update scaled as `match_rms_adamw`, with the Newton-Schulz iteration in float32 off
    CUDA: torch's runs it in bfloat16, which a CPU without bf16 units emulates ~10x slower (the tiny's matrices:
    0.51 s a step against 0.05 s, AVX2, one thread)."""

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float, momentum: float):
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        assert closure is None, "Muon here takes no closure"
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape[:2])))  # AdamW's update RMS, ~0.2


def build_optimizers(model: torch.nn.Module, tp: TrainParams, lr: float,
                     device: torch.device) -> dict[str, torch.optim.Optimizer]:
    """The optimizers by their checkpoint key: {"optimizer": AdamW} or {"optimizer": AdamW, "muon": Muon}."""
    matrices, rest = param_groups(model, tp.weight_decay)
    adamw = {"lr": lr, "betas": (tp.beta1, tp.beta2), "fused": device.type == "cuda"}
    if tp.optimizer == "adamw":
        return {"optimizer": torch.optim.AdamW([matrices, rest], **adamw)}
    return {"optimizer": torch.optim.AdamW([rest], **adamw),
            "muon": Muon(matrices["params"], lr=lr, weight_decay=tp.weight_decay, momentum=tp.muon_momentum)}
