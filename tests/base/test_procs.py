"""A process's identity: pid and start, which outlives neither the process nor a reboot, and no pid reuse fakes."""
import os
import socket
import subprocess
import sys

from mmrec import procs


def a_dead_stamp() -> str:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    stamp = procs.stamp(child.pid)
    child.wait()
    return stamp


def test_a_stamp_names_one_process_while_it_lives():
    assert procs.alive(procs.stamp()) and procs.owner_alive(procs.owner()) is True
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    stamp = procs.stamp(child.pid)
    assert procs.alive(stamp)
    child.stdin.close()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: /proc lists it still (a zombie)
    assert not procs.alive(stamp)
    child.wait()
    assert not procs.alive(stamp) and not procs.alive(a_dead_stamp())

    pid, start = procs.stamp().split(".")
    assert not procs.alive(f"{pid}.{int(start) + 1}")  # the same pid, started at another time: a reused pid
    assert procs.alive(str(os.getpid())) and not procs.alive("999999999")  # names from before the start was kept


def test_an_owner_on_another_machine_or_in_another_boot_is_not_for_us_to_judge():
    here = procs.owner()
    host, boot, stamp = here.split("/")
    assert host == socket.gethostname()
    assert procs.owner_alive(f"elsewhere/{boot}/{stamp}") is None
    assert procs.owner_alive(f"{host}/another-boot/{stamp}") is False  # this machine rebooted since
