"""Kill -9 in the middle of a stage, then `dvc repro`: nothing the dead attempt owned is left behind, even when
DVC restores the stage from its run-cache and so never runs it again (the validate stage cleans up: mmrec/pipeline/cleanup.py).

The kill cases drive the real dvc CLI on a temp copy of the repository and kill the whole process tree.
"""
import json
import sqlite3
import subprocess
import time
from pathlib import Path

from mlflow import MlflowClient

from mmrec.pipeline import cleanup
from mmrec import procs
from mmrec.tracking.store import fluent_store
from tests.conftest import dvc, edit_params, kill_tree, ran, synthetic_documents, tiny_params
from tests.base.test_procs import a_dead_stamp, another_machine


def test_the_temps_of_dead_writers_go_and_nothing_else(tmp_path):
    dead, live = a_dead_stamp(), procs.stamp()
    gone = [f"data/.prepared.tmp-{dead}-k2j4/train.txt", f"models/tiny/.best.{dead}-abcd1234.tmp.pt",
            f"metrics/train/.tiny.{dead}-x_9.tmp.json", f"data/.tokens.old-{dead}/test.bin",
            "data/.tokens.tmp-999999999-x/a.bin"]  # a bare pid: named before the start was kept
    kept = [f"data/.prepared.tmp-{live}-q/train.txt", "data/prepared/train.txt", "models/tiny/best.pt",
            "data/.gitignore", "checkpoints/tiny/last.pt", "metrics/.hidden.tmp"]
    for name in gone + kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    lines = cleanup.clean_up(tiny_params(tmp_path), tmp_path)  # (no store yet: nothing to end there)
    assert sorted(lines) == sorted(f"removed {Path(name).parent if '.tmp-' in name or '.old-' in name else name} "
                                   "(its writer is gone)" for name in gone)
    assert all((tmp_path / name).exists() for name in kept) and not any((tmp_path / n).exists() for n in gone)


def test_a_dead_writers_temp_in_a_shared_checkpoint_folder_goes_and_is_named_whole(tmp_path):
    shared = tmp_path / "shared"  # train.checkpoint_dir on another disk: absolute, outside the repository
    stale = shared / f"tiny/.last.{a_dead_stamp()}-abcd.tmp.pt"
    stale.parent.mkdir(parents=True)
    stale.write_text("x")
    repo = tmp_path / "repo"
    repo.mkdir()
    lines = cleanup.clean_up(tiny_params(repo, train={"checkpoint_dir": str(shared)}), repo)
    assert lines == [f"removed {stale} (its writer is gone)"] and not stale.exists()


def test_what_processes_on_other_machines_own_in_a_shared_checkpoint_folder_is_left_with_one_line(tmp_path):
    """Another machine's pid is no process of ours, live or dead: only that machine can tell (procs.tag)."""
    shared, repo = tmp_path / "shared", tmp_path / "repo"
    theirs = f"{a_dead_stamp()}.{another_machine()}"  # no process here has that pid now; there, it may run
    left = [shared / f"tiny.gpu2.mmrec.0123abcd/.last.{theirs}-abcd.tmp.pt",
            shared / f"mini.gpu2.mmrec.0123abcd/.best.{theirs}-efgh.tmp.pt"]
    gone = shared / f"tiny.here.mmrec.4567cdef/.last.{a_dead_stamp()}.{procs.machine()}-ijkl.tmp.pt"
    for path in [*left, gone]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    held = shared / "tiny.gpu3.mmrec.89ab0123"  # a training folder that a process on another machine holds
    held.mkdir()
    (held / "training.json").write_text(json.dumps({"rung": "tiny", "host": "gpu3", "workspace": "/nowhere",
                                                    "process": f"gpu3/some-boot/{a_dead_stamp()}"}))
    repo.mkdir()
    lines = cleanup.clean_up(tiny_params(repo, train={"checkpoint_dir": str(shared)}), repo)
    assert lines[:-1] == [f"removed {gone} (its writer is gone)"] and len(lines) == 2
    assert lines[-1].startswith("left 3 file(s) that processes on other machines own as they are (only those "
                                "machines can tell whether they still run), such as ")
    assert all(p.exists() for p in [*left, held]) and not gone.exists()


def test_the_store_is_opened_only_when_it_may_hold_something_to_clean_up(tmp_path):
    params = tiny_params(tmp_path).mlflow
    assert cleanup._nothing_in_store(params)  # no store yet
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.create_experiment("mmrec", artifact_location=(tmp_path / "mlruns").as_uri())
    run = c.create_run(exp).info.run_id
    assert not cleanup._nothing_in_store(params)  # a RUNNING run
    c.set_terminated(run)
    assert cleanup._nothing_in_store(params)
    model = c.create_logged_model(exp, source_run_id=run, name="model")
    assert not cleanup._nothing_in_store(params)  # a logged model no version points at
    with fluent_store(f"sqlite:///{tmp_path}/mlflow.db"):  # the registry looks the model up in the global store
        c.create_registered_model("mmrec")
        c.create_model_version("mmrec", f"models:/{model.model_id}", run_id=run, model_id=model.model_id)
    assert cleanup._nothing_in_store(params)


