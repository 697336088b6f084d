"""Which device a run uses, and the numeric mode it runs in there."""
from __future__ import annotations

import contextlib

import torch

from mmrec.errors import UserError


def resolve_device(name: str) -> torch.device:
    """'auto' means CUDA when torch sees a GPU, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full fp32 on CPU so CPU runs stay bit-reproducible."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
