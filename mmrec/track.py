"""MLflow tracking: runs, their params, metrics and artifacts (registry.py holds the model registry).

One MLflow run per rung. The stage that trains a rung opens it and writes its id to
models/<rung>/run.json; evaluate and promote reopen the same run through that file, so a rung's
whole story (params, curves, test metrics, the gate) sits in one place in `mlflow ui`.

The rung runs of one pipeline execution (`dvc repro`, one `dvc exp run`, one queued experiment) nest
under a parent run that carries the headline: best test bits per byte and the champion rung. Stages
are separate processes, so each finds its parent by a key that is the same for every stage of one
execution and differs between executions: the DVC experiment name, its baseline commit, the params
digest, and the dvc process that runs the stages (see `pipeline_key`).
"""
from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
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
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from sqlalchemy.exc import SQLAlchemyError  # noqa: E402

from mmrec.config import PARAMS_FILE, DataParams, MlflowParams, Params, flatten  # noqa: E402
from mmrec.errors import UserError  # noqa: E402
from mmrec.files import dvc_fix, load_json  # noqa: E402
from mmrec.paths import SPLITS  # noqa: E402

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


def git(*args: str) -> str:
    """Output of a git command in the current directory ('' when git or the repository is missing)."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except OSError:
        return ""


def git_commit() -> str:
    return git("rev-parse", "HEAD") or "unknown"


def user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container uid without a passwd entry
        return str(os.getuid())


def workspace() -> str:
    """The directory a stage runs in: the repository, or a DVC queue's temporary copy of it."""
    return str(Path.cwd().resolve())


