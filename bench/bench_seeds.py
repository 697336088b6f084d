"""How large a gain is real on this corpus? K seeds of a rung, each scored the way the gate scores it.

    python bench/bench_seeds.py --full                               # the full-budget study: ~65 min, quiet 2 cores
    python bench/bench_seeds.py --rung tiny --seeds 4 --steps 400    # ~18 min on 2 cores beside another job
    python bench/bench_seeds.py --merge a.json b.json                # one table over a study split in parts

Each seed trains the rung with the pipeline's own loop (fit), schedule and evaluations (train.eval_every), on the
tokens of `dvc repro tokenizer`, for --steps steps (0: the rung's own budget), and keeps what the pipeline keeps
(best.pt: the weights of the best evaluation, the EMA's when the rung has one). A grown rung grows, seed by seed,
from one parent: its parent's run of params.yaml's seed, trained here once (at its own budget, or at --steps
when the parent is studied in the same call, where that run is the parent's first seed). Then each seed is
scored as evaluate@<rung> scores it: test bits per byte with full context, document by document. Reported, beside
each other, for each rung:

- the spread of the gate's figure and of the best val loss over the seeds (std, min-max): training noise, which
  the gate cannot see (compare.seed_std in params.yaml is the gate figure's std that compare takes for a
  config of one seed);
- the bootstrap interval of each seed's figure (test documents resampled): test-sampling noise, which it can;
- the paired gain between every two seeds (the same config: any gain is noise) with the paired interval the
  gate computes, and how many of those intervals leave out 0, i.e. would call a seed's luck a real gain.

--full is the study docs/measurements.md reports: every rung of the ladder at its own budget, 4 seeds of a rung
trained from scratch and 3 of a grown one (the default ladder: tiny at 2,500 steps, then mini grown from the
tiny of params.yaml's seed). Run it beside nothing else: the figures are seconds as well as bits. Never run by
the tests.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, setup, train
from mmrec.files import write_text
from mmrec.model.growth import grow_state_dict
from mmrec.data.tokenizer import load_tokenizer
from mmrec.model.inference import bits_per_byte, score_context, text_bytes
from mmrec.model.lm import ModelConfig, build_model, count_params
from mmrec.paths import RungPaths
from mmrec.paired import figure_interval, paired_gain
from mmrec.pipeline.evaluate import test_metrics
from mmrec.training.schedule import budget_for

FULL_SEEDS = {"scratch": 4, "grown": 3}  # --full: seeds of a rung trained from scratch, of a grown one


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rung", default="tiny", help="the rungs to study, comma-separated (tiny,mini)")
    ap.add_argument("--seeds", default="4", help="how many seeds (params.yaml's seed, +1, +2, ...): one number for "
                    "every rung, or one per rung, comma-separated")
    ap.add_argument("--steps", type=int, default=400, help="training steps of each seed (0: each rung's own budget)")
    ap.add_argument("--full", action="store_true", help="every rung of the ladder at its own budget, "
                    f"{FULL_SEEDS['scratch']} seeds from scratch, {FULL_SEEDS['grown']} grown (overrides the three above)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--json", metavar="FILE", help="also write every figure here")
    ap.add_argument("--first-seed", type=int, help="the first seed (default: params.yaml's); one seed is then "
                    "allowed, for --merge: a study split over processes or machines")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="no training: one table over the seeds of these "
                    "--json files (each seed once, the last file's)")
    ap.add_argument("--parents", metavar="DIR", help="keep each parent's params.seed run here (<rung>.pt), and take "
                    "it from here when there: two calls, one for each rung, can then run side by side")
    return ap.parse_args()


def plan(args: argparse.Namespace, params) -> list[tuple[str, int]]:
    """(rung, seeds) in ladder order; a bad flag ends the script with one line."""
    if args.full:
        args.steps = 0
        return [(name, FULL_SEEDS["grown" if rung.parent else "scratch"]) for name, rung in params.ladder.items()]
    names = args.rung.split(",")
    counts = [int(n) for n in args.seeds.split(",")] if args.seeds.replace(",", "").isdigit() else []
    if len(counts) == 1:
        counts *= len(names)
    if len(counts) != len(names):
        sys.exit(f"--seeds {args.seeds}: one number, or one per rung of --rung {args.rung}")
    if min(counts) < (1 if args.first_seed is not None else 2):
        sys.exit(f"--seeds {args.seeds}: at least 2 a rung, or there is no spread to measure")
    unknown = [n for n in names if n not in params.ladder]
    if unknown:
        sys.exit(f"--rung {unknown[0]}: not in the ladder ({', '.join(params.ladder)})")
    order = list(params.ladder)
    return sorted(zip(names, counts), key=lambda nc: order.index(nc[0]))  # a parent before its children


class Study:
    """Trains and scores the seeds of each rung; keeps each rung's run of params.yaml's seed for its children."""

    def __init__(self, params, header, train_tokens, val_tokens, steps: int, parents: Path | None = None):
        self.params, self.vocab, self.steps, self.parents = params, header["vocab_size"], steps, parents
        self.tokens = train_tokens, val_tokens
        sp = load_tokenizer(RungPaths(ROOT, "").tokenizer_dir)
        self.val_bytes = text_bytes(sp, val_tokens[1:], sp.eos_id())  # the denominator of val_bpb_context
        self.first: dict[str, tuple[dict, ModelConfig]] = {}  # rung -> (kept weights, config) of params.seed's run

    def cfg(self, rung: str) -> ModelConfig:
        return ModelConfig.from_params(self.params.model, self.params.rung(rung), self.vocab)

    def start(self, rung: str, seed: int) -> dict | None:
        """A grown rung's weights at step 0 for `seed`: its parent's params.seed run, grown as the pipeline does."""
        parent = self.params.rung(rung).parent
        if parent is None:
            return None
        kept = self.parents / f"{parent}.pt" if self.parents else None
        if parent not in self.first and kept and kept.exists():
            print(f"{parent}: its seed {self.params.seed} run from {kept}", flush=True)
            self.first[parent] = torch.load(kept, weights_only=True), self.cfg(parent)
        if parent not in self.first:
            print(f"{parent}: training it once at its own budget (seed {self.params.seed}), {rung}'s parent", flush=True)
            self.run(parent, self.params.seed, own_budget=True)
        state, parent_cfg = self.first[parent]
        return grow_state_dict(state, parent_cfg, self.cfg(rung), noise=self.params.promote.growth_noise,
                               generator=torch.Generator().manual_seed(seed), split=self.params.train.growth_split)

    def val_bpb_context(self, model: torch.nn.Module) -> float:
        """Val bits per byte with full context, scored as the gate scores test: unlike the best val loss (windows
        of train.seq_len tokens), comparable across configs that train on other window lengths."""
        t = self.params.train
        scores = score_context(model, self.tokens[1], t.seq_len, self.params.evaluate.batch_size, torch.device("cpu"),
                               ranks=False)
        return bits_per_byte(scores.nll_sum, self.val_bytes)

    def run(self, rung: str, seed: int, own_budget: bool = False):
        """Train one seed of `rung` with the pipeline's budget; returns the kept model, its progress and seconds."""
        seeded = self.params.model_copy(update={"seed": seed})
        b = budget_for(seeded, rung)
        steps = b.steps if own_budget or not self.steps else self.steps
        model, progress, secs = train(self.cfg(rung), seeded, steps, min(b.warmup, steps), *self.tokens,
                                      state=self.start(rung, seed), lr=b.lr, ema_decay=b.ema_decay, keep_best=True)
        if seed == self.params.seed:
            self.first[rung] = {k: v.clone() for k, v in model.state_dict().items()}, self.cfg(rung)
            if self.parents:
                self.parents.mkdir(parents=True, exist_ok=True)
                tmp = self.parents / f".{rung}.pt.tmp"
                torch.save(self.first[rung][0], tmp)
                tmp.replace(self.parents / f"{rung}.pt")
        return model, progress, secs, steps


