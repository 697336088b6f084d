"""The pipeline against a shared tracking server: a real `mlflow server` on 127.0.0.1 (sqlite backend,
served artifacts), as several machines or many queued runs would use it; one that goes away mid-run."""
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import ONE_RUNG, kill_tree, run, start_server
from tests.e2e.test_bad_input_and_kills import wait_for


class Server:
    """`mlflow server` in a process of its own; stop() and start() again keep its store (the port is the one
    the kernel gives it at each start: `uri` says which)."""

    def __init__(self, home: Path):
        self.home, self.proc, self.uri = home, None, ""

    def start(self) -> None:
        self.proc, self.uri = start_server(
            ["mlflow", "server", "--backend-store-uri", f"sqlite:///{self.home}/server.db",
             "--artifacts-destination", str(self.home / "artifacts"), "--host", "127.0.0.1",
             "--port", "0", "--workers", "1"],
            self.home / "server.log", env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        with urllib.request.urlopen(f"{self.uri}/health", timeout=10) as r:
            assert r.status == 200

    def stop(self) -> None:
        kill_tree(self.proc.pid)
        self.proc.wait()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "server")
    s.home.mkdir()
    s.start()
    yield s
    if s.proc.poll() is None:
        s.stop()


def test_the_pipeline_runs_unchanged_against_a_tracking_server_that_goes_away(project, server):
    root, set_params = project
    set_params(**ONE_RUNG, train={"max_steps": 2000, "eval_every": 20})
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
    run(["dvc", "repro", "tokenizer"], root)

    proc = subprocess.Popen(["dvc", "repro"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert wait_for(lambda: (root / "checkpoints/tiny/last.pt").exists(), proc, timeout=240)
    server.stop()
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0 and "Traceback" not in err
    [line] = [l for l in err.splitlines() if l.startswith("error:")]
    assert f"MLflow store {server.uri}: unreachable" in line and "rerun `dvc repro`" in line

    server.start()  # back again (on another port): the rerun resumes the same run and completes the ladder
    out = run(["dvc", "repro"], root, env=env | {"MLFLOW_TRACKING_URI": server.uri})
    assert "resuming from step" in out.stdout + out.stderr
    assert not (root / "mlflow.db").exists(), "a run went to the local store instead of the server"

    client = MlflowClient(server.uri)
    [r] = [r for r in client.search_runs([client.get_experiment_by_name("mmrec").experiment_id])
           if r.data.tags.get("kind") == "rung"]
    assert r.info.status == "FINISHED" and any("bpb" in key for key in r.data.metrics)
    for key in r.data.metrics:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} was logged twice at some step"
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert "checkpoint" in artifacts  # stored through the server, not in a local folder
    assert not (root / "mlruns").exists()
    versions = client.search_model_versions("name = 'mmrec'")
    assert len(versions) == 1 and versions[0].run_id == r.info.run_id
