"""Queued experiments that run at once (`dvc queue start -j N`) and share one absolute train.checkpoint_dir, as
docs/gpus.md sets a team up: each trains in a folder of its own that no other reads, deletes or overwrites, and
each registered version holds its own run's weights, with different params and with equal resume fingerprints
(experiments that differ in an evaluate param only). The real dvc CLI and MLflow store; tiny budgets."""
import hashlib
import io
import json
import socket
import threading
import time
from pathlib import Path

import torch
import yaml
from mlflow import MlflowClient

from tests.conftest import dvc, run
from tests.e2e.test_experiments import ONE_RUNG, commit, run_queue

# long enough (a few seconds each) that the two trainings surely overlap, short enough to stay cheap
OVERLAPPING = {"max_steps": 240, "eval_every": 40}


class Watcher(threading.Thread):
    """Looks into the shared folder every few milliseconds: which process held each training folder, and how many
    trainings held one at the same moment."""

    def __init__(self, shared: Path):
        super().__init__(daemon=True)
        self.shared, self.stopped = shared, threading.Event()
        self.holders: dict[str, set[str]] = {}
        self.most_at_once = 0

    def run(self) -> None:
        while not self.stopped.is_set():
            held = 0
            for info in self.shared.glob("*/training.json"):
                try:
                    process = json.loads(info.read_text())["process"]
                except (OSError, ValueError):  # gone between the glob and the read
                    continue
                if process:
                    self.holders.setdefault(info.parent.name, set()).add(process)
                    held += 1
            self.most_at_once = max(self.most_at_once, held)
            time.sleep(0.02)


def best_pt(root: Path, exp: str) -> bytes:
    """The experiment's models/tiny/best.pt, found through its commit's dvc.lock in DVC's cache."""
    ref = run(["git", "for-each-ref", "--format=%(refname)", f"refs/exps/**/{exp}"], root).stdout.strip()
    lock = yaml.safe_load(run(["git", "show", f"{ref}:dvc.lock"], root).stdout)
    [md5] = [o["md5"] for o in lock["stages"]["train@tiny"]["outs"] if o["path"] == "models/tiny/best.pt"]
    return (root / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).read_bytes()


def test_queued_experiments_on_one_checkpoint_folder_train_apart_and_register_their_own_weights(project, tmp_path):
    """Three at once (one queue run keeps the test cheap): two of different lr, and a third that differs from the
    first in an evaluate param only, so it has the first's resume fingerprint (the same weights, trained twice at
    once): neither may resume the other's last.pt or MLflow run."""
    exps = {"lr-low": ["train.lr=0.003"], "lr-high": ["train.lr=0.007"],
            "lr-low-cool": ["train.lr=0.003", "evaluate.temperature=0.5"]}
    root, set_params = project
    shared = tmp_path / "team-checkpoints"
    set_params(**ONE_RUNG, train={"checkpoint_dir": str(shared), **OVERLAPPING})
    dvc(root, "repro", "tokenizer")
    commit(root, "baseline: one checkpoint folder for the team")
    for name, changes in exps.items():
        dvc(root, "exp", "run", "--queue", *[a for c in changes for a in ("-S", c)], "-n", name)
    watcher = Watcher(shared)
    watcher.start()
    status = run_queue(root, jobs=len(exps))
    watcher.stopped.set()
    watcher.join()
    logs = "".join(dvc(root, "queue", "logs", name, check=False).stdout[-2000:] for name in exps)
    assert status.count("Success") == len(exps), status + logs

    # every training folder held by one process only, all at the same moment, gone once its training finished
    host = socket.gethostname().split(".")[0]
    assert watcher.most_at_once == len(exps), watcher.holders  # the trainings overlapped
    assert sorted(n.rsplit(".", 1)[0] for n in watcher.holders) == sorted(f"tiny.{host}.{e}" for e in exps)
    assert all(len(holders) == 1 for holders in watcher.holders.values()), watcher.holders
    assert not any(shared.iterdir())  # each finished training removed its own folder, and no other's

    # every rung run FINISHED, its best.pt its own run's, registered as a version of that run
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mmrec").experiment_id], "tags.kind = 'rung'")
    found = {}
    for exp in exps:
        [r] = [r for r in runs if r.data.tags.get("dvc_exp_name") == exp]
        assert r.info.status == "FINISHED", exp
        weights = best_pt(root, exp)
        kept = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        assert kept["run_id"] == r.info.run_id, exp  # the weights its own training wrote
        [version] = client.search_model_versions(f"run_id = '{r.info.run_id}'")
        assert version.tags["checkpoint_sha256"] == hashlib.sha256(weights).hexdigest(), exp
        found[exp] = (r, kept["model"])
    assert {e: r.data.params["train.lr"] for e, (r, _) in found.items()} == \
        {"lr-low": "0.003", "lr-high": "0.007", "lr-low-cool": "0.003"}
    (low, low_weights), (cool, cool_weights) = found["lr-low"], found["lr-low-cool"]
    assert low.data.tags["fingerprint"] == cool.data.tags["fingerprint"] != found["lr-high"][0].data.tags["fingerprint"]
    assert all(torch.equal(low_weights[k], cool_weights[k]) for k in low_weights)  # one fingerprint, one result
    assert low.info.run_id != cool.info.run_id  # yet two trainings, two runs
