import json
import os
import socket
import subprocess
import sys
import threading

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mmrec.tracking import pipeline_run, store, location as store_location, run as track
from mmrec.config import MlflowParams
from tests.conftest import REPO


def test_relative_store_resolves_against_dvc_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setattr(store_location, "USER_TRACKING_URI", None)
    assert store.tracking_uri(MlflowParams()) == f"sqlite:///{tmp_path}/mlflow.db"
    assert store.artifact_location(MlflowParams()) == (tmp_path / "mlruns").as_uri()
    monkeypatch.setattr(store_location, "USER_TRACKING_URI", "http://mlflow.example:5000")
    assert store.tracking_uri(MlflowParams()) == "http://mlflow.example:5000"


def test_the_fluent_store_leaves_no_variable_behind(tmp_path):
    assert "MLFLOW_TRACKING_URI" not in os.environ
    with store.fluent_store(f"sqlite:///{tmp_path}/a.db"):
        assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/a.db"
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ


def test_metrics_are_batched_until_flush(tmp_path):
    params = MlflowParams(tracking_uri=f"sqlite:///{tmp_path}/m.db", artifact_root=str(tmp_path / "mlruns"))
    run = track.Run.start(params, "r", {"rung": "tiny"})
    client = MlflowClient(store.tracking_uri(params))
    run.log(1, loss=2.0, lr=0.1)
    assert client.get_metric_history(run.id, "loss") == []
    run.flush()
    assert [(m.step, m.value) for m in client.get_metric_history(run.id, "loss")] == [(1, 2.0)]
    run.end()
    assert client.get_run(run.id).info.status == "FINISHED"
    assert client.get_run(run.id).data.tags["rung"] == "tiny"


def git_repo_with_params(root, monkeypatch, params: dict) -> None:
    """`root` as a repository whose committed params.yaml is `params`; the process works in it."""
    import subprocess

    import yaml

    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for cmd in (["init", "-q", "-b", "main"], ["add", "params.yaml"],
                ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "params"]):
        subprocess.run(["git", *cmd], cwd=root, check=True, capture_output=True)
    monkeypatch.chdir(root)
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)


def test_run_names_say_what_changed_and_reruns_get_a_number(workdir, monkeypatch):
    import yaml

    from tests.conftest import tiny_params

    params = tiny_params(workdir, mlflow={"system_metrics": False})
    git_repo_with_params(workdir, monkeypatch, {"train": {"lr": 0.003, "seq_len": 32}, "model": {"arch": "mmrec"}})
    first = pipeline_run.start_rung_run(params, "tiny", {"rung": "tiny"}, workdir)
    first.end()
    again = pipeline_run.start_rung_run(params, "tiny", {"rung": "tiny"}, workdir)  # same execution: same parent
    again.end()
    (workdir / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.001, "seq_len": 32},
                                                        "model": {"arch": "gpt"}}))
    monkeypatch.setenv("DVC_EXP_NAME", "lr-1e-3")  # another experiment: another parent
    exp = pipeline_run.start_rung_run(params, "tiny", {"rung": "tiny"}, workdir)
    exp.end()

    c = MlflowClient(store.tracking_uri(params.mlflow))
    runs = {r: c.get_run(r) for r in (first.id, again.id, exp.id)}
    assert [runs[r].info.run_name for r in (first.id, again.id, exp.id)] == [
        "tiny · main", "tiny · main #2", "tiny · arch=gpt, lr=0.001 · lr-1e-3"]  # params.yaml order
    assert first.parent_id == again.parent_id != exp.parent_id
    parent = c.get_run(first.parent_id)
    assert parent.info.run_name == "pipeline · main" and parent.info.status == "FINISHED"
    assert c.get_run(exp.parent_id).info.run_name == "pipeline · arch=gpt, lr=0.001 · lr-1e-3"
    for r in runs.values():
        assert r.data.tags["mlflow.parentRunId"] in (first.parent_id, exp.parent_id)
        assert r.data.tags["mlflow.user"] and r.data.tags["mlflow.source.git.commit"] != "unknown"
        assert not any(k.startswith("system/") for k in r.data.metrics)  # mlflow.system_metrics: false


