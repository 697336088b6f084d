import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from tqdm import tqdm

import mmrec.training.loop as train_module
from mmrec.model import checkpoint
from mmrec.training import distributed, perf
from mmrec.tracking import run as track
from mmrec.data.windows import fixed_starts
from mmrec.training.ema import ema_of
from mmrec.errors import Interrupted
from mmrec.model.lm import ModelConfig, ModelOutput, build_model
from mmrec.training.perf import peak_flops
from mmrec.pipeline.rung import train_rung
from mmrec.training.schedule import Budget, budget_for, lr_at
from mmrec.tracking.store import StoreError
from mmrec.data.tokenizer import load_tokens
from mmrec.training.loop import (TrainingDiverged, fit, forward_backward, restore_rng, rng_state, seed_everything, use_compile,
                         val_loss)
from tests.conftest import REPO, TINY_PARAMS, deep_merge, tiny_params


def test_lr_warms_up_then_decays_to_min_lr():
    b = Budget(steps=100, lr=1e-3, warmup=10)
    assert lr_at(0, b, 1e-4) == pytest.approx(1e-4)
    assert lr_at(9, b, 1e-4) == pytest.approx(1e-3)
    assert lr_at(55, b, 1e-4) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(100, b, 1e-4) == pytest.approx(1e-4)
    assert all(lr_at(s, b, 1e-4) >= lr_at(s + 1, b, 1e-4) for s in range(10, 100))


def test_wsd_holds_the_peak_then_decays_linearly_to_min_lr_over_the_last_share():
    b = Budget(steps=100, lr=1e-3, warmup=10)
    lr = [lr_at(s, b, 1e-4, "wsd", 0.2) for s in range(100)]
    assert lr[9] == lr[10] == lr[79] == pytest.approx(1e-3)  # warmup, then the plateau until 20 steps are left
    assert lr[80] < 1e-3 and lr[99] == pytest.approx(1e-4)  # the last step trains at min_lr
    assert lr[89] - lr[90] == pytest.approx(lr[95] - lr[96])  # a straight line
    assert lr_at(50, b, 1e-4) < 1e-3  # cosine is already decaying there


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


def run_fit(root, ckpt_dir, sink=None, resume=None, ema=0.0, ramp=True, optimizer="adamw"):
    params, model, gen, train, val, budget = setup(root, train={"optimizer": optimizer})
    budget.ema_decay, budget.ema_ramp = ema, ramp
    progress = fit(model, train, val, params.train, budget, generator=gen, ckpt_dir=ckpt_dir,
                   extra={"fingerprint": "x"}, sink=sink, resume=resume)
    return progress, model


def test_same_seed_gives_bit_identical_losses(workdir):
    a, _ = run_fit(workdir, workdir / "a")
    b, _ = run_fit(workdir, workdir / "b")
    assert a.history == b.history
    assert len(a.history) == 2 and a.history[-1]["val_loss"] < math.log(400)


@pytest.mark.parametrize("ema, ramp, optimizer", [(0.0, True, "adamw"), (0.9, True, "adamw"), (0.9, False, "adamw"),
                                                   (0.0, True, "muon")])  # no EMA, scratch's, a grown rung's; Muon's
def test_resume_after_a_kill_ends_with_the_same_weights(workdir, ema, ramp, optimizer):
    whole, whole_model = run_fit(workdir, workdir / "whole", ema=ema, ramp=ramp, optimizer=optimizer)
    with pytest.raises(Crash):  # last.pt was written at step 20
        run_fit(workdir, workdir / "killed", sink=CrashAt(25), ema=ema, ramp=ramp, optimizer=optimizer)
    last = checkpoint.load(workdir / "killed" / "last.pt")
    assert last["progress"]["step"] == 20
    assert ("muon" in last) == (optimizer == "muon")  # its momenta are saved beside AdamW's
    resumed, resumed_model = run_fit(workdir, workdir / "killed", resume=last, ema=ema, ramp=ramp, optimizer=optimizer)
    assert resumed.history == whole.history
    for (name, a), b in zip(whole_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    best_whole = checkpoint.load(workdir / "whole" / "best.pt")["model"]  # the EMA's weights, when there is one
    for name, b in checkpoint.load(workdir / "killed" / "best.pt")["model"].items():
        assert torch.equal(best_whole[name], b), name


def test_from_a_random_init_the_ema_forgets_the_init_and_ramps_up():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 1.0)  # the random init
    ema = ema_of(model, 0.9, ramp=True)
    torch.nn.init.constant_(model.weight, 0.5)  # after step 1
    ema.update_parameters(model)
    assert ema.module.weight.item() == 0.5  # the init does not linger
    torch.nn.init.constant_(model.weight, 0.0)
    ema.update_parameters(model)
    assert ema.module.weight.item() == pytest.approx(2 / 11 * 0.5)  # decay (1 + 1) / (10 + 1), not yet 0.9