def seeds_of(study: Study, rung: str, count: int, first: int) -> dict:
    """Train and score `count` seeds of `rung`; print its tables; return its figures."""
    params, p = study.params, study.params.promote
    b = budget_for(params, rung)
    steps = study.steps or b.steps
    grown = f", grown from {params.rung(rung).parent}" if params.rung(rung).parent else ""
    print(f"\n{rung}: {count_params(build_model(study.cfg(rung))):,} params{grown}, {steps} steps of "
          f"{params.train.batch_size} x {params.train.seq_len} tokens at peak lr {b.lr:g}"
          f"{f', EMA {b.ema_decay}' if b.ema_decay else ''}, {count} seeds, {torch.get_num_threads()} threads; "
          f"bootstrap {p.bootstrap_samples:,} resamples, {p.confidence:.0%} intervals", flush=True)
    rows, scores = [], []
    for seed in range(first, first + count):
        model, progress, secs, _ = study.run(rung, seed)
        start = time.perf_counter()
        metrics, docs, _ = test_metrics(model.eval(), params.model_copy(update={"seed": seed}), ROOT)
        low, high = figure_interval(docs, p.confidence, p.bootstrap_samples, params.seed)
        rows.append({"seed": seed, "bpb": metrics["test_bpb_context"], "low": low, "high": high,
                     "val": progress.best_val, "val_bpb_context": study.val_bpb_context(model),
                     "best_step": progress.best_step, "train_s": secs,
                     "eval_s": time.perf_counter() - start})
        scores.append(docs)
        print(f"seed {seed}: test bits/byte {metrics['test_bpb_context']:.4f} [{low:.4f}, {high:.4f}], best val loss "
              f"{progress.best_val:.4f} (step {progress.best_step}), val bits/byte with full context "
              f"{rows[-1]['val_bpb_context']:.4f}, {secs:.0f} s training", flush=True)

    print(f"\n| seed | test bits/byte (full context) | {p.confidence:.0%} interval of the figure | width | "
          "best val loss | train s |\n|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {r['bpb']:.4f} | [{r['low']:.4f}, {r['high']:.4f}] | {r['high'] - r['low']:.4f} | "
              f"{r['val']:.4f} | {r['train_s']:.0f} |")
    if len(rows) < 2:
        return {"rung": rung, "steps": steps, "seeds": rows}
    print(f"\n| pair | gain (a - b) | paired {p.confidence:.0%} interval | width | leaves out 0 |\n"
          "|---|---:|---|---:|---|")
    gains = []
    for (i, a), (j, c) in itertools.combinations(enumerate(scores), 2):
        g = paired_gain(a, c, p.confidence, p.bootstrap_samples, params.seed)
        gains.append(g)
        print(f"| {rows[i]['seed']} vs {rows[j]['seed']} | {g.mean:+.4f} | [{g.low:+.4f}, {g.high:+.4f}] | "
              f"{g.high - g.low:.4f} | {'yes' if g.low > 0 or g.high < 0 else 'no'} |")
    figures, vals = np.array([r["bpb"] for r in rows]), np.array([r["val"] for r in rows])
    real = sum(g.low > 0 or g.high < 0 for g in gains)
    print(f"\n{rung}, gate figure over {len(rows)} seeds: mean {figures.mean():.4f}, std {figures.std(ddof=1):.4f}, "
          f"min-max {figures.min():.4f}-{figures.max():.4f} (range {np.ptp(figures):.4f}); best val loss: mean "
          f"{vals.mean():.4f}, std {vals.std(ddof=1):.4f}, range {np.ptp(vals):.4f}")
    print(f"one figure's bootstrap interval (test documents resampled): width "
          f"{np.mean([r['high'] - r['low'] for r in rows]):.4f} on average")
    print(f"paired gain between two seeds: |gain| {np.mean([abs(g.mean) for g in gains]):.4f} on average, "
          f"{max(abs(g.mean) for g in gains):.4f} at most; paired interval width "
          f"{np.mean([g.high - g.low for g in gains]):.4f} on average; {real} of {len(gains)} intervals leave out 0")
    print(f"promote.min_improvement {p.min_improvement}: "
          f"{p.min_improvement / max(figures.std(ddof=1), 1e-12):.1f} x the seed std", flush=True)
    return {"rung": rung, "steps": steps, "seeds": rows, "bpb_std": float(figures.std(ddof=1)),
            "bpb_range": float(np.ptp(figures)), "val_std": float(vals.std(ddof=1)), "val_range": float(np.ptp(vals)),
            "pairs_leaving_out_0": int(real), "pairs": len(gains)}


