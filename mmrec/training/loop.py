"""The training loop: plain PyTorch, nanoGPT style, for any model and budget (rung.py trains one rung with it).

A run killed at any moment resumes from last.pt and ends with the same weights as a run that was never
killed: the checkpoint holds the model, optimizer, step, the RNG states (torch's, CUDA's when a GPU trains,
every rank's data sampler) and the history. bf16 autocast around the forward only, a step whose gradient
norm is not finite skipped and counted, torch.compile on CUDA by default, and MFU logged beside tokens/s.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mmrec.model import checkpoint
from mmrec.training import distributed
from mmrec.config import TrainParams
from mmrec.training.cores import CoreShare
from mmrec.data.windows import fixed_starts, random_batch
from mmrec.training.device import autocast
from mmrec.training.ema import ema_of
from mmrec.errors import Interrupted, UserError
from mmrec.model.inference import score
from mmrec.model.lm import ModelOutput, count_params, flops_per_token
from mmrec.training.optim import build_optimizers
from mmrec.training.perf import peak_flops
from mmrec.training.schedule import Budget, lr_at


class MetricSink(Protocol):
    def log(self, step: int, **metrics: float) -> None: ...
    def flush(self) -> None: ...


class SharingSink:
    """Passes metrics on to `sink` (None on non-main ranks) and takes this process's share of the cores
    again at every flush, so trainings that start or finish beside it move its thread count."""

    def __init__(self, sink: MetricSink | None, cores: CoreShare):
        self.sink, self.cores = sink, cores

    def log(self, step: int, **metrics: float) -> None:
        if self.sink is not None:
            self.sink.log(step, **metrics)

    def flush(self) -> None:
        self.cores.apply()
        if self.sink is not None:
            self.sink.flush()


class TrainingDiverged(UserError):
    """The loss turned NaN or infinite; last.pt still holds the last good state."""


class RankLost(UserError):
    """Another rank stopped answering (its process or its machine died): every rank leaves at its next
    collective; last.pt holds step `saved` (-1: nothing saved yet)."""

    def __init__(self, step: int, saved: int, last: Path):
        super().__init__(f"lost another rank at step {step}")
        self.step, self.saved, self.last = step, saved, last


class Stopped(Interrupted):
    """Ctrl-C, honoured at a step boundary that every rank agreed on; last.pt holds that step."""

    def __init__(self, step: int, last: Path):
        super().__init__(f"interrupted at step {step}")
        self.step, self.last = step, last


@dataclass
class Progress:
    """Everything besides tensors that a resumed run needs; stored in last.pt as plain types."""
    step: int = 0
    tokens: int = 0
    best_val: float = math.inf
    best_step: int = -1
    bad_evals: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one row per evaluation
    stopped_early: bool = False
    skipped_steps: int = 0  # updates dropped because the gradient norm was not finite
    train_losses: list[float] = field(default_factory=list)  # since the last evaluation, for its row


def seed_everything(seed: int, rank: int = 0) -> torch.Generator:
    """Seed torch's global RNG (init, dropout) and return the data sampler's own generator: one per
    rank, so data-parallel ranks draw different windows."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed + 1 + 7919 * rank)


COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests trace with "eager" (no C++ toolchain run)


def use_compile(setting: str | bool, device: torch.device) -> bool:
    """train.compile: 'auto' compiles on CUDA only; true/false force it. On the CPU compiling MM-Rec took
    1-4 minutes and its steps were no faster (docs/measurements.md, "Training throughput and MFU")."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def forward_backward(step_fn: Any, x: torch.Tensor, y: torch.Tensor, scale: float,
                     amp: contextlib.AbstractContextManager) -> ModelOutput:
    """One micro-batch: the forward under autocast, the backward outside it, as PyTorch advises (each
    backward op runs in the dtype autocast picked for its forward anyway)."""
    with amp:
        out = step_fn(x, y)
    (out.loss * scale).backward()
    return out


def rng_state(device: torch.device, generator: torch.Generator, group: distributed.Group) -> dict[str, Any]:
    """Every random stream the loop draws from: torch's CPU RNG (init, dropout on CPU), the CUDA RNG of
    every rank when a GPU trains (dropout there) and every rank's data sampler. A collective call."""
    state = {"torch": torch.get_rng_state(), "data": distributed.gather(generator.get_state(), group)}
    if device.type == "cuda":
        state["cuda"] = distributed.gather(torch.cuda.get_rng_state(device), group)
    return state


