"""The linear recurrence h_t = gamma_t * h_{t-1} + b_t, computed chunk by chunk.

Inside a chunk of length C, with A_t = prod_{s<=t} gamma_s (a cumulative sum in log space),
    h_t = A_t * (h_carry + cumsum_s(b_s / A_s)),
so a chunk costs a few element-wise ops and two cumsums. The carries between chunks follow the same
recurrence over the T / C chunk ends, solved in log2(T / C) vectorised steps: no Python loop over time.
The rescaled form needs |log A| bounded inside a chunk: exp(-log A) must not overflow, so keep
C * |log gamma_min| under ~80 in float32 (~700 in float64). MMRec bounds gamma >= min_floor and picks
C from it (see model.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_scan(gamma: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
                chunk_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma, b: [B, T, D]; h0: [B, D] or None (zeros). Returns (h [B, T, D], h_last [B, D])."""
    out_dtype = b.dtype
    if out_dtype in (torch.float16, torch.bfloat16):  # the rescaling needs fp32 range
        gamma, b = gamma.float(), b.float()
        h0 = None if h0 is None else h0.float()
    B, T, D = b.shape
    C = max(1, min(chunk_size, T))
    pad = -T % C
    if pad:  # gamma = 1, b = 0 keeps h constant through the padding
        gamma = F.pad(gamma, (0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, pad))
    N = (T + pad) // C

    log_gamma = torch.log(gamma.clamp_min(torch.finfo(gamma.dtype).tiny))  # never -inf
    log_a = log_gamma.view(B, N, C, D).cumsum(2)
    a = torch.exp(log_a)
    h_local = a * torch.cumsum(b.view(B, N, C, D) * torch.exp(-log_a), 2)  # each chunk started from zero

    # Chunk ends obey the same recurrence, end_n = a_n * end_{n-1} + h_local_n: solve it for all n at once.
    ends = _doubling_scan(a[:, :, -1], h_local[:, :, -1], h0)
    first = torch.zeros_like(ends[:, :1]) if h0 is None else h0.to(b.dtype).unsqueeze(1)
    carries = torch.cat([first, ends[:, :-1]], 1)  # h entering each chunk
    h = h_local + a * carries.unsqueeze(2)
    h = h.view(B, N * C, D)[:, :T]
    return h.to(out_dtype), h[:, -1].to(out_dtype)


def _doubling_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """h_n = a_n * h_{n-1} + b_n over dim 1 in log2(N) vectorised steps (Hillis-Steele).

    Only products of a's in [0, 1] appear, so unlike the rescaled cumsum it cannot overflow however long
    the sequence: this is what lets the chunk carries skip a Python loop over T / C chunks (kernel launches
    on a GPU)."""
    if h0 is not None:
        b = torch.cat([b[:, :1] + a[:, :1] * h0.to(b.dtype).unsqueeze(1), b[:, 1:]], 1)
    step = 1
    while step < b.shape[1]:  # after this pass each (a_n, b_n) spans the last 2 * step positions
        b = torch.cat([b[:, :step], b[:, step:] + a[:, step:] * b[:, :-step]], 1)
        a = torch.cat([a[:, :step], a[:, step:] * a[:, :-step]], 1)
        step *= 2
    return b


def sequential_scan(gamma: torch.Tensor, b: torch.Tensor,
                    h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The step-by-step reference: same contract as linear_scan, one Python step per time step."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = []
    for t in range(b.shape[1]):
        h = gamma[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1), h
