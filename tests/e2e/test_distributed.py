"""Data-parallel training with 2 CPU processes (gloo), launched the way the stage launches itself: on one
machine, and as two "nodes" (two launchers on 127.0.0.1) that meet at a c10d rendezvous."""
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from mlflow import MlflowClient

from mmrec.model import checkpoint
from mmrec.training import distributed
from mmrec.errors import UserError
from mmrec.paths import RungPaths
from mmrec.pipeline.checkpoint_dirs import training_dir
from mmrec.pipeline.rung import check_nodes_agree
from tests.conftest import REPO, TINY_PARAMS, deep_merge, dvc, kill_tree, run, wait_for_file
from tests.e2e.test_experiments import commit
from tests.e2e.test_bad_input_and_kills import ONE_RUNG

# max_tokens is all ranks' tokens: 100 steps of 2 ranks x 8 x 32 (it used to allow 200 steps, capped at 120)
PARAMS = deep_merge(TINY_PARAMS, {"train": {"nproc": 2, "max_steps": 120, "max_tokens": 100 * 2 * 8 * 32,
                                            "eval_every": 20}})


def start(root, params=PARAMS, env=None):
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return subprocess.Popen([sys.executable, str(REPO / "stages/train.py"), "tiny"], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})


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
    wait_for_file(last, proc)
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
    assert wait_for_file(last, proc, 180), proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    stops = re.findall(r"error: [^\r\n]*?interrupted at step (\d+)", out)
    assert len(stops) == 2 and len(set(stops)) == 1, out[-3000:]  # one line from each rank, the same step
    assert out.count("error:") == 2, out[-3000:]
    assert checkpoint.load(last)["progress"]["step"] == int(stops[0])  # saved where they stopped
    client, [run] = runs(workdir)
    assert run.info.status == "KILLED"


def test_ctrl_c_keeps_the_agreed_save_when_a_rank_needs_longer_than_torchruns_grace(workdir):
    """torchrun SIGKILLs the ranks a grace after it forwards Ctrl-C (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by
    default): a rank that takes longer to reach the agreed step (a first compiled step, a long evaluation, a large
    save) must still save it. Here the grace is cut to 2 s, and rank 0 is held (SIGSTOP) for 6 s as Ctrl-C comes."""
    import psutil

    proc = start(workdir, deep_merge(PARAMS, {"train": {"max_steps": 5000, "max_tokens": 0, "eval_every": 20}}),
                 env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2"})
    last = workdir / "checkpoints/tiny/last.pt"
    assert wait_for_file(last, proc, 180), proc.communicate()[0][-3000:]
    [rank0] = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "0"]
    rank0.suspend()
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(6)  # three graces
    if rank0.is_running():  # else torchrun killed it: the assertions below say what was lost
        rank0.resume()
    out, _ = proc.communicate(timeout=180)
    stops = re.findall(r"error: [^\r\n]*?interrupted at step (\d+)", out)
    assert proc.returncode == 130 and len(stops) == 2 and len(set(stops)) == 1, out[-3000:]
    assert checkpoint.load(last)["progress"]["step"] == int(stops[0])  # the agreed step, saved
    assert runs(workdir)[1][0].info.status == "KILLED"


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


