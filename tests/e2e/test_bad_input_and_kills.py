"""A bad params.yaml, a damaged artifact, a faulty tracking store or a kill: one line, and nothing lost.

Every case drives the real parts: the dvc CLI on a temp copy of the repository, the real stage scripts,
an sqlite MLflow store held locked by a second process, pickles that would run code if loaded.
"""
import json
import os
import pickle
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from mmrec.model import checkpoint
from tests.conftest import ONE_RUNG, dvc, edit_params, kill_tree, ran, run

def outputs(root: Path) -> dict[str, bytes]:
    """Every file a stage wrote (models/, metrics/, data/), byte for byte; wall-clock figures aside."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for top in ("models", "metrics", "data") for p in sorted((root / top).rglob("*"))
            if p.is_file() and "speed" not in p.parts and p.name != ".gitignore"}


def kept(root: Path) -> dict[str, bytes]:
    """The outputs a failed validate must leave alone (DVC removes the validate stage's own marker)."""
    return {k: v for k, v in outputs(root).items() if k != "data/params.ok"}


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def stage(root: Path, name: str, *args: str, env: dict | None = None, timeout: float = 300):
    """Run a stage script the way dvc does, in the project's root."""
    return subprocess.run([sys.executable, f"stages/{name}.py", *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def runs(root: Path):
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("mmrec")
    found = [] if exp is None else client.search_runs([exp.experiment_id])
    return [r for r in found if r.data.tags.get("kind") == "rung"]  # the pipeline's parent run aside


def statuses(root: Path) -> list[str]:
    """The status of every rung run, read with plain sqlite: MLflow's client caches a connection per store,
    which a test that replaces the database file would leave pointing at the old one."""
    with sqlite3.connect(root / "mlflow.db") as db:  # the rung runs (their pipeline's parent run aside)
        return sorted(status for (status,) in db.execute(
            "select status from runs join tags using (run_uuid) where key = 'kind' and value = 'rung'"))


BAD_EDITS = [
    ("train.lerning_rate", lambda p: p["train"].update(lerning_rate=0.01), "unknown key 'train.lerning_rate'"),
    ("train.lr: fast", lambda p: p["train"].update(lr="fast"), "train.lr = 'fast'"),
    ("train.lr: -0.5", lambda p: p["train"].update(lr=-0.5), "train.lr = -0.5"),
    ("train.batch_size: 0", lambda p: p["train"].update(batch_size=0), "train.batch_size = 0"),
    ("model.arch", lambda p: p["model"].update(arch="transformer"), "model.arch = 'transformer'"),
    ("ladder.tiny.max_steps", lambda p: p["ladder"]["tiny"].update(max_steps=-5), "ladder.tiny.max_steps = -5"),
    ("trian", lambda p: p.update(trian={"lr": 1}), "unknown key 'trian'"),
    ("mini width", lambda p: p["ladder"]["mini"].update(width=48),
     "ladder.mini.width 48 must be an integer multiple of ladder.tiny.width 32"),
]


def test_a_bad_params_yaml_deletes_nothing_and_a_gate_setting_retrains_no_rung(project):
    root, _ = project
    dvc(root, "repro")
    before, kept_before = outputs(root), kept(root)
    assert {"models/tiny/best.pt", "models/tiny/run.json", "models/mini/best.pt", "metrics/eval/mini.json",
            "models/mini/handoff.json"} <= set(before)
    for label, edit, expected in BAD_EDITS:
        good = edit_params(root, edit)
        proc = dvc(root, "repro", check=False)
        assert proc.returncode != 0, label
        [line] = error_lines(proc)
        assert expected in line, (label, line)
        assert "Traceback" not in proc.stderr, label
        assert ran(proc.stdout) == ["validate"], label
        (root / "params.yaml").write_text(good)
        assert kept(root) == kept_before, label

    # back to valid params: nothing but the validate stage has anything to do
    assert not set(ran(dvc(root, "repro").stdout)) - {"validate"}
    assert outputs(root) == before

    # a gate threshold reruns the gates (and the report of their decisions), never a training: the child depends on
    # the parent's handoff only
    edit_params(root, lambda p: p["promote"].update(min_improvement=0.001))
    assert ran(dvc(root, "repro").stdout) == ["validate", "promote@tiny", "promote@mini", "report"]
    assert (root / "models/mini/best.pt").read_bytes() == before["models/mini/best.pt"]
    assert json.loads((root / "models/mini/promotion.json").read_text())["threshold_bpb"] != \
        json.loads(before["models/mini/promotion.json"])["threshold_bpb"]


def test_the_run_cache_restores_a_configuration_seen_before(project):
    root, set_params = project
    set_params(**ONE_RUNG)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "one rung"], root)
    dvc(root, "repro")
    first = outputs(root)
    trained = len(runs(root))

    edit_params(root, lambda p: p["train"].update(lr=0.005))
    assert "train@tiny" in ran(dvc(root, "repro").stdout)
    run(["git", "checkout", "params.yaml"], root)
    back = dvc(root, "repro")
    assert "train@tiny" not in ran(back.stdout)
    assert "Stage 'train@tiny' is cached - skipping run" in back.stdout
    assert outputs(root) == first
    assert dvc(root, "status").stdout.strip() == "Data and pipelines are up to date."

    # an experiment with params seen before restores too: no training, no new MLflow run
    exp = dvc(root, "exp", "run", "-S", "train.lr=0.005")
    assert "train@tiny" not in ran(exp.stdout) and "Stage 'train@tiny' is cached" in exp.stdout
    assert len(runs(root)) == trained + 1  # only the lr=0.005 run of the edit above


def test_store_faults_are_one_line_and_leave_no_run_running(tokenized_project):
    root = tokenized_project
    (root / "mlflow.db").write_bytes(b"this is not a database" * 100)  # replaces the fixture's store
    proc = stage(root, "train", "tiny")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = error_lines(proc)
    assert f"MLflow store sqlite:///{root}/mlflow.db: not an SQLite database" in line

    (root / "mlflow.db").unlink()
    (root / "mlruns").write_text("a file where the artifact root should be")
    proc = stage(root, "train", "tiny")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = error_lines(proc)
    assert "mlruns" in line and "make it a writable directory" in line

    # the run started, then its artifacts could not be written: it ends FAILED, not RUNNING
    (root / "mlruns").unlink()
    assert stage(root, "train", "tiny").returncode == 0  # creates the experiment and its artifact root
    os.rename(root / "mlruns", root / "mlruns.good")
    (root / "mlruns").write_text("not a directory")
    proc = stage(root, "train", "tiny")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(error_lines(proc)) == 1
    assert statuses(root) == ["FAILED", "FINISHED"]


def hold_lock(db: Path) -> subprocess.Popen:
    """A process holding the sqlite store locked (as a long write transaction would) until its stdin closes."""
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sqlite3, sys
c = sqlite3.connect({str(db)!r}, isolation_level=None)
c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read(); c.execute('COMMIT')
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def start_stage(root: Path, name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, f"stages/{name}.py", *args], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def until_waiting(proc: subprocess.Popen) -> tuple[float, list[str]]:
    """Read the stage's stderr up to its line saying it waits for the store; (when it came, lines so far)."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("waiting for the MLflow store"):
            return time.monotonic(), lines
    raise AssertionError("the stage never said it waits for the store:\n" + "".join(lines[-20:]))


def test_a_locked_store_is_waited_on_for_the_stated_limit_then_reported_in_one_line(tokenized_project):
    """mlflow.lock_timeout_s is the whole wait: MLflow's own sqlite busy timeout (20 s inside every try) no
    longer sits under it unannounced."""
    root = tokenized_project
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("lock_timeout_s: 120.0",
                                                                                  "lock_timeout_s: 4"))
    assert "lock_timeout_s: 4" in (root / "params.yaml").read_text()
    stage(root, "validate")
    holder = hold_lock(root / "mlflow.db")
    try:
        proc = start_stage(root, "train", "tiny")
        said_waiting, _ = until_waiting(proc)
        err = proc.stderr.read()
        proc.wait(timeout=60)
        after_saying = time.monotonic() - said_waiting
    finally:
        holder.kill()
    assert proc.returncode == 2 and "Traceback" not in err
    [line] = [l for l in err.splitlines() if l.startswith("error:")]
    assert "still locked by another process after" in line and "mlflow.lock_timeout_s" in line
    assert int(re.search(r"after (\d+)s", line).group(1)) in (4, 5)
    assert after_saying < 4 + 2  # the first try waited SQLITE_WAIT_S (1 s) before saying so; exiting takes a moment


def test_a_lock_released_while_the_stage_waits_lets_it_finish(tokenized_project):
    root = tokenized_project
    holder = hold_lock(root / "mlflow.db")
    proc = start_stage(root, "train", "tiny")
    until_waiting(proc)  # held past sqlite's own wait: only the backoff can carry the stage through
    time.sleep(2)
    holder.stdin.close()
    holder.wait()
    err = proc.stderr.read()
    proc.wait(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert statuses(root) == ["FINISHED"]


def test_evaluate_on_a_device_torch_lacks_leaves_the_run_as_it_was(tokenized_project):
    root = tokenized_project
    assert stage(root, "train", "tiny").returncode == 0
    edit_params(root, lambda p: p["train"].update(device="cuda"))
    proc = stage(root, "evaluate", "tiny", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = error_lines(proc)
    assert "train.device = 'cuda' but torch sees no CUDA device" in line
    assert statuses(root) == ["FINISHED"]  # not RUNNING: the device is checked before the run is reopened


class Payload:
    """Unpickling this would run a shell command: every loader must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"model": Payload(marker), "config": {}}, f)


