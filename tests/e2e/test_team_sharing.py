"""Past one machine: results shared through a DVC remote (a local folder, a real remote type) and one `mlflow
server` on 127.0.0.1, the way docs/gpus.md tells a team to share them. Clone A trains once (module fixture);
a fresh clone B gets A's results without training; queued experiments in A land on the same server."""
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import dvc, make_project, run, synthetic_documents
from tests.e2e.test_experiments import commit, run_queue
from tests.e2e.test_bad_input_and_kills import ONE_RUNG, outputs, ran
from tests.e2e.test_tracking_server import Server

STAGES = ["validate", "download", "tokenizer", "train@tiny", "evaluate@tiny", "promote@tiny"]


@dataclass
class Team:
    server: Server
    a: Path  # the clone that trained
    home: Path


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """Clone A, set up to share (a DVC remote and the tracking server, both committed), trains the tiny rung,
    commits dvc.lock as a DVC user does after a run, and pushes its outputs and run history."""
    home = tmp_path_factory.mktemp("team")
    server = Server(home / "server")
    server.home.mkdir()
    starting = threading.Thread(target=server.start)  # it takes a while: the data stages run meanwhile
    starting.start()
    corpus = home / "corpus.txt"
    corpus.write_text("\n\n".join(synthetic_documents()) + "\n")
    a = home / "a"
    set_params = make_project(a, corpus)
    set_params(**ONE_RUNG)
    dvc(a, "repro", "tokenizer")
    starting.join()
    assert server.uri, (server.home / "server.log").read_text()[-3000:]
    set_params(**ONE_RUNG, mlflow={"tracking_uri": server.uri})
    dvc(a, "remote", "add", "--default", "shared", str(home / "dvc-remote"))
    commit(a, "share: the team's DVC remote and MLflow server")
    dvc(a, "repro")
    commit(a, "train the tiny rung")
    dvc(a, "push", "--run-cache")
    yield Team(server, a, home)
    server.stop()


def tracked(root: Path) -> dict[str, bytes]:
    """The outputs DVC tracks (data/raw, the download's local cache, is not one)."""
    return {k: v for k, v in outputs(root).items() if not k.startswith("data/raw/")}


def rung_runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("mmrec")
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_a_fresh_clone_gets_the_results_without_training(team):
    a, b = team.a, team.home / "b"
    client = MlflowClient(team.server.uri)
    before = {r.info.run_id for r in rung_runs(client)}
    run(["git", "clone", "-q", str(a), str(b)], team.home)
    dvc(b, "pull", "--run-cache")
    out = dvc(b, "repro").stdout
    assert set(ran(out)) <= {"validate"}, out  # it may check params (restored from the run-cache); nothing trains
    assert [f"Stage '{s}' didn't change, skipping" in out for s in STAGES[1:]] == [True] * (len(STAGES) - 1), out
    assert outputs(b) == tracked(a)  # every file a stage wrote, byte for byte
    assert sorted(p.name for p in (b / ".dvc/cache/runs").rglob("*") if p.is_file()) == \
        sorted(p.name for p in (a / ".dvc/cache/runs").rglob("*") if p.is_file())  # A's run history came too

    metrics = json.loads(dvc(b, "metrics", "show", "--json").stdout)
    assert metrics == json.loads(dvc(a, "metrics", "show", "--json").stdout)
    summary = json.loads((a / "metrics/summary/tiny.json").read_text())
    shown = json.loads(dvc(b, "exp", "show", "--json").stdout)
    [head] = [row for row in shown if row["rev"] != "workspace"]
    assert head["data"]["metrics"]["metrics/summary/tiny.json"]["data"] == summary

    # the MLflow records that B's outputs point at are A's runs on the shared server; B made none
    record = json.loads((b / "models/tiny/run.json").read_text())
    assert record["tracking_uri"] == team.server.uri
    r = client.get_run(record["run_id"])
    assert r.data.tags["workspace"] == str(a.resolve()) and r.info.status == "FINISHED"
    assert r.data.metrics["test/bpb_context"] == pytest.approx(summary["tiny"]["bpb"], abs=1e-5)
    assert {x.info.run_id for x in rung_runs(client)} == before
    [version] = client.search_model_versions("name = 'mmrec' and run_id = '" + record["run_id"] + "'")
    assert version.run_id == record["run_id"]


def test_queued_experiments_on_the_shared_server_keep_one_parent_each(team):
    a = team.a
    names = ["lr-low", "lr-high", "seed-7"]
    for name, change in zip(names, ["train.lr=0.005", "train.lr=0.02", "seed=7"]):
        dvc(a, "exp", "run", "--queue", "-S", change, "-n", name)
    status = run_queue(a, jobs=2)
    assert status.count("Success") == 3, status + dvc(a, "queue", "logs", names[0]).stdout

    client = MlflowClient(team.server.uri)
    runs = rung_runs(client)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    queued = [r for r in runs if r.data.tags.get("dvc_exp_name") in names]
    parents = {r.data.tags["dvc_exp_name"]: r for r in queued if r.data.tags.get("kind") == "pipeline"}
    rungs = [r for r in queued if r.data.tags.get("kind") == "rung"]
    assert sorted(r.data.tags["dvc_exp_name"] for r in queued if r.data.tags.get("kind") == "pipeline") == \
        sorted(names)  # one pipeline parent per experiment, no more
    assert sorted(r.data.tags["dvc_exp_name"] for r in rungs) == sorted(names)
    for r in rungs:
        parent = parents[r.data.tags["dvc_exp_name"]]
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status == parent.info.status == "FINISHED"
        assert r.data.tags["promote.decision"] == "promoted"

    versions = client.search_model_versions("name = 'mmrec'")
    assert len({v.version for v in versions}) == len(versions) == 1 + len(names)  # A's baseline and each experiment
    assert len({v.run_id for v in versions}) == len(versions)  # no run registered twice
    assert {r.info.run_id for r in rungs} < {v.run_id for v in versions}
