"""Checkpoint files: written atomically, read with weights_only=True, holding only plain types; and exports
(safetensors beside a config.json), which hold no pickle at all."""
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




# An export (python -m mmrec.registry export): the weights as safetensors, which hold tensors and a JSON header and
# nothing a loader could run, beside config.json (the architecture and where the weights come from).
EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_FORMAT = "model.safetensors", "config.json", "mmrec"


def save_export(model: torch.nn.Module, meta: dict[str, Any], folder: Path) -> None:
    """model.safetensors (a tied tensor stored once, as safetensors' save_model does) and config.json: `meta`, which
    holds the model's config under 'config', with the format named."""
    import json

    from safetensors.torch import save_model

    with replacing(folder / EXPORT_WEIGHTS) as tmp:  # which gives it the usual mode: safetensors writes it private
        save_model(model, str(tmp))
    (folder / EXPORT_CONFIG).write_text(json.dumps({"format": EXPORT_FORMAT, "format_version": 1, **meta}, indent=2,
                                                   sort_keys=True) + "\n")


def read_export(folder: Path, fix: str) -> dict[str, Any]:
    """config.json of an export; a folder that holds none (or not ours) is one line."""
    import json

    try:
        meta = json.loads((folder / EXPORT_CONFIG).read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} holds no {EXPORT_CONFIG}: not an export of `python -m mmrec.registry export`; "
                        f"{fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{folder / EXPORT_CONFIG}: not valid JSON (damaged?); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or "config" not in meta:
        raise UserError(f"{folder / EXPORT_CONFIG} is not the config of an mmrec export; {fix}")
    return meta


def load_export_weights(model: torch.nn.Module, folder: Path, fix: str) -> None:
    """The export's weights into `model`, which must have exactly their names and shapes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = folder / EXPORT_WEIGHTS
    if not path.is_file():
        raise UserError(f"{path} not found; {fix}")
    try:
        load_model(model, str(path), strict=True)
    except SafetensorError as err:
        raise UserError(f"{path} cannot be read ({err}); {fix}") from None
