"""The MLflow store: opening it, waiting on its lock, and its faults as one line each (where it is: store_location.py).

Every call to the store goes through `Store.call`: a locked sqlite database is waited on with backoff for
mlflow.lock_timeout_s in all, and any other fault (unwritable artifact root, a file that is no database, a
server that is down) becomes one `StoreError` line naming the store and what to do.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
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
from mlflow.exceptions import MlflowException  # noqa: E402
from sqlalchemy import event  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402
from sqlalchemy.exc import SQLAlchemyError  # noqa: E402

from mmrec.config import MlflowParams  # noqa: E402
from mmrec.errors import UserError  # noqa: E402
from mmrec.tracking.location import artifact_location, local_store, tracking_uri  # noqa: E402

T = TypeVar("T")


STORE_FAULTS = (MlflowException, SQLAlchemyError, OSError)  # OSError covers requests' connection errors too


class StoreError(UserError):
    """The tracking store cannot be opened or written: one line naming the store and what to do."""


# MLflow makes sqlite itself wait up to 20 s for a lock inside every call (PRAGMA busy_timeout in each of its
# sessions): under Store.call's backoff, that hid 20 s per try, unannounced, past mlflow.lock_timeout_s.
# Once a process opens a Store, sqlite waits at most SQLITE_WAIT_S inside a call (brief locks of a writer
# beside us pass unseen) and Store.call waits the rest, saying so, within the limit.
SQLITE_WAIT_S = 1.0
_sqlite_wait_ms: int | None = None  # None: MLflow's own wait (a process that opened no Store)


@event.listens_for(Engine, "connect")
def _sqlite_wait_on_connect(dbapi_conn: Any, _record: Any) -> None:
    if _sqlite_wait_ms is not None and isinstance(dbapi_conn, sqlite3.Connection):
        dbapi_conn.execute(f"PRAGMA busy_timeout = {_sqlite_wait_ms}")


@event.listens_for(Engine, "before_cursor_execute", retval=True)
def _sqlite_wait_in_sessions(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any,
                             _executemany: bool) -> tuple[str, Any]:
    if _sqlite_wait_ms is not None and statement.startswith("PRAGMA busy_timeout"):
        statement = f"PRAGMA busy_timeout = {_sqlite_wait_ms};"
    return statement, parameters


def _locked(err: BaseException) -> bool:
    return "database is locked" in str(err) or "database table is locked" in str(err)


def _missing_run(err: BaseException) -> bool:
    return isinstance(err, MlflowException) and err.error_code == "RESOURCE_DOES_NOT_EXIST"


# How requests words a server that is down (refused) or that died in the middle of a reply (broken, aborted).
UNREACHABLE = ("Max retries exceeded", "Connection refused", "Connection broken", "Connection aborted")


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
    if isinstance(err, OSError) or any(sign in text for sign in UNREACHABLE):
        return (f"MLflow store {store}: unreachable ({type(err).__name__}); start the tracking server or fix "
                "MLFLOW_TRACKING_URI, then rerun `dvc repro` (it resumes)")
    return f"MLflow store {store}: {text[:300]}"


class Store:
    """Every call to the tracking store goes through `call`: a locked sqlite database is waited on with
    backoff for mlflow.lock_timeout_s in all; any other fault becomes one StoreError line."""

    def __init__(self, params: MlflowParams):
        global _sqlite_wait_ms
        self.uri, self.wait_s = tracking_uri(params), params.lock_timeout_s
        self.sqlite_wait_s = min(SQLITE_WAIT_S, self.wait_s)
        _sqlite_wait_ms = round(1000 * self.sqlite_wait_s)
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
        """fn(*args, **kwargs), waiting on a locked store (see `waited`); any other fault becomes one StoreError
        line, except a missing run, which callers handle."""
        try:
            return self.waited(fn, *args, **kwargs)
        except STORE_FAULTS as err:
            if _missing_run(err):
                raise
            raise StoreError(describe(err, self.uri)) from None

    def waited(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs), tried again with backoff while the store is locked, until mlflow.lock_timeout_s
        has passed since the first try (sqlite's own wait inside each try counted in). Other faults propagate."""
        start, delay, announced = time.monotonic(), 1.0, False
        while True:
            try:
                return fn(*args, **kwargs)
            except STORE_FAULTS as err:
                if not _locked(err):
                    raise
            waited = time.monotonic() - start
            if waited >= self.wait_s:
                raise StoreError(f"MLflow store {self.uri}: still locked by another process after {waited:.0f}s; "
                                 f"let it finish or raise mlflow.lock_timeout_s ({self.wait_s:g})")
            if not announced:
                print(f"waiting for the MLflow store {self.uri}: locked by another process "
                      f"(up to {self.wait_s:.0f}s, mlflow.lock_timeout_s)", file=sys.stderr, flush=True)
                announced = True
            time.sleep(max(0.05, min(delay, self.wait_s - waited - self.sqlite_wait_s)))  # the next try ends in time
            delay = min(delay * 2, 10.0)

    def waiting(self) -> "WaitingClient":
        """The client, each of whose calls waits on a locked store: for code that talks to MLflow directly and
        handles MLflow's errors itself (the registry's, under faults_as_errors)."""
        return WaitingClient(self)


class WaitingClient:
    """An MlflowClient whose every method waits on a locked store through Store.waited."""

    def __init__(self, store: Store):
        self._store = store

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store.client, name)
        return functools.partial(self._store.waited, attr) if callable(attr) else attr


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


@contextlib.contextmanager
def faults_as_errors(store: str) -> Iterator[None]:
    """For a block of direct client calls (the registry's): a store fault becomes one StoreError line."""
    try:
        yield
    except STORE_FAULTS as err:
        raise StoreError(describe(err, store)) from None


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


def store_settings(tracking_uri_flag: str | None, experiment_flag: str | None) -> tuple[str, str]:
    """For the commands that read the store: (tracking URI, experiment), from their flags first, then
    params.yaml, then the schema's defaults; a local store that does not exist is an error, not created."""
    from mmrec.config import workspace_params

    mlflow_params = workspace_params().mlflow
    uri = tracking_uri_flag or tracking_uri(mlflow_params)
    store = local_store(uri)
    if store is not None and not store.exists():  # reading a missing store would create an empty one
        raise UserError(f"no MLflow store at {store} (tracking URI {uri}); train a rung first or pass --tracking-uri")
    return uri, experiment_flag or mlflow_params.experiment
