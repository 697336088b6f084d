"""User errors and the one place that turns them into a one-line exit."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A mistake the user can fix (bad params, bad input data, a failed gate): one line, no traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a message saying where the work stopped and how it resumes."""


def _close_progress_bars() -> None:
    """A bar left open by the failure would swallow the start of the error's line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def exits_cleanly(main: F) -> F:
    """Wrap a stage's main(): a UserError prints `error: <message>` and exits 2, leaving no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            _close_progress_bars()
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as err:
            _close_progress_bars()
            print(f"error: {err}" if str(err) else "error: interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
