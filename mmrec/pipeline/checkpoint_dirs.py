"""Which folder of train.checkpoint_dir a training keeps its last.pt and best.pt in, and how it stays its own.

Inside the workspace (the default `checkpoints`) a rung's folder is <checkpoint_dir>/<rung>: as private as the
workspace itself. A checkpoint_dir outside it (absolute, or reached through `..` or a link: a folder that clones,
people or queued experiments share) gets one folder per rung and workspace, <rung>.<host>.<workspace>.<digest>:
the host and the workspace's folder name (a queued experiment's name: it runs in a temporary copy) say whose it
is, and the digest of the host and the workspace's path keeps two apart. Either way the training that uses a
folder claims it first in its training.json (rung, host, workspace, experiment and procs.owner() of the process),
and no other training deletes or resumes a folder whose owner lives: a kill then `dvc repro` in the same
workspace resumes from it as before, and the validate stage's sweep removes a folder only when its owner is
gone and so is its workspace (a queued experiment's temporary copy), never one that another machine owns.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock

from mmrec.errors import UserError
from mmrec.files import write_json
from mmrec.procs import owner, owner_alive

INFO = "training.json"


def training_dir(root: Path, rung: str, checkpoint_dir: str) -> Path:
    """The folder of this workspace's training of `rung` (see the module's docstring)."""
    base, workspace = root / checkpoint_dir, root.resolve()
    if base.resolve().is_relative_to(workspace):
        return base / rung
    host = socket.gethostname()
    dvc_root = os.environ.get("DVC_ROOT")
    queued = bool(dvc_root) and Path(dvc_root).resolve() != workspace  # a queued experiment's temporary copy
    label = os.environ.get("DVC_EXP_NAME", "") if queued else workspace.name
    digest = hashlib.sha256(f"{host}\n{workspace}".encode()).hexdigest()[:8]
    return base / ".".join([rung, _safe(host.split(".")[0]), _safe(label or workspace.name), digest])


def _safe(text: str) -> str:
    return re.sub(r"[^\w-]", "-", text)[:40] or "-"


def _read(folder: Path) -> dict[str, Any] | None:
    try:
        held = json.loads((folder / INFO).read_text())
    except (OSError, ValueError):  # none, or not ours: nobody holds the folder
        return None
    return held if isinstance(held, dict) else None


def claim(folder: Path, rung: str, root: Path) -> None:
    """Make `folder` this process's, or stop with one line when a training that may still run holds it."""
    lock = Path(tempfile.gettempdir()) / f"mmrec-ckpt-{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]}.lock"
    with FileLock(lock):  # two trainings of one workspace starting at once: one wins
        held = _read(folder) or {}
        process = held.get("process") or ""
        if process and process != owner():
            verdict = owner_alive(process)
            pid = process.rpartition("/")[2].partition(".")[0]
            if verdict:
                raise UserError(f"{folder} is in use by another training of {rung} on this machine (pid {pid}); "
                                "wait for it to end, or stop it")
            if verdict is None:
                raise UserError(f"{folder} is in use by a training on {held.get('host')} (pid {pid}), and only that "
                                f"machine can tell whether it still runs; if it does not, delete {folder / INFO} "
                                "and run the stage again to resume from its last.pt")
        write_json(folder / INFO, {"rung": rung, "host": socket.gethostname(), "workspace": str(root.resolve()),
                                   "experiment": os.environ.get("DVC_EXP_NAME", ""), "process": owner()})


def release(folder: Path) -> None:
    """Leave `folder` (its last.pt stays for a resume) when this process holds it."""
    held = _read(folder)
    if held is not None and held.get("process") == owner():
        write_json(folder / INFO, held | {"process": ""})


def sweep(checkpoint_dir: Path, root: Path) -> tuple[list[str], list[Path]]:
    """Remove the training folders of this machine whose owner and workspace are both gone (nobody can resume
    them). Returns a line for each, and the folders that a process on another machine holds (left alone).
    A checkpoint_dir inside the workspace `root` is left as it is: its folders go with the workspace, and a
    moved clone resumes from them."""
    lines, elsewhere = [], []
    if checkpoint_dir.resolve().is_relative_to(root.resolve()):
        return lines, elsewhere
    for info in sorted(checkpoint_dir.glob(f"*/{INFO}")):
        folder, held = info.parent, _read(info.parent)
        if held is None:
            continue
        process, workspace = held.get("process") or "", Path(held.get("workspace") or folder)
        if held.get("host") != socket.gethostname():
            if process:
                elsewhere.append(folder)
            continue
        if (process and owner_alive(process) is not False) or workspace.exists():
            continue  # running, or its workspace's next `dvc repro` resumes it (or starts over)
        shutil.rmtree(folder, ignore_errors=True)
        lines.append(f"removed {folder} (its training is gone, and so is its workspace {workspace})")
    return lines, elsewhere