def spread(results: list[dict]) -> None:
    """One row a rung: mean, std and range over its seeds of the gate's figure and of the best val loss."""
    print(f"\n| rung | steps | seeds | test bits/byte mean | std | range | best val loss mean | std | range |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        bpb, val = np.array([s["bpb"] for s in r["seeds"]]), np.array([s["val"] for s in r["seeds"]])
        std = (lambda a: a.std(ddof=1)) if len(bpb) > 1 else (lambda a: float("nan"))
        print(f"| {r['rung']} | {r['steps']:,} | {len(bpb)} | {bpb.mean():.4f} | {std(bpb):.4f} | {np.ptp(bpb):.4f} | "
              f"{val.mean():.4f} | {std(val):.4f} | {np.ptp(val):.4f} |")
    print("compare.seed_std (params.yaml) is the std compare takes for a config of one seed: "
          + ", ".join(f"{r['rung']} {np.std([s['bpb'] for s in r['seeds']], ddof=1):.4f}" for r in results
                      if len(r["seeds"]) > 1))


def merged(files: list[str]) -> list[dict]:
    """Each rung's seeds over several --json files, a seed counted once (the last file's), in ladder order."""
    rungs: dict[str, dict] = {}
    for name in files:
        for r in json.loads(Path(name).read_text())["rungs"]:
            into = rungs.setdefault(r["rung"], {"rung": r["rung"], "steps": r["steps"], "by_seed": {}})
            if into["steps"] != r["steps"]:
                sys.exit(f"{name}: {r['rung']} at {r['steps']} steps, another file at {into['steps']}: not one study")
            into["by_seed"] |= {s["seed"]: s for s in r["seeds"]}
    return [{"rung": r["rung"], "steps": r["steps"], "seeds": [r["by_seed"][k] for k in sorted(r["by_seed"])]}
            for r in rungs.values()]


def main() -> None:
    args = parse_args()
    if args.merge:
        spread(merged(args.merge))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    params, header, train_tokens, val_tokens = setup()
    rungs = plan(args, params)
    study = Study(params, header, train_tokens, val_tokens, args.steps, Path(args.parents) if args.parents else None)
    start = time.perf_counter()
    first = params.seed if args.first_seed is None else args.first_seed
    results = [seeds_of(study, rung, count, first) for rung, count in rungs]
    spread(results)
    print(f"\n{(time.perf_counter() - start) / 60:.0f} min in all")
    if args.json:
        write_text(Path(args.json), json.dumps({"threads": torch.get_num_threads(), "rungs": results}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