def restore_rng(state: dict[str, Any], device: torch.device, generator: torch.Generator,
                group: distributed.Group, where: Path) -> None:
    if len(state["data"]) != group.world:
        raise UserError(f"{where} was written by {len(state['data'])} processes; resume with train.nnodes x "
                        f"train.nproc = {len(state['data'])} or delete it")
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"][group.rank])
    if device.type == "cuda" and "cuda" in state:  # a CPU checkpoint resumed on a GPU starts CUDA's afresh
        torch.cuda.set_rng_state(state["cuda"][group.rank], device)


def val_loss(model: torch.nn.Module, val: np.ndarray, starts: list[int], tp: TrainParams, device: torch.device) -> float:
    with autocast(device):
        return score(model, val, [(s, tp.seq_len) for s in starts], tp.batch_size, device).loss


class Throughput:
    """Tokens/s and MFU of each step, with compile time, evaluations and peak probes kept out of the clock."""

    def __init__(self, model: torch.nn.Module, tp: TrainParams, tokens_per_step: int, device: torch.device,
                 group: distributed.Group, compiled: bool):
        self.device, self.group, self.tokens_per_step = device, group, tokens_per_step
        # MFU: the model's training FLOPs over what all ranks' devices could do in the same time.
        self.step_flops = flops_per_token(model.cfg, count_params(model), tp.seq_len) * tokens_per_step
        self.warming_up = compiled  # the first compiled step includes the compilation: timed apart, once
        self.peak = self._probe_peak()
        self.clock = time.perf_counter()

    def _probe_peak(self) -> float:
        return peak_flops(self.device.type, self.device.index)[0] * self.group.world  # once per thread count

    def step_done(self) -> dict[str, float]:
        """The figures of the step that just ended: compile time once, then tokens/s and MFU."""
        elapsed = time.perf_counter() - self.clock
        self.clock = time.perf_counter()
        if self.warming_up:
            self.warming_up = False
            return {"perf/compile_s": elapsed}
        return {"perf/tokens_per_s": self.tokens_per_step / max(elapsed, 1e-9),
                "perf/mfu": self.step_flops / elapsed / self.peak}

    def reprobe(self) -> None:
        """After a flush re-divided the cores (train.threads: 0) the CPU's peak moved: probe it again."""
        probe = time.perf_counter()
        self.peak = self._probe_peak()
        self.clock += time.perf_counter() - probe  # a probe is not training time

    def restart(self) -> None:
        """An evaluation or a save just ran: it is not training throughput."""
        self.clock = time.perf_counter()
        self.warming_up = False


@dataclass
class StepResult:
    loss: float  # cross-entropy (+ UBOO's weighted loss), averaged over micro-batches and ranks
    aux: float | None  # UBOO's loss alone, when it is on
    grad_norm: float
    lr: float