def context_tags() -> dict[str, str]:
    """Where a run comes from: who, which script and commit (MLflow's Source and User columns), and the DVC
    stage and experiment (set by `dvc repro` / `dvc exp run`)."""
    commit = git_commit()
    tags = {"git_commit": commit, "workspace": workspace(), "mlflow.user": user(), "mlflow.source.type": "LOCAL",
            "mlflow.source.name": source_name(), "mlflow.source.git.commit": commit}
    if branch := git("rev-parse", "--abbrev-ref", "HEAD"):
        tags["mlflow.source.git.branch"] = branch
    if remote := git("config", "--get", "remote.origin.url"):
        tags["mlflow.source.git.repoURL"] = remote
    for env, tag in [("DVC_STAGE", "dvc_stage"), ("DVC_EXP_NAME", "dvc_exp_name"),
                     ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev")]:
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def source_name() -> str:
    """The script that made the run, relative to the repository (stages/train.py), else the program's name."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None or not script.is_file():
        return "python"
    try:
        return script.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return script.name


# ---- which pipeline execution a stage belongs to, and what its runs are called ----

def dvc_execution() -> str:
    """'<pid>:<start time>' of the nearest `dvc` process above this one: every stage of one `dvc repro`,
    `dvc exp run` or queued experiment (`dvc exp exec-run`, one per experiment under `dvc queue start -j N`)
    shares it, and two executions never do. '' when no dvc process started us (a stage run by hand)."""
    import psutil

    try:
        proc = psutil.Process().parent()
        while proc is not None:
            cmd = proc.cmdline()
            if any(Path(a).name == "dvc" for a in cmd[:2]) or cmd[1:3] == ["-m", "dvc"]:
                return f"{proc.pid}:{proc.create_time():.2f}"
            proc = proc.parent()
    except psutil.Error:
        pass
    return ""


def pipeline_key(params: Params) -> str:
    """Equal for every stage of one pipeline execution, different for any two (see dvc_execution)."""
    parts = [os.environ.get("DVC_EXP_NAME") or "workspace",
             os.environ.get("DVC_EXP_BASELINE_REV") or git_commit(), params.digest(), dvc_execution()]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _short(value: Any, limit: int = 24) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def changed_params(root: Path = Path(".")) -> dict[str, Any]:
    """Params that differ from the commit the run started from (what `dvc exp run -S` changed), dotted keys."""
    import yaml

    rev = os.environ.get("DVC_EXP_BASELINE_REV") or "HEAD"
    base_text = git("show", f"{rev}:{PARAMS_FILE.as_posix()}")
    path = root / PARAMS_FILE
    if not base_text or not path.exists():
        return {}
    try:
        base, now = flatten(yaml.safe_load(base_text) or {}), flatten(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError:
        return {}
    return {k: v for k, v in now.items() if base.get(k) != v}


def run_label(root: Path = Path(".")) -> str:
    """What sets this run apart, in a few characters: the changed params ('lr=0.001, arch=gpt'), else the branch."""
    changed = changed_params(root)
    if changed:
        leaves = [k.rsplit(".", 1)[-1] for k in changed]
        parts = [f"{leaf if leaves.count(leaf) == 1 else key}={_short(v)}"
                 for key, leaf, v in zip(changed, leaves, changed.values())]
        return ", ".join(parts[:2]) + (f" +{len(parts) - 2}" if len(parts) > 2 else "")
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    return branch if branch and branch != "HEAD" else git("rev-parse", "--short", "HEAD") or "local"


def store_lock(uri: str) -> FileLock:
    """A lock every process of this machine naming runs in this store shares (one file per store, in the temp dir)."""
    return FileLock(Path(tempfile.gettempdir()) / f"mmrec-runs-{hashlib.sha256(uri.encode()).hexdigest()[:12]}.lock")


def name_tag(base: str) -> str:
    """The tag value of runs named `base` (a digest: a name may hold quotes that a search filter cannot)."""
    return hashlib.sha256(base.encode()).hexdigest()[:16]


def unique_name(c: MlflowClient, exp_id: str, base: str) -> str:
    """`base`, or `base #n` when n - 1 runs already carry it (call under store_lock)."""
    taken = c.search_runs([exp_id], filter_string=f"tags.`mmrec.name_base` = '{name_tag(base)}'", max_results=1000)
    return base if not taken else f"{base} #{len(taken) + 1}"


# ---- datasets ----

def _source_type(source: str) -> str:
    if source.startswith(("http://", "https://")):
        return "http"
    return "code" if source.startswith("package:") else "local"


def split_datasets(data: DataParams, tokens_dir: Path) -> list[DatasetInput]:
    """The train/val/test token files as MLflow dataset inputs: name, digest (content sha256), source, profile."""
    from mmrec.files import sha256_file

    header = json.loads((tokens_dir / "header.json").read_text())
    corpus = Path(data.source.removeprefix("package:").split("?")[0].rstrip("/")).name.split(".")[0] or "corpus"
    contexts = {"train": "training", "val": "validation", "test": "testing"}
    inputs = []
    for split in SPLITS:
        stats = header["splits"][split]
        sha = sha256_file(tokens_dir / f"{split}.bin")
        profile = {"documents": stats["documents"], "tokens": stats["tokens"], "bytes": stats["bytes"],
                   "sha256": sha, "tokenizer_sha256": header["tokenizer_sha256"]}
        schema = {"mlflow_tensorspec": {"features": json.dumps([{"name": "token_id", "type": "tensor",
                                                                  "tensor-spec": {"dtype": header["dtype"],
                                                                                  "shape": [-1]}}])}}
        ds = Dataset(name=f"{corpus}-{split}", digest=sha[:32],  # MLflow keeps at most 36 characters
                     source_type=_source_type(data.source), source=json.dumps({"uri": data.source}),
                     schema=json.dumps(schema), profile=json.dumps(profile))
        inputs.append(DatasetInput(ds, [InputTag("mlflow.data.context", contexts[split])]))
    return inputs


PARENT_TAG = "mlflow.parentRunId"  # MLflow nests a run under the run this tag names


class Run:
    """One MLflow run; metrics are buffered and sent in one batch per flush to keep logging cheap.
    With system metrics on, MLflow's own monitor samples CPU, memory, disk, network (and GPUs) in a thread.
    Every call goes through the Store, so a fault ends as one StoreError line."""

    def __init__(self, store: Store, run_id: str, parent_id: str | None = None, fresh: bool = True):
        self.store, self.client, self.id, self.parent_id, self.fresh = store, store.client, run_id, parent_id, fresh
        self._buffer: list[Metric] = []
        self._logged: dict[str, int] = {}  # key -> last step already in the store (a resumed run skips those)
        self._monitor = None

    @classmethod
    def start(cls, params: MlflowParams, name: str, tags: dict[str, str], *, parent_id: str | None = None) -> "Run":
        store = Store(params)
        tags = {**context_tags(), **tags, **({PARENT_TAG: parent_id} if parent_id else {})}
        exp = store.call(experiment_id, store.client, params)
        run = store.call(store.client.create_run, exp, run_name=name, tags=tags)
        if parent_id:
            store.call(store.client.update_run, parent_id, status="RUNNING")  # until its last rung ends
        return cls(store, run.info.run_id, parent_id).watch_system(params)

    @classmethod
    def resume(cls, params: MlflowParams, run_id: str, name: str = "", tags: dict[str, str] | None = None, *,
               skip_logged: bool = False, system_metrics: bool = False) -> "Run":
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
        data = store.call(store.client.get_run, run_id).data
        run = cls(store, run_id, data.tags.get(PARENT_TAG), fresh=False)
        if run.parent_id:
            store.call(store.client.update_run, run.parent_id, status="RUNNING")
        if skip_logged:
            run._logged = {key: max((m.step for m in store.call(store.client.get_metric_history, run_id, key)),
                                    default=-1) for key in data.metrics}
        return run.watch_system(params, resume=True) if system_metrics else run
    def watch_system(self, params: MlflowParams, resume: bool = False) -> "Run":
        """Start MLflow's system-metrics monitor (`mlflow.system_metrics: false` turns it off). It samples
        every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10 by default)."""
        if params.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter
            self._monitor = SystemMetricsMonitor(self.id, resume_logging=resume, tracking_uri=self.client.tracking_uri)
            self._monitor.start()
        return self

    def _stop_system(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        monitor.finish()
        # a run shorter than one sampling interval would have no sample at all: log the one in hand
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()

    def log_params(self, flat: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.store.call(self.client.log_batch, self.id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.store.call(self.client.log_batch, self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_inputs(self, inputs: list[DatasetInput]) -> None:
        self.store.call(self.client.log_inputs, self.id, datasets=inputs)

    def log(self, step: int, **metrics: float) -> None:
        self.log_metrics(step, metrics)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Like log(), for names that are not Python identifiers ('loss/train')."""
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
        self._stop_system()
        self.store.call(self.client.set_terminated, self.id, status)
        if self.parent_id:
            self.store.call(refresh_pipeline, self.client, self.parent_id)

    def abort(self, status: str) -> None:
        """End a run whose stage failed, best effort: when the store itself is the fault, the stage's own
        error is the one to report."""
        self._buffer = []  # a fault may lie in the buffered batch itself
        with contextlib.suppress(Exception):
            self._stop_system()
        with contextlib.suppress(*STORE_FAULTS, StoreError):
            self.store.call(self.client.set_terminated, self.id, status)
            if self.parent_id:
                self.store.call(refresh_pipeline, self.client, self.parent_id)

    def metric_history(self, key: str) -> Iterator[tuple[int, float]]:
        """(step, value) in the order they were logged within each step."""
        history = self.store.call(self.client.get_metric_history, self.id, key)
        for m in sorted(history, key=lambda m: (m.step, m.timestamp)):
            yield m.step, m.value


