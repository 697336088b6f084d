"""A rung's budget and learning-rate schedule: steps, peak lr, warmup, weight averaging."""
from __future__ import annotations

import math
from dataclasses import dataclass

from mmrec.config import Params


@dataclass
class Budget:
    steps: int
    lr: float
    warmup: int
    ema_decay: float = 0.0  # 0: evaluate and keep the trained weights themselves
    ema_ramp: bool = True  # from a random init; a grown rung's average starts at its parent's weights, full decay


def lr_at(step: int, budget: Budget, min_lr: float, schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """Linear warmup to the peak, then cosine decay to min_lr at the end of the budget; or (wsd) the peak held
    until the last `decay_fraction` of the steps and a linear decay to min_lr over them."""
    if step < budget.warmup:
        return budget.lr * (step + 1) / budget.warmup
    if schedule == "wsd":
        decay = max(round(budget.steps * decay_fraction), 1)
        left = budget.steps - step  # steps still to take, this one included
        return budget.lr if left > decay else min_lr + (budget.lr - min_lr) * max(left - 1, 0) / decay
    span = max(budget.steps - budget.warmup, 1)
    cos = 0.5 * (1 + math.cos(math.pi * min(step - budget.warmup, span) / span))
    return min_lr + (budget.lr - min_lr) * cos


def budget_for(params: Params, rung_name: str, world: int = 1) -> Budget:
    """Steps, peak lr, warmup and weight averaging of a rung; `world` processes each take batch_size windows a
    step, so train.max_tokens (all ranks' tokens) caps the steps at max_tokens / (tokens a step x world)."""
    tp, rung = params.train, params.rung(rung_name)
    steps = rung.max_steps or tp.max_steps
    if tp.max_tokens:
        steps = min(steps, math.ceil(tp.max_tokens / (tp.batch_size * tp.seq_len * tp.grad_accum * world)))
    ema = tp.ema_decay if rung.ema_decay is None else rung.ema_decay
    if rung.parent:  # a grown rung starts at its parent's loss: a lower peak keeps AdamW's first steps from undoing it
        return Budget(steps=steps, lr=rung.lr or tp.lr * tp.growth_lr_scale, warmup=min(tp.rewarmup_steps, steps),
                      ema_decay=ema, ema_ramp=False)
    return Budget(steps=steps, lr=rung.lr or tp.lr, warmup=min(tp.warmup_steps, steps), ema_decay=ema)
