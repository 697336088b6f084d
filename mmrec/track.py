"""MLflow tracking: runs, their params, metrics and artifacts (registry.py holds the model registry).

One MLflow run per rung. The stage that trains a rung opens it and writes its id to
models/<rung>/run.json; evaluate and promote reopen the same run through that file, so a rung's
whole story (params, curves, test metrics, the gate) sits in one place in `mlflow ui`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # telemetry stays off unless the user turns it on
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stage logs stay readable
# A tracking server that is down should fail a stage in seconds, not after MLflow's default ~2 minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations on a fresh store are noise

import mlflow  # noqa: E402
from filelock import FileLock  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from sqlalchemy.exc import SQLAlchemyError  # noqa: E402

from mmrec.config import MlflowParams  # noqa: E402
from mmrec.errors import UserError  # noqa: E402
from mmrec.files import dvc_fix, load_json  # noqa: E402

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
# The user's choice, read once: mlflow.set_tracking_uri() writes this variable itself, so reading it
# later would return whatever store this process touched last.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


T = TypeVar("T")
STORE_FAULTS = (MlflowException, SQLAlchemyError, OSError)  # OSError covers requests' connection errors too


class StoreError(UserError):
    """The tracking store cannot be opened or written: one line naming the store and what to do."""


def read_run_id(model_dir: Path) -> str:
    """The MLflow run of a rung, as its train stage recorded it in models/<rung>/run.json."""
    path = model_dir / "run.json"
    return str(read_json(path, f"train@{model_dir.name}", "run_id"))


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


def _locked(err: BaseException) -> bool:
    return "database is locked" in str(err) or "database table is locked" in str(err)


def _missing_run(err: BaseException) -> bool:
    return isinstance(err, MlflowException) and err.error_code == "RESOURCE_DOES_NOT_EXIST"


def describe(err: BaseException, store: str) -> str:
    """One line for a store fault: which store, what went wrong, what to do."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, OSError) and getattr(err, "filename", None):  # the artifact root or the database's folder
        where = err.filename
        return (f"MLflow store {store}: cannot write {where} ({err.strerror or type(err).__name__}); "
                "make it a writable directory or set mlflow.artifact_root")
    if "file is not a database" in text or "file is encrypted" in text:
        return (f"MLflow store {store}: not an SQLite database (damaged?); move it aside to start a new store, "
                "or point mlflow.tracking_uri / MLFLOW_TRACKING_URI at another")
    if "unable to open database file" in text or "readonly database" in text:
        return (f"MLflow store {store}: cannot open the database for writing; check the file and its directory "
                "are writable, or point mlflow.tracking_uri elsewhere")
    if isinstance(err, OSError) or "Max retries exceeded" in text or "Connection refused" in text:
        return (f"MLflow store {store}: unreachable ({type(err).__name__}); start the tracking server or fix "
                "MLFLOW_TRACKING_URI, then rerun `dvc repro` (it resumes)")
    return f"MLflow store {store}: {text[:300]}"