def test_a_grown_rungs_ema_starts_at_the_grown_weights_and_averages_at_full_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 1.0)  # the grown weights
    ema = ema_of(model, 0.9, ramp=False)
    assert ema.module.weight.item() == 1.0  # before step 1
    torch.nn.init.constant_(model.weight, 0.0)  # after step 1
    ema.update_parameters(model)
    assert ema.module.weight.item() == pytest.approx(0.9)  # 0.9 x grown + 0.1 x step 1's


def test_after_its_first_step_a_grown_rung_keeps_decay_x_grown_plus_the_rest_x_the_trained_weights(workdir):
    from mmrec.model.growth import grow_state_dict

    params = tiny_params(workdir, train={"max_steps": 1, "eval_every": 1}, ladder={
        "tiny": {"width": 32, "layers": 1, "memories": 2, "after": "data/tokens"},
        "mini": {"width": 64, "layers": 2, "memories": 2, "after": "models/tiny/handoff.json", "ema_decay": 0.9}})
    torch.set_num_threads(1)
    parent_cfg = ModelConfig.from_params(params.model, params.rung("tiny"), 400)
    cfg = ModelConfig.from_params(params.model, params.rung("mini"), 400)
    gen = seed_everything(params.seed)
    model = build_model(cfg)
    model.load_state_dict(grow_state_dict(build_model(parent_cfg).state_dict(), parent_cfg, cfg, noise=0.0,
                                          generator=torch.Generator().manual_seed(0), split=0.5))
    grown = {k: v.clone() for k, v in model.state_dict().items()}
    budget = budget_for(params, "mini")
    assert (budget.ema_decay, budget.ema_ramp, budget.steps) == (0.9, False, 1)
    train, val = load_tokens(workdir / "data/tokens", "train"), load_tokens(workdir / "data/tokens", "val")
    fit(model, train, val, params.train, budget, generator=gen, ckpt_dir=workdir / "g", extra={})
    kept = checkpoint.load(workdir / "g" / "best.pt")["model"]  # the average, evaluated after step 1
    trained = model.state_dict()
    moved = [name for name, w in trained.items() if not torch.equal(w, grown[name])]
    assert len(moved) > len(trained) / 2, moved  # the step moved the weights: else there is nothing to average
    for name, w in trained.items():  # every tensor, the ones the step left as they were too
        assert w.is_floating_point(), name
        assert torch.allclose(kept[name], 0.9 * grown[name] + 0.1 * w, rtol=1e-5, atol=1e-7), name


def test_with_an_ema_the_kept_weights_are_the_average_and_the_trained_ones_are_logged_beside(workdir):
    class Keep:
        def __init__(self):
            self.metrics = {}

        def log(self, step, **metrics):
            self.metrics.update({(k, step): v for k, v in metrics.items()})

        def flush(self):
            pass

    sink = Keep()
    progress, model = run_fit(workdir, workdir / "e", sink=sink, ema=0.9)
    params, _, _, _, val, _ = setup(workdir)
    best = checkpoint.load(workdir / "e" / "best.pt")["model"]
    assert any(not torch.equal(best[k], v) for k, v in model.state_dict().items())  # not the trained weights
    kept = build_model(model.cfg)
    kept.load_state_dict(best)
    starts = fixed_starts(len(val), params.train.seq_len, params.train.eval_windows)
    assert val_loss(kept, val, starts, params.train, torch.device("cpu")) == pytest.approx(progress.best_val)
    last = progress.history[-1]
    assert last["val_loss_raw"] == pytest.approx(val_loss(model, val, starts, params.train, torch.device("cpu")))
    assert last["val_loss_raw"] != last["val_loss"]
    assert sink.metrics[("loss/val_raw", last["step"])] == last["val_loss_raw"]
    assert "ema" in checkpoint.load(workdir / "e" / "last.pt")