class Trainer:
    """One training's state between steps: the model (and its DDP/compiled wrappers), the optimizer, the EMA,
    the progress, and where checkpoints go. `fit` below reads as the loop; each concern is a method here."""

    def __init__(self, model: torch.nn.Module, train: np.ndarray, tp: TrainParams, budget: Budget,
                 generator: torch.Generator, ckpt_dir: Path, extra: dict[str, Any], device: torch.device,
                 group: distributed.Group):
        self.model, self.train_tokens, self.tp, self.budget, self.generator = model, train, tp, budget, generator
        self.tokens_per_step = tp.batch_size * tp.seq_len * tp.grad_accum * group.world
        self.ckpt_dir, self.extra, self.device, self.group = ckpt_dir, extra, device, group
        model.recompute = tp.recompute
        self.optimizers = build_optimizers(model, tp, budget.lr, device)  # by checkpoint key
        self.ema = ema_of(model, budget.ema_decay, ramp=budget.ema_ramp) if budget.ema_decay else None
        self.progress = Progress()
        self.saved_at = -1  # the step that last.pt holds

    @property
    def last(self) -> Path:
        return self.ckpt_dir / "last.pt"

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights that are evaluated and kept as best.pt: the EMA's when there is one."""
        return self.model if self.ema is None else self.ema.module

    def resume_from(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        for key, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[key])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.progress = Progress(**state["progress"])
        restore_rng(state["rng"], self.device, self.generator, self.group, self.last)
        self.saved_at = self.progress.step

    def wrap(self) -> tuple[torch.nn.Module, Any, bool]:
        """DDP around the model under several ranks, torch.compile around that where it pays."""
        wrapped = self.model
        if self.group.world > 1:
            wrapped = DistributedDataParallel(self.model,
                                              device_ids=[self.device.index] if self.device.type == "cuda" else None)
        compiled = use_compile(self.tp.compile, self.device)
        return wrapped, torch.compile(wrapped, backend=COMPILE_BACKEND) if compiled else wrapped, compiled

    def save(self, name: str, with_optimizer: bool) -> None:
        """best.pt (weights only) or last.pt (everything a resume needs); rank 0 writes, every rank calls."""
        rng = rng_state(self.device, self.generator, self.group) if with_optimizer else None  # a collective
        if not self.group.main:
            return
        kept = self.model if with_optimizer else self.evaluated
        state = {"model": kept.state_dict(), "progress": self.progress.__dict__, **self.extra}
        if with_optimizer:
            state |= {key: optimizer.state_dict() for key, optimizer in self.optimizers.items()} | {"rng": rng}
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
        checkpoint.save_atomic(state, self.ckpt_dir / name)

    def save_last(self) -> None:
        self.save("last.pt", with_optimizer=True)
        self.saved_at = self.progress.step

    def train_step(self, wrapped: torch.nn.Module, step_fn: Any) -> StepResult:
        """One optimizer step over grad_accum micro-batches; a step with a non-finite gradient is skipped."""
        tp, group, progress = self.tp, self.group, self.progress
        lr = lr_at(progress.step, self.budget, min(tp.min_lr, self.budget.lr), tp.schedule, tp.decay_fraction)
        for optimizer in self.optimizers.values():
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
        self.model.train()
        loss, aux = 0.0, 0.0  # aux: UBOO's loss, logged apart from the cross-entropy
        for micro in range(tp.grad_accum):
            x, y = random_batch(self.train_tokens, tp.batch_size, tp.seq_len, self.generator)
            sync = micro == tp.grad_accum - 1 or group.world == 1  # DDP all-reduces on the last micro-batch only
            with contextlib.nullcontext() if sync else wrapped.no_sync():
                out = forward_backward(step_fn, x.to(self.device), y.to(self.device), 1 / tp.grad_accum,
                                       autocast(self.device))
            loss += out.loss.item() / tp.grad_accum
            aux += out.aux.item() / tp.grad_accum if out.aux is not None else 0.0
        loss = distributed.mean(loss, group)
        aux = distributed.mean(aux, group) if out.aux is not None else None
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss} at step {progress.step} (lr {lr:.2e}); the last good checkpoint is "
                f"{self.last} (step {max(self.saved_at, 0)}); lower train.lr or raise train.warmup_steps")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                         tp.grad_clip if tp.grad_clip > 0 else math.inf))
        if math.isfinite(grad_norm):  # DDP averaged the gradients first, so every rank agrees
            for optimizer in self.optimizers.values():
                optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        else:  # a finite loss with an inf/NaN gradient: clipping would spread the NaN into every weight
            progress.skipped_steps += 1
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        progress.tokens += self.tokens_per_step
        progress.train_losses.append(loss)
        return StepResult(loss, aux, grad_norm, lr)

    def evaluate(self, val: np.ndarray, starts: list[int], lr: float) -> dict[str, float]:
        """Validation loss on the fixed windows; best.pt when it improved, last.pt always, and rank 0's early
        stopping decision for every rank (a rank that stopped alone would hang the others' all-reduce)."""
        progress, tp = self.progress, self.tp
        vl = val_loss(self.evaluated, val, starts, tp, self.device)
        row = {"step": progress.step, "train_loss": float(np.mean(progress.train_losses)), "val_loss": vl, "lr": lr}
        if self.ema is not None:  # the weights being trained, beside the average that is kept: shown, not used
            row["val_loss_raw"] = val_loss(self.model, val, starts, tp, self.device)
        progress.history.append(row)
        progress.train_losses = []
        if vl < progress.best_val:
            progress.best_val, progress.best_step, progress.bad_evals = vl, progress.step, 0
            self.save("best.pt", with_optimizer=False)
        else:
            progress.bad_evals += 1
        progress.stopped_early = distributed.broadcast(0 < tp.patience <= progress.bad_evals, self.group)
        self.save_last()
        return row


