"""An exponential moving average of a model's weights, the copy a rung evaluates and keeps when it has one."""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


def ema_of(model: torch.nn.Module, decay: float, ramp: bool) -> AveragedModel:
    """An exponential moving average of the weights. From a random init (`ramp`) it starts at the weights after
    the first step and its decay ramps up as (1 + n) / (10 + n), so that the first steps' weights do not linger
    in it; a grown rung's average starts at the grown weights (the model's now) and averages at the full decay
    from the first step, so it holds the parent's good weights until training has earned a say."""
    def average(avg: list[torch.Tensor], new: list[torch.Tensor], n: torch.Tensor | int) -> None:
        d = min(decay, (1 + float(n)) / (10 + float(n))) if ramp else decay
        torch._foreach_lerp_(avg, new, 1 - d)
    ema = AveragedModel(model, multi_avg_fn=average)  # a copy of the model's weights now
    if not ramp:
        ema.n_averaged.fill_(1)  # else the first update_parameters copies the weights after step 1 over the copy
    return ema
