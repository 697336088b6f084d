"""Sharing the CPU among trainings that run at the same time (`dvc queue start -j 2`, or two shells).

torch takes every core by default, so two trainings at once each run as many threads as there are cores
and both crawl (11x slower per step on 2 cores, rather than 2x). Every training or evaluation registers
its pid in a small directory under the system temp dir; a process asked for `threads: 0` takes its share,
cores // live registered processes, and takes it again now and then, so a run that starts or ends
moves everybody's share. Dead entries (a killed run) are ignored and swept.

Within that share it also leaves room for work that is not ours: torch's threads wait for each other at
every parallel region, so a thread that shares its core with a busy process holds the others back (the
tiny rung's step on 2 cores: 9.2 k tokens/s alone, 3.3 k at 2 threads beside one busy process, 5.3 k at
1). At each look it counts the cores' worth of CPU time others ran on our CPUs since the last look
(mmrec/cpus.py) and takes the cores left, rounded, at least one.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from mmrec.cpus import OutsideLoad, usable_cpus
from mmrec.procs import alive, stamp

REGISTRY = Path(tempfile.gettempdir()) / "mmrec-cores"
RECHECK_S = 2.0  # how often a running process looks at the registry again


def fit_threads(share: int, cpus: int, outside: float | None) -> int:
    """Threads beside `outside` cores of other work (None: unknown): the cores left, rounded, within [1, share]."""
    if outside is None:
        return share
    return max(1, min(share, int(cpus - outside + 0.5)))


def _alive(entry: Path) -> bool:
    try:
        owner = entry.read_text()
    except OSError:
        return False
    return owner.partition(".")[0] == entry.name and alive(owner)  # its pid, and not a recycled one


class CoreShare:
    """This process's threads: `requested` when > 0, else its share (usable CPUs / live registered processes),
    less what other work keeps busy when `follow_load`."""

    def __init__(self, requested: int = 0, registry: Path = REGISTRY, follow_load: bool = True):
        self.requested, self.registry = requested, registry
        self.load = OutsideLoad() if follow_load and not requested else None
        self.entry = registry / str(os.getpid())
        self.current = 0
        self._checked = 0.0
        registry.mkdir(parents=True, exist_ok=True)
        tmp = registry / f".{os.getpid()}.tmp"  # renamed in whole: a reader never sees it half-written
        tmp.write_text(stamp())
        os.replace(tmp, self.entry)

    def live(self) -> int:
        n = 0
        for entry in self.registry.iterdir():
            if entry.name.startswith("."):
                continue
            if _alive(entry):
                n += 1
            else:
                entry.unlink(missing_ok=True)  # a killed run left it behind
        return max(n, 1)

    def share(self) -> int:
        """Usable CPUs divided among the mmrec trainings and evaluations that run now."""
        return max(1, usable_cpus() // self.live())

    def threads(self) -> int:
        if self.requested:
            return self.requested
        return fit_threads(self.share(), usable_cpus(), self.load.cores() if self.load else None)

    def apply(self, force: bool = False) -> int:
        """Set torch's thread count to the current share (at most every RECHECK_S seconds unless forced)."""
        now = time.monotonic()
        if force or now - self._checked >= RECHECK_S:
            self._checked = now
            n = self.threads()
            if n != self.current:
                import torch

                torch.set_num_threads(n)
                self.current = n
        return self.current

    def close(self) -> None:
        self.entry.unlink(missing_ok=True)

    def __enter__(self) -> "CoreShare":
        self.apply(force=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