def query(root: Path, sql: str) -> list[tuple]:
    """Rows of the MLflow store, read with plain sqlite (while a stage may be writing to it)."""
    with sqlite3.connect(root / "mlflow.db", timeout=5) as db:
        return db.execute(sql).fetchall()


def statuses(root: Path) -> dict[str, list[str]]:
    """The statuses of the rung runs and of the pipeline runs."""
    found = {"rung": [], "pipeline": []}
    for kind, status in query(root, "select t.value, r.status from runs r join tags t using (run_uuid) "
                                    "where t.key = 'kind'"):
        found[kind].append(status)
    return {kind: sorted(s) for kind, s in found.items()}


def kill_when(cmd: list[str], root: Path, ready, what: str, timeout: float = 180) -> None:
    """Start `cmd` in `root`, SIGKILL its whole tree as soon as ready() holds."""
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if ready():
                break
        except sqlite3.Error:  # the store is being created or written just now
            pass
        time.sleep(0.02)
    assert proc.poll() is None, f"`{' '.join(cmd)}` ended before {what}"
    kill_tree(proc.pid)
    proc.wait()


UP_TO_DATE = "Data and pipelines are up to date."


def test_a_forced_training_killed_before_its_checkpoint_is_restored_and_leaves_no_run_running(tokenized_project):
    """The kill leaves the stage's marker in attempts/, which the validate stage depends on: `dvc status` is clean
    after a clean run, and the next `dvc repro` after a kill runs validate, which cleans up (mmrec/attempts.py)."""
    root = tokenized_project
    edit_params(root, lambda p: p["train"].update(max_steps=400, eval_every=400))  # one checkpoint: at the end
    dvc(root, "repro", "train@tiny")  # the run-cache now holds this training
    assert dvc(root, "status", "train@tiny").stdout.strip() == UP_TO_DATE
    kill_when(["dvc", "repro", "-f", "-s", "train@tiny"], root, lambda: "RUNNING" in statuses(root)["rung"],
              "its run opened")
    assert not (root / "checkpoints/tiny/last.pt").exists(), "the kill came after the first checkpoint"
    assert statuses(root) == {"rung": ["FINISHED", "RUNNING"], "pipeline": ["FINISHED", "RUNNING"]}
    [marker] = (root / "attempts").glob("train@tiny.*")
    assert dvc(root, "status", "validate").stdout.split() == ["validate:", "changed", "deps:", "modified:",
                                                              "attempts"]

    out = dvc(root, "repro", "train@tiny")
    assert "Stage 'train@tiny' is cached - skipping run" in out.stdout and "train@tiny" not in ran(out.stdout)
    assert statuses(root) == {"rung": ["FINISHED", "KILLED"], "pipeline": ["FAILED", "FINISHED"]}
    assert out.stdout.count("cleaned up: ended MLflow run") == 2  # the rung's run and its pipeline's
    assert not marker.exists() and dvc(root, "status", "train@tiny").stdout.strip() == UP_TO_DATE


def test_a_download_killed_midway_leaves_no_temp_when_the_rerun_is_restored(project, tmp_path):
    root, set_params = project
    big = tmp_path / "big.txt"  # big enough that splitting it takes a moment
    big.write_text("\n\n".join(synthetic_documents(n_docs=60000)) + "\n")
    set_params(data={"source": str(big)})
    dvc(root, "repro", "download")
    kill_when(["dvc", "repro", "-f", "download"], root, lambda: list((root / "data").glob(".prepared.tmp-*")),
              "it began writing data/prepared")
    assert list((root / "data").glob(".prepared.tmp-*")), "the kill came after the temp was renamed"

    out = dvc(root, "repro", "download")
    assert "Stage 'download' is cached - skipping run" in out.stdout and "download" not in ran(out.stdout)
    assert not list((root / "data").glob(".prepared.tmp-*"))
    assert (root / "data/prepared/train.txt").stat().st_size > 10_000_000


def test_a_promote_killed_while_it_registers_leaves_no_orphan_model(tokenized_project):
    root = tokenized_project
    dvc(root, "repro", "evaluate@tiny")
    kill_when(["dvc", "repro", "promote@tiny"], root, lambda: query(root, "select model_id from logged_models"),
              "it logged the model")
    [(orphan, where)] = query(root, "select model_id, artifact_location from logged_models")
    assert query(root, "select * from model_versions") == [], "the kill came after the version was registered"

    out = dvc(root, "repro")
    [(model,)] = query(root, "select model_id from logged_models where lifecycle_stage = 'active'")
    assert model != orphan and query(root, "select source from model_versions") == [(f"models:/{model}",)]
    assert not Path(where.removeprefix("file://")).exists()  # its weights went with it
    assert f"cleaned up: deleted logged model {orphan}" in out.stdout
    assert "RUNNING" not in statuses(root)["rung"] + statuses(root)["pipeline"]