def _two_nodes(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Torch rank 1 runs under DVC, as if c10d had numbered the node that runs `dvc repro` second."""
    os.environ.update(LOCAL_RANK="0", WORLD_SIZE=str(world), LOCAL_WORLD_SIZE="1", GROUP_RANK=str(rank))
    os.environ.pop("DVC_STAGE", None)
    if rank == 1:
        os.environ["DVC_STAGE"] = "train@tiny"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = distributed.init("cpu")
    out = Path(out_dir)
    seen = {"rank": group.rank, "from_rank_0": distributed.broadcast(f"torch rank {rank}", group),
            "gathered": distributed.gather(f"torch rank {rank}", group)}
    node, shared = out / f"node{rank}", str(out / "shared")
    inputs = {"params": {"seed": 1, "train": {"lr": 0.01}}, "code": {"mmrec/model/lm.py": "abc"}}
    if rank == 0:  # a last.pt that only one node sees: written while the folder was not shared
        (node / "checkpoints/tiny").mkdir(parents=True)
        (node / "checkpoints/tiny/last.pt").write_bytes(b"weights")
    cases = {"last.pt on one node": (node, "checkpoints", inputs), "own folders": (node, "checkpoints-2", inputs),
             "shared": (node, shared, inputs),
             "other params": (node, shared, inputs if group.main else {**inputs, "params": {"seed": 2}})}
    for case, (root, ckpt_dir, mine) in cases.items():
        try:
            check_nodes_agree(RungPaths(root, "tiny", ckpt_dir), mine, group)
            seen[case] = "agreed"
        except UserError as err:
            seen[case] = str(err)
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_the_node_under_dvc_takes_rank_0_and_every_rank_checks_it_shares_the_checkpoint_folder(tmp_path):
    mp.spawn(_two_nodes, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]  # by torch rank
    assert [s["rank"] for s in seen] == [1, 0]  # the node under DVC leads: it writes the outputs
    assert {s["from_rank_0"] for s in seen} == {"torch rank 1"}
    assert seen[0]["gathered"] == seen[1]["gathered"] == ["torch rank 1", "torch rank 0"]  # in our rank order
    for s in seen:  # every rank leaves with the same line, naming the folder
        assert s["last.pt on one node"].startswith("train.checkpoint_dir checkpoints: rank 1 on ")
        digest = hashlib.sha256(b"weights").hexdigest()[:12]  # torch rank 0's, our rank 1's
        assert f"sees last.pt {digest} in " in s["last.pt on one node"]
        assert s["last.pt on one node"].endswith("rank 0 on " + socket.gethostname() + " sees no last.pt; make it a "
                                                  "folder every node shares (rank 0 saves last.pt there, and every "
                                                  "rank resumes from it)")
        assert s["own folders"].startswith("train.checkpoint_dir checkpoints-2: rank 1 on ")
        assert "does not see the file rank 0 on" in s["own folders"] and "folder every node shares" in s["own folders"]
        assert s["shared"] == "agreed"
        assert "would train tiny from other inputs than rank 0" in s["other params"]
        assert "(params (seed, train) differ)" in s["other params"]
    assert not list((tmp_path / "shared/tiny").iterdir())  # the probe is gone

    with pytest.raises(UserError, match="2 nodes run this stage under DVC"):
        distributed.lead_first([(True, 0), (True, 1)])
    assert distributed.lead_first([(False, 0), (False, 0), (True, 1), (True, 1)]) == [2, 3, 0, 1]
    assert distributed.lead_first([(False, 0), (False, 1)]) == [0, 1]  # no DVC anywhere: torch's order


def free_port() -> int:
    """A port nothing listens on now. A c10d host cannot be told port 0 (the other nodes must know it in advance),
    so another process may take it before the node that leads binds it: that node then says so, and
    `start_two_nodes` tries again with another port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_copy(root: Path, to: Path) -> Path:
    """The code, params and data of `root` in a folder of their own."""
    for name in ["mmrec", "stages", "params.yaml", "data/tokens", "models/tokenizer"]:
        shutil.copytree(root / name, to / name) if (root / name).is_dir() else shutil.copy(root / name, to / name)
    return to


def with_train(root: Path, **train) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"] |= train
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


STARTED: list[subprocess.Popen] = []


@pytest.fixture
def reaper():
    """Whatever a failed test left running is killed, not left waiting for its other node for minutes."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()


def start_logged(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # a file, not a pipe: nobody reads while they train
        STARTED.append(subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    return STARTED[-1]


def finished(proc: subprocess.Popen, log: Path) -> str:
    proc.wait(timeout=300)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return log.read_text()


def start_two_nodes(lead: Path, other: Path, logs: Path) -> tuple[subprocess.Popen, subprocess.Popen]:
    """`python stages/train.py tiny` on the node that joins (started first: it waits for the other), `dvc repro` on
    the one that leads, meeting at a free port of 127.0.0.1."""
    for _ in range(3):
        endpoint = f"127.0.0.1:{free_port()}"
        for root in (lead, other):
            with_train(root, rdzv_endpoint=endpoint)
        joins = start_logged([sys.executable, "stages/train.py", "tiny"], other, logs / "joins.log")
        leads = start_logged(["dvc", "repro", "train@tiny"], lead, logs / "leads.log")
        deadline = time.time() + 240
        while leads.poll() is None and not listening(endpoint) and time.time() < deadline:
            time.sleep(0.05)
        if leads.poll() is None and time.time() < deadline:
            return leads, joins
        for proc in (joins, leads):
            if proc.poll() is None:
                kill_tree(proc.pid)
            proc.wait()
        if "cannot host the rendezvous" not in (logs / "leads.log").read_text():
            raise AssertionError((logs / "leads.log").read_text()[-3000:])
    raise AssertionError("no free port stayed free long enough for the rendezvous")


def wait_for_checkpoint(last: Path, step: int, *procs: subprocess.Popen) -> None:
    """Until rank 0 has saved `step` in `last` (it replaces the file whole), while every node runs."""
    deadline = time.time() + 240
    while all(p.poll() is None for p in procs) and time.time() < deadline:
        if last.exists() and checkpoint.load(last, keys=("progress",))["progress"]["step"] >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} was not saved: a node ended, or nothing moved in 4 minutes")


def one_line(proc: subprocess.Popen, log: Path) -> str:
    """The node's one line when another node died (DVC adds its own 'ERROR: failed to reproduce' line under it):
    no traceback, no report of torchrun's, and a failed exit."""
    proc.wait(timeout=120)
    out = log.read_text()
    ours = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(ours) == 1 and "Traceback" not in out and "torch.distributed" not in out, \
        out[-3000:]
    return ours[0]


def listening(endpoint: str) -> bool:
    host, port = endpoint.split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def test_the_node_that_leads_says_in_one_line_that_its_port_is_taken(project):
    """What `start_two_nodes` retries on: another process took the port between free_port() and the rendezvous."""
    a, set_params = project
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"127.0.0.1:{taken.getsockname()[1]}"
        set_params(**ONE_RUNG, train={"nnodes": 2, "rdzv_endpoint": endpoint})
        out = dvc(a, "repro", "train@tiny", check=False)
    assert out.returncode != 0 and "Traceback" not in out.stdout + out.stderr
    expected = (f"error: cannot host the rendezvous at {endpoint} on this node (RendezvousConnectionError): is the "
                "port taken, or does train.rdzv_endpoint name another machine?")
    assert [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error:")] == [expected]


def test_two_nodes_train_like_one_node_of_two_processes_and_resume_after_a_node_dies(project, tmp_path, reaper):
    """docs/gpus.md's recipe: node A runs `dvc repro` and leads; node B, a clone of its own with the data pulled
    from the DVC remote, runs the stage by hand; the checkpoint folder is shared. A killed mid-run takes B down
    with one line; run again, they resume and end bit for bit where one machine with 2 processes ends, with one
    MLflow run and one set of outputs (A's)."""
    a, set_params = project
    shared = tmp_path / "shared-checkpoints"
    set_params(**ONE_RUNG, train={"max_steps": 100, "eval_every": 20, "nproc": 1, "nnodes": 2,
                                  "rdzv_endpoint": "127.0.0.1:29500", "checkpoint_dir": str(shared)})
    dvc(a, "remote", "add", "--default", "shared", str(tmp_path / "dvc-remote"))
    dvc(a, "repro", "tokenizer")
    commit(a, "train on two machines: the params, the DVC remote and the data stages' dvc.lock")
    dvc(a, "push")
    b = tmp_path / "b"
    run(["git", "clone", "-q", str(a), str(b)], tmp_path)
    dvc(b, "pull", "tokenizer")
    one = node_copy(a, tmp_path / "one")
    with_train(one, nproc=2, nnodes=1)  # the same total batch on one machine
    finished(start_logged([sys.executable, "stages/train.py", "tiny"], one, tmp_path / "one.log"), tmp_path / "one.log")

    last = training_dir(a, "tiny", str(shared)) / "last.pt"  # node A's workspace's folder: rank 0 names it
    # node B dies just after the checkpoint of step 20: node A says where it stopped and what resumes
    leads, joins = start_two_nodes(a, b, tmp_path)
    wait_for_checkpoint(last, 20, leads, joins)
    kill_tree(joins.pid)
    joins.wait()
    assert "error: lost another rank at step 2" in one_line(leads, tmp_path / "leads.log")
    assert "`dvc repro` resumes from step 20, once every node" in (tmp_path / "leads.log").read_text()

    # resumed; then node A dies (dvc, the stage, its rank) just after step 40: node B says it lost the job
    leads, joins = start_two_nodes(a, b, tmp_path)
    wait_for_checkpoint(last, 40, leads, joins)
    kill_tree(leads.pid)
    leads.wait()
    assert one_line(joins, tmp_path / "joins.log").startswith("error: lost the job at 127.0.0.1:")
    assert "resuming from step 20" in (tmp_path / "leads.log").read_text()

    leads, joins = start_two_nodes(a, b, tmp_path)
    assert "resuming from step 40" in finished(leads, tmp_path / "leads.log")
    finished(joins, tmp_path / "joins.log")

    assert [p for p in ("models/tiny", "metrics/train", "metrics/curves", "mlflow.db") if (b / p).exists()] == []
    assert not any(shared.iterdir())  # finished: the shared checkpoint is gone
    client, [rung_run] = runs(a)  # one run, resumed across both kills, under one pipeline run
    ref_client, [ref] = runs(one)
    assert rung_run.info.status == "FINISHED" and rung_run.data.params["train.nnodes"] == "2"
    everything = client.search_runs([rung_run.info.experiment_id])
    assert [(r.data.tags.get("kind"), r.info.status) for r in everything if r.info.run_id != rung_run.info.run_id] \
        == [("pipeline", "FINISHED")]
    curve = [(m.step, m.value) for m in client.get_metric_history(rung_run.info.run_id, "loss/train")]
    ref_curve = [(m.step, m.value) for m in ref_client.get_metric_history(ref.info.run_id, "loss/train")]
    assert sorted(curve) == sorted(ref_curve) and len(curve) == 100  # bit for bit, every step once
    assert (a / "metrics/train/tiny.json").read_text() == (one / "metrics/train/tiny.json").read_text()
    best, ref_best = checkpoint.load(a / "models/tiny/best.pt"), checkpoint.load(one / "models/tiny/best.pt")
    assert all(torch.equal(best["model"][k], ref_best["model"][k]) for k in ref_best["model"])
