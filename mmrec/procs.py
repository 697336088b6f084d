"""Which process owns something (an MLflow run, a temp file, a share of the cores), and whether it still lives.

A pid alone names no process for long: pids are reused. A pid with the process's start time does, if that
start time never moves. Linux keeps it in /proc/<pid>/stat as clock ticks since boot, which never change.
The start time that psutil and `ps` report is boot time + those ticks, and the kernel derives boot time
from the wall clock (/proc/stat btime): an NTP step, or a VM resumed from a snapshot, moves it by whole
seconds while the process runs. One `dvc repro` whose stages saw their dvc process "start" at two different
seconds ended up under two pipeline runs; identities here use the ticks.

Ticks mean something on their own machine only: a file in a folder that several machines may share (an absolute
train.checkpoint_dir on a network disk) names its writer with tag(), which adds the machine, and only that
machine judges it (tag_alive: None elsewhere).
"""
from __future__ import annotations

import getpass
import hashlib
import os
import re
import socket
from functools import lru_cache
from pathlib import Path


def start_ticks(pid: int) -> int | None:
    """When `pid` started, as a number that never moves while it runs; None when no such process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else _start_elsewhere(pid)
    except OSError:
        return None
    # the fields after the command name, which is in parentheses and may itself hold spaces and parentheses
    fields = stat.rsplit(b")", 1)[1].split()
    if fields[0] in (b"Z", b"X"):  # killed, not yet reaped by its parent: it runs no more
        return None
    return int(fields[19])  # field 22, starttime


def _start_elsewhere(pid: int) -> int | None:
    """No procfs (macOS, Windows): the start time the OS keeps, fixed when the process starts, in 1/100 s."""
    import psutil

    try:
        return round(psutil.Process(pid).create_time() * 100)
    except psutil.Error:
        return None


def user() -> str:
    """Who runs this process: the login name, else the numeric uid (a container uid without a passwd entry)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


@lru_cache(maxsize=1)
def _boot() -> str:
    """This boot of this machine (a random id): a reboot ends every process, and tick counts start again."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "-"  # no procfs: the start times are wall-clock times, fixed when each process starts


def stamp(pid: int | None = None) -> str:
    """'<pid>.<start>' of a process of this machine (this one by default), for names of local files."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}.{start_ticks(pid)}"


def identity(pid: int | None = None) -> str:
    """'<boot id>/<pid>.<start>': one process among all machines and boots, and nothing about it that changes
    while it runs (unlike the host name, which a laptop's changes with its network)."""
    return f"{_boot()}/{stamp(pid)}"


def owner(pid: int | None = None) -> str:
    """'<host>/<boot id>/<pid>.<start>': a process, and the machine that alone can tell whether it still runs."""
    return f"{socket.gethostname()}/{identity(pid)}"


def alive(stamp_or_pid: str) -> bool:
    """Whether the process a stamp() names still runs (a bare pid, from older names: whether any process has it)."""
    pid, _, start = stamp_or_pid.partition(".")
    try:
        now = start_ticks(int(pid))
    except ValueError:
        return False
    return now is not None and (not start or str(now) == start)


def owner_alive(owner_: str) -> bool | None:
    """Whether the process an owner() names still runs; None when it ran on another machine (only it can tell)."""
    host, _, rest = owner_.partition("/")
    boot, _, pid_start = rest.rpartition("/")
    return _verdict(host == socket.gethostname(), boot == _boot(), pid_start)


def _verdict(host_is_mine: bool, boot_is_mine: bool, pid_start: str) -> bool | None:
    """A process of some machine: judged here when it ran on this one (an earlier boot's are all gone), None when
    it ran on another, which alone can tell whether it still runs."""
    if not host_is_mine:
        return None
    return boot_is_mine and alive(pid_start)


@lru_cache(maxsize=1)
def machine() -> str:
    """This boot of this machine in 16 hex digits, short enough for a file name: 8 of the host name's digest and
    the first 8 of the boot id (0s without procfs, where start times are wall-clock times)."""
    boot = re.sub(r"[^0-9a-f]", "", _boot().lower())[:8].ljust(8, "0")
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8] + boot


TAG = re.compile(r"(\d+\.\d+)\.([0-9a-f]{16})")


def tag(pid: int | None = None) -> str:
    """'<pid>.<start>.<machine>': a process among the machines that may share a folder (an absolute
    train.checkpoint_dir on a network disk), for the names of files there; see tag_alive."""
    return f"{stamp(pid)}.{machine()}"


def tag_alive(tag_or_stamp: str) -> bool | None:
    """Whether the process a tag() names still runs; None when it ran on another machine. A stamp() without the
    machine (names written before tags) is judged here, as it always was."""
    m = TAG.fullmatch(tag_or_stamp)
    if m is None:
        return alive(tag_or_stamp)
    pid_start, where = m.groups()
    return _verdict(where[:8] == machine()[:8], where[8:] == machine()[8:], pid_start)
