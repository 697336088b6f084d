"""What running a stage again does after Ctrl-C stopped it: DVC runs it again (and it resumes from its
checkpoint), or keeps the result it already has, when nothing the stage depends on changed since dvc.lock
(the stage ran only because it was forced: `dvc repro -f`)."""
from __future__ import annotations

import logging
from pathlib import Path


def dvc_keeps_its_result(stage: str, root: Path) -> bool | None:
    """Whether a plain `dvc repro` keeps `stage`'s earlier result (restored from DVC's cache) instead of running
    it: nothing but its outputs differs from dvc.lock. None outside a DVC project, or when DVC cannot tell."""
    log = logging.getLogger("dvc")  # DVC's warnings would add lines to the one line of the interruption
    quiet, propagate = logging.NullHandler(), log.propagate
    log.addHandler(quiet)
    log.propagate = False
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo, repo.lock:  # free: `dvc repro` lets go of it while a stage runs
            [found] = repo.stage.collect(stage)
            # what `dvc repro` asks first, less the outputs (DVC removed them when it started this run);
            # `dvc status` would wait for the write lock on the outputs that our own `dvc repro` holds
            return not (found.changed_stage() or found.changed_deps())
    except Exception:  # not a DVC project, a stage it does not know, a locked repository: it cannot tell
        return None
    finally:
        log.removeHandler(quiet)
        log.propagate = propagate


def after_interrupt(stage: str, step: int, last: Path, root: Path = Path(".")) -> str:
    """What each next command does with `last`, the checkpoint of `step`, in a few words for the error line."""
    keeps = dvc_keeps_its_result(stage, root)
    if keeps is None:
        return f"running {stage} again resumes from step {step}"
    if keeps:
        return (f"a plain `dvc repro` restores {stage}'s earlier result from DVC's cache instead and leaves "
                f"{last} behind; `dvc repro -f -s {stage}` resumes this run from step {step}")
    return f"`dvc repro` resumes from step {step}"