class Store:
    """Every call to the tracking store goes through `call`: a locked sqlite database is waited on with
    backoff up to mlflow.lock_timeout_s; any other fault becomes one StoreError line."""

    def __init__(self, params: MlflowParams):
        self.uri, self.wait_s = tracking_uri(params), params.lock_timeout_s
        self.client = self.call(self._open)

    def _open(self) -> MlflowClient:
        if not self.uri.startswith("sqlite:///"):
            return MlflowClient(self.uri, self.uri)
        # The first client of a new sqlite store creates its tables; two queued experiments doing that at
        # once collide in the schema migration, so opening a store is serialised by a lock file beside it.
        db = Path(self.uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{db}.lock"):
            c = MlflowClient(self.uri, self.uri)
            c._tracking_client.store  # opens (and if new, creates) the database now, inside the lock
            return c

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        deadline, delay = None, 1.0
        while True:
            try:
                return fn(*args, **kwargs)
            except STORE_FAULTS as err:
                if _missing_run(err):
                    raise
                if not _locked(err):
                    raise StoreError(describe(err, self.uri)) from None
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.wait_s
                    print(f"waiting for the MLflow store {self.uri}: locked by another process "
                          f"(up to {self.wait_s:.0f}s, mlflow.lock_timeout_s)", file=sys.stderr, flush=True)
                if now + delay > deadline:
                    raise StoreError(f"MLflow store {self.uri}: still locked by another process after "
                                     f"{self.wait_s:.0f}s; let it finish or raise mlflow.lock_timeout_s") from None
                time.sleep(delay)
                delay = min(delay * 2, 10.0)


def client(params: MlflowParams) -> MlflowClient:
    return Store(params).client


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
    # a local store keeps artifacts under mlflow.artifact_root; a tracking server decides (and serves) its own
    local = c.tracking_uri.startswith("sqlite:") or "://" not in c.tracking_uri
    location = artifact_location(params) if local else None
    try:
        if location and location.startswith("file:"):
            Path(location.removeprefix("file://")).mkdir(parents=True, exist_ok=True)  # a bad root fails here
        return c.create_experiment(params.experiment, artifact_location=location)
    except MlflowException as err:  # a concurrent run created it first
        exp = c.get_experiment_by_name(params.experiment)
        if exp is None:
            raise err
        return exp.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def workspace() -> str:
    """The directory a stage runs in: the repository, or a DVC queue's temporary copy of it."""
    return str(Path.cwd().resolve())


def context_tags() -> dict[str, str]:
    """Where a run comes from: git, the DVC stage and experiment (set by `dvc repro` / `dvc exp run`)."""
    tags = {"git_commit": git_commit(), "workspace": workspace()}
    for env, tag in [("DVC_STAGE", "dvc_stage"), ("DVC_EXP_NAME", "dvc_exp_name"),
                     ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev")]:
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


class Run:
    """One MLflow run; metrics are buffered and sent in one batch per flush to keep logging cheap.
    Every call goes through the Store, so a fault ends as one StoreError line."""

    def __init__(self, store: Store, run_id: str, fresh: bool = True):
        self.store, self.client, self.id, self.fresh = store, store.client, run_id, fresh
        self._buffer: list[Metric] = []
        self._logged: dict[str, int] = {}  # key -> last step already in the store (a resumed run skips those)

    @classmethod
    def start(cls, params: MlflowParams, name: str, tags: dict[str, str]) -> "Run":
        store = Store(params)
        exp = store.call(experiment_id, store.client, params)
        run = store.call(store.client.create_run, exp, run_name=name, tags={**context_tags(), **tags})
        return cls(store, run.info.run_id)

    @classmethod
    def resume(cls, params: MlflowParams, run_id: str, name: str = "", tags: dict[str, str] | None = None,
               skip_logged: bool = False) -> "Run":
        """Reopen `run_id`. If the store no longer has it (a deleted or replaced database), start a new run
        named `name` with `tags` and say so; without a name that is an error. skip_logged: drop metrics
        at steps the run already holds, so a resumed training logs nothing twice."""
        store = Store(params)
        try:
            store.call(store.client.update_run, run_id, status="RUNNING")
        except MlflowException as err:
            if not _missing_run(err):
                raise StoreError(describe(err, store.uri)) from None
            if not name:
                raise StoreError(f"MLflow store {store.uri}: run {run_id} is gone; rerun `dvc repro -f` for "
                                 "this rung to record it again") from None
            run = cls.start(params, name, tags or {})
            print(f"note: MLflow run {run_id} is gone from {store.uri}; continuing in a new run {run.id}",
                  file=sys.stderr, flush=True)
            return run
        run = cls(store, run_id, fresh=False)
        if skip_logged:
            data = store.call(store.client.get_run, run_id).data
            run._logged = {key: max((m.step for m in store.call(store.client.get_metric_history, run_id, key)),
                                    default=-1) for key in data.metrics}
        return run

    def log_params(self, flat: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.store.call(self.client.log_batch, self.id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.store.call(self.client.log_batch, self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log(self, step: int, **metrics: float) -> None:
        ts = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), ts, step) for k, v in metrics.items()
                         if step > self._logged.get(k, -1)]

    def flush(self) -> None:
        for i in range(0, len(self._buffer), 1000):
            self.store.call(self.client.log_batch, self.id, metrics=self._buffer[i:i + 1000])
        self._buffer = []

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.store.call(self.client.log_artifact, self.id, str(path), folder)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.store.call(self.client.set_terminated, self.id, status)

    def metric_history(self, key: str) -> Iterator[tuple[int, float]]:
        for m in self.store.call(self.client.get_metric_history, self.id, key):
            yield m.step, m.value


@contextlib.contextmanager
def closed_on_failure(run: Run | None) -> Iterator[Run | None]:
    """A block that writes to `run`: if it raises, the run ends FAILED (KILLED on Ctrl-C), never stays RUNNING.
    Ending it is best effort: when the store itself is the fault, the original error is the one to report."""
    try:
        yield run
    except BaseException as err:
        if run is not None:
            run._buffer = []  # a fault may lie in the buffered batch itself
            with contextlib.suppress(*STORE_FAULTS, StoreError):
                run.store.call(run.client.set_terminated, run.id,
                               "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise


@contextlib.contextmanager
def faults_as_errors(store: str) -> Iterator[None]:
    """For a block of direct client calls (the registry's): a store fault becomes one StoreError line."""
    try:
        yield
    except STORE_FAULTS as err:
        raise StoreError(describe(err, store)) from None


def close_abandoned(params: MlflowParams, rung: str) -> None:
    """Mark KILLED the RUNNING runs of `rung` that an earlier, killed process in this workspace left behind
    (it died before its first checkpoint, so nothing resumes them)."""
    store = Store(params)
    exp = store.call(store.client.get_experiment_by_name, params.experiment)
    if exp is None:
        return
    query = (f"tags.rung = '{rung}' and tags.workspace = '{workspace()}' and attributes.status = 'RUNNING'")
    for r in store.call(store.client.search_runs, [exp.experiment_id], query):
        store.call(store.client.set_terminated, r.info.run_id, "KILLED")


def read_json(path: Path, stage: str, key: str | None = None) -> Any:
    """A small JSON output of a stage; a missing or damaged one is one line naming the file and the fix."""
    data = load_json(path, stage)
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise UserError(f"{path}: has no '{key}' (damaged?); {dvc_fix(stage)}")
        return data[key]
    return data


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


def store_settings(tracking_uri_flag: str | None, experiment_flag: str | None) -> tuple[str, str]:
    """For the commands that read the store: (tracking URI, experiment), from their flags first, then
    params.yaml, then the schema's defaults; a local store that does not exist is an error, not created."""
    from mmrec.config import PARAMS_FILE, load_params

    mlflow_params = load_params().mlflow if PARAMS_FILE.exists() else MlflowParams()
    uri = tracking_uri_flag or tracking_uri(mlflow_params)
    store = local_store(uri)
    if store is not None and not store.exists():  # reading a missing store would create an empty one
        raise UserError(f"no MLflow store at {store} (tracking URI {uri}); train a rung first or pass --tracking-uri")
    return uri, experiment_flag or mlflow_params.experiment