class CtrlCAt:
    """A metric sink that presses Ctrl-C during a given step (the loop logs each step before it is over)."""

    def __init__(self, step: int):
        self.at, self.pressed = step, False

    def log(self, step: int, **metrics: float) -> None:
        if step == self.at and not self.pressed:
            self.pressed = True
            os.kill(os.getpid(), signal.SIGINT)

    def flush(self) -> None:
        pass


def test_ctrl_c_saves_the_step_it_stopped_at_and_the_resumed_run_ends_the_same(workdir):
    whole, whole_model = run_fit(workdir, workdir / "whole", ema=0.9)
    with pytest.raises(Interrupted, match="interrupted at step 25"):
        run_fit(workdir, workdir / "stopped", sink=CtrlCAt(25), ema=0.9)  # between evaluations (20 and 40)
    last = checkpoint.load(workdir / "stopped" / "last.pt")
    assert last["progress"]["step"] == 25
    resumed, resumed_model = run_fit(workdir, workdir / "stopped", resume=last, ema=0.9)
    assert resumed.history == whole.history  # the train loss of steps 21-25 counts in step 40's row
    for (name, a), b in zip(whole_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_ctrl_c_in_the_last_step_is_not_swallowed_and_the_handler_and_bar_are_restored(workdir):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted, match="interrupted at step 40"):  # the last step, then the final evaluation
        run_fit(workdir, workdir / "c", sink=CtrlCAt(40))
    assert signal.getsignal(signal.SIGINT) is before
    assert not getattr(tqdm, "_instances", None)  # the progress bar was closed
    assert checkpoint.load(workdir / "c" / "last.pt")["progress"]["step"] == 40
    with pytest.raises(Crash):  # a failure, not a Ctrl-C: the handler comes back all the same
        run_fit(workdir, workdir / "d", sink=CrashAt(3))
    assert signal.getsignal(signal.SIGINT) is before and not getattr(tqdm, "_instances", None)


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
    for key in ["loss/train", "opt/lr", "opt/grad_norm", "perf/tokens_per_s", "perf/mfu", "opt/skipped_steps"]:
        assert len(client.get_metric_history(run_id, key)) == params.train.max_steps, key
    assert [m.step for m in client.get_metric_history(run_id, "loss/val")] == [20, 40]
    assert run.data.metrics["summary/best_val_loss"] == pytest.approx(metrics["best_val_loss"])
    artifacts = {a.path for folder in ["plots", "tokenizer", "checkpoint"] for a in client.list_artifacts(run_id, folder)}
    assert artifacts == {"plots/tiny.png", "tokenizer/spm.model", "checkpoint/best.pt"}

    speed = json.loads((workdir / "metrics/speed/tiny.json").read_text())
    assert speed["tokens_per_s"] > 0 and 0 < speed["mfu"] < 1 and 50 < speed["peak_rss_mb"] < 4000
    started = run.info.start_time / 1000  # the wall time: from the run's start to the outputs
    assert 0 < speed["seconds"] <= round(time.time() - started, 1) + 0.1
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


@pytest.mark.parametrize("fault, status", [(StoreError("the store failed"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_failure_right_after_the_run_is_opened_does_not_leave_it_running(workdir, monkeypatch, fault, status):
    log_params = track.Run.log_params

    def fail(self, flat):  # the rung run's first write after it started (its pipeline's parent run logs first)
        if "n_params" in flat:
            raise fault
        log_params(self, flat)

    monkeypatch.setattr(track.Run, "log_params", fail)
    with pytest.raises(type(fault)):
        train_rung(tiny_params(workdir), "tiny", workdir)
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("mmrec").experiment_id], "tags.kind = 'rung'")
    assert run.info.status == status


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


class Recorder:
    """A metric sink that keeps every value, and optionally a copy of the weights after each step."""

    def __init__(self, model=None):
        self.metrics, self.model, self.weights = {}, model, {}

    def log(self, step: int, **metrics: float) -> None:
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, v))
        if self.model is not None and "opt/skipped_steps" in metrics:
            self.weights[step] = {k: v.clone() for k, v in self.model.state_dict().items()}

    def flush(self) -> None:
        pass


