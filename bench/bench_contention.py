"""The real train stage beside other work: tokens/s alone and beside 1 and 2 busy processes, two thread policies.

    python bench/bench_contention.py --steps 40
    python bench/bench_contention.py --steps 40 --evaluate     # evaluate@tiny after each training, too
    taskset -c 0,1 python bench/bench_contention.py           # as on a 2-core machine

A throwaway copy of the repository (git + DVC, the default corpus, the tiny rung only, its own MLflow store
with system metrics on) runs `dvc repro -f -s train@tiny` under each condition; the figure is the stage's
own median tokens/s (metrics/speed/tiny.json). A busy process is `while True: pass` in Python, one core's
worth of someone else's work, started before the stage and killed after it. The policies:

  fixed   train.threads = every usable CPU: what `threads: 0` did for a training alone before it measured
          outside load (mmrec/training/cores.py)
  follow  train.threads = 0: its share, less the cores other work keeps busy, looked at every few seconds

Conditions run in rounds (busy 0, 1, 2; each policy in turn), so that a change in the machine's own load
hits both policies alike; each figure is the median over --repeats rounds. Never run by the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mmrec.cpus import usable_cpus  # noqa: E402

COPIED = ["mmrec", "stages", "dvc.yaml", "params.yaml", ".gitignore", ".dvc/config", ".dvc/.gitignore",
          "attempts/.gitignore"]
BUSY = "while True: pass"


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def project(base: Path, steps: int) -> Path:
    """A git + DVC copy of the repository that trains the tiny rung for `steps` steps, tokens made."""
    root = base / "repo"
    root.mkdir()
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ladder"] = {"tiny": params["ladder"]["tiny"] | {"max_steps": steps}}
    params["train"] |= {"eval_every": steps, "log_every": 5}  # the thread count is looked at each log flush
    params["mlflow"]["system_metrics"] = True
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=bench@mmrec.invalid", "-c", "user.name=bench"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "bench"]):
        run(git + cmd, root)
    run(["dvc", "repro", "tokenizer"], root)
    return root


def set_threads(root: Path, threads: int) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["train"]["threads"] = threads
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def measure(root: Path, busy: int, evaluate: bool) -> dict[str, float]:
    """Run the stage beside `busy` busy processes; its median training tokens/s (and evaluate's)."""
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        run(["dvc", "repro", "-f", "-s", "train@tiny"], root)
        out = {"train": json.loads((root / "metrics/speed/tiny.json").read_text())["tokens_per_s"]}
        if evaluate:
            run(["dvc", "repro", "-f", "-s", "evaluate@tiny"], root)
            out["evaluate"] = json.loads((root / "metrics/speed/eval/tiny.json").read_text())["tokens_per_s"]
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="training steps a run (log and thread look every 5)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds; each figure is the median over them")
    ap.add_argument("--busy", default="0,1,2", help="numbers of busy processes beside the stage")
    ap.add_argument("--evaluate", action="store_true", help="also run evaluate@tiny after each training")
    args = ap.parse_args()
    cpus = usable_cpus()
    busy_counts = [int(b) for b in args.busy.split(",")]
    policies = {"fixed": cpus, "follow": 0}
    print(f"{cpus} usable CPUs, load average {os.getloadavg()[0]:.1f} at the start; tiny rung, "
          f"{args.steps} steps a run, median of {args.repeats}", flush=True)
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = project(Path(tmp), args.steps)
        for r in range(args.repeats):
            for busy in busy_counts:
                for policy, threads in policies.items():
                    set_threads(root, threads)
                    got = measure(root, busy, args.evaluate)
                    results.setdefault((policy, busy), []).append(got)
                    print(f"  round {r + 1}: {policy:6s} beside {busy} busy: {got}, load average "
                          f"{os.getloadavg()[0]:.1f}", flush=True)
    keys = ["train", "evaluate"] if args.evaluate else ["train"]
    print("\n| policy | busy processes | train tokens/s | vs alone |" + (" evaluate tokens/s |" if args.evaluate else ""))
    print("|---|---:|---:|---:|" + ("---:|" if args.evaluate else ""))
    for policy in policies:
        alone = statistics.median(x["train"] for x in results.get((policy, 0), [{"train": float("nan")}]))
        for busy in busy_counts:
            med = {k: statistics.median(x[k] for x in results[(policy, busy)]) for k in keys}
            row = f"| {policy} | {busy} | {med['train']:,.0f} | {med['train'] / alone:.2f} |"
            print(row + (f" {med['evaluate']:,.0f} |" if args.evaluate else ""))


if __name__ == "__main__":
    main()
