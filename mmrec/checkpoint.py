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


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: say which, never unpickle arbitrary objects
        raise UserError(f"checkpoint {path} cannot be read ({type(err).__name__}); delete it and rerun") from None

