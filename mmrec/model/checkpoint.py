"""Checkpoint files: written atomically, read with weights_only=True, holding only plain types."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmrec.errors import UserError
from mmrec.files import replacing


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temp file beside `path`, then rename: a kill mid-write never leaves a torn file."""
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def load(path: str | Path, fix: str = "delete it and rerun", keys: tuple[str, ...] = ("model",)) -> dict[str, Any]:
    """A checkpoint holding at least `keys`; `fix` tells the user what to do when it is missing or damaged.
    weights_only=True: a file holding anything but tensors and plain types is refused, never executed."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} not found; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: say which, never unpickle arbitrary objects
        raise UserError(f"checkpoint {path} cannot be read ({type(err).__name__}: not a checkpoint of ours, "
                        f"or damaged); {fix}") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"checkpoint {path} has no {', '.join(missing)} (not a checkpoint of ours?); {fix}")
    return state


