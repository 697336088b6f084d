"""The pipeline against a shared tracking server: a real `mlflow server` on 127.0.0.1 (sqlite backend,
served artifacts), as several machines or many queued runs would use it; one that goes away mid-run; two
promotes at once."""
import json
import multiprocessing
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import ONE_RUNG, kill_tree, run, start_server, tiny_params
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
    set_params(**ONE_RUNG, train={"max_steps": 600, "eval_every": 20})  # still training when the server goes
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


def promote_beside_another(root: Path, uri: str, meetings: list) -> None:
    """promote@tiny of `root` into each registered model of `meetings` in turn, in a process of its own, made to
    overlap another's: both pass `start` as they begin to publish; then the one that is not `first` waits until
    the first reads `champion`, and both meet at `inside` there (after reading it, before moving it), where the
    later one waits a second more so that it writes last. A promote that waits for the registry while the other
    holds it breaks `inside`: they run one after the other, and neither waits for a meeting that cannot come."""
    from mmrec.registry import models
    from mmrec.registry.gate import promote_rung

    try:
        from mmrec.registry import lease
    except ImportError:  # (before the registry had a lease)
        lease = None
    with_checkpoint, holder = models.with_checkpoint, models.holder
    for model, first, start, inside, first_in in meetings:
        met = set()

        def hooked_with_checkpoint(*args):
            out = with_checkpoint(*args)
            if "start" not in met:
                met.add("start")
                start.wait()
                if not first:
                    first_in.wait(timeout=120)
            return out

        def hooked_holder(client, name, alias):
            out = holder(client, name, alias)
            if alias == models.CHAMPION and "inside" not in met:
                met.add("inside")
                if first:
                    first_in.set()
                try:
                    inside.wait()
                except threading.BrokenBarrierError:  # the other waits for the registry: one after the other
                    pass
                if not first:
                    time.sleep(1)
            return out

        models.with_checkpoint, models.holder = hooked_with_checkpoint, hooked_holder
        if lease is not None:
            def announce_wait(*args, _inside=inside, _announce=lease.announce_wait):
                _inside.abort()
                return _announce(*args)
            lease.announce_wait = announce_wait
        promote_rung(tiny_params(root, mlflow={"tracking_uri": uri}, promote={"registered_model": model}), "tiny",
                     root)
        (root / f"{model}.json").write_text((root / "models/tiny/promotion.json").read_text())


def test_two_promotes_at_once_leave_champion_on_the_better_model_in_either_order(server, tokenized, tmp_path):
    from mmrec.registry.gate import promote_rung
    from tests.registry.test_gate import rung_with_checkpoint

    roots = {}
    for who, bpb, seed in [("base", 1.5, 0), ("better", 1.3, 1), ("worse", 1.4, 2)]:
        roots[who] = tmp_path / who
        shutil.copytree(tokenized, roots[who])
        rung_with_checkpoint(roots[who], tiny_params(roots[who], mlflow={"tracking_uri": server.uri}), "tiny", bpb,
                             seed=seed)
    client = MlflowClient(server.uri, server.uri)
    spawn = multiprocessing.get_context("spawn")
    orders = {"better-first": "better", "worse-first": "worse"}  # registered model: whose promote goes first
    meetings = {who: [] for who in ["better", "worse"]}
    for model, first in orders.items():
        params = tiny_params(roots["base"], mlflow={"tracking_uri": server.uri}, promote={"registered_model": model})
        assert promote_rung(params, "tiny", roots["base"]).model_version == "1"
        start, inside, first_in = spawn.Barrier(2, timeout=120), spawn.Barrier(2, timeout=120), spawn.Event()
        for who in meetings:
            meetings[who].append((model, who == first, start, inside, first_in))
    procs = [spawn.Process(target=promote_beside_another, args=(roots[who], server.uri, meetings[who]))
             for who in meetings]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0

    for model, first in orders.items():
        d = {who: json.loads((roots[who] / f"{model}.json").read_text()) for who in meetings}
        v = {who: d[who]["model_version"] for who in meetings}
        tags = {who: client.get_model_version(model, v[who]).tags for who in meetings}
        for alias in ["champion", "tiny"]:
            assert str(client.get_model_version_by_alias(model, alias).version) == v["better"], (model, alias, d)
        if first == "better":  # the worse one then met the better one, and stayed
            assert tags["better"]["champion.previous"] == "1" and "champion.set_by" not in tags["worse"]
            why = d["worse"]["champion_reason"]
            assert why.startswith("stayed: ") and f"on v{v['better']} " in why
        else:  # the worse one took it from v1, the better one from the worse one
            assert tags["worse"]["champion.previous"] == "1" and tags["better"]["champion.previous"] == v["worse"]
            why = d["better"]["champion_reason"]
            assert why.startswith("moved: ") and f"on v{v['worse']} " in why
    assert [m.name for m in client.search_registered_models()] == ["better-first", "worse-first"]  # no lease left
