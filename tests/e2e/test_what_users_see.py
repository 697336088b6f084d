"""What a user looks at, checked on a real pipeline: the MLflow runs table over HTTP (names, nesting, datasets,
source, system metrics), `dvc exp show`'s width, `dvc metrics diff` after a rerun, `dvc plots show` offline."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import commit, dvc, kill_tree, run, start_server

SHOW_WIDTH = 160  # the terminal `dvc exp show` must fit its headline into


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
