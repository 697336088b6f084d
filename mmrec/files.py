"""Atomic writes and content digests, shared by every stage.

Outputs are built under a temp name beside their final place and renamed in only when complete,
so a crash leaves the old output (or nothing), never a half-written file a later stage would trust.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mmrec.errors import UserError
from mmrec.procs import tag, tag_alive

_UMASK = os.umask(0)
os.umask(_UMASK)  # mkstemp/mkdtemp create private (0600/0700) paths: published outputs get the usual modes


# The temp names of replacing() and replacing_dir(): each carries its writer's procs.tag() ('<pid>.<start>.<machine>':
# the machine, so that a sweep of a folder that several machines share leaves their temps alone; '<pid>.<start>' or
# a bare pid in names written before).
_OWNER = r"(\d+(?:\.\d+(?:\.[0-9a-f]{16})?)?)"
TEMP_NAME = re.compile(rf"\..+?(?:\.{_OWNER}-\w+\.tmp(?:\.\w+)?|\.tmp-{_OWNER}-\w+|\.old-{_OWNER})")


def temp_owner(name: str) -> str | None:
    """The tag (or older stamp) in a temp's name, or None when `name` is no temp of ours."""
    m = TEMP_NAME.fullmatch(name)
    return next(g for g in m.groups() if g) if m else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_stale(path: Path) -> None:
    """Remove the temp files and dirs that a killed writer of `path` left beside it (a temp of a process
    still alive is left alone)."""
    for stale in set(path.parent.glob(f".{path.stem}.*")) | set(path.parent.glob(f".{path.name}.*")):
        owner = temp_owner(stale.name)
        ours = owner is not None and stale.name.startswith(
            (f".{path.stem}.{owner}-", f".{path.name}.tmp-{owner}-", f".{path.name}.old-{owner}"))
        if ours and tag_alive(owner) is False:  # another machine's (None) is for it to judge
            _remove(stale)


def sweep_tree(root: Path) -> tuple[list[Path], list[Path]]:
    """Remove every temp under `root` whose writer is dead, whatever output it was for: a stage that DVC restores
    from its run-cache never runs, so it never cleans up the temps of its own killed attempt. Returns what went,
    and the temps that writers on other machines own (left alone: only their machine can tell if they live)."""
    gone, elsewhere = [], []
    for top, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            owner = temp_owner(name)
            verdict = None if owner is None else tag_alive(owner)
            if owner is not None and verdict is None:
                elsewhere.append(Path(top) / name)
            elif verdict is False:
                _remove(Path(top) / name)
                gone.append(Path(top) / name)
        dirs[:] = [d for d in dirs if Path(top) / d not in gone + elsewhere]  # not into what was just judged
    return gone, elsewhere


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` (same suffix, so format-sniffing writers work); it replaces
    `path` when the block succeeds and is removed when it fails (or by the next writer, after a kill -9)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.{tag()}-", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def replacing_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty directory beside `path` to build in; on success it takes `path`'s place (the old
    one is moved aside first: rename cannot replace a non-empty directory), on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    me = tag()
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{me}-"))
    old = path.with_name(f".{path.name}.old-{me}")
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def dvc_fix(stage: str) -> str:
    """The fix for a damaged DVC output: every output is cached, so restore it; or rebuild it."""
    return f"restore it with `dvc checkout --force {stage}` or rebuild it with `dvc repro -f {stage}`"


def load_json(path: str | Path, stage: str) -> Any:
    """A JSON file that `stage` wrote: missing or damaged, one line naming the file and the fix."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; run `dvc repro {stage}` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON (damaged?); {dvc_fix(stage)}") from None


def write_json(path: str | Path, obj: Any) -> None:
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    with replacing(dst) as tmp:
        shutil.copyfile(src, tmp)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
