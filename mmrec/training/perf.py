"""What the device could do: the peak FLOP/s that MFU divides by."""
from __future__ import annotations

import functools
import math
import time

import torch

# Dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "GH200": 989e12, "B200": 2250e12,
                   "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12,
                   "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device_type: str, index: int | None = None) -> tuple[float, str]:
    """The device's peak FLOP/s for MFU and where the figure comes from: the table above for a known GPU
    (bf16, the dtype training runs in there), else a matmul measured (fp32 on the CPU), which is what the
    device can reach rather than a datasheet figure. On the CPU that depends on the thread count, which
    `train.threads: 0` moves during a run: it is probed once for each thread count."""
    return device_peak(device_type, index, torch.get_num_threads() if device_type == "cpu" else 0)


@functools.cache
def device_peak(device_type: str, index: int | None, threads: int) -> tuple[float, str]:
    """peak_flops, cached: `threads` (0 off the CPU) is part of the key, the probe runs at the current count."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name(index)
        for key, flops in PEAK_BF16_FLOPS.items():  # ordered: "H100 PCIe" before "H100"
            if key in name:
                return flops, f"table: {name}"
    flops, source = matmul_probe(torch.device(device_type, index) if index is not None else torch.device(device_type))
    return flops, source + (f", {threads} thread{'s' * (threads > 1)}" if threads else "")


def matmul_probe(device: torch.device, n: int = 512, reps: int = 8) -> tuple[float, str]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device).manual_seed(0)  # its own stream: drawing from torch's would shift dropout's
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
    best = math.inf
    for _ in range(reps + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, f"matmul probe {n}x{n} {str(dtype).removeprefix('torch.')}"
