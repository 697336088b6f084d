"""Training throughput and MFU of MM-Rec vs the GPT baseline at equal parameter count and equal tokens per step.

    python bench/bench_throughput.py                      # CPU, seq 256 / 1024 / 4096, 8192 tokens a step
    python bench/bench_throughput.py --device cuda --compile --tokens 65536 --steps 8 --stat median
    python bench/bench_throughput.py --device cuda --compile --width 512 --layers 8 --seqs 1024 4096
    python bench/bench_throughput.py --variants mmrec --seqs 256 --tokens 4096 --optimizer muon --no-scan-times

A step is forward + backward + AdamW (fused on CUDA; with `--optimizer muon`, Muon for the matrices and AdamW
for the rest, as training builds them) on the default tiny rung's shape (params.yaml defaults,
vocab 5000), bf16 autocast around the forward on CUDA as training does. tokens/s is the best (or median)
timed step; MFU is the model's FLOPs per token (6N, plus attention for GPT: mmrec/model/lm.py) times tokens/s
over the device's peak (a table of GPUs, else a matmul probe: mmrec/training/loop.py). With --compile the first
warm-up step's time is the compile time, reported apart. Variants: `mmrec` uses the scan this device gets
(fla's fused kernel on CUDA when installed, our chunked scan otherwise), `mmrec:torch` forces our scan
(MMREC_SCAN=torch), `mmrec:fla` forces fla's. Each (variant, seq) runs in its own process so its peak memory
is its own. Never run by the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmrec.config import ModelParams, RungParams, TrainParams  # noqa: E402
from mmrec.training.device import autocast  # noqa: E402
from mmrec.model.lm import ModelConfig, build_model, count_params, flops_per_token  # noqa: E402
from mmrec.training.perf import peak_flops  # noqa: E402
from mmrec.model.scan import FLA_AVAILABLE, hgrn_scan, linear_scan, scan_backend  # noqa: E402
from mmrec.training.loop import forward_backward  # noqa: E402
from mmrec.training.optim import build_optimizers  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_run(variant: str, seq: int, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    arch = variant.split(":")[0]
    cfg = ModelConfig.from_params(ModelParams(arch=arch), RungParams(width=args.width, layers=args.layers),
                                  args.vocab)
    model = build_model(cfg).to(device)
    opts = build_optimizers(model, TrainParams(optimizer=args.optimizer), 1e-3, device).values()
    step_fn = torch.compile(model) if args.compile else model
    batch = max(1, args.tokens // seq)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    times = []
    for _ in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        forward_backward(step_fn, x[:, :-1], x[:, 1:], 1.0, autocast(device))  # as fit() does it
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
    timed = times[args.warmup:]
    step_s = statistics.median(timed) if args.stat == "median" else min(timed)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    n = count_params(model)
    tok_s = batch * seq / step_s
    return {"params": n, "batch": batch, "tok_s": tok_s, "peak_mb": peak / 2**20,
            "mfu": flops_per_token(cfg, n, seq) * tok_s / peak_flops(device.type)[0],
            "scan": scan_backend(device.type) if arch == "mmrec" else "-",
            "first_step_s": times[0]}


def time_scans(device: torch.device, T: int, compile_: bool, reps: int = 10) -> dict[str, float]:
    """Best ms of one scan of [16, T, 128] fp32, forward + backward, for each scan this device can run."""
    gamma = (0.5 + 0.5 * torch.rand(16, T, 128, device=device)).requires_grad_()
    log_gamma = torch.log(gamma.detach()).requires_grad_()
    b = torch.randn(16, T, 128, device=device, requires_grad=True)
    ours = lambda: linear_scan(gamma, b, chunk_size=32, min_gamma=0.5)  # noqa: E731
    scans = {"ours": ours}
    if compile_:
        compiled = torch.compile(linear_scan)
        scans["ours compiled"] = lambda: compiled(gamma, b, chunk_size=32, min_gamma=0.5)
    if device.type == "cuda" and FLA_AVAILABLE:
        scans["fla chunk_hgrn"] = lambda: hgrn_scan(log_gamma, b)
    out = {}
    for name, fn in scans.items():
        times = []
        for _ in range(reps + 3):
            sync(device)
            start = time.perf_counter()
            h, _ = fn()
            h.sum().backward()
            sync(device)
            times.append(time.perf_counter() - start)
        out[name] = 1000 * min(times[3:])
    return out


def default_variants(device: str) -> list[str]:
    if device == "cuda" and FLA_AVAILABLE:  # the fused kernel against our (compiled) scan, and GPT
        return ["mmrec", "mmrec:torch", "gpt"]
    return ["mmrec", "gpt"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seqs", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch = tokens // seq)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--stat", choices=["best", "median"], default="best", help="of the timed steps")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (the first step compiles)")
    ap.add_argument("--variants", nargs="+", help="mmrec, mmrec:torch, mmrec:fla, gpt (default: what the device has)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=5000)
    ap.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                    help="built as training builds train.optimizer (muon: Muon for the matrices, AdamW for the rest)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--scan-times", action=argparse.BooleanOptionalAction, default=True,
                    help="also time one scan of each backend at each seq")
    ap.add_argument("--json", type=Path, help="also append every measurement to this file, one JSON line each")
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.one:  # a child process: one measurement, as one JSON line
        print(json.dumps(one_run(args.one[0], int(args.one[1]), args)))
        return

    device = torch.device(args.device)
    variants = args.variants or default_variants(args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}"
    peak, source = peak_flops(device.type)
    print(f"device {device_name}, torch {torch.__version__}, {args.tokens} tokens/step, {args.warmup} warmup + "
          f"{args.stat} of {args.steps} timed steps, compile {args.compile}, width {args.width}, layers "
          f"{args.layers}, vocab {args.vocab}, {args.optimizer}; peak {peak / 1e12:.3g} TFLOP/s ({source})\n")
    mem = "peak GPU MB" if args.device == "cuda" else "peak RSS MB"
    print(f"| seq | batch | model | scan | params | tokens/s | MFU | first step s | {mem} |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|", flush=True)
    best: dict[int, dict[str, float]] = {}
    for seq in args.seqs:
        for variant in variants:
            env = dict(os.environ)
            if ":" in variant:
                env["MMREC_SCAN"] = variant.split(":")[1]
            cmd = [sys.executable, __file__, "--one", variant, str(seq)] + sys.argv[1:]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"| {seq} | | {variant} | failed: {proc.stderr.strip().splitlines()[-1][:120]} |||||", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps({"variant": variant, "seq": seq, "compile": args.compile, "width": args.width,
                                        "layers": args.layers, "device": device_name, **r}) + "\n")
            arch = variant.split(":")[0]
            best.setdefault(seq, {})[arch] = max(best.get(seq, {}).get(arch, 0.0), r["tok_s"])
            print(f"| {seq} | {r['batch']} | {arch} | {r['scan']} | {r['params']:,} | {r['tok_s']:,.0f} | "
                  f"{100 * r['mfu']:.1f} % | {r['first_step_s']:.1f} | {r['peak_mb']:,.0f} |", flush=True)
    print("\nbest mmrec / best gpt: " + ", ".join(f"seq {s} {b['mmrec'] / b['gpt']:.2f}x" for s, b in best.items()
                                                 if b.get("gpt") and b.get("mmrec")))
    for T in args.seqs if args.scan_times else []:
        scans = time_scans(device, T, args.compile)
        print(f"one scan [16, {T}, 128] fp32 fwd+bwd, best of 10: "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in scans.items()), flush=True)


if __name__ == "__main__":
    main()
