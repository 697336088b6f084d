"""Reruns that reproduce and queued experiments that land in one MLflow store: the real dvc CLI."""
import json
import time

from mlflow import MlflowClient

from mmrec.tracking.compare import main as compare
from tests.conftest import commit, dvc

ONE_RUNG = {"ladder": {"tiny": {"width": 32, "layers": 1, "memories": 2, "after": "data/tokens"}}}


def run_queue(root, jobs: int, timeout: float = 400) -> str:
    """`dvc queue start -j <jobs>`, then wait until nothing is queued or running: `dvc queue status` at the end."""
    dvc(root, "queue", "start", "-j", str(jobs))
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = dvc(root, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    return status


def reproducible_metrics(root):
    """Every metrics file but the wall-clock ones, byte for byte."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "metrics").rglob("*"))
            if p.is_file() and "speed" not in p.parts}


def test_forced_reruns_give_bit_identical_metrics(project):
    root, set_params = project
    set_params(**ONE_RUNG)
    dvc(root, "repro")
    first = reproducible_metrics(root)
    assert {"metrics/train/tiny.json", "metrics/eval/tiny.json", "metrics/tokenizer.json"} <= set(first)
    dvc(root, "repro", "-f")
    assert reproducible_metrics(root) == first
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mmrec").experiment_id])
    runs = [r for r in runs if r.data.tags.get("kind") == "rung"]  # each execution also has its pipeline run
    assert len(runs) == 2 and len({r.data.tags["params_hash"] for r in runs}) == 1


def test_queued_experiments_run_two_at_a_time_into_the_main_store(project, capsys):
    root, set_params = project
    set_params(**ONE_RUNG)
    dvc(root, "repro", "tokenizer")
    commit(root, "baseline")
    dvc(root, "exp", "run", "--queue", "-S", "train.lr=0.005", "-n", "lr-low")
    dvc(root, "exp", "run", "--queue", "-S", "model.arch=gpt", "-n", "gpt")
    status = run_queue(root, jobs=2)
    assert status.count("Success") == 2, status + dvc(root, "queue", "logs", "gpt").stdout

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mmrec").experiment_id])
    by_exp = {r.data.tags.get("dvc_exp_name"): r for r in runs if r.data.tags.get("kind") == "rung"}
    assert set(by_exp) == {"lr-low", "gpt"}
    for name, lr, arch in [("lr-low", "0.005", "mmrec"), ("gpt", "0.01", "gpt")]:
        r = by_exp[name]
        assert r.info.status == "FINISHED" and r.data.params["train.lr"] == lr and r.data.params["model.arch"] == arch
        assert len(client.get_metric_history(r.info.run_id, "loss/train")) == 40
        assert "test/bpb" in r.data.metrics and r.data.tags["promote.decision"] == "promoted"
        # nested under its own execution's pipeline run, which carries the headline
        parent = client.get_run(r.data.tags["mlflow.parentRunId"])
        assert parent.data.tags["kind"] == "pipeline" and parent.data.tags["dvc_exp_name"] == name
        moved = r.data.tags["promote.champion"] == "True"  # only a version better than the champion takes it
        assert parent.data.tags.get("champion_rung") == ("tiny" if moved else None) and parent.info.status == "FINISHED"
        assert parent.data.metrics["summary/best_test_bpb"] == r.data.metrics["test/bpb_context"]  # the gate's number
        assert r.data.tags["dvc_exp_baseline_rev"]

    shown = json.loads(dvc(root, "exp", "show", "--json").stdout)
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    assert {e["name"] for e in exps} == {"lr-low", "gpt"}

    capsys.readouterr()
    assert compare(["--tracking-uri", f"sqlite:///{root}/mlflow.db", "--experiment", "mmrec"]) == 0
    table = capsys.readouterr().out
    assert "lr-low" in table and "gpt" in table and "train.lr" in table and "model.arch" in table
