"""Two trainings at once against one alone, and what MLflow's system metrics cost.

    dvc repro tokenizer
    python bench/bench_share.py --steps 40
    taskset -c 0,1 python bench/bench_share.py     # as on a 2-core machine

Each training is the tiny rung's real stage code (`train_rung`: the loop, checkpoints, MLflow logging) in a
process of its own over the pipeline's tokens, with a private MLflow store. Three ways:

  alone    one training, `train.threads: 0` (all the cores it sees)
  shared   two started together, `train.threads: 0` (mmrec/training/cores.py divides the cores between them)
  greedy   two started together, each with every core (what `threads: 0` meant before)

The figure of merit is the wall time of the pair over the time of one alone: 2.0 is a perfect share.
Then the same alone run with `mlflow.system_metrics` off and on, and the cost of one system-metrics
sample (it samples every 10 s by default), as a share of step time. Never run by the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from mmrec.config import load_params
from mmrec.pipeline.rung import train_rung
params = load_params("params.yaml")
start = time.perf_counter()
m = train_rung(params, "tiny")
print(json.dumps({{"seconds": time.perf_counter() - start, "steps": m["steps"]}}))
"""


def workdir(base: Path, name: str, steps: int, threads: int, system_metrics: bool) -> Path:
    """A root holding links to the pipeline's tokens and tokenizer and a params.yaml for one training."""
    import yaml

    root = base / name
    (root / "data").mkdir(parents=True)
    (root / "models").mkdir()
    os.symlink(ROOT / "data/tokens", root / "data/tokens")
    os.symlink(ROOT / "models/tokenizer", root / "models/tokenizer")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"] |= {"max_steps": steps, "eval_every": steps, "threads": threads}
    params["mlflow"] |= {"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_root": str(root / "mlruns"),
                         "system_metrics": system_metrics}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def together(base: Path, tag: str, n: int, steps: int, threads: int, system_metrics: bool = True) -> dict:
    """Start n trainings at once; wall time until the last one ends, and each one's train_rung seconds."""
    roots = [workdir(base, f"{tag}{i}", steps, threads, system_metrics) for i in range(n)]
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT))], cwd=r, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for r in roots]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = time.perf_counter() - start
    for r in roots:
        shutil.rmtree(r)
    return {"wall": wall, "train_s": [o["seconds"] for o in outs]}


def sample_cost(repeats: int = 20) -> float:
    """Seconds one system-metrics sample takes (collect CPU, memory, disk, network, GPU; log one batch)."""
    from mlflow import MlflowClient
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    with tempfile.TemporaryDirectory() as d:
        uri = f"sqlite:///{d}/m.db"
        c = MlflowClient(uri)
        run_id = c.create_run(c.create_experiment("x")).info.run_id
        mon = SystemMetricsMonitor(run_id, tracking_uri=uri)
        mon.collect_metrics()  # warm up (psutil's first cpu_percent)
        start = time.perf_counter()
        for _ in range(repeats):
            mon.collect_metrics()
            mon.publish_metrics(mon.aggregate_metrics())
            mon.mlflow_logger.flush()
        return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--greedy-steps", type=int, default=10, help="steps of the greedy pair (it is slow)")
    ap.add_argument("--repeats", type=int, default=3, help="alone and shared alternate; the fastest of each counts")
    args = ap.parse_args()
    if not (ROOT / "data/tokens/header.json").exists():
        sys.exit("data/tokens is missing -- run `dvc repro tokenizer` first")
    from mmrec.cpus import usable_cpus

    cores = usable_cpus()
    print(f"{cores} cores, tiny rung, {args.steps} steps a training, best of {args.repeats}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        alones, pairs = [], []
        for i in range(args.repeats):  # interleaved, so a burst of outside load hits both ways alike
            alones.append(together(base, f"alone{i}-", 1, args.steps, 0))
            pairs.append(together(base, f"shared{i}-", 2, args.steps, 0))
            print(f"  round {i}: alone {alones[-1]['wall']:.1f} s, pair {pairs[-1]['wall']:.1f} s", flush=True)
        # the fastest round of each: the one least disturbed by whatever else the machine runs
        alone, shared = (min(runs, key=lambda r: r["wall"]) for runs in (alones, pairs))
        greedy_alone = together(base, "galone", 1, args.greedy_steps, cores)
        greedy = together(base, "greedy", 2, args.greedy_steps, cores)
        off = together(base, "off", 1, args.steps, 0, system_metrics=False)
        on = together(base, "on", 1, args.steps, 0, system_metrics=True)
    step_s = on["train_s"][0] / args.steps
    cost = sample_cost()
    print("| way | trainings | steps | wall s | each train_rung s | wall vs one alone |\n|---|---:|---:|---:|---:|---:|")
    for name, n, steps, r, ref in [("alone, threads 0", 1, args.steps, alone, alone),
                                   ("together, threads 0 (shared)", 2, args.steps, shared, alone),
                                   ("alone, every core", 1, args.greedy_steps, greedy_alone, greedy_alone),
                                   ("together, every core each", 2, args.greedy_steps, greedy, greedy_alone)]:
        each = " / ".join(f"{t:.1f}" for t in r["train_s"])
        print(f"| {name} | {n} | {steps} | {r['wall']:.1f} | {each} | {r['wall'] / ref['wall']:.2f} |")
    print(f"\nsystem metrics: train_rung {off['train_s'][0]:.1f} s off, {on['train_s'][0]:.1f} s on "
          f"({100 * (on['train_s'][0] / off['train_s'][0] - 1):+.1f} %, noise included); one sample costs "
          f"{1000 * cost:.1f} ms every 10 s = {100 * cost / 10:.3f} % of the training time "
          f"(a step takes {step_s:.2f} s)")


if __name__ == "__main__":
    main()
