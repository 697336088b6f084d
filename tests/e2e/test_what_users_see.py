"""What a user looks at, checked on a real pipeline: the MLflow runs table over HTTP (names, nesting, datasets,
source, system metrics), `dvc exp show`'s width, `dvc metrics diff` after a rerun, `dvc plots show` offline."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, dvc, kill_tree, run, start_server

SHOW_WIDTH = 160  # the terminal `dvc exp show` must fit its headline into


def commit(root: Path, message: str) -> None:
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message], root)


class Server:
    """`mlflow server` on 127.0.0.1 over the project's store: what `mlflow ui` serves the browser."""

    def __init__(self, root: Path):
        self.proc, self.url = start_server(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--host", "127.0.0.1", "--port", "0", "--workers", "1"], root.parent / "mlflow-server.log", cwd=root)

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"{self.url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=30).read())

    def get(self, path: str) -> dict:
        return json.loads(urllib.request.urlopen(f"{self.url}/api/2.0/mlflow/{path}", timeout=30).read())

    def close(self) -> None:
        kill_tree(self.proc.pid)  # mlflow and the uvicorn it started
        self.proc.wait(timeout=30)


def as_dict(entries: list[dict]) -> dict:
    return {e["key"]: e["value"] for e in entries}


def exp_show_header(root: Path) -> str:
    """The header row of `dvc exp show` as the pager gets it (full width; `less -S` cuts it at the terminal)."""
    out = subprocess.run(["dvc", "exp", "show", "--no-pager"], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "5000"}, check=True).stdout
    return next(line for line in out.splitlines() if "Experiment" in line)


