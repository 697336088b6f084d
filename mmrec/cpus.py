"""The CPUs this process may use, and how much of them other processes keep busy.

Worker and thread counts start from `usable_cpus()`, the process's CPU affinity (taskset, a container's
cpuset, a batch scheduler's slot), not the host's core count: pinned to 2 of 64 cores, 64 workers would
only queue. `OutsideLoad` reads the busy time of those CPUs in /proc/stat and takes off this process's own
CPU time, so what is left is what everything else ran there: mmrec/training/cores.py leaves that much
to them instead of spinning threads on cores it does not get.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
# /proc/stat's columns after the cpu name: user nice system idle iowait irq softirq steal (guest time is
# inside user already). Steal is time a hypervisor gave other machines: outside load too.
BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)
MIN_INTERVAL_S = 0.5  # a shorter look is a few clock ticks (10 ms each): too coarse to divide by


def usable_cpus() -> int:
    """How many CPUs this process may run on: its affinity where the OS has one (Linux), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _busy_seconds(cpus: set[int], tick: float) -> float | None:
    """Busy time of `cpus` since boot, from /proc/stat; None where there is none to read."""
    try:
        lines = PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            fields = rest.split()
            busy += sum(int(fields[i]) for i in BUSY_COLUMNS if i < len(fields))
    return busy * tick


class OutsideLoad:
    """Cores' worth of CPU time that other processes ran on this process's CPUs between two looks."""

    def __init__(self) -> None:
        try:
            self.cpus = os.sched_getaffinity(0)
        except AttributeError:
            self.cpus = set()
        self.tick = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        busy = _busy_seconds(self.cpus, self.tick) if self.cpus else None
        return None if busy is None else (time.monotonic(), busy, time.process_time())

    def cores(self) -> float | None:
        """Other processes' CPU time on our CPUs since the last reading, over the wall time: 1.0 is one core
        kept busy. None without /proc/stat, or sooner than MIN_INTERVAL_S after the last reading (or the start)."""
        now, last = self._sample(), self._last
        if now is None or last is None or now[0] - last[0] < MIN_INTERVAL_S:
            return None
        self._last = now
        others = (now[1] - last[1]) - (now[2] - last[2])
        return max(0.0, others / (now[0] - last[0]))
