"""Training throughput of MM-Rec vs the GPT baseline at equal parameter count and equal tokens per step.

    python bench/bench_throughput.py                      # CPU, seq 256 / 1024 / 4096, 8192 tokens a step
    python bench/bench_throughput.py --device cuda --steps 20 --warmup 5

A step is forward + backward + AdamW on the default tiny rung (params.yaml defaults, vocab 5000); tokens/s is
the best timed step, robust to a shared machine. Each (arch, seq) runs in its own process so its peak RSS
is its own. Never run by the tests.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmrec.config import ModelParams, RungParams  # noqa: E402
from mmrec.model import ModelConfig, build_model, count_params, param_groups  # noqa: E402
from mmrec.scan import linear_scan  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_run(arch: str, seq: int, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = ModelConfig.from_params(ModelParams(arch=arch), RungParams(width=args.width, layers=args.layers),
                                  args.vocab)
    model = build_model(cfg).to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    batch = max(1, args.tokens // seq)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        with amp:  # as training does: bf16 autocast on CUDA, fp32 on CPU
            loss = model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"params": count_params(model), "batch": batch, "tok_s": batch * seq / min(times),
            "peak_mb": peak / 2**20}


def time_scan(device: torch.device, reps: int = 10) -> float:
    """Best ms of one linear_scan of [16, 256, 128], forward + backward (the design note's ~9 ms case)."""
    gamma = (0.5 + 0.5 * torch.rand(16, 256, 128, device=device)).requires_grad_()
    b = torch.randn(16, 256, 128, device=device, requires_grad=True)
    times = []
    for _ in range(reps + 2):
        sync(device)
        start = time.perf_counter()
        h, _ = linear_scan(gamma, b, chunk_size=32)
        h.sum().backward()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * min(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seqs", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch = tokens // seq)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--one", nargs=2, metavar=("ARCH", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.one:  # a child process: one measurement, as one JSON line
        print(json.dumps(one_run(args.one[0], int(args.one[1]), args)))
        return

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"device {device_name}, {args.tokens} tokens/step, {args.warmup} warmup + best of {args.steps} timed steps, "
          f"width {args.width}, layers {args.layers}, vocab {args.vocab}\n")
    mem = "peak GPU MB" if args.device == "cuda" else "peak RSS MB"
    print(f"| seq | batch | mmrec tok/s | gpt tok/s | mmrec/gpt | mmrec {mem} | gpt {mem} |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    params = {}
    for seq in args.seqs:
        row = {}
        for arch in ("mmrec", "gpt"):
            cmd = [sys.executable, __file__, "--one", arch, str(seq)] + sys.argv[1:]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row[arch] = json.loads(out.strip().splitlines()[-1])
            params[arch] = row[arch]["params"]
        m, g = row["mmrec"], row["gpt"]
        print(f"| {seq} | {m['batch']} | {m['tok_s']:,.0f} | {g['tok_s']:,.0f} | {m['tok_s'] / g['tok_s']:.2f} "
              f"| {m['peak_mb']:,.0f} | {g['peak_mb']:,.0f} |", flush=True)
    print(f"\nparameters: mmrec {params['mmrec']:,}, gpt {params['gpt']:,}")
    print(f"one scan [16, 256, 128] fwd+bwd: {time_scan(torch.device(args.device)):.1f} ms (best of 10)")


if __name__ == "__main__":
    main()
