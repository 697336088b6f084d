"""Reading runs back from the store, for `python -m mmrec.tracking.compare`: experiments, runs as a table, metric
histories and JSON artifacts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# store.py first: it sets MLflow's environment (telemetry off, short HTTP retries) before mlflow is imported
from mmrec.tracking.store import fluent_store  # noqa: I001

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402  (mlflow loads it anyway)
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402


def experiment_names(uri: str) -> list[str]:
    return sorted(e.name for e in MlflowClient(uri).search_experiments())


def runs_frame(uri: str, experiment: str) -> pd.DataFrame | None:
    """Every active run of `experiment`, one row each, as mlflow.search_runs lays it out (run_id, status, start_time,
    params.<dotted key>, metrics.<key> at its latest step, tags.<key>); None when the store has no such experiment."""
    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    if exp is None:
        return None
    with fluent_store(uri):  # search_runs pages through the global store
        return mlflow.search_runs([exp.experiment_id])


def json_artifact(artifact_uri: str, tracking_uri: str) -> Any | None:
    """An artifact that holds JSON ('runs:/<run id>/<path>', or a logged model's location + path), read; None when
    it is missing or damaged (the callers treat those alike: figures without per-document scores)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tmp, tracking_uri=tracking_uri)
            return json.loads(Path(local).read_text())
        except (MlflowException, OSError, ValueError):
            return None


def metric_histories(uri: str, run_ids: list[str], key: str) -> dict[str, list[tuple[int, float]]]:
    """Run id -> (step, value) of metric `key`, in step order."""
    c = MlflowClient(uri)
    return {rid: [(m.step, m.value) for m in sorted(c.get_metric_history(rid, key), key=lambda m: (m.step, m.timestamp))]
            for rid in run_ids}