def test_max_tokens_counts_the_tokens_of_every_process(workdir):
    params = tiny_params(workdir, train={"max_steps": 1000, "max_tokens": 100 * 8 * 32})
    assert budget_for(params, "tiny").steps == 100
    assert budget_for(params, "tiny", world=2).steps == 50
    assert budget_for(params, "tiny", world=3).steps == 34  # rounded up: never less than max_tokens


def test_a_non_finite_gradient_norm_skips_the_update_and_is_counted(workdir):
    params, model, gen, train, val, budget = setup(workdir)
    steps_seen = []

    def poison(grad):  # a finite loss whose gradient overflows, once, during step 7
        steps_seen.append(None)
        return grad * math.inf if len(steps_seen) == 7 else grad

    model.blocks[0].out.weight.register_hook(poison)
    sink = Recorder(model)
    progress = fit(model, train, val, params.train, budget, generator=gen, ckpt_dir=workdir / "c",
                   extra={}, sink=sink)
    assert progress.skipped_steps == 1 and progress.step == budget.steps
    assert dict(sink.metrics["opt/skipped_steps"])[6] == 0 and dict(sink.metrics["opt/skipped_steps"])[7] == 1
    assert not math.isfinite(dict(sink.metrics["opt/grad_norm"])[7])
    for name, before in sink.weights[6].items():  # step 7 changed nothing, not even by weight decay
        assert torch.equal(sink.weights[7][name], before), name
    assert any(not torch.equal(sink.weights[8][n], w) for n, w in sink.weights[7].items())  # training went on
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert checkpoint.load(workdir / "c" / "last.pt")["progress"]["skipped_steps"] == 1


def test_backward_runs_outside_autocast():
    model = torch.nn.Linear(4, 4)
    seen = []
    model.weight.register_hook(lambda g: seen.append(torch.is_autocast_enabled("cpu")))
    step_fn = lambda x, y: ModelOutput(model(x), model(x).pow(2).mean(), None, None)  # noqa: E731
    out = forward_backward(step_fn, torch.randn(3, 4), None, 0.5, torch.autocast("cpu", dtype=torch.bfloat16))
    assert out.logits.dtype == torch.bfloat16  # the forward did run under autocast
    assert seen == [False]  # True when backward() ran inside the autocast block


def test_the_checkpoint_carries_the_cuda_rng_state_when_a_gpu_trains(monkeypatch):
    """No GPU here: torch.cuda's RNG calls are replaced by a recorder, the rest is the real plumbing."""
    gen = torch.Generator().manual_seed(3)
    cpu_state = rng_state(torch.device("cpu"), gen, distributed.Group())
    assert set(cpu_state) == {"torch", "data"}  # nothing about CUDA on a CPU run

    cuda_rng, restored = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: cuda_rng.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: restored.append((state, device)))
    gpu = torch.device("cuda", 0)
    state = rng_state(gpu, gen, distributed.Group())
    assert torch.equal(state["cuda"][0], cuda_rng)
    buf = io.BytesIO()
    torch.save(state, buf)  # plain tensors and lists: loadable with weights_only=True
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    before = gen.get_state()
    torch.rand(5, generator=gen)
    restore_rng(back, gpu, gen, distributed.Group(), Path("last.pt"))
    assert torch.equal(gen.get_state(), before)
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_rng) and restored[0][1] == gpu
    restore_rng(cpu_state, gpu, gen, distributed.Group(), Path("last.pt"))  # a CPU checkpoint on a GPU: no error
    assert len(restored) == 1


def test_compile_auto_means_cuda_only():
    assert use_compile("auto", torch.device("cuda", 0)) and not use_compile("auto", torch.device("cpu"))
    assert use_compile(True, torch.device("cpu")) and not use_compile(False, torch.device("cuda"))


