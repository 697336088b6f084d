"""train.threads 0: the cores divided among the trainings that run at once."""
import os
import subprocess
import sys
import time

import pytest

from mmrec.cpus import usable_cpus as cpu_count
from mmrec.training.cores import CoreShare
from tests.conftest import REPO


def registered_child(registry) -> subprocess.Popen:
    """Another process holding a share until it is told to stop (its stdin closes)."""
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path; from mmrec.training.cores import CoreShare; "
            f"s = CoreShare(0, Path({str(registry)!r})); print('ok', flush=True); sys.stdin.read(); s.close()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ok"
    return child


def test_shares_follow_the_processes_that_run_now(tmp_path):
    registry = tmp_path / "cores"
    share = CoreShare(0, registry, follow_load=False)  # the registry alone (outside load: below)
    assert share.threads() == cpu_count()
    child = registered_child(registry)
    assert share.live() == 2 and share.threads() == max(1, cpu_count() // 2)
    child.stdin.close()
    child.wait()
    assert share.live() == 1 and share.threads() == cpu_count()  # the survivor takes everything back

    (registry / "999999999").write_text(str(time.time()))  # a killed run's leftover: no such process
    assert share.live() == 1 and not (registry / "999999999").exists()
    assert CoreShare(3, registry).threads() == 3  # an explicit train.threads is kept
    share.close()
    assert not (registry / str(share.entry.name)).exists()


def test_threads_fit_the_cores_other_work_leaves():
    from mmrec.training.cores import fit_threads

    assert fit_threads(2, 2, None) == 2  # nothing measured yet: the share
    assert fit_threads(2, 2, 0.3) == 2  # a shell, a daemon: every core still pays
    assert fit_threads(2, 2, 0.67) == 1  # one busy process beside our 2 threads gets 2/3 of a core
    assert fit_threads(2, 2, 2.0) == 1  # never fewer than one
    assert fit_threads(4, 8, 1.0) == 4  # the share of mmrec's own processes still bounds it


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and two CPUs")
def test_a_busy_process_beside_it_takes_a_thread_away(tmp_path):
    """On 2 cores beside one busy process, 2 threads ran the tiny step at 3.3 k tokens/s and 1 thread at 5.3 k:
    a thread that shares its core holds the other up at every parallel region."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpus[0]}))
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path; "
            f"from mmrec.training.cores import CoreShare; s = CoreShare(0, Path({str(tmp_path / 'cores')!r})); "
            "time.sleep(1.5); print(s.threads())")
    try:
        time.sleep(0.2)  # running before the look starts
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              preexec_fn=lambda: os.sched_setaffinity(0, set(cpus)))
    finally:
        busy.kill()
        busy.wait()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"  # both CPUs are its share; it takes the one left