@contextlib.contextmanager
def closed_on_failure(run: Run | None) -> Iterator[Run | None]:
    """A block that writes to `run`: if it raises, the run ends FAILED (KILLED on Ctrl-C), never stays RUNNING."""
    try:
        yield run
    except BaseException as err:
        if run is not None:
            run.abort("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
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


def test_metric_names(metrics: dict[str, float]) -> dict[str, float]:
    """evaluate's metrics under MLflow names: test_bpb -> test/bpb, unigram_bpb -> test/unigram_bpb, so MLflow
    charts them in one 'test' section (runs and logged models alike)."""
    return {f"test/{k.removeprefix('test_')}": float(v) for k, v in metrics.items()}


def pipeline_run(params: Params, label: str, inputs: list[DatasetInput]) -> str:
    """The parent run of this pipeline execution: found by its key, or created (under the store's lock, so two
    stages can never make two)."""
    store = Store(params.mlflow)
    c = store.client
    exp_id = store.call(experiment_id, c, params.mlflow)
    key = pipeline_key(params)
    with store_lock(store.uri), faults_as_errors(store.uri):
        found = c.search_runs([exp_id], filter_string=f"tags.`mmrec.pipeline` = '{key}'", max_results=1)
        if found:
            return found[0].info.run_id
        exp = os.environ.get("DVC_EXP_NAME")
        base = f"pipeline · {label}" + (f" · {exp}" if exp else "")
        tags = {**context_tags(), "mmrec.pipeline": key, "mmrec.name_base": name_tag(base), "kind": "pipeline"}
        run = c.create_run(exp_id, run_name=unique_name(c, exp_id, base), tags=tags)
    parent = Run(store, run.info.run_id)
    parent.log_params(params.flat())
    parent.log_inputs(inputs)
    return parent.id


def start_rung_run(params: Params, rung: str, tags: dict[str, str], root: Path = Path(".")) -> Run:
    """A rung's run, named '<rung> · <what sets it apart>[ · <dvc exp>]', nested under its pipeline's run,
    with the data splits as dataset inputs and system metrics on (unless mlflow.system_metrics is false)."""
    from mmrec.paths import TOKENS

    label = run_label(root)
    inputs = split_datasets(params.data, root / TOKENS)
    parent_id = pipeline_run(params, label, inputs)
    exp = os.environ.get("DVC_EXP_NAME")
    base = f"{rung} · {label}" + (f" · {exp}" if exp else "")
    store = Store(params.mlflow)
    with store_lock(store.uri):
        name = store.call(unique_name, store.client, store.call(experiment_id, store.client, params.mlflow), base)
        run = Run.start(params.mlflow, name, {**tags, "mmrec.name_base": name_tag(base), "kind": "rung"},
                        parent_id=parent_id)
    run.log_inputs(inputs)
    return run


def refresh_pipeline(c: MlflowClient, parent_id: str) -> None:
    """Put the headline of a pipeline's rungs on its parent run: best test bits per byte (full context), the
    rung that became champion (if any did), and a status that is RUNNING while any rung runs. Missing figures are skipped."""
    parent = c.get_run(parent_id)
    children = c.search_runs([parent.info.experiment_id], filter_string=f"tags.{PARENT_TAG} = '{parent_id}'",
                             max_results=1000)
    metrics, tags = {}, {"rungs": ", ".join(sorted(r.data.tags.get("rung", "?") for r in children))}
    headline = "test/bpb_context"  # the gate's number (promote.GATE_METRIC under its MLflow name)
    scored = [r for r in children if headline in r.data.metrics]
    if scored:
        best = min(scored, key=lambda r: r.data.metrics[headline])
        metrics["summary/best_test_bpb"] = best.data.metrics[headline]
        tags["best_rung"] = best.data.tags.get("rung", "")
    # the rungs whose promotion moved `champion` (promote's alias rule), the last of them holding it now
    promoted = [r for r in children if r.data.tags.get("promote.champion") == "True"]
    if promoted:
        def version(r) -> int:
            v = r.data.tags.get("promote.model_version", "")
            return int(v) if v.isdigit() else -1
        champ = max(promoted, key=lambda r: (version(r), r.info.end_time or 0))
        tags |= {"champion_rung": champ.data.tags.get("rung", ""), "champion_run_id": champ.info.run_id,
                 "champion_version": champ.data.tags.get("promote.model_version", "")}
    ts = int(time.time() * 1000)
    c.log_batch(parent_id, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()],
                tags=[RunTag(k, str(v)) for k, v in tags.items()])
    statuses = {r.info.status for r in children}
    if "RUNNING" in statuses:
        return
    c.set_terminated(parent_id, "FAILED" if statuses & {"FAILED", "KILLED"} else "FINISHED")


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
