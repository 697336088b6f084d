"""Peak resident memory of this process, as the data stages record it in metrics/speed/."""
from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set, in MB (2^20 bytes).

    Linux's VmHWM starts again at exec; getrusage's ru_maxrss does not, so a stage started by a large
    process (dvc, pytest) would report its parent's size at fork time instead of its own.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux: ru_maxrss is the best there is (KB on Linux, bytes on macOS)
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(kb / 1024 if kb < 1 << 40 else kb / 2**20, 1)
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return round(kb / 1024, 1)
