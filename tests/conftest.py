"""Shared fixtures: a small synthetic corpus and a throwaway copy of the repository for real `dvc` runs."""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
for _who in ("AUTHOR", "COMMITTER"):  # commits made by the tests (and dvc exp) need an identity
    os.environ.setdefault(f"GIT_{_who}_NAME", "mmrec tests")
    os.environ.setdefault(f"GIT_{_who}_EMAIL", "tests@mmrec.invalid")

SUBJECTS = ["the king", "a shepherd", "the people", "my brother", "the prophet", "his servant", "the city"]
VERBS = ["went up to", "spake unto", "looked upon", "came down from", "gave bread to", "dwelt in"]
OBJECTS = ["the mountain", "the house of David", "Jerusalem", "the river", "the land of Egypt", "the temple"]


TESTS = Path(__file__).resolve().parent
E2E = TESTS / "e2e"

# The slowest files, slowest first (seconds of one worker in the whole suite on 2 cores, 2026-12-06: 389, 221,
# 197, 161, 159, 149, 145, 143, 122, 82, 80; the next file takes 39). Workers take whole files in collection
# order (--dist loadfile --no-loadscope-reorder), so these start first and the many short files fill in at the
# end: the two workers finish together, instead of one running the last heavy files alone (xdist's own order,
# most tests first, left one worker idle for the last 400 s). A file not listed keeps its place after them.
SLOWEST_FIRST = ["e2e/test_bad_input_and_kills.py", "e2e/test_daily_loop.py", "e2e/test_tracking_server.py",
                 "e2e/test_distributed.py", "e2e/test_team_sharing.py", "e2e/test_pipeline.py",
                 "registry/test_models.py", "e2e/test_experiments.py", "e2e/test_what_users_see.py",
                 "e2e/test_cleanup_after_kills.py", "e2e/test_team_checkpoints.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e/ (the real dvc CLI, servers, several processes) is marked e2e, beside the few
    slow tests marked by hand in the unit folders: `python -m pytest -m "not e2e"` is the fast loop. Then the
    slowest files go first (SLOWEST_FIRST); the order within a file stays."""
    for item in items:
        if item.path.is_relative_to(E2E):
            item.add_marker(pytest.mark.e2e)
    rank = {TESTS / name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path, len(rank)))


@pytest.fixture(autouse=True)
def _sys_path_restored():
    """mlflow.pyfunc.load_model puts a model's code folder (a partial copy of mmrec) first on sys.path: a process
    that a later test spawns would import that copy instead of the package under test."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved


@pytest.fixture(autouse=True)
def _no_inherited_mlflow_store(monkeypatch):
    """Stages started by a test must pick their store from params, not from a variable an earlier test set.
    Cleared after the test too: a module fixture set up before the next test's autouse fixtures would inherit it."""
    variables = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    for var in variables:
        monkeypatch.delenv(var, raising=False)
    yield
    for var in variables:
        os.environ.pop(var, None)


def synthetic_documents(n_docs: int = 120, seed: int = 0) -> list[str]:
    """A tiny, learnable corpus: templated sentences grouped into multi-sentence documents."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        sentences = [f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                     f"in the {rng.randint(1, 40)}th year." for _ in range(rng.randint(4, 9))]
        docs.append(f"Chapter {d}. " + " ".join(sentences))
    return docs


@pytest.fixture
def corpus_txt(tmp_path: Path) -> Path:
    """A .txt corpus: documents separated by blank lines."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(synthetic_documents()) + "\n")
    return path


TINY_PARAMS = {
    "tokenizer": {"vocab_size": 400},
    "model": {"dpg_rank": 4, "chunk_size": 16, "head_dim": 16},
    "train": {"seq_len": 32, "batch_size": 8, "max_steps": 40, "eval_every": 20, "lr": 0.01, "min_lr": 0.001, "eval_windows": 4,
              "warmup_steps": 2, "rewarmup_steps": 2, "log_every": 2, "threads": 1},
    "ladder": {"tiny": {"width": 32, "layers": 1, "memories": 2, "after": "data/tokens"},
               "mini": {"width": 64, "layers": 2, "memories": 2, "after": "models/tiny/handoff.json"}},
    "evaluate": {"sample_tokens": 8, "max_tokens": 2000},
    "promote": {"baseline_margin": 0.0, "min_improvement": 0.0},
}


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["dvc", *args], root, check=check)


def commit(root: Path, message: str) -> None:
    """git add -A and commit in a test project, as its user would."""
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message], root)


LISTENING = re.compile(r"Uvicorn running on (http://\S+)")


