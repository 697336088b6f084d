"""MM-Rec against the GPT baseline at an equal wall-clock training budget on the default corpus.

    dvc repro tokenizer
    python bench/bench_study.py --minutes 5 --seqs 256 1024 --update-docs

Both archs use the tiny rung's shape (so about the same parameter count) and the same tokens per step.
A short probe measures each one's step time; the budget in steps is then the minutes it can fill, so the
cosine schedule ends where the time does. Each (arch, seq) trains in its own process (its peak RSS is its
own), then the pipeline's test metrics score it. Never run by the tests.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import numpy as np
import torch

from common import ROOT, peak_rss_mb, setup, train
from mmrec.pipeline.evaluate import test_metrics
from mmrec.model.lm import ModelConfig, count_params

MARKERS = ("<!-- bench_study:start -->", "<!-- bench_study:end -->")


class Speed:
    """A metric sink that keeps the loop's own per-step tokens/s."""

    def __init__(self) -> None:
        self.tok_s: list[float] = []

    def log(self, step: int, **metrics: float) -> None:
        if "perf/tokens_per_s" in metrics:
            self.tok_s.append(metrics["perf/tokens_per_s"])

    def flush(self) -> None:
        pass


def steps_per_second(cfg: ModelConfig, params, train_tokens, val_tokens, probe: int = 12) -> float:
    """Steady-state speed of the real loop: the median step of a short probe, the first two left out."""
    speed = Speed()
    train(cfg, params, probe, 1, train_tokens, val_tokens, eval_every=10**9, sink=speed)
    tokens_per_step = params.train.batch_size * params.train.seq_len
    return float(np.median(speed.tok_s[2:])) / tokens_per_step


def one(arch: str, seq: int, minutes: float, tokens_per_step: int) -> dict:
    params, header, train_tokens, val_tokens = setup()
    batch = max(1, tokens_per_step // seq)
    params = params.model_copy(update={
        "model": params.model.model_copy(update={"arch": arch}),
        "train": params.train.model_copy(update={"seq_len": seq, "batch_size": batch}),
        "evaluate": params.evaluate.model_copy(update={"batch_size": batch})})
    cfg = ModelConfig.from_params(params.model, params.rung("tiny"), header["vocab_size"])
    steps = max(10, int(minutes * 60 * steps_per_second(cfg, params, train_tokens, val_tokens)))
    model, progress, seconds = train(cfg, params, steps, params.train.warmup_steps, train_tokens, val_tokens,
                                     eval_every=max(1, steps // 5))
    metrics = test_metrics(model, params, ROOT)[0]
    return {"arch": arch, "seq": seq, "batch": batch, "params": count_params(model), "steps": steps,
            "train_s": seconds, "tok_s": steps * batch * seq / seconds, "best_val_loss": progress.best_val,
            "test_bpb": metrics["test_bpb"], "peak_rss_mb": peak_rss_mb()}


def table(rows: list[dict], minutes: float, tokens_per_step: int) -> str:
    lines = [f"Equal wall-clock budget of {minutes:g} min per run on {torch.get_num_threads()} CPU threads, "
             f"{tokens_per_step} tokens per step, tiny rung shape, default corpus "
             f"(`python bench/bench_study.py --minutes {minutes:g}`).", "",
             "| arch | seq | params | steps | train s | tokens/s | best val loss | test bits/byte | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['seq']} | {r['params']:,} | {r['steps']} | {r['train_s']:.0f} | {r['tok_s']:,.0f} | "
                     f"{r['best_val_loss']:.4f} | {r['test_bpb']:.4f} | {r['peak_rss_mb']:,.0f} |")
    return "\n".join(lines)


def update_docs(text: str) -> None:
    page = ROOT / "docs" / "measurements.md"
    body = page.read_text()
    start, end = MARKERS
    if start not in body:
        sys.exit(f"docs/measurements.md has no {start} ... {end} section")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    page.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", body))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget of each run")
    ap.add_argument("--seqs", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch = tokens // seq)")
    ap.add_argument("--update-docs", action="store_true", help="write the table into docs/measurements.md")
    ap.add_argument("--one", nargs=2, metavar=("ARCH", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # a child process: one run, as one JSON line
        print(json.dumps(one(args.one[0], int(args.one[1]), args.minutes, args.tokens)))
        return
    rows = []
    for seq in args.seqs:
        for arch in ("mmrec", "gpt"):
            cmd = [sys.executable, __file__, "--one", arch, str(seq), "--minutes", str(args.minutes),
                   "--tokens", str(args.tokens)]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{arch} seq {seq}: test bpb {rows[-1]['test_bpb']:.4f}", file=sys.stderr, flush=True)
    text = table(rows, args.minutes, args.tokens)
    print(text)
    if args.update_docs:
        update_docs(text)


if __name__ == "__main__":
    main()
