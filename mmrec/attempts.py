"""Attempt markers: what tells the next `dvc repro` that a stage was killed since the last one.

Each stage keeps an empty file attempts/<stage>.<procs.tag()> while it runs and removes it however it exits, but for
a kill -9, the OOM killer or a power cut: exactly the ends that clean nothing up. The validate stage depends on
the folder (dvc.yaml), so it runs, and sweeps (mmrec/pipeline/cleanup.py), on the next `dvc repro` after such an
end, restored from the run-cache or not, and `dvc status` is clean after a clean run. The folder is the main
repository's: a queued experiment runs in a temporary copy that goes with it, and its marker must outlive it.
"""
from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Callable, TypeVar

from mmrec.paths import ATTEMPTS
from mmrec.procs import TAG, tag, tag_alive

F = TypeVar("F", bound=Callable[..., object])
_MARKER = re.compile(rf".+?\.({TAG.pattern})")  # <stage>.<tag>


def folder(root: Path = Path(".")) -> Path:
    """The main repository's attempts/: DVC's queued experiments run in a temporary copy but set DVC_ROOT to it."""
    return Path(os.environ.get("DVC_ROOT") or root) / ATTEMPTS


def _stage() -> str:
    """This stage as DVC names it (train@tiny), or the script and its arguments when run by hand."""
    name = os.environ.get("DVC_STAGE") or "-".join([Path(sys.argv[0]).stem, *sys.argv[1:]])
    return re.sub(r"[^\w@-]", "-", name)[:80]


def marked(main: F) -> F:
    """Wrap a stage's main(): its marker exists while it runs (inside exits_cleanly, so every exit but a kill
    removes it)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        marker = folder() / f"{_stage()}.{tag()}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        try:
            return main(*args, **kwargs)
        finally:
            marker.unlink(missing_ok=True)

    return wrapper  # type: ignore[return-value]


def sweep(root: Path = Path(".")) -> tuple[list[Path], list[Path]]:
    """Remove the markers of stages that are gone. Returns them, and the markers of another machine's stages
    (a workspace on a shared disk), left for it to judge."""
    gone, elsewhere = [], []
    for marker in sorted(folder(root).glob("*")):
        m = _MARKER.fullmatch(marker.name)
        verdict = tag_alive(m.group(1)) if m else True  # else .gitignore, or a file of the user's
        if verdict is None:
            elsewhere.append(marker)
        elif verdict is False:
            marker.unlink(missing_ok=True)
            gone.append(marker)
    return gone, elsewhere
