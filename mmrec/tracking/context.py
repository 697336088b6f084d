"""Where a run comes from: the code (git commit, branch, script), the user and workspace, the DVC stage and
experiment, and the data (the token files as MLflow dataset inputs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# store.py first: it sets MLflow's environment (telemetry off, short HTTP retries) before mlflow is imported
from mmrec.tracking import store  # noqa: F401, I001

from mlflow.entities import Dataset, DatasetInput, InputTag  # noqa: E402

from mmrec.config import DataParams  # noqa: E402
from mmrec.paths import SPLITS  # noqa: E402
from mmrec.procs import user  # noqa: E402


def git(*args: str) -> str:
    """Output of a git command in the current directory ('' when git or the repository is missing)."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except OSError:
        return ""


def git_commit() -> str:
    return git("rev-parse", "HEAD") or "unknown"


def workspace() -> str:
    """The directory a stage runs in: the repository, or a DVC queue's temporary copy of it."""
    return str(Path.cwd().resolve())


def context_tags() -> dict[str, str]:
    """Where a run comes from: who, which script and commit (MLflow's Source and User columns), and the DVC
    stage and experiment (set by `dvc repro` / `dvc exp run`)."""
    commit = git_commit()
    tags = {"git_commit": commit, "workspace": workspace(), "mlflow.user": user(), "mlflow.source.type": "LOCAL",
            "mlflow.source.name": source_name(), "mlflow.source.git.commit": commit}
    if branch := git("rev-parse", "--abbrev-ref", "HEAD"):
        tags["mlflow.source.git.branch"] = branch
    if remote := git("config", "--get", "remote.origin.url"):
        tags["mlflow.source.git.repoURL"] = remote
    for env, tag in [("DVC_STAGE", "dvc_stage"), ("DVC_EXP_NAME", "dvc_exp_name"),
                     ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev")]:
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def source_name() -> str:
    """The script that made the run, relative to the repository (stages/train.py), else the program's name."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None or not script.is_file():
        return "python"
    try:
        return script.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return script.name


def _source_type(source: str) -> str:
    if source.startswith(("http://", "https://")):
        return "http"
    return "code" if source.startswith("package:") else "local"


def split_datasets(data: DataParams, tokens_dir: Path) -> list[DatasetInput]:
    """The train/val/test token files as MLflow dataset inputs: name, digest (content sha256), source, profile."""
    from mmrec.files import sha256_file

    header = json.loads((tokens_dir / "header.json").read_text())
    corpus = Path(data.source.removeprefix("package:").split("?")[0].rstrip("/")).name.split(".")[0] or "corpus"
    contexts = {"train": "training", "val": "validation", "test": "testing"}
    inputs = []
    for split in SPLITS:
        stats = header["splits"][split]
        sha = sha256_file(tokens_dir / f"{split}.bin")
        profile = {"documents": stats["documents"], "tokens": stats["tokens"], "bytes": stats["bytes"],
                   "sha256": sha, "tokenizer_sha256": header["tokenizer_sha256"]}
        schema = {"mlflow_tensorspec": {"features": json.dumps([{"name": "token_id", "type": "tensor",
                                                                  "tensor-spec": {"dtype": header["dtype"],
                                                                                  "shape": [-1]}}])}}
        ds = Dataset(name=f"{corpus}-{split}", digest=sha[:32],  # MLflow keeps at most 36 characters
                     source_type=_source_type(data.source), source=json.dumps({"uri": data.source}),
                     schema=json.dumps(schema), profile=json.dumps(profile))
        inputs.append(DatasetInput(ds, [InputTag("mlflow.data.context", contexts[split])]))
    return inputs