def start_server(cmd: list[str], log: Path, timeout: float = 120, **popen) -> tuple[subprocess.Popen, str]:
    """Start a server that was told to listen on port 0, and return it with the URL it reports. The kernel picks
    the port as the server binds it, so nothing else can take it in between (as it could a port probed, closed
    and handed over). uvicorn, behind `mlflow server` and `mlflow models serve`, logs the line once it accepts
    requests. Output goes to `log`, whose tail a failure shows. MLflow 3's job runner (GenAI scorers and trace
    rollups, nothing these tests use) stays off: it is eight more processes and ~23 s of CPU a `mlflow server`."""
    env = {**popen.pop("env", os.environ), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env, **popen)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if found := LISTENING.search(log.read_text()):
            return proc, found.group(1)
        time.sleep(0.2)
    if proc.poll() is None:
        kill_tree(proc.pid)
        proc.wait()
    raise AssertionError(f"{' '.join(cmd[:3])} did not start listening in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all it started (torchrun's workers live in sessions of their own)."""
    import psutil  # comes with dvc

    launcher = psutil.Process(pid)
    for p in [launcher, *launcher.children(recursive=True)]:
        p.kill()


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Whether `path` (a training's first last.pt, say) appeared before proc ended or the timeout passed."""
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return path.exists()


def make_project(root: Path, corpus: Path):
    """A fresh git + DVC copy of the repository at `root` with tiny params reading `corpus`; returns a setter for params."""
    root.mkdir()
    for name in ["mmrec", "stages", "dvc.yaml", "params.yaml", ".gitignore", ".dvc/config", ".dvc/.gitignore",
                 "attempts/.gitignore"]:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / name)

    def set_params(**sections) -> None:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params = deep_merge(params, TINY_PARAMS)
        # mini keeps the budget these tests were written against, not the shipped ladder's
        params["ladder"]["mini"] |= {"max_steps": 300, "dropout": 0.0}
        params["data"] |= {"source": str(corpus), "val_fraction": 0.1, "test_fraction": 0.1}
        if "ladder" in sections:  # a ladder is replaced whole, never merged rung by rung
            params["ladder"] = sections.pop("ladder")
        params = deep_merge(params, sections)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    set_params()
    run(["git", "init", "-q"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], root)
    return set_params


@pytest.fixture
def project(tmp_path: Path, corpus_txt: Path):
    """A fresh git + DVC copy of the repository with tiny params and the synthetic corpus; returns a setter for params."""
    root = tmp_path / "repo"
    return root, make_project(root, corpus_txt)


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory) -> Path:
    """A root with data/prepared, models/tokenizer and data/tokens built by the real code from the synthetic corpus."""
    from mmrec.config import DataParams, TokenizerParams
    from mmrec.data.corpus import write_splits
    from mmrec.data.tokenizer import encode_splits, train_tokenizer

    root = tmp_path_factory.mktemp("tokenized")
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    write_splits(synthetic_documents(), prepared, DataParams(val_fraction=0.1, test_fraction=0.1))
    model = train_tokenizer(prepared / "train.txt", root / "models" / "tokenizer", TokenizerParams(vocab_size=400), seed=0)
    encode_splits(model, prepared, root / "data" / "tokens", num_threads=1)
    return root


@pytest.fixture
def workdir(tokenized: Path, tmp_path: Path) -> Path:
    """A private copy of `tokenized` that a test may write into (models/, metrics/, mlflow.db)."""
    root = tmp_path / "work"
    shutil.copytree(tokenized, root)
    return root


def grow_train_split(root: Path, n_tokens: int) -> Path:
    """Make root/data/tokens/train.bin `n_tokens` long (its own ids over and over) and say so in header.json:
    a train split shaped like a large corpus's, made in a moment. Returns the file."""
    import json

    import numpy as np

    tokens = root / "data" / "tokens"
    header = json.loads((tokens / "header.json").read_text())
    ids = np.fromfile(tokens / "train.bin", dtype=header["dtype"])
    np.resize(ids, n_tokens).tofile(tokens / "train.bin")
    header["splits"]["train"]["tokens"] = n_tokens
    (tokens / "header.json").write_text(json.dumps(header))
    return tokens / "train.bin"


def tiny_params(root: Path, **sections):
    """Validated tiny Params whose MLflow store lives under `root`."""
    from mmrec.config import parse_params

    raw = deep_merge(TINY_PARAMS, {"mlflow": {"tracking_uri": f"sqlite:///{root}/mlflow.db",
                                              "artifact_root": str(root / "mlruns")}})
    return parse_params(deep_merge(raw, sections))


ONE_RUNG = {"ladder": {"tiny": {"width": 32, "layers": 1, "memories": 2, "after": "data/tokens"}}}


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def edit_params(root: Path, edit) -> str:
    """Apply `edit` to params.yaml; return the text it had, to put back."""
    path = root / "params.yaml"
    before = path.read_text()
    params = yaml.safe_load(before)
    edit(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return before


@pytest.fixture
def tokenized_project(project):
    root, set_params = project
    set_params(**ONE_RUNG)
    dvc(root, "repro", "tokenizer")
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{root}/mlflow.db").search_experiments()  # an initialised store
    return root
