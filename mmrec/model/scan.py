"""The linear recurrence h_t = gamma_t * h_{t-1} + b_t, computed chunk by chunk (or by a fused kernel on CUDA).

Inside a chunk of length C, with A_t = prod_{s<=t} gamma_s (a cumulative sum in log space),
    h_t = A_t * (h_carry + cumsum_s(b_s / A_s)),
so a chunk costs a few element-wise ops and two cumsums. The carries between chunks follow the same
recurrence over the T / C chunk ends, solved in log2(T / C) vectorised steps: no Python loop over time.
The rescaled form needs |log A| bounded inside a chunk: exp(-log A) must not overflow, so
C * |log gamma_min| must stay under MAX_LOG_SPAN (80 in float32, 700 in float64). MMRec bounds
gamma >= min_floor, picks C from it (see model.py) and says so through `min_gamma`; any other caller
gets its gammas checked, and a scan past the bound (or with a gamma of 0) runs the doubling scan over
the whole sequence instead, which only multiplies numbers in [0, 1] and so cannot overflow.

On CUDA, flash-linear-attention's HGRN kernels (`fla.ops.hgrn`, h_t = exp(g_t) h_{t-1} + x_t; pip install
-r requirements-gpu.txt) do the same in one fused pass: `hgrn_scan` takes g = log gamma. `scan_backend`
says which one a device gets; MMREC_SCAN=torch|fla|auto overrides the choice (benchmarks, debugging).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from mmrec.errors import UserError

MAX_LOG_SPAN = {torch.float32: 80.0, torch.float64: 700.0}  # exp(80) ~ 5.5e34 leaves fp32 ~1e4 headroom
BACKENDS = ("auto", "torch", "fla")


def _probe_fla() -> bool:
    """Whether the fused kernels can run here: a CUDA device and an importable fla (which brings Triton).
    Probed once at import, outside any torch.compile trace."""
    if not torch.cuda.is_available():
        return False
    try:
        import fla.ops.hgrn  # noqa: F401
    except Exception:  # missing, or a Triton/torch mismatch: our scan still works
        return False
    return True


FLA_AVAILABLE = _probe_fla()
if FLA_AVAILABLE:  # imported here, not inside hgrn_scan, so that torch.compile never traces an import
    from fla.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn
REQUESTED = os.environ.get("MMREC_SCAN", "auto")


def choose_backend(device_type: str, requested: str = "auto", fla_available: bool = False) -> str:
    """'fla' for CUDA tensors when the kernels import (or when asked for), else 'torch' (our chunked scan)."""
    if requested not in BACKENDS:
        raise UserError(f"MMREC_SCAN={requested!r} is unknown; allowed: {', '.join(BACKENDS)}")
    usable = device_type == "cuda" and fla_available
    if requested == "fla" and not usable:
        raise UserError("MMREC_SCAN=fla needs a CUDA device and flash-linear-attention's kernels "
                        "(pip install -r requirements-gpu.txt)")
    return "fla" if usable and requested != "torch" else "torch"


def scan_backend(device_type: str) -> str:
    """The backend for tensors on `device_type`, from this process's probe and MMREC_SCAN."""
    return choose_backend(device_type, REQUESTED, FLA_AVAILABLE)


def hgrn_scan(log_gamma: torch.Tensor, b: torch.Tensor,
              h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_scan's contract with gamma given as log gamma (<= 0), on fla's fused CUDA kernels, in fp32.

    chunk_hgrn is the fast one but returns no gradient for h0 and drops the final state's gradient;
    fused_recurrent_hgrn has both. h_last is read off h here, so its gradient flows through h either way:
    only a differentiable h0 needs the recurrent kernel."""
    out_dtype = b.dtype
    g, x = log_gamma.float(), b.float()
    h0 = None if h0 is None else h0.float()
    kernel = fused_recurrent_hgrn if h0 is not None and h0.requires_grad else chunk_hgrn
    h, _ = kernel(x, g, h0)
    return h.to(out_dtype), h[:, -1].to(out_dtype)


def linear_scan(gamma: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, chunk_size: int = 32,
                min_gamma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma (in [0, 1]), b: [B, T, D]; h0: [B, D] or None (zeros). Returns (h [B, T, D], h_last [B, D]).

    min_gamma: a lower bound on gamma the caller guarantees; without it the gammas are checked (one
    reduction and a host sync), and a chunk whose rescaling could overflow falls back to the doubling scan."""
    out_dtype = b.dtype
    if out_dtype in (torch.float16, torch.bfloat16):  # the rescaling needs fp32 range
        gamma, b = gamma.float(), b.float()
        h0 = None if h0 is None else h0.float()
    B, T, D = b.shape
    C = max(1, min(chunk_size, T))
    lowest = min_gamma if min_gamma is not None else float(gamma.detach().min()) if gamma.numel() else 1.0
    if lowest <= 0 or C * -math.log(lowest) > MAX_LOG_SPAN.get(b.dtype, 80.0):
        h = _doubling_scan(gamma, b, h0)  # exact for any gamma in [0, 1], O(T log T) work
        return h.to(out_dtype), h[:, -1].to(out_dtype)
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
