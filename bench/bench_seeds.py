"""How large a gain is real on this corpus? K seeds of one rung, each scored the way the gate scores it.

    python bench/bench_seeds.py --rung tiny --seeds 4 --steps 400    # ~18 min on 2 cores beside another job

Each seed trains the rung from scratch with the pipeline's own loop (fit) and schedule, on the tokens of
`dvc repro tokenizer`, for --steps steps (evaluated once, at the end, so the kept weights are the last),
then is scored as evaluate@<rung> scores it: test bits per byte with full context, document by document.
Reported, beside each other:

- the spread of the gate's figure over the seeds (std, min-max): training noise, which the gate cannot see;
- the bootstrap interval of each seed's figure (test documents resampled): test-sampling noise, which it can;
- the paired gain between every two seeds (the same config: any gain is noise) with the paired interval the
  gate computes, and how many of those intervals leave out 0, i.e. would call a seed's luck a real gain.

Only rungs trained from scratch without an EMA (tiny by default). Never run by the tests.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import numpy as np
import torch

from common import ROOT, setup, train
from mmrec.pipeline.evaluate import test_metrics
from mmrec.model.lm import ModelConfig, build_model, count_params
from mmrec.registry.paired import figure_interval, paired_gain
from mmrec.training.schedule import budget_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rung", default="tiny")
    ap.add_argument("--seeds", type=int, default=4, help="how many seeds: params.yaml's seed, +1, +2, ...")
    ap.add_argument("--steps", type=int, default=400, help="training steps of each seed (the rung's own: 0)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = ap.parse_args()
    if args.seeds < 2:
        sys.exit("--seeds: at least 2, or there is no spread to measure")
    if args.threads:
        torch.set_num_threads(args.threads)

    params, header, train_tokens, val_tokens = setup()
    rung = params.rung(args.rung)
    b = budget_for(params, args.rung)
    if rung.parent or b.ema_decay:
        sys.exit(f"--rung {args.rung}: only rungs trained from scratch without an EMA (it grows from "
                 f"{rung.parent}, or averages its weights)")
    steps = args.steps or b.steps
    p = params.promote
    cfg = ModelConfig.from_params(params.model, rung, header["vocab_size"])
    tp = params.train
    print(f"{args.rung}: {count_params(build_model(cfg)):,} params, {steps} steps of {tp.batch_size} x {tp.seq_len} "
          f"tokens at peak lr {b.lr:g}, {args.seeds} seeds, {torch.get_num_threads()} threads; bootstrap "
          f"{p.bootstrap_samples:,} resamples, {p.confidence:.0%} intervals")

    rows, scores = [], []
    for seed in range(params.seed, params.seed + args.seeds):
        seeded = params.model_copy(update={"seed": seed})
        model, progress, secs = train(cfg, seeded, steps, min(b.warmup, steps), train_tokens, val_tokens,
                                      eval_every=steps, lr=b.lr)
        start = time.perf_counter()
        metrics, docs, _ = test_metrics(model.eval(), seeded, ROOT)
        low, high = figure_interval(docs, p.confidence, p.bootstrap_samples, params.seed)
        rows.append({"seed": seed, "bpb": metrics["test_bpb_context"], "low": low, "high": high,
                     "val": progress.best_val, "train_s": secs, "eval_s": time.perf_counter() - start})
        scores.append(docs)
        print(f"seed {seed}: test bits/byte {metrics['test_bpb_context']:.4f} [{low:.4f}, {high:.4f}], val loss "
              f"{progress.best_val:.4f}, {secs:.0f} s training", flush=True)

    figures = np.array([r["bpb"] for r in rows])
    widths = np.array([r["high"] - r["low"] for r in rows])
    print(f"\n| seed | test bits/byte (full context) | {p.confidence:.0%} interval of the figure | width | "
          "best val loss | train s |\n|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {r['bpb']:.4f} | [{r['low']:.4f}, {r['high']:.4f}] | {r['high'] - r['low']:.4f} | "
              f"{r['val']:.4f} | {r['train_s']:.0f} |")

    print(f"\n| pair | gain (a - b) | paired {p.confidence:.0%} interval | width | leaves out 0 |\n"
          "|---|---:|---|---:|---|")
    gains = []
    for (i, a), (j, c) in itertools.combinations(enumerate(scores), 2):
        g = paired_gain(a, c, p.confidence, p.bootstrap_samples, params.seed)
        gains.append(g)
        print(f"| {rows[i]['seed']} vs {rows[j]['seed']} | {g.mean:+.4f} | [{g.low:+.4f}, {g.high:+.4f}] | "
              f"{g.high - g.low:.4f} | {'yes' if g.low > 0 or g.high < 0 else 'no'} |")
    paired_widths = np.array([g.high - g.low for g in gains])
    real = sum(g.low > 0 or g.high < 0 for g in gains)
    print(f"\ngate figure over {len(rows)} seeds: mean {figures.mean():.4f}, std {figures.std(ddof=1):.4f}, "
          f"min-max {figures.min():.4f}-{figures.max():.4f} (range {np.ptp(figures):.4f})")
    print(f"one figure's bootstrap interval (test documents resampled): width {widths.mean():.4f} on average")
    print(f"paired gain between two seeds: |gain| {np.mean([abs(g.mean) for g in gains]):.4f} on average, "
          f"{max(abs(g.mean) for g in gains):.4f} at most; paired interval width {paired_widths.mean():.4f} on "
          f"average; {real} of {len(gains)} intervals leave out 0")
    print(f"promote.min_improvement {p.min_improvement}: "
          f"{p.min_improvement / max(figures.std(ddof=1), 1e-12):.1f} x the seed std")


if __name__ == "__main__":
    main()
