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
from typing import Any, Iterator

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # telemetry stays off unless the user turns it on
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stage logs stay readable
logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations on a fresh store are noise

import mlflow  # noqa: E402
from filelock import FileLock  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag  # noqa: E402

from mmrec.config import PARAMS_FILE, DataParams, MlflowParams, Params, flatten  # noqa: E402
from mmrec.errors import UserError  # noqa: E402
from mmrec.paths import SPLITS  # noqa: E402

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


def context_tags() -> dict[str, str]:
    """Where a run comes from: who, which script and commit (MLflow's Source and User columns), and the DVC
    stage and experiment (set by `dvc repro` / `dvc exp run`)."""
    commit = git_commit()
    tags = {"git_commit": commit, "mlflow.user": user(), "mlflow.source.type": "LOCAL",
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
    With system metrics on, MLflow's own monitor samples CPU, memory, disk, network (and GPUs) in a thread."""

    def __init__(self, c: MlflowClient, run_id: str, parent_id: str | None = None):
        self.client, self.id, self.parent_id = c, run_id, parent_id
        self._buffer: list[Metric] = []
        self._monitor = None

    @classmethod
    def start(cls, params: MlflowParams, name: str, tags: dict[str, str], *, parent_id: str | None = None) -> "Run":
        c = client(params)
        tags = {**context_tags(), **tags, **({PARENT_TAG: parent_id} if parent_id else {})}
        run = c.create_run(experiment_id(c, params), run_name=name, tags=tags)
        if parent_id:
            c.update_run(parent_id, status="RUNNING")  # until its last rung ends (refresh_pipeline)
        return cls(c, run.info.run_id, parent_id).watch_system(params)

    @classmethod
    def resume(cls, params: MlflowParams, run_id: str, *, system_metrics: bool = False) -> "Run":
        c = client(params)
        c.update_run(run_id, status="RUNNING")
        run = cls(c, run_id, c.get_run(run_id).data.tags.get(PARENT_TAG))
        if run.parent_id:
            c.update_run(run.parent_id, status="RUNNING")
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
            self.client.log_batch(self.id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_inputs(self, inputs: list[DatasetInput]) -> None:
        self.client.log_inputs(self.id, datasets=inputs)

    def log(self, step: int, **metrics: float) -> None:
        self.log_metrics(step, metrics)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Like log(), for names that are not Python identifiers ('loss/train')."""
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
        self._stop_system()
        self.client.set_terminated(self.id, status)
        if self.parent_id:
            refresh_pipeline(self.client, self.parent_id)

    def metric_history(self, key: str) -> Iterator[tuple[int, float]]:
        """(step, value) in the order they were logged within each step."""
        for m in sorted(self.client.get_metric_history(self.id, key), key=lambda m: (m.step, m.timestamp)):
            yield m.step, m.value


def pipeline_run(params: Params, label: str, inputs: list[DatasetInput]) -> str:
    """The parent run of this pipeline execution: found by its key, or created (under the store's lock, so two
    stages can never make two)."""
    c = client(params.mlflow)
    exp_id = experiment_id(c, params.mlflow)
    key = pipeline_key(params)
    with store_lock(tracking_uri(params.mlflow)):
        found = c.search_runs([exp_id], filter_string=f"tags.`mmrec.pipeline` = '{key}'", max_results=1)
        if found:
            return found[0].info.run_id
        exp = os.environ.get("DVC_EXP_NAME")
        base = f"pipeline · {label}" + (f" · {exp}" if exp else "")
        tags = {**context_tags(), "mmrec.pipeline": key, "mmrec.name_base": name_tag(base), "kind": "pipeline"}
        run = c.create_run(exp_id, run_name=unique_name(c, exp_id, base), tags=tags)
    parent = Run(c, run.info.run_id)
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
    c = client(params.mlflow)
    with store_lock(tracking_uri(params.mlflow)):
        name = unique_name(c, experiment_id(c, params.mlflow), base)
        run = Run.start(params.mlflow, name, {**tags, "mmrec.name_base": name_tag(base), "kind": "rung"},
                        parent_id=parent_id)
    run.log_inputs(inputs)
    return run


def refresh_pipeline(c: MlflowClient, parent_id: str) -> None:
    """Put the headline of a pipeline's rungs on its parent run: best test bits per byte, the champion (the
    latest promoted version), and a status that is RUNNING while any rung runs. Missing figures are skipped."""
    parent = c.get_run(parent_id)
    children = c.search_runs([parent.info.experiment_id], filter_string=f"tags.{PARENT_TAG} = '{parent_id}'",
                             max_results=1000)
    metrics, tags = {}, {"rungs": ", ".join(sorted(r.data.tags.get("rung", "?") for r in children))}
    scored = [r for r in children if "test/bpb" in r.data.metrics]
    if scored:
        best = min(scored, key=lambda r: r.data.metrics["test/bpb"])
        metrics["summary/best_test_bpb"] = best.data.metrics["test/bpb"]
        tags["best_rung"] = best.data.tags.get("rung", "")
    promoted = [r for r in children if r.data.tags.get("promote.decision") == "promoted"]
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