def log_step(sink: MetricSink, step: int, result: StepResult, perf: dict[str, float], trainer: Trainer) -> None:
    sink.log(step, **{"loss/train": result.loss, "opt/lr": result.lr, "opt/grad_norm": result.grad_norm,
                      "opt/skipped_steps": trainer.progress.skipped_steps}, **perf)
    if result.aux is not None:
        sink.log(step, **{"loss/train_uboo": result.aux,
                          "loss/train_ce": result.loss - trainer.model.cfg.uboo_weight * result.aux})


def log_evaluation(sink: MetricSink, step: int, row: dict[str, float]) -> None:
    sink.log(step, **{"loss/val": row["val_loss"]})
    if "val_loss_raw" in row:
        sink.log(step, **{"loss/val_raw": row["val_loss_raw"]})


def fit(model: torch.nn.Module, train: np.ndarray, val: np.ndarray, tp: TrainParams, budget: Budget, *,
        generator: torch.Generator, ckpt_dir: Path, extra: dict[str, Any], sink: MetricSink | None = None,
        resume: dict[str, Any] | None = None, device: torch.device = torch.device("cpu"),
        group: distributed.Group = distributed.Group()) -> Progress:
    """Train until the budget or early stopping; rank 0 keeps best.pt and last.pt in ckpt_dir.

    Under torchrun every rank samples its own windows (its generator is seeded apart) and DDP averages
    the gradients; every rank evaluates the same fixed windows, and rank 0's decision to stop early is
    broadcast so that no rank can leave the others waiting in a collective."""
    trainer = Trainer(model, train, tp, budget, generator, ckpt_dir, extra, device, group)
    if resume is not None:
        trainer.resume_from(resume)
    progress = trainer.progress
    wrapped, step_fn, compiled = trainer.wrap()
    starts = fixed_starts(len(val), tp.seq_len, tp.eval_windows)
    meter = Throughput(model, tp, trainer.tokens_per_step, device, group, compiled)

    def flush() -> None:
        sink.flush()  # under threads: 0 this re-divides the cores, which moves the CPU's peak
        meter.reprobe()

    bar = tqdm(total=budget.steps, initial=progress.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not group.main)
    stop = StopRequest.install()
    try:
        while True:
            # Ctrl-C, honoured between steps, at the same step on every rank: torchrun forwards it to each at
            # its own moment, and a rank leaving alone would strand the others in an all-reduce. No collective,
            # store call or file write is cut in half, and one pressed in the last step or evaluation counts.
            if distributed.any_rank(stop.requested, group):
                if trainer.saved_at != progress.step:
                    trainer.save_last()
                raise Stopped(progress.step, trainer.last)
            if progress.step >= budget.steps or progress.stopped_early:
                return progress
            result = trainer.train_step(wrapped, step_fn)
            perf = meter.step_done()
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{result.lr:.1e}",
                            tok_s=f"{perf.get('perf/tokens_per_s', 0):,.0f}", refresh=False)
            if sink is not None:
                log_step(sink, progress.step, result, perf, trainer)
                if progress.step % tp.log_every == 0:
                    flush()
            if progress.step % tp.eval_every == 0 or progress.step == budget.steps:
                row = trainer.evaluate(val, starts, result.lr)
                if group.main:
                    bar.write(f"step {progress.step}: val loss {row['val_loss']:.4f} "
                              f"(best {progress.best_val:.4f} @ {progress.best_step})")
                if sink is not None:
                    log_evaluation(sink, progress.step, row)
                    flush()
                meter.restart()  # evaluation time is not training throughput
    except RuntimeError as err:  # a rank that died (its process or machine) fails the others' next collective
        if group.world == 1 or not distributed.lost_peer(err):
            raise
        raise RankLost(progress.step, trainer.saved_at, trainer.last) from None
    finally:  # a failure or a Ctrl-C leaves the terminal as it found it
        bar.close()
        stop.uninstall()


class StopRequest:
    """The first Ctrl-C asks the loop to stop at the next step boundary (it saves that step and says where it
    stopped); a second one interrupts at once, as Python would."""

    def __init__(self) -> None:
        self.requested, self.previous = False, None

    @classmethod
    def install(cls) -> "StopRequest":
        stop = cls()
        if threading.current_thread() is threading.main_thread():  # signal handlers belong to the main thread
            stop.previous = signal.signal(signal.SIGINT, stop._handle)
        return stop

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def uninstall(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