def test_malicious_checkpoints_are_refused_unexecuted_by_every_loader(project, tmp_path):
    root, _ = project
    dvc(root, "repro", "train@tiny")
    marker = tmp_path / "pwned"
    good = (root / "models/tiny/best.pt").read_bytes()

    plant(root / "models/tiny/best.pt", marker)  # evaluate reads it
    proc = stage(root, "evaluate", "tiny")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = error_lines(proc)
    assert "models/tiny/best.pt cannot be read" in line and "dvc checkout --force train@tiny" in line

    proc = stage(root, "train", "mini")  # growth reads the parent's best.pt
    [line] = error_lines(proc)
    assert proc.returncode == 2 and "models/tiny/best.pt cannot be read" in line

    (root / "models/tiny/best.pt").write_bytes(good)
    plant(root / "checkpoints/mini/last.pt", marker)  # resume reads last.pt
    proc = stage(root, "train", "mini")
    [line] = error_lines(proc)
    assert proc.returncode == 2 and "checkpoints/mini/last.pt cannot be read" in line
    assert "delete" in line and "checkpoints/mini" in line
    assert not marker.exists()


def test_damaged_artifacts_name_the_file_and_the_fix(tokenized_project):
    root = tokenized_project
    assert stage(root, "train", "tiny").returncode == 0
    spm = root / "models/tokenizer/spm.model"
    good = spm.read_bytes()
    spm.write_bytes(b"garbage" * 50)
    proc = stage(root, "evaluate", "tiny")
    [line] = error_lines(proc)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "models/tokenizer/spm.model: not a SentencePiece model" in line and "dvc checkout --force tokenizer" in line
    spm.write_bytes(good)

    test_bin = root / "data/tokens/test.bin"
    test_bin.write_bytes(b"\xff" * test_bin.stat().st_size)  # the right size, impossible ids
    proc = stage(root, "evaluate", "tiny")
    [line] = error_lines(proc)
    assert proc.returncode == 2 and "data/tokens/test.bin: holds ids beyond vocab_size" in line
    dvc(root, "checkout", "--force", "tokenizer")  # every output is cached: the damaged one comes back

    (root / "models/tiny/run.json").write_text("{not json")
    proc = stage(root, "evaluate", "tiny")
    [line] = error_lines(proc)
    assert proc.returncode == 2 and "models/tiny/run.json: not valid JSON" in line and "dvc checkout --force train@tiny" in line


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def checkpoint_step(root: Path) -> int:
    """The step that checkpoints/tiny/last.pt holds."""
    return checkpoint.load(root / "checkpoints/tiny/last.pt")["progress"]["step"]


