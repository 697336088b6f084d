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


def another_machine() -> str:
    """procs.machine() of a machine that is not this one (its host name's digest differs)."""
    here = procs.machine()
    return ("0" if here[0] != "0" else "1") * 8 + here[8:]


def test_a_tag_says_which_machine_so_only_that_machine_judges_it():
    """Temp names in a folder that several machines share (an absolute train.checkpoint_dir): a pid of another
    machine says nothing here, whether a process of ours has it or not."""
    tag = procs.tag()
    stamp, machine = tag.rsplit(".", 1)
    assert stamp == procs.stamp() and machine == procs.machine() and len(machine) == 16
    assert procs.tag_alive(tag) is True and procs.tag_alive(f"{a_dead_stamp()}.{machine}") is False
    assert procs.tag_alive(f"{stamp}.{another_machine()}") is None  # a live pid here: still not for us to judge
    assert procs.tag_alive(f"{a_dead_stamp()}.{another_machine()}") is None
    earlier_boot = ("0" if machine[8] != "0" else "1") * 8
    assert procs.tag_alive(f"{stamp}.{machine[:8]}{earlier_boot}") is False  # this machine, rebooted since
    assert procs.tag_alive(stamp) is True and procs.tag_alive(a_dead_stamp()) is False  # names from before tags
