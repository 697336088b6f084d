"""Cleaning up after dead attempts: the validate stage runs it on the next `dvc repro` or `dvc exp run` after a
stage was killed (its marker in attempts/ changes the stage's deps: mmrec/attempts.py), and whenever params change.

A killed stage leaves behind what only its own next run used to clean: its MLflow run RUNNING for ever, temp
files beside its outputs (data/.prepared.tmp-*, as large as the corpus), a logged model that no registered
version points at (a promote killed while it registered). A stage that DVC restores from its run-cache never
runs at all. So every run, temp and logged model records the process that owns it (mmrec/procs.py); what
names a process that is gone belongs to a dead attempt and goes, and what a live process owns (a queued
experiment running beside this one, a stage started by hand) is left alone, as is what a process on another
machine owns (a shared checkpoint_dir): only that machine can tell whether it still runs.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

from mmrec import attempts
from mmrec.config import MlflowParams, Params
from mmrec.files import sweep_tree
from mmrec.paths import OUTPUT_ROOTS
from mmrec.pipeline import checkpoint_dirs
from mmrec.tracking.location import local_store, tracking_uri


def clean_up(params: Params, root: Path = Path(".")) -> list[str]:
    """Remove the dead attempts' temp files under `root` and training folders nobody can resume, end their runs,
    delete their orphan logged models, then their markers. Returns one line per thing cleaned up (none when there
    was nothing), and one for all that processes on other machines own, which it leaves."""
    lines, elsewhere = [], []
    for top in (*OUTPUT_ROOTS, Path(params.train.checkpoint_dir)):  # an absolute checkpoint_dir: named whole
        gone, theirs = sweep_tree(root / top)
        lines += [f"removed {p.relative_to(root) if p.is_relative_to(root) else p} (its writer is gone)" for p in gone]
        elsewhere += theirs
    removed, theirs = checkpoint_dirs.sweep(root / params.train.checkpoint_dir, root)
    lines += removed
    elsewhere += theirs
    swept_store = True
    if not _nothing_in_store(params.mlflow):
        from mmrec.tracking import run as track
        from mmrec.tracking.store import StoreError

        try:
            lines += [f"ended MLflow run '{name}' (its process is gone)"
                      for name in track.close_abandoned(params.mlflow)]
            lines += [f"deleted logged model {m} (no version points at it; its process is gone)"
                      for m in track.drop_orphan_models(params.mlflow)]
        except StoreError as err:  # the stage that needs the store will stop on it; this one only cleans up
            lines.append(f"left the MLflow store as it is: {err}")
            swept_store = False
    if swept_store:  # else the markers stay, so that the next `dvc repro` tries again
        elsewhere += attempts.sweep(root)[1]
    if elsewhere:  # once, however many
        lines.append(f"left {len(elsewhere)} file(s) that processes on other machines own as they are (only those "
                     f"machines can tell whether they still run), such as {elsewhere[0]}")
    return lines


def _nothing_in_store(params: MlflowParams) -> bool:
    """True when a local sqlite store surely holds nothing to clean up: no store yet, or no RUNNING run and no
    logged model without a version. Asked in plain SQL, so that an up-to-date `dvc repro` does not import
    MLflow (seconds) for nothing; any doubt (a server, another schema, a lock) answers False."""
    uri = tracking_uri(params)
    if not uri.startswith("sqlite:///"):
        return False
    db = local_store(uri)
    if not db.exists():
        return True
    try:
        with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=1) as con:
            running = con.execute("select exists(select 1 from runs where status = 'RUNNING')").fetchone()[0]
            orphans = con.execute("select exists(select 1 from logged_models m where lifecycle_stage = 'active' and "
                                  "not exists(select 1 from model_versions where source = 'models:/' || m.model_id))"
                                  ).fetchone()[0]
    except sqlite3.Error:
        return False
    return not running and not orphans
