"""MLflow tracking: one run, its params, metrics and artifacts, and the sweep of runs dead attempts left (store.py
opens the store; context.py says where a run comes from; pipeline_run.py finds a rung's parent run and names it;
reading.py reads runs back; registry/models.py holds the model registry).

One MLflow run per rung. The stage that trains a rung opens it and writes its id to
models/<rung>/run.json; evaluate and promote reopen the same run through that file, so a rung's
whole story (params, curves, test metrics, the gate) sits in one place in `mlflow ui`.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

# store.py first: it sets MLflow's environment (telemetry off, short HTTP retries) before mlflow is imported
from mmrec.tracking.store import STORE_FAULTS, Store, StoreError, _missing_run, describe, experiment_id  # noqa: I001

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import DatasetInput, Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from mmrec.config import MlflowParams  # noqa: E402
from mmrec.errors import UserError  # noqa: E402
from mmrec.files import dvc_fix, load_json  # noqa: E402
from mmrec.paths import GATE_METRIC_NAME, test_metric_name  # noqa: E402
from mmrec.procs import owner, owner_alive  # noqa: E402
from mmrec.tracking.context import context_tags, workspace  # noqa: E402

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


def read_run_id(model_dir: Path) -> str:
    """The MLflow run of a rung, as its train stage recorded it in models/<rung>/run.json."""
    path = model_dir / "run.json"
    return str(read_json(path, f"train@{model_dir.name}", "run_id"))


def read_json(path: Path, stage: str, key: str | None = None) -> Any:
    """A small JSON output of a stage; a missing or damaged one is one line naming the file and the fix."""
    data = load_json(path, stage)
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise UserError(f"{path}: has no '{key}' (damaged?); {dvc_fix(stage)}")
        return data[key]
    return data


PARENT_TAG = "mlflow.parentRunId"  # MLflow nests a run under the run this tag names
# procs.owner() of the process a run is RUNNING in (for a pipeline's run, its dvc process), or that logged a
# model: once that process is gone, the run or model is a dead attempt's (see close_abandoned).
OWNER_TAG = "mmrec.owner"


def dead(tags: dict[str, str]) -> bool:
    """Whether the owner these tags name is gone (False when it is alive, unknown, or on another machine)."""
    return OWNER_TAG in tags and owner_alive(tags[OWNER_TAG]) is False


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
        tags = {**context_tags(), **tags, OWNER_TAG: owner(), **({PARENT_TAG: parent_id} if parent_id else {})}
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
            store.call(store.client.set_tag, run_id, OWNER_TAG, owner())  # RUNNING in this process from now on
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
            from mlflow.system_metrics.system_metrics_monitor import (
                SystemMetricsMonitor,
            )

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
        self.store.call(monitor.publish_metrics, monitor.aggregate_metrics())
        self.store.call(monitor.mlflow_logger.flush)

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


def close_abandoned(params: MlflowParams, rung: str | None = None) -> list[str]:
    """End the runs of dead attempts (of `rung`, or of every rung): a RUNNING run whose process is gone ends
    KILLED, and so does the pipeline run of a dvc process that is gone; each pipeline run touched is refreshed
    (FAILED once none of its rungs runs). Runs of live processes, or of other machines, are left alone.
    Returns the names of the runs it ended."""
    store = Store(params)
    exp = store.call(store.client.get_experiment_by_name, params.experiment)
    if exp is None:
        return []
    query = "attributes.status = 'RUNNING'" + (f" and tags.rung = '{rung}'" if rung else "")
    running = store.call(store.client.search_runs, [exp.experiment_id], query, max_results=10000)
    ended, parents = [], set()
    for r in running:
        tags = r.data.tags
        if tags.get("kind") == "pipeline":
            if dead(tags):
                parents.add(r.info.run_id)
        elif dead(tags) or (OWNER_TAG not in tags and tags.get("workspace") == workspace()):  # (older runs: no owner)
            store.call(store.client.set_terminated, r.info.run_id, "KILLED")
            ended.append(r.info.run_name)
            if tags.get(PARENT_TAG):
                parents.add(tags[PARENT_TAG])
    for parent in parents:
        if store.call(refresh_pipeline, store.client, parent) != "RUNNING":
            ended.append(store.call(store.client.get_run, parent).info.run_name)
    return ended


def drop_orphan_models(params: MlflowParams) -> list[str]:
    """Delete the logged models (and their weights) that a dead process logged but that no registered version
    points at: a promote killed while it registered leaves one behind. Returns their ids."""
    store = Store(params)
    exp = store.call(store.client.get_experiment_by_name, params.experiment)
    if exp is None:
        return []
    ours = store.call(store.client.search_logged_models, [exp.experiment_id], filter_string=f"tags.`{OWNER_TAG}` != ''",
                      order_by=[{"field_name": "creation_timestamp", "ascending": False}], max_results=1000)  # newest
    orphans = [m for m in ours if dead(m.tags)]
    if not orphans:
        return []
    versions = store.call(store.client.search_model_versions, max_results=10000)
    pointed = {v.model_id for v in versions} | {v.source.removeprefix("models:/") for v in versions}
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    dropped = []
    for m in orphans:
        if m.model_id in pointed:
            continue
        store.call(get_artifact_repository(m.artifact_location).delete_artifacts)
        store.call(store.client.delete_logged_model, m.model_id)
        dropped.append(m.model_id)
    return dropped


def test_metric_names(metrics: dict[str, float]) -> dict[str, float]:
    """evaluate's metrics under their MLflow names (test_metric_name)."""
    return {test_metric_name(k): float(v) for k, v in metrics.items()}


def refresh_pipeline(c: MlflowClient, parent_id: str) -> str:
    """Put the headline of a pipeline's rungs on its parent run: best test bits per byte (full context), the
    rung that became champion (if any did), and a status that is RUNNING while any rung runs (before the first,
    while its dvc process runs). Missing figures are skipped. Returns the status it leaves."""
    parent = c.get_run(parent_id)
    children = c.search_runs([parent.info.experiment_id], filter_string=f"tags.{PARENT_TAG} = '{parent_id}'",
                             max_results=1000)
    metrics, tags = {}, {"rungs": ", ".join(sorted(r.data.tags.get("rung", "?") for r in children))}
    headline = GATE_METRIC_NAME
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
    if not children:  # no rung started yet: it runs as long as its dvc process does
        status = "KILLED" if dead(parent.data.tags) else parent.info.status
    elif "RUNNING" in statuses:
        status = "RUNNING"
    else:
        status = "FAILED" if statuses & {"FAILED", "KILLED"} else "FINISHED"
    if status not in ("RUNNING", parent.info.status):
        c.set_terminated(parent_id, status)
    return status