def test_runs_views_and_plots_after_a_pipeline_and_an_experiment(project, monkeypatch, tmp_path):
    root, set_params = project
    set_params(ladder={"tiny": {"width": 32, "layers": 1, "memories": 2, "after": "data/tokens"},
                       "mini": {"width": 64, "layers": 2, "memories": 2, "after": "models/tiny/handoff.json",
                                "max_steps": 20}},
               promote={"on_reject": "continue"})  # the names and views are under test here, not the gate
    commit(root, "tiny ladder")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # tiny runs last seconds
    dvc(root, "repro")
    commit(root, "baseline")
    branch = run(["git", "rev-parse", "--abbrev-ref", "HEAD"], root).stdout.strip()

    # a forced rerun of a rung changes no DVC metric: wall-clock figures are not metrics
    dvc(root, "repro", "-f", "-s", "train@tiny")
    dvc(root, "repro", "-f", "-s", "evaluate@tiny")
    assert json.loads(dvc(root, "metrics", "diff", "--json").stdout or "{}") == {}

    dvc(root, "exp", "run", "-S", "ladder.mini.max_steps=30", "-n", "longer")  # tiny is unchanged: only mini runs

    # dvc exp show: the headline of both rungs right after the experiment name, within 160 columns
    header = exp_show_header(root)
    for rung in ["tiny", "mini"]:
        for key in ["bpb", "val_loss", "params"]:
            col = f"{rung}.{key}"
            assert col in header and header.index(col) + len(col) <= SHOW_WIDTH, header[:300]
    summary = json.loads((root / "metrics/summary/mini.json").read_text())["mini"]
    assert summary["params"] > 0 and 0 < summary["bpb"] < 10

    # dvc plots show: the loss curves as images the HTML embeds (no network needed), titled vega plots beside
    out = tmp_path / "plots"
    shown = dvc(root, "plots", "show", "-o", str(out))
    assert "failed to load" not in shown.stdout + shown.stderr  # nothing in the plot folders but plots
    assert not (root / "metrics/plots/.gitignore").exists()  # the root .gitignore covers them: DVC adds none
    html = (out / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+\.png)"', html)
    assert {Path(i).name.split("_")[-1] for i in images} >= {"tiny.png", "mini.png"}, images
    assert all((out / i).stat().st_size > 5000 for i in images)
    assert "Train loss at every step" in html and "val loss (nats / token)" in html
    train_rows = (root / "metrics/curves/train/tiny.csv").read_text().splitlines()
    assert len(train_rows) == 1 + 40  # every step of the tiny budget

    server = Server(root)
    try:
        [exp] = [e for e in server.get("experiments/search?max_results=10")["experiments"] if e["name"] == "mmrec"]
        runs = server.post("runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
        check_runs(runs, root, branch)
    finally:
        server.close()


def check_runs(runs: list[dict], root: Path, branch: str) -> None:
    tags = {r["info"]["run_id"]: as_dict(r["data"].get("tags", [])) for r in runs}
    names = {r["info"]["run_id"]: r["info"]["run_name"] for r in runs}
    parents = {rid for rid, t in tags.items() if t.get("kind") == "pipeline"}
    rungs = {rid for rid, t in tags.items() if t.get("kind") == "rung"}
    # repro, the forced tiny rerun, the experiment: three pipeline executions, four rung runs
    assert len(parents) == 3 and len(rungs) == 4 and len(runs) == 7
    assert len(set(names.values())) == len(runs), sorted(names.values())  # every name tells its run apart
    assert all(tags[r]["mlflow.parentRunId"] in parents for r in rungs)
    by_parent = {p: sorted(names[r] for r in rungs if tags[r]["mlflow.parentRunId"] == p) for p in parents}
    assert sorted(by_parent.values()) == sorted([[f"mini · {branch}", f"tiny · {branch}"], [f"tiny · {branch} #2"],
                                                  ["mini · max_steps=30 · longer"]])
    assert sorted(names[p] for p in parents) == sorted(
        [f"pipeline · {branch}", f"pipeline · {branch} #2", "pipeline · max_steps=30 · longer"])

    sha = {s: hashlib.sha256((root / f"data/tokens/{s}.bin").read_bytes()).hexdigest() for s in ["train", "val", "test"]}
    metrics = {r["info"]["run_id"]: {m["key"]: m["value"] for m in r["data"].get("metrics", [])} for r in runs}
    for r in runs:
        rid, t = r["info"]["run_id"], tags[r["info"]["run_id"]]
        assert t["mlflow.source.name"] == "stages/train.py" and t["mlflow.user"]
        assert re.fullmatch("[0-9a-f]{40}", t["mlflow.source.git.commit"])
        inputs = {d["dataset"]["name"]: d for d in r.get("inputs", {}).get("dataset_inputs", [])}
        assert set(inputs) == {"corpus-train", "corpus-val", "corpus-test"}, names[rid]
        for split, d in inputs.items():
            split = split.removeprefix("corpus-")
            assert d["dataset"]["digest"] == sha[split][:32]
            assert json.loads(d["dataset"]["profile"])["sha256"] == sha[split]
            assert json.loads(d["dataset"]["source"])["uri"].endswith("corpus.txt")
        if rid in rungs:
            assert "system/cpu_utilization_percentage" in metrics[rid], names[rid]
            assert {"loss/train", "loss/val", "opt/lr", "test/bpb"} <= set(metrics[rid])

    # each parent carries its headline: best test bits per byte of its rungs and the champion
    for p in parents:
        kids = [r for r in rungs if tags[r]["mlflow.parentRunId"] == p]
        assert metrics[p]["summary/best_test_bpb"] == pytest.approx(min(metrics[k]["test/bpb_context"] for k in kids))
        promoted = [k for k in kids if tags[k].get("promote.champion") == "True"]
        if promoted:  # the last version of this execution that moved `champion`
            champ = max(promoted, key=lambda k: int(tags[k]["promote.model_version"]))
            assert tags[p]["champion_rung"] == tags[champ]["rung"]
            assert tags[p]["champion_version"] == tags[champ]["promote.model_version"]
        else:  # champion did not move (no promotion, or not better than the champion)
            assert "champion_rung" not in tags[p]
    statuses = {r["info"]["status"] for r in runs}
    assert statuses == {"FINISHED"}


def readme_block(name: str) -> str:
    """The bash block between <!-- name:start --> and <!-- name:end --> in README.md."""
    text = (REPO / "README.md").read_text()
    block = text.split(f"<!-- {name}:start -->")[1].split(f"<!-- {name}:end -->")[0]
    return block.strip().removeprefix("```bash").removesuffix("```").strip()


def stop_stray_workers(root: Path) -> None:
    """DVC's queue workers can outlive `dvc exp run --run-all`: when two finish at once, one may miss the
    shutdown and sleep on with the queue empty (seen once in CI, dvc 3.67.1). Stop whatever still runs in root."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(root):
                os.kill(int(proc.name), signal.SIGTERM)
        except OSError:  # gone meanwhile, or not ours to read
            continue


def test_the_readme_daily_loop_does_what_it_says_when_pasted_in_order(project, tmp_path):
    root, set_params = project
    set_params(ladder={"tiny": {"width": 32, "layers": 1, "memories": 2, "after": "data/tokens"}},
               train={"max_steps": 30, "eval_every": 10},  # one rung, small budgets: the block is under test,
               promote={"on_reject": "continue"})          # not whether lr 1e-3 learns enough in 30 steps
    dvc(root, "repro")
    commit(root, "baseline")  # a fresh clone after the quick start
    params_before = (root / "params.yaml").read_text()

    script = tmp_path / "daily.sh"
    script.write_text("set -euo pipefail\n" + readme_block("daily-loop") + "\n")
    # Output to files, not pipes: a queue worker left behind (below) would hold a pipe open and hang the test.
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        code = subprocess.run(["bash", str(script)], cwd=root, stdout=out, stderr=err, timeout=1200).returncode
    stop_stray_workers(root)
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert code == 0, stdout[-3000:] + stderr[-3000:]

    assert (root / "params.yaml").read_text() == params_before  # --temp left the workspace's params alone
    assert "train.lr" not in dvc(root, "params", "diff").stdout
    shown = json.loads(dvc(root, "exp", "show", "--json").stdout)
    exps = {e["name"]: e for rev in shown for e in (rev.get("experiments") or [])}
    assert set(exps) == {"lr-1e-3", "gpt", "lr-3e-3-1", "lr-3e-3-2", "lr-3e-3-3", "base-1", "base-2"}
    for name, lr, arch, seed in [("lr-1e-3", 0.001, "mmrec", 1337), ("gpt", 0.01, "gpt", 1337),
                                 ("lr-3e-3-1", 0.003, "mmrec", 1337), ("lr-3e-3-3", 0.003, "mmrec", 1339),
                                 ("base-2", 0.01, "mmrec", 1339)]:
        [rev] = exps[name]["revs"]
        data = rev["data"]
        assert float(data["params"]["params.yaml"]["data"]["train"]["lr"]) == lr  # each from the committed params
        assert data["params"]["params.yaml"]["data"]["model"]["arch"] == arch
        assert data["params"]["params.yaml"]["data"]["seed"] == seed  # a seed sweep: one experiment a seed
        assert data["metrics"]["metrics/summary/tiny.json"]["data"]["tiny"]["bpb"] > 0
    assert "lr-3e-3-2" in stdout and "gpt" in stdout  # the compare table lists the runs
    # then one row per config: lr 3e-3 and the committed params over three seeds each, the gain of the first
    # over the second with an interval (seeds and documents) and the documents' alone
    configs = stdout.split("by config:")[1].splitlines()
    lr_row = next(line for line in configs if " lr=0.003 " in line).split()
    assert lr_row[3:5] == ["3", "1337-1339"] and lr_row[-2].startswith("[") and lr_row[-1].startswith("[")
    assert any(line.split()[3:5] == ["3", "1337-1339"] and " ref " in f"{line} " for line in configs)
    assert (root / "val_loss.png").stat().st_size > 1000
    assert "['In the beginning" in stdout  # the champion wrote text
