import os

from mlflow import MlflowClient

from mmrec import track
from mmrec.config import MlflowParams


def test_relative_store_resolves_against_dvc_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setattr(track, "USER_TRACKING_URI", None)
    assert track.tracking_uri(MlflowParams()) == f"sqlite:///{tmp_path}/mlflow.db"
    assert track.artifact_location(MlflowParams()) == (tmp_path / "mlruns").as_uri()
    monkeypatch.setattr(track, "USER_TRACKING_URI", "http://mlflow.example:5000")
    assert track.tracking_uri(MlflowParams()) == "http://mlflow.example:5000"


def test_the_fluent_store_leaves_no_variable_behind(tmp_path):
    assert "MLFLOW_TRACKING_URI" not in os.environ
    with track.fluent_store(f"sqlite:///{tmp_path}/a.db"):
        assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/a.db"
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ


def test_metrics_are_batched_until_flush(tmp_path):
    params = MlflowParams(tracking_uri=f"sqlite:///{tmp_path}/m.db", artifact_root=str(tmp_path / "mlruns"))
    run = track.Run.start(params, "r", {"rung": "tiny"})
    client = MlflowClient(track.tracking_uri(params))
    run.log(1, loss=2.0, lr=0.1)
    assert client.get_metric_history(run.id, "loss") == []
    run.flush()
    assert [(m.step, m.value) for m in client.get_metric_history(run.id, "loss")] == [(1, 2.0)]
    run.end()
    assert client.get_run(run.id).info.status == "FINISHED"
    assert client.get_run(run.id).data.tags["rung"] == "tiny"
