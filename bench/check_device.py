"""The training loop on an accelerator: bf16 autocast and torch.compile through the real fit().

    python bench/check_device.py --device cuda --steps 200

Trains the tiny rung's shape on a synthetic Markov-chain corpus (learnable, no files needed) with
compile off and on, and prints tokens/s, MFU and compile time as fit() logs them (medians over the
steps), the loss it reached and peak memory. A check to run once on a GPU machine, not a test.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmrec.config import ModelParams, RungParams, TrainParams  # noqa: E402
from mmrec.model.lm import ModelConfig, build_model, count_params  # noqa: E402
from mmrec.training.schedule import Budget  # noqa: E402
from mmrec.training.loop import fit, seed_everything  # noqa: E402


def markov_tokens(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Each token picks its successor among 4 fixed candidates: entropy ln 4 nats, easy to learn."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, vocab, (vocab, 4))
    out = np.empty(n, dtype=np.uint16)
    out[0] = 0
    choices = rng.integers(0, 4, n)
    for i in range(1, n):
        out[i] = table[out[i - 1], choices[i]]
    return out


class Medians:
    """A metric sink keeping what fit() logs, to print the medians."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def log(self, step: int, **metrics: float) -> None:
        for k, v in metrics.items():
            self.values.setdefault(k, []).append(v)

    def flush(self) -> None:
        pass

    def median(self, key: str) -> float:
        return float(np.median(self.values[key])) if key in self.values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--arch", nargs="+", default=["mmrec", "gpt"])
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    tokens = markov_tokens(2_000_000, 512)
    train, val = tokens[:1_800_000], tokens[1_800_000:]
    print(f"device {name}, torch {torch.__version__}; entropy floor ln 4 = {math.log(4):.3f} nats\n")
    print("| arch | compile | params | steps | tokens/s | MFU | compile s | train loss @ first eval | best val loss "
          "| peak MB | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arch in args.arch:
        for compile_ in (False, True):
            tp = TrainParams(seq_len=256, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=20,
                             max_steps=args.steps, eval_every=max(1, args.steps // 4), device=args.device,
                             compile=compile_)
            cfg = ModelConfig.from_params(ModelParams(arch=arch), RungParams(width=128, layers=4), 512)
            generator = seed_everything(0)
            model = build_model(cfg).to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            sink = Medians()
            with tempfile.TemporaryDirectory() as ckpt:
                progress = fit(model, train, val, tp, Budget(args.steps, tp.lr, tp.warmup_steps), generator=generator,
                               ckpt_dir=Path(ckpt), extra={}, device=device, sink=sink)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
            print(f"| {arch} | {compile_} | {count_params(model):,} | {args.steps} | {sink.median('perf/tokens_per_s'):,.0f} | "
                  f"{100 * sink.median('perf/mfu'):.1f} % | {sink.median('perf/compile_s'):.1f} | "
                  f"{progress.history[0]['train_loss']:.3f} | {progress.best_val:.3f} | {peak:,.0f} | {seconds:.1f} |",
                  flush=True)
            assert math.isfinite(progress.best_val) and progress.best_val < math.log(512), "did not learn"


if __name__ == "__main__":
    main()