def test_runs_of_one_config_over_seeds_carry_one_config_tag_and_another_config_another(workdir, monkeypatch):
    import yaml

    from tests.conftest import tiny_params

    committed = {"seed": 1337, "train": {"lr": 0.003}}
    git_repo_with_params(workdir, monkeypatch, committed)
    runs = {}
    for name, edit in [("base", {}), ("seed", {"seed": 1338}), ("threads", {"seed": 1339, "train": {"lr": 0.003, "threads": 1}}),
                       ("lr", {"seed": 1338, "train": {"lr": 0.001}})]:
        on_disk = committed | edit  # what `dvc exp run -S` writes
        (workdir / "params.yaml").write_text(yaml.safe_dump(on_disk))
        monkeypatch.setenv("DVC_EXP_NAME", name)  # each its own execution, as queued experiments are
        params = tiny_params(workdir, mlflow={"system_metrics": False}, **on_disk)
        run = pipeline_run.start_rung_run(params, "tiny", {"rung": "tiny"}, workdir)
        run.end()
        runs[name] = MlflowClient(store.tracking_uri(params.mlflow)).get_run(run.id).data.tags
    assert runs["base"]["config"] == runs["seed"]["config"] == runs["threads"]["config"] != runs["lr"]["config"]
    assert runs["base"]["config"] == tiny_params(workdir, seed=1337, train={"lr": 0.003}).config_digest("tiny")
    # in words: what the run's name says, less the seed and what cannot change the model
    assert [runs[k]["config_label"] for k in runs] == ["main", "main", "main", "lr=0.001"]


def test_splits_are_dataset_inputs_with_their_content_digest(workdir, monkeypatch):
    import hashlib

    from tests.conftest import tiny_params

    params = tiny_params(workdir)
    git_repo_with_params(workdir, monkeypatch, {})
    run = pipeline_run.start_rung_run(params, "tiny", {"rung": "tiny"}, workdir)
    run.end()
    c = MlflowClient(store.tracking_uri(params.mlflow))
    got = c.get_run(run.id)
    inputs = {d.dataset.name: d for d in got.inputs.dataset_inputs}
    assert set(inputs) == {"kjv-train", "kjv-val", "kjv-test"}  # named after data.source
    for split in ["train", "val", "test"]:
        d = inputs[f"kjv-{split}"]
        sha = hashlib.sha256((workdir / f"data/tokens/{split}.bin").read_bytes()).hexdigest()
        assert d.dataset.digest == sha[:32] and json.loads(d.dataset.profile)["sha256"] == sha
        assert json.loads(d.dataset.profile)["tokens"] > 0
        assert json.loads(d.dataset.source) == {"uri": params.data.source}
    assert {t.value for d in inputs.values() for t in d.tags} == {"training", "validation", "testing"}
    # system metrics are on by default; a run shorter than one sampling interval still gets a sample
    assert "system/cpu_utilization_percentage" in got.data.metrics


def test_the_pipeline_run_names_the_champion_from_its_rungs(tmp_path):
    params = MlflowParams(tracking_uri=f"sqlite:///{tmp_path}/m.db", artifact_root=str(tmp_path / "mlruns"),
                          system_metrics=False)
    c = store.client(params)
    parent = c.create_run(store.experiment_id(c, params), run_name="pipeline").info.run_id
    for rung, bpb, version in [("tiny", 1.5, "1"), ("mini", 1.2, "2")]:
        run = track.Run.start(params, rung, {"rung": rung}, parent_id=parent)
        run.log(10, **{"test/bpb_context": bpb})
        run.set_tags({"promote.decision": "promoted", "promote.model_version": version, "promote.champion": True})
        if rung == "tiny":
            run.end()
            assert c.get_run(parent).info.status == "FINISHED"
            assert c.get_run(parent).data.tags["champion_rung"] == "tiny"
    assert c.get_run(parent).info.status == "RUNNING"  # mini is still running
    run.end()
    got = c.get_run(parent)
    assert got.data.tags["champion_rung"] == "mini" and got.data.tags["champion_version"] == "2"
    assert got.data.metrics["summary/best_test_bpb"] == 1.2 and got.info.status == "FINISHED"


