import json
import math

import pytest
import torch
from mlflow import MlflowClient

from mmrec import checkpoint
from mmrec.model import ModelConfig, build_model
from mmrec.tokenizer import load_tokens
from mmrec.train import Budget, TrainingDiverged, fit, lr_at, seed_everything, train_rung
from tests.conftest import tiny_params


def test_lr_warms_up_then_decays_to_min_lr():
    b = Budget(steps=100, lr=1e-3, warmup=10)
    assert lr_at(0, b, 1e-4) == pytest.approx(1e-4)
    assert lr_at(9, b, 1e-4) == pytest.approx(1e-3)
    assert lr_at(55, b, 1e-4) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(100, b, 1e-4) == pytest.approx(1e-4)
    assert all(lr_at(s, b, 1e-4) >= lr_at(s + 1, b, 1e-4) for s in range(10, 100))


class Crash(Exception):
    pass


class CrashAt:
    """A metric sink that dies at a given step: a kill in the middle of a run."""

    def __init__(self, step: int):
        self.at = step

    def log(self, step: int, **metrics: float) -> None:
        if step == self.at:
            raise Crash

    def flush(self) -> None:
        pass


def setup(root, **sections):
    params = tiny_params(root, **sections)
    torch.set_num_threads(1)
    cfg = ModelConfig.from_params(params.model, params.rung("tiny"), 400)
    gen = seed_everything(params.seed)
    model = build_model(cfg)
    train, val = load_tokens(root / "data/tokens", "train"), load_tokens(root / "data/tokens", "val")
    budget = Budget(steps=params.train.max_steps, lr=params.train.lr, warmup=2)
    return params, model, gen, train, val, budget


def run_fit(root, ckpt_dir, sink=None, resume=None):
    params, model, gen, train, val, budget = setup(root)
    progress = fit(model, train, val, params.train, budget, generator=gen, ckpt_dir=ckpt_dir,
                   extra={"fingerprint": "x"}, sink=sink, resume=resume)
    return progress, model


def test_same_seed_gives_bit_identical_losses(workdir):
    a, _ = run_fit(workdir, workdir / "a")
    b, _ = run_fit(workdir, workdir / "b")
    assert a.history == b.history
    assert len(a.history) == 2 and a.history[-1]["val_loss"] < math.log(400)


def test_resume_after_a_kill_ends_with_the_same_weights(workdir):
    whole, whole_model = run_fit(workdir, workdir / "whole")
    with pytest.raises(Crash):
        run_fit(workdir, workdir / "killed", sink=CrashAt(25))  # last.pt was written at step 20
    last = checkpoint.load(workdir / "killed" / "last.pt")
    assert last["progress"]["step"] == 20
    resumed, resumed_model = run_fit(workdir, workdir / "killed", resume=last)
    assert resumed.history == whole.history
    for (name, a), b in zip(whole_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(workdir):
    with pytest.raises(Crash):
        run_fit(workdir, workdir / "c", sink=CrashAt(25))
    good = checkpoint.load(workdir / "c" / "last.pt")
    poisoned = dict(good)
    poisoned["model"] = {k: torch.full_like(v, float("nan")) if k in ("wte.weight", "head.weight") else v for k, v in good["model"].items()}
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 20 .*last good checkpoint"):
        run_fit(workdir, workdir / "c", resume=poisoned)
    after = checkpoint.load(workdir / "c" / "last.pt")
    assert all(torch.isfinite(v).all() for v in after["model"].values())


def test_train_rung_logs_params_metrics_and_artifacts_to_mlflow(workdir):
    params = tiny_params(workdir)
    metrics = train_rung(params, "tiny", workdir)

    run_id = json.loads((workdir / "models/tiny/run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(params.train.lr)
    assert run.data.params["ladder.tiny.width"] == "32"
    assert run.data.tags["rung"] == "tiny" and run.data.tags["params_hash"] == params.digest()
    assert run.data.tags["tokenizer_sha256"]
    for key in ["loss/train", "opt/lr", "opt/grad_norm", "perf/tokens_per_s"]:
        assert len(client.get_metric_history(run_id, key)) == params.train.max_steps, key
    assert [m.step for m in client.get_metric_history(run_id, "loss/val")] == [20, 40]
    assert run.data.metrics["summary/best_val_loss"] == pytest.approx(metrics["best_val_loss"])
    artifacts = {a.path for folder in ["plots", "tokenizer", "checkpoint"] for a in client.list_artifacts(run_id, folder)}
    assert artifacts == {"plots/tiny.png", "tokenizer/spm.model", "checkpoint/best.pt"}

    saved = json.loads((workdir / "metrics/train/tiny.json").read_text())
    assert saved["best_val_loss"] == metrics["best_val_loss"] and saved["n_params"] > 0
    train_rows = (workdir / "metrics/curves/train/tiny.csv").read_text().splitlines()
    assert train_rows[0] == "step,train_loss,lr" and len(train_rows) == 1 + params.train.max_steps  # every step
    assert [r.split(",")[0] for r in (workdir / "metrics/curves/val/tiny.csv").read_text().splitlines()] == [
        "step", "20", "40"]
    assert (workdir / "metrics/plots/tiny.png").read_bytes()[:4] == b"\x89PNG"
    best = checkpoint.load(workdir / "models/tiny/best.pt")
    assert best["progress"]["best_step"] == saved["best_step"]
    assert not (workdir / "checkpoints" / "tiny").exists()  # finished runs leave nothing to resume


def test_uboo_loss_is_logged_apart_from_the_cross_entropy(workdir):
    params = tiny_params(workdir, model={"uboo_weight": 0.1})
    train_rung(params, "tiny", workdir)
    run_id = json.loads((workdir / "models/tiny/run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    loss, ce, aux = (client.get_metric_history(run_id, k) for k in ["loss/train", "loss/train_ce", "loss/train_uboo"])
    assert len(aux) == len(ce) == params.train.max_steps
    last = {m.key: m.value for m in (loss[-1], ce[-1], aux[-1])}
    assert last["loss/train"] == pytest.approx(last["loss/train_ce"] + 0.1 * last["loss/train_uboo"])
    assert last["loss/train_uboo"] > 0
