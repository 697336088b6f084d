"""An exponential moving average of a model's weights, the copy a rung evaluates and keeps when it has one."""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


def ema_of(model: torch.nn.Module, decay: float, ramp: bool) -> AveragedModel:
    """An exponential moving average of the weights. From a random init its decay ramps up as
    (1 + n) / (10 + n), so that the first steps' weights do not linger in it; a grown rung starts from its
    parent's good weights and averages at the full decay from the first step."""
    def average(avg: list[torch.Tensor], new: list[torch.Tensor], n: torch.Tensor | int) -> None:
        d = min(decay, (1 + float(n)) / (10 + float(n))) if ramp else decay
        torch._foreach_lerp_(avg, new, 1 - d)
    return AveragedModel(model, multi_avg_fn=average)
