"""train.threads 0: the cores divided among the trainings that run at once."""
import subprocess
import sys
import time

from mmrec.training.cores import CoreShare, cpu_count
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
    share = CoreShare(0, registry)
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
