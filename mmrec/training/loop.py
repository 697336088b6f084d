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
from mmrec.model.lm import ModelOutput, count_params, flops_per_token, param_groups
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


def fit(model: torch.nn.Module, train: np.ndarray, val: np.ndarray, tp: TrainParams, budget: Budget, *,
        generator: torch.Generator, ckpt_dir: Path, extra: dict[str, Any], sink: MetricSink | None = None,
        resume: dict[str, Any] | None = None, device: torch.device = torch.device("cpu"),
        group: distributed.Group = distributed.Group()) -> Progress:
    """Train until the budget or early stopping; rank 0 keeps best.pt and last.pt in ckpt_dir.

    Under torchrun every rank samples its own windows (its generator is seeded apart) and DDP averages
    the gradients; every rank evaluates the same fixed windows, and rank 0's decision to stop early is
    broadcast so that no rank can leave the others waiting in a collective."""
    optimizer = torch.optim.AdamW(param_groups(model, tp.weight_decay), lr=budget.lr, betas=(tp.beta1, tp.beta2),
                                  fused=device.type == "cuda")
    progress = Progress()
    ema = ema_of(model, budget.ema_decay, ramp=budget.ema_ramp) if budget.ema_decay else None
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        progress = Progress(**resume["progress"])
        restore_rng(resume["rng"], device, generator, group, ckpt_dir / "last.pt")
    wrapped = model
    if group.world > 1:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    compiled = use_compile(tp.compile, device)
    step_fn = torch.compile(wrapped, backend=COMPILE_BACKEND) if compiled else wrapped
    starts = fixed_starts(len(val), tp.seq_len, tp.eval_windows)
    tokens_per_step = tp.batch_size * tp.seq_len * tp.grad_accum * group.world
    # MFU: the model's training FLOPs over what all ranks' devices could do in the same time.
    step_flops = flops_per_token(model.cfg, count_params(model), tp.seq_len) * tokens_per_step
    peak = peak_flops(device.type, device.index)[0] * group.world  # moves with the thread count: see flush

    def save(name: str, with_optimizer: bool) -> None:
        rng = rng_state(device, generator, group) if with_optimizer else None  # collective: every rank calls it
        if not group.main:
            return
        # best.pt holds the weights that were evaluated: the EMA's when there is one
        kept = model if ema is None or with_optimizer else ema.module
        state = {"model": kept.state_dict(), "progress": progress.__dict__, **extra}
        if with_optimizer:
            state |= {"optimizer": optimizer.state_dict(), "rng": rng}
            if ema is not None:
                state["ema"] = ema.state_dict()
        checkpoint.save_atomic(state, ckpt_dir / name)

    def flush() -> None:
        nonlocal peak, clock
        sink.flush()  # under threads: 0 this re-divides the cores, which moves the CPU's peak
        probe = time.perf_counter()
        peak = peak_flops(device.type, device.index)[0] * group.world  # probed once per thread count
        clock += time.perf_counter() - probe  # a probe is not training time

    bar = tqdm(total=budget.steps, initial=progress.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not group.main)
    stop = StopRequest.install()
    warming_up = compiled  # the first compiled step includes the compilation: timed apart, once
    saved_at = progress.step if resume is not None else -1  # the step that last.pt holds
    clock = time.perf_counter()
    try:
        while True:
            # Ctrl-C, honoured between steps, at the same step on every rank: torchrun forwards it to each at
            # its own moment, and a rank leaving alone would strand the others in an all-reduce. No collective,
            # store call or file write is cut in half, and one pressed in the last step or evaluation counts.
            if distributed.any_rank(stop.requested, group):
                if saved_at != progress.step:
                    save("last.pt", with_optimizer=True)
                raise Stopped(progress.step, ckpt_dir / "last.pt")
            if progress.step >= budget.steps or progress.stopped_early:
                return progress
            lr = lr_at(progress.step, budget, min(tp.min_lr, budget.lr))
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            model.train()
            loss_sum, aux_sum = 0.0, 0.0  # aux: UBOO's loss, logged apart from the cross-entropy
            for micro in range(tp.grad_accum):
                x, y = random_batch(train, tp.batch_size, tp.seq_len, generator)
                sync = micro == tp.grad_accum - 1 or group.world == 1  # DDP all-reduces on the last micro-batch only
                with contextlib.nullcontext() if sync else wrapped.no_sync():
                    out = forward_backward(step_fn, x.to(device), y.to(device), 1 / tp.grad_accum, autocast(device))
                loss_sum += out.loss.item() / tp.grad_accum
                aux_sum += out.aux.item() / tp.grad_accum if out.aux is not None else 0.0
            loss_sum = distributed.mean(loss_sum, group)
            aux_sum = distributed.mean(aux_sum, group) if out.aux is not None else None
            if not math.isfinite(loss_sum):
                raise TrainingDiverged(
                    f"loss became {loss_sum} at step {progress.step} (lr {lr:.2e}); the last good checkpoint is "
                    f"{ckpt_dir / 'last.pt'} (step {max(saved_at, 0)}); "
                    "lower train.lr or raise train.warmup_steps")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                             tp.grad_clip if tp.grad_clip > 0 else math.inf))
            if math.isfinite(grad_norm):  # DDP averaged the gradients first, so every rank agrees
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(model)
            else:  # a finite loss with an inf/NaN gradient: clipping would spread the NaN into every weight
                progress.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.tokens += tokens_per_step
            progress.train_losses.append(loss_sum)
            elapsed = time.perf_counter() - clock
            tok_s = tokens_per_step / max(elapsed, 1e-9)
            clock = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if sink is not None:
                sink.log(progress.step, **{"loss/train": loss_sum, "opt/lr": lr, "opt/grad_norm": grad_norm,
                                           "opt/skipped_steps": progress.skipped_steps})
                if warming_up:  # compile time is reported once and kept out of the throughput figures
                    sink.log(progress.step, **{"perf/compile_s": elapsed})
                else:
                    sink.log(progress.step, **{"perf/tokens_per_s": tok_s, "perf/mfu": step_flops / elapsed / peak})
                if aux_sum is not None:
                    sink.log(progress.step, **{"loss/train_uboo": aux_sum,
                                               "loss/train_ce": loss_sum - model.cfg.uboo_weight * aux_sum})
                if progress.step % tp.log_every == 0:
                    flush()
            if progress.step % tp.eval_every == 0 or progress.step == budget.steps:
                vl = val_loss(model if ema is None else ema.module, val, starts, tp, device)
                row = {"step": progress.step, "train_loss": float(np.mean(progress.train_losses)), "val_loss": vl,
                       "lr": lr}
                if ema is not None:  # the weights being trained, beside the average that is kept: shown, not used
                    row["val_loss_raw"] = val_loss(model, val, starts, tp, device)
                progress.history.append(row)
                progress.train_losses = []
                if vl < progress.best_val:
                    progress.best_val, progress.best_step, progress.bad_evals = vl, progress.step, 0
                    save("best.pt", with_optimizer=False)
                else:
                    progress.bad_evals += 1
                # Rank 0's decision for all: a rank that stopped alone would hang the others' all-reduce.
                progress.stopped_early = distributed.broadcast(0 < tp.patience <= progress.bad_evals, group)
                save("last.pt", with_optimizer=True)
                saved_at = progress.step
                if group.main:
                    bar.write(f"step {progress.step}: val loss {vl:.4f} "
                              f"(best {progress.best_val:.4f} @ {progress.best_step})")
                if sink is not None:
                    sink.log(progress.step, **{"loss/val": vl})
                    if ema is not None:
                        sink.log(progress.step, **{"loss/val_raw": row["val_loss_raw"]})
                    flush()
                clock = time.perf_counter()  # evaluation time is not training throughput
            warming_up = False
    except RuntimeError as err:  # a rank that died (its process or machine) fails the others' next collective
        if group.world == 1 or not distributed.lost_peer(err):
            raise
        raise RankLost(progress.step, saved_at, ckpt_dir / "last.pt") from None
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
