"""Data-parallel training with 2 CPU processes (gloo), launched the way the stage launches itself."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from mlflow import MlflowClient

from mmrec import checkpoint, distributed
from tests.conftest import REPO, TINY_PARAMS, deep_merge, kill_tree

# max_tokens is all ranks' tokens: 100 steps of 2 ranks x 8 x 32 (it used to allow 200 steps, capped at 120)
PARAMS = deep_merge(TINY_PARAMS, {"train": {"nproc": 2, "max_steps": 120, "max_tokens": 100 * 2 * 8 * 32,
                                            "eval_every": 20}})


def start(root, params=PARAMS):
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return subprocess.Popen([sys.executable, str(REPO / "stages/train.py"), "tiny"], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def runs(root):
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("mmrec")
    return client, [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kind") == "rung"]


def test_two_gloo_processes_train_log_once_and_resume_to_the_same_result(workdir, tmp_path):
    whole = workdir
    finish(start(whole))
    client, [run] = runs(whole)
    assert run.data.params["train.nproc"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/train")] == list(range(1, 101))
    expected = json.loads((whole / "metrics/train/tiny.json").read_text())
    assert expected["tokens_seen"] == 100 * 2 * 8 * 32  # both ranks' windows count, and no more than max_tokens

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


def test_ctrl_c_stops_every_rank_at_the_same_step_and_the_run_ends_killed(workdir):
    """torchrun forwards SIGINT to each rank at its own moment: they must agree on one step boundary, save
    once, and each leave with one line and exit 130 (one alone would leave the other waiting in an all-reduce)."""
    proc = start(workdir, deep_merge(PARAMS, {"train": {"max_steps": 5000, "max_tokens": 0, "eval_every": 20}}))
    last = workdir / "checkpoints/tiny/last.pt"
    deadline = time.time() + 180
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert last.exists(), proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    stops = re.findall(r"error: [^\r\n]*?interrupted at step (\d+)", out)
    assert len(stops) == 2 and len(set(stops)) == 1, out[-3000:]  # one line from each rank, the same step
    assert out.count("error:") == 2, out[-3000:]
    assert checkpoint.load(last)["progress"]["step"] == int(stops[0])  # saved where they stopped
    client, [run] = runs(workdir)
    assert run.info.status == "KILLED"


def _decide(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = distributed.Group(rank, world, rank)
    decision = distributed.broadcast(rank == 1, group)  # rank 1 alone would stop; rank 0 would not
    (Path(out_dir) / f"rank{rank}").write_text(json.dumps(decision))
    dist.destroy_process_group()


def test_every_rank_takes_rank_0s_early_stopping_decision(tmp_path):
    mp.spawn(_decide, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    assert [json.loads((tmp_path / f"rank{r}").read_text()) for r in (0, 1)] == [False, False]
    assert distributed.broadcast("alone", distributed.Group()) == "alone"