def test_a_server_that_dies_in_the_middle_of_a_reply_reads_as_unreachable(monkeypatch):
    """A tracking server killed while it answers: the headers arrive, the body never does."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    listener = socket.create_server(("127.0.0.1", 0))
    uri = f"http://127.0.0.1:{listener.getsockname()[1]}"

    def answer_and_die() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n")
        conn.close()

    threading.Thread(target=answer_and_die, daemon=True).start()
    with pytest.raises(MlflowException) as caught:
        MlflowClient(uri).log_metric("0" * 32, "loss", 1.0)
    listener.close()
    assert "Connection broken" in str(caught.value)
    line = store.describe(caught.value, uri)
    assert line.startswith(f"MLflow store {uri}: unreachable") and "rerun `dvc repro`" in line


def run_and_die(params: MlflowParams, parent: str, rung: str, *, linger: bool = False) -> subprocess.Popen:
    """A process that opens a rung run under `parent`, then dies without ending it (or, with linger, lives on
    until its stdin closes): the run of a killed stage."""
    code = (f"import os, sys; sys.path.insert(0, {str(REPO)!r})\n"
            "from mmrec.config import MlflowParams; from mmrec.tracking.run import Run\n"
            f"params = MlflowParams(**{params.model_dump()!r})\n"
            f"run = Run.start(params, {rung!r}, {{'rung': {rung!r}}}, parent_id={parent!r})\n"
            "print(run.id, flush=True)\n"
            + ("sys.stdin.read()\n" if linger else "os._exit(0)\n"))
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_a_dead_attempts_run_ends_killed_with_its_pipeline_run_and_a_live_ones_runs_on(tmp_path):
    params = MlflowParams(tracking_uri=f"sqlite:///{tmp_path}/m.db", artifact_root=str(tmp_path / "mlruns"),
                          system_metrics=False)
    c = store.client(params)
    parent = c.create_run(store.experiment_id(c, params), run_name="pipeline", tags={"kind": "pipeline"}).info.run_id
    dead = run_and_die(params, parent, "tiny")
    dead_id = dead.stdout.readline().strip()
    dead.wait()
    other = c.create_run(store.experiment_id(c, params), run_name="pipeline 2", tags={"kind": "pipeline"}).info.run_id
    live = run_and_die(params, other, "tiny", linger=True)  # a queued experiment training beside us
    live_id = live.stdout.readline().strip()
    try:
        assert c.get_run(dead_id).info.status == "RUNNING" and c.get_run(parent).info.status == "RUNNING"
        ended = track.close_abandoned(params, "tiny")
        assert c.get_run(dead_id).info.status == "KILLED"
        assert c.get_run(parent).info.status == "FAILED"  # refreshed: none of its rungs runs any more
        assert c.get_run(live_id).info.status == "RUNNING" and c.get_run(other).info.status == "RUNNING"
        assert ended == ["tiny", "pipeline"]
    finally:
        live.stdin.close()
        live.wait()


def test_the_pipeline_key_survives_a_step_of_the_wall_clock(tmp_path):
    """psutil's create_time() is boot time + start ticks, and Linux derives boot time (/proc/stat btime) from the
    wall clock: an NTP step or a VM resumed from a snapshot moves it by whole seconds between two stages of one
    `dvc repro`. The key must not move with it, nor with the host name."""
    from tests.conftest import tiny_params

    params = tiny_params(tmp_path)
    (tmp_path / "dvc").write_text("import subprocess, sys\nsys.exit(subprocess.call(sys.argv[1:]))\n")  # a dvc process
    stage = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
             "import psutil._pslinux as linux\n"
             "from mmrec.config import parse_params; from mmrec.tracking.pipeline_run import dvc_execution, pipeline_key\n"
             f"params = parse_params({params.model_dump()!r})\n"
             "assert dvc_execution(), 'no dvc process found above the stage'\n"
             "before = pipeline_key(params)\n"
             "boot_time = linux.boot_time\n"
             "linux.boot_time = lambda: boot_time() + 1.0  # the wall clock stepped by a second\n"
             "stepped = pipeline_key(params)\n"
             "import socket; socket.gethostname = lambda: 'renamed'  # a laptop that joined another network\n"
             "print(before, stepped, pipeline_key(params))\n")
    out = subprocess.run([sys.executable, str(tmp_path / "dvc"), sys.executable, "-c", stage], capture_output=True,
                         text=True, check=True, cwd=tmp_path).stdout.split()
    assert len(out) == 3 and out[0] == out[1] == out[2]