def test_a_kill_before_the_first_checkpoint_leaves_no_run_running_and_no_temp_behind(tokenized_project, tmp_path):
    root = tokenized_project
    edit_params(root, lambda p: p["train"].update(max_steps=3000, eval_every=3000))
    for stale in ("data/.tokens.tmp-99999999-x", "models/.tokenizer.tmp-99999999-y", "data/.prepared.tmp-99999999-z"):
        (root / stale).mkdir(parents=True)
    proc = subprocess.Popen(["dvc", "repro", "train@tiny"], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert wait_for(lambda: "RUNNING" in statuses(root),
                    proc, timeout=180)
    kill_tree(proc.pid)
    proc.wait()
    assert not (root / "checkpoints/tiny/last.pt").exists(), "the kill came after the first checkpoint"

    edit_params(root, lambda p: p["train"].update(max_steps=40, eval_every=20))
    dvc(root, "repro", "-f", "download", "tokenizer")
    dvc(root, "repro", "train@tiny")
    assert statuses(root) == ["FINISHED", "KILLED"]
    assert not list((root / "data").glob(".*.tmp-*")) and not list((root / "models").glob(".*.tmp-*"))


def interrupt(cmd: list[str], root: Path) -> str:
    """Start `cmd` in a session of its own, press Ctrl-C (SIGINT to the whole process group, as a terminal
    does) once a checkpoint exists, and return its stderr."""
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert wait_for(lambda: (root / "checkpoints/tiny/last.pt").exists(), proc), "no checkpoint before the end"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err[-3000:]
    return err


def test_ctrl_c_in_training_says_where_it_stopped_and_what_each_rerun_does(tokenized_project):
    root = tokenized_project
    edit_params(root, lambda p: p["train"].update(max_steps=100, eval_every=10))
    stage(root, "validate")
    err = interrupt([sys.executable, "stages/train.py", "tiny"], root)
    [line] = [l for l in err.splitlines() if l.startswith("error:")]
    step = checkpoint_step(root)
    assert line == (f"error: interrupted at step {step}, saved in checkpoints/tiny/last.pt; "
                    f"`dvc repro` resumes from step {step}")  # train@tiny has never run: DVC will run it
    assert statuses(root) == ["KILLED"]

    out = dvc(root, "repro", "train@tiny")
    assert f"resuming from step {step}" in out.stdout + out.stderr
    [r] = runs(root)
    assert r.info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    for key in r.data.metrics:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"the resumed run logged {key} twice at some step"

    # A forced rerun of the finished stage, stopped: a plain `dvc repro` keeps DVC's earlier result instead
    err = interrupt(["dvc", "repro", "-f", "-s", "train@tiny"], root)
    [line] = [l for l in err.splitlines() if l.startswith("error:")]
    step = checkpoint_step(root)
    assert line == (f"error: interrupted at step {step}, saved in checkpoints/tiny/last.pt; a plain `dvc repro` "
                    "restores train@tiny's earlier result from DVC's cache instead and leaves checkpoints/tiny/last.pt "
                    f"behind; `dvc repro -f -s train@tiny` resumes this run from step {step}")
    out = dvc(root, "repro", "train@tiny")
    assert "Running stage 'train@tiny'" not in out.stdout and (root / "checkpoints/tiny/last.pt").exists()
    out = dvc(root, "repro", "-f", "-s", "train@tiny")
    assert f"resuming from step {step}" in out.stdout + out.stderr
    assert not (root / "checkpoints/tiny").exists()
    assert statuses(root) == ["FINISHED", "FINISHED"]
