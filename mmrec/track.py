"""MLflow tracking: runs, their params, metrics and artifacts (registry.py holds the model registry).

One MLflow run per rung. The stage that trains a rung opens it and writes its id to
models/<rung>/run.json; evaluate and promote reopen the same run through that file, so a rung's
whole story (params, curves, test metrics, the gate) sits in one place in `mlflow ui`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # telemetry stays off unless the user turns it on
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stage logs stay readable
logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations on a fresh store are noise

import mlflow  # noqa: E402
from filelock import FileLock  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402

from mmrec.config import MlflowParams  # noqa: E402
from mmrec.errors import UserError  # noqa: E402

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
# The user's choice, read once: mlflow.set_tracking_uri() writes this variable itself, so reading it
# later would return whatever store this process touched last.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def read_run_id(model_dir: Path) -> str:
    """The MLflow run of a rung, as its train stage recorded it in models/<rung>/run.json."""
    path = model_dir / "run.json"
    if not path.exists():
        raise UserError(f"{path} is missing; run `dvc repro train@{model_dir.name}` first")
    return json.loads(path.read_text())["run_id"]


def repo_root() -> Path:
    """The main repository: DVC's queued experiments run in a temporary copy but set DVC_ROOT to it."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(params: MlflowParams) -> str:
    """MLFLOW_TRACKING_URI wins; a relative sqlite path or directory resolves against the main repository."""
    uri = USER_TRACKING_URI or params.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{repo_root() / uri.removeprefix('sqlite:///')}"
    if "://" not in uri:
        return str(repo_root() / uri)
    return uri


def artifact_location(params: MlflowParams) -> str:
    root = params.artifact_root
    return root if "://" in root else (repo_root() / root).as_uri()


def client(params: MlflowParams) -> MlflowClient:
    uri = tracking_uri(params)
    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri, uri)
    # The first client of a new sqlite store creates its tables; two queued experiments doing that at
    # once collide in the schema migration, so opening a store is serialised by a lock file beside it.
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock"):
        return MlflowClient(uri, uri)


@contextlib.contextmanager
def fluent_store(uri: str) -> Iterator[None]:
    """MLflow's fluent API (start_run, log_model, load_model, search_runs) reads one process-wide URI,
    and set_tracking_uri() also exports it to every child process: point it at `uri` for this block only."""
    saved = {var: os.environ.get(var) for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def experiment_id(c: MlflowClient, params: MlflowParams) -> str:
    exp = c.get_experiment_by_name(params.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(params.experiment, artifact_location=artifact_location(params))
    except mlflow.exceptions.MlflowException:  # a concurrent run created it first
        return c.get_experiment_by_name(params.experiment).experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def context_tags() -> dict[str, str]:
    """Where a run comes from: git, the DVC stage and experiment (set by `dvc repro` / `dvc exp run`)."""
    tags = {"git_commit": git_commit()}
    for env, tag in [("DVC_STAGE", "dvc_stage"), ("DVC_EXP_NAME", "dvc_exp_name"),
                     ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev")]:
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


class Run:
    """One MLflow run; metrics are buffered and sent in one batch per flush to keep logging cheap."""

    def __init__(self, c: MlflowClient, run_id: str):
        self.client, self.id = c, run_id
        self._buffer: list[Metric] = []

    @classmethod
    def start(cls, params: MlflowParams, name: str, tags: dict[str, str]) -> "Run":
        c = client(params)
        run = c.create_run(experiment_id(c, params), run_name=name, tags={**context_tags(), **tags})
        return cls(c, run.info.run_id)

    @classmethod
    def resume(cls, params: MlflowParams, run_id: str) -> "Run":
        c = client(params)
        c.update_run(run_id, status="RUNNING")
        return cls(c, run_id)

    def log_params(self, flat: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log(self, step: int, **metrics: float) -> None:
        ts = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), ts, step) for k, v in metrics.items()]

    def flush(self) -> None:
        for i in range(0, len(self._buffer), 1000):
            self.client.log_batch(self.id, metrics=self._buffer[i:i + 1000])
        self._buffer = []

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.id, str(path), folder)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.id, status)

    def metric_history(self, key: str) -> Iterator[tuple[int, float]]:
        for m in self.client.get_metric_history(self.id, key):
            yield m.step, m.value


# Reading runs back, for `python -m mmrec.compare`.
import pandas as pd  # noqa: E402  (mlflow loads it anyway)


def local_store(uri: str) -> Path | None:
    """The file or folder a local tracking URI points at (None for a server): MLflow creates it when it is missing."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:"):
        from urllib.parse import urlparse

        return Path(urlparse(uri).path)
    return None if "://" in uri else Path(uri)


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


def metric_histories(uri: str, run_ids: list[str], key: str) -> dict[str, list[tuple[int, float]]]:
    """Run id -> (step, value) of metric `key`, in step order."""
    c = MlflowClient(uri)
    return {rid: [(m.step, m.value) for m in sorted(c.get_metric_history(rid, key), key=lambda m: (m.step, m.timestamp))]
            for rid in run_ids}
