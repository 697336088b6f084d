"""Where the MLflow store is: the tracking URI a stage writes to, resolved without importing MLflow (seconds),
so that a stage with nothing to write (the validate stage's clean-up, mostly) can look without it."""
from __future__ import annotations

import os
from pathlib import Path

from mmrec.config import MlflowParams

# The user's choice, read once: mlflow.set_tracking_uri() writes this variable itself, so reading it
# later would return whatever store this process touched last.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def repo_root() -> Path:
    """The main repository: DVC's queued experiments run in a temporary copy but set DVC_ROOT to it."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(params: MlflowParams) -> str:
    """MLFLOW_TRACKING_URI wins; a relative sqlite path or directory resolves against the main repository."""
    uri = USER_TRACKING_URI or params.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{repo_root() / uri.removeprefix('sqlite:///')}"
    if "://" not in uri:
        return str(repo_root() / uri)
    return uri


def artifact_location(params: MlflowParams) -> str:
    root = params.artifact_root
    return root if "://" in root else (repo_root() / root).as_uri()


def local_store(uri: str) -> Path | None:
    """The file or folder a local tracking URI points at (None for a server): MLflow creates it when it is missing."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:"):
        from urllib.parse import urlparse

        return Path(urlparse(uri).path)
    return None if "://" in uri else Path(uri)
