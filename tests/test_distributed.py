"""Data-parallel training with 2 CPU processes (gloo), launched the way the stage launches itself."""
import json
import subprocess
import sys
import time

import yaml
from mlflow import MlflowClient

from tests.conftest import REPO, TINY_PARAMS, deep_merge, kill_tree

PARAMS = deep_merge(TINY_PARAMS, {"train": {"nproc": 2, "max_steps": 120, "eval_every": 20}})


def start(root):
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    return subprocess.Popen([sys.executable, str(REPO / "stages/train.py"), "tiny"], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def runs(root):
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("mmrec")
    return client, client.search_runs([exp.experiment_id])


def test_two_gloo_processes_train_log_once_and_resume_to_the_same_result(workdir, tmp_path):
    whole = workdir
    finish(start(whole))
    client, [run] = runs(whole)
    assert run.data.params["train.nproc"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(1, 121))
    expected = json.loads((whole / "metrics/train/tiny.json").read_text())
    assert expected["tokens_seen"] == 120 * 2 * 8 * 32  # both ranks' windows count

    killed = tmp_path / "killed"
    killed.mkdir()
    for sub in ["data", "models"]:
        subprocess.run(["cp", "-r", str(whole / sub), str(killed / sub)], check=True)
    (killed / "models/tiny").exists() and subprocess.run(["rm", "-r", str(killed / "models/tiny")], check=True)
    proc = start(killed)
    last = killed / "checkpoints/tiny/last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait()
    assert last.exists() and not (killed / "metrics/train/tiny.json").exists(), "the run ended before the kill"

    out = finish(start(killed))
    assert "resuming from step" in out, out[:2000]
    assert json.loads((killed / "metrics/train/tiny.json").read_text()) == expected
    client, [run] = runs(killed)  # the resumed run continues the same MLflow run
    assert run.info.status == "FINISHED"
