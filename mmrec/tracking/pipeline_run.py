"""Which pipeline execution a stage belongs to, and what its runs are called.

The rung runs of one pipeline execution (`dvc repro`, one `dvc exp run`, one queued experiment) nest
under a parent run that carries the headline: best test bits per byte and the champion rung. Stages
are separate processes, so each finds its parent by a key that is the same for every stage of one
execution and differs between executions: the dvc process that runs the stages, named so that neither
pid reuse nor a step of the wall clock can change it (see `dvc_execution`, `pipeline_key`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import DatasetInput

from mmrec.config import PARAMS_FILE, Params, flat_params_text
from mmrec.procs import identity, owner
from mmrec.tracking.store import Store, experiment_id
from mmrec.tracking.context import context_tags, git, git_commit, split_datasets
from mmrec.tracking.run import OWNER_TAG, PARENT_TAG, Run


def dvc_process() -> int | None:
    """The pid of the nearest `dvc` process above this one: the one that runs every stage of a `dvc repro`,
    `dvc exp run` or queued experiment (`dvc exp exec-run`, one per experiment under `dvc queue start -j N`).
    None when no dvc process started us (a stage run by hand)."""
    import psutil

    try:
        proc = psutil.Process().parent()
        while proc is not None:
            cmd = proc.cmdline()
            if any(Path(a).name == "dvc" for a in cmd[:2]) or cmd[1:3] == ["-m", "dvc"]:
                return proc.pid
            proc = proc.parent()
    except psutil.Error:
        pass
    return None


def dvc_execution() -> str:
    """procs.identity() of the dvc process (not psutil's create_time(), which is boot time + start ticks, and boot
    time moves with the wall clock): every stage of one execution shares it, two never do. '' by hand."""
    dvc = dvc_process()
    return identity(dvc) if dvc else ""


def pipeline_key(params: Params, execution: str | None = None) -> str:
    """Equal for every stage of one pipeline execution, different for any two. Under dvc, the dvc process names
    the execution (and nothing that can change while it runs, such as HEAD after a commit, takes part);
    stages run by hand share one parent per experiment, commit and params."""
    execution = dvc_execution() if execution is None else execution
    exp = os.environ.get("DVC_EXP_NAME") or "workspace"
    parts = [exp, execution] if execution else [exp, os.environ.get("DVC_EXP_BASELINE_REV") or git_commit(),
                                                params.digest()]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _short(value: Any, limit: int = 24) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def changed_params(root: Path = Path(".")) -> dict[str, Any]:
    """Params that differ from the commit the run started from (what `dvc exp run -S` changed), dotted keys."""
    rev = os.environ.get("DVC_EXP_BASELINE_REV") or "HEAD"
    base_text = git("show", f"{rev}:{PARAMS_FILE.as_posix()}")
    path = root / PARAMS_FILE
    if not base_text or not path.exists():
        return {}
    base, now = flat_params_text(base_text), flat_params_text(path.read_text())
    return {k: v for k, v in now.items() if base.get(k) != v}


def run_label(root: Path = Path(".")) -> str:
    """What sets this run apart, in a few characters: the changed params ('lr=0.001, arch=gpt'), else the branch."""
    return label_of(changed_params(root))


def config_tags(params: Params, rung: str, root: Path = Path(".")) -> dict[str, str]:
    """The run's config (mlflow ui's "Group by" and compare group its runs by it): `config`, the digest of the
    params it is a run of whatever its seed (Params.config_identity), and `config_label`, what sets that config
    apart in words: run_label less the seed and what cannot change the model."""
    identity = params.config_identity(rung)
    changed = {k: v for k, v in changed_params(root).items() if k in identity}
    return {"config": params.config_digest(rung), "config_label": label_of(changed)}


def label_of(changed: dict[str, Any]) -> str:
    """'lr=0.001, arch=gpt' for these changed params (dotted keys where two leaves share a name), else the branch."""
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


def pipeline_run(params: Params, label: str, inputs: list[DatasetInput]) -> str:
    """The parent run of this pipeline execution: found by its key, or created (under the store's lock, so two
    stages can never make two)."""
    store = Store(params.mlflow)
    c = store.client
    exp_id = store.call(experiment_id, c, params.mlflow)
    dvc = dvc_process()
    key = pipeline_key(params, identity(dvc) if dvc else "")
    with store_lock(store.uri):
        found = store.call(c.search_runs, [exp_id], filter_string=f"tags.`mmrec.pipeline` = '{key}'", max_results=1)
        if found:
            return found[0].info.run_id
        exp = os.environ.get("DVC_EXP_NAME")
        base = f"pipeline · {label}" + (f" · {exp}" if exp else "")
        tags = {**context_tags(), "mmrec.pipeline": key, "mmrec.name_base": name_tag(base), "kind": "pipeline",
                OWNER_TAG: owner(dvc)}  # the dvc process (or, by hand, this stage)
        run = store.call(c.create_run, exp_id, run_name=store.call(unique_name, c, exp_id, base), tags=tags)
    parent = Run(store, run.info.run_id)
    parent.log_params(params.flat())
    if inputs:
        parent.log_inputs(inputs)
    return parent.id


REPORT_FOLDER = "report"  # the report's folder among the pipeline run's artifacts
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store unless told otherwise


def log_report(params: Params, page: Path, pictures: list[Path]) -> str:
    """Log a markdown page and the pictures it shows as artifacts of this execution's pipeline run (in
    REPORT_FOLDER), and return the run's id. MLflow's artifact view renders markdown, but an image only from an
    absolute http(s) URL (a relative one it shows as text): in the logged copy each picture is the server's
    get-artifact route, under the tracking server's URL (for a local store, `mlflow ui`'s default address),
    followed by a relative link to the same route, which opens it from whichever address serves the page.
    A pipeline run that this stage opened itself (no rung ran in this execution: DVC restored them all) ends
    here, as a rung's end would end it."""
    from urllib.parse import quote

    parent_id = pipeline_run(params, run_label(), [])
    store = Store(params.mlflow)
    base = store.uri.rstrip("/") if store.uri.startswith(("http://", "https://")) else LOCAL_UI
    text = page.read_text(encoding="utf-8")
    for picture in pictures:
        route = f"get-artifact?path={quote(f'{REPORT_FOLDER}/{picture.name}', safe='')}&run_uuid={parent_id}"
        text = text.replace(f"]({picture.name})", f"]({base}/{route})\n\n[{picture.name}]({route})")
    with tempfile.TemporaryDirectory() as tmp:
        logged = Path(tmp) / page.name
        logged.write_text(text, encoding="utf-8")
        for path in [logged, *pictures]:
            store.call(store.client.log_artifact, parent_id, str(path), REPORT_FOLDER)
    c = store.client
    children = store.call(c.search_runs, [store.call(experiment_id, c, params.mlflow)],
                          filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=1)
    if not children:
        store.call(c.set_terminated, parent_id, "FINISHED")
    return parent_id


def start_rung_run(params: Params, rung: str, tags: dict[str, str], root: Path = Path(".")) -> Run:
    """A rung's run, named '<rung> · <what sets it apart>[ · <dvc exp>]', nested under its pipeline's run, tagged
    with its config (config_tags), with the data splits as dataset inputs and system metrics on (unless
    mlflow.system_metrics is false)."""
    from mmrec.paths import TOKENS

    label = run_label(root)
    inputs = split_datasets(params.data, root / TOKENS)
    parent_id = pipeline_run(params, label, inputs)
    exp = os.environ.get("DVC_EXP_NAME")
    base = f"{rung} · {label}" + (f" · {exp}" if exp else "")
    store = Store(params.mlflow)
    with store_lock(store.uri):
        name = store.call(unique_name, store.client, store.call(experiment_id, store.client, params.mlflow), base)
        run = Run.start(params.mlflow, name, {**tags, **config_tags(params, rung, root),
                                              "mmrec.name_base": name_tag(base), "kind": "rung"}, parent_id=parent_id)
    run.log_inputs(inputs)
    return run