def test_peak_flops_from_the_table_for_a_known_gpu_or_a_probe(monkeypatch):
    flops, source = peak_flops("cpu")
    assert flops > 1e8 and "probe" in source
    for name, expected in [("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None, n=name: n)  # a stand-in GPU
        perf.device_peak.cache_clear()
        assert peak_flops("cuda", 0) == (expected, f"table: {name}")
    perf.device_peak.cache_clear()


def test_the_cpu_peak_follows_the_thread_count_probed_once_for_each(monkeypatch):
    """train.threads: 0 moves the thread count during a run; MFU must divide by what that many threads can do."""
    probes = []
    real = perf.matmul_probe
    monkeypatch.setattr(perf, "matmul_probe", lambda device: probes.append(torch.get_num_threads()) or real(device))
    perf.device_peak.cache_clear()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = peak_flops("cpu")
        torch.set_num_threads(2)
        two = peak_flops("cpu")
        torch.set_num_threads(1)
        assert peak_flops("cpu") == one  # cached, not probed again
    finally:
        torch.set_num_threads(before)
        perf.device_peak.cache_clear()
    assert probes == [1, 2]
    assert one[1].endswith("1 thread") and two[1].endswith("2 threads")


def test_mfu_divides_by_the_peak_of_the_threads_the_step_ran_on(workdir, monkeypatch):
    class Regroup(Recorder):  # SharingSink under threads: 0 re-divides the cores at a flush
        def flush(self):
            torch.set_num_threads(2 if self.metrics["opt/lr"][-1][0] >= 4 else 1)

    seen = []
    monkeypatch.setattr(train_module, "peak_flops", lambda device_type, index=None: (
        seen.append(torch.get_num_threads()) or (1e9 * torch.get_num_threads(), "stand-in")))
    params, model, gen, train, val, budget = setup(workdir, train={"max_steps": 8, "log_every": 2})
    sink = Regroup()
    try:
        fit(model, train, val, params.train, budget, generator=gen, ckpt_dir=workdir / "c", extra={}, sink=sink)
    finally:
        torch.set_num_threads(1)
    assert 1 in seen and 2 in seen
    step_flops = {}  # tokens/s x MFU x peak is the step's FLOPs: the same every step, whatever the peak
    for (step, tok_s), (_, mfu) in zip(sink.metrics["perf/tokens_per_s"], sink.metrics["perf/mfu"]):
        step_flops[step] = mfu * 1e9 * (2 if step > 4 else 1) / tok_s
    assert max(step_flops.values()) == pytest.approx(min(step_flops.values()))


def test_mfu_is_logged_and_compile_time_is_kept_out_of_tokens_per_s(workdir, monkeypatch):
    monkeypatch.setattr(train_module, "COMPILE_BACKEND", "eager")  # dynamo's real trace, no C++ build here
    params, model, gen, train, val, budget = setup(workdir, train={"max_steps": 6, "eval_every": 6,
                                                                   "compile": True})
    sink = Recorder()
    fit(model, train, val, params.train, budget, generator=gen, ckpt_dir=workdir / "c", extra={}, sink=sink)
    assert [s for s, _ in sink.metrics["perf/compile_s"]] == [1]  # once, for the first step
    assert [s for s, _ in sink.metrics["perf/tokens_per_s"]] == [2, 3, 4, 5, 6]
    assert [s for s, _ in sink.metrics["perf/mfu"]] == [2, 3, 4, 5, 6]
    assert all(0 < v < 1 for _, v in sink.metrics["perf/mfu"])


def interrupt_after_first_checkpoint(root, timeout=180) -> str:
    """Run the train stage of `root`'s own code copy and press Ctrl-C once last.pt exists; returns its stderr."""
    proc = subprocess.Popen([sys.executable, "stages/train.py", "tiny"], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not (root / "checkpoints/tiny/last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    return err


@pytest.mark.e2e  # interrupts a real stage process
def test_a_code_change_restarts_an_interrupted_rung_from_step_0_and_says_why(workdir):
    for name in ("mmrec", "stages"):  # a project of its own, whose code the test may edit
        shutil.copytree(REPO / name, workdir / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = deep_merge(TINY_PARAMS, {"train": {"max_steps": 100, "eval_every": 10}})
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    interrupt_after_first_checkpoint(workdir)
    killed_run = checkpoint.load(workdir / "checkpoints/tiny/last.pt")["run_id"]

    with open(workdir / "mmrec/model/lm.py", "a") as f:
        f.write("# an edit of the model's code\n")
    rerun = subprocess.run([sys.executable, "stages/train.py", "tiny"], cwd=workdir, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from step" not in rerun.stdout
    [line] = [line for line in rerun.stdout.splitlines() if line.startswith("not resuming")]
    assert "mmrec/model/lm.py changed" in line and line.endswith("training from step 0")
    assert json.loads((workdir / "models/tiny/run.json").read_text())["run_id"] != killed_run  # a new run
