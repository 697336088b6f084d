"""Training one rung of the ladder: the loop, its schedule, checkpoints, early stopping and resume.

`train_rung` is what `stages/train.py` calls. A run killed at any moment resumes from
checkpoints/<rung>/last.pt (when its fingerprint matches the current params and data) and ends
with the same weights as a run that was never killed: the checkpoint holds the model, optimizer,
step, the RNG states (torch's, CUDA's when a GPU trains, every rank's data sampler) and the history.
The loop is plain PyTorch, nanoGPT style: bf16 autocast around the forward only, a step whose gradient
norm is not finite skipped and counted, torch.compile on CUDA by default, and MFU logged beside tokens/s.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from mmrec import checkpoint, distributed
from mmrec.config import Params, TrainParams
from mmrec.cores import CoreShare
from mmrec.data import check_fits, fixed_starts, random_batch
from mmrec.errors import Interrupted, UserError
from mmrec.files import copy_atomic, dvc_fix, replacing, sha256_file, sha256_text, write_json, write_text
from mmrec.device import autocast, resolve_device
from mmrec.inference import score
from mmrec.model import ModelConfig, ModelOutput, build_model, count_params, flops_per_token, param_groups
from mmrec.paths import RungPaths


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


@dataclass
class Budget:
    steps: int
    lr: float
    warmup: int
    ema_decay: float = 0.0  # 0: evaluate and keep the trained weights themselves
    ema_ramp: bool = True  # from a random init; a grown rung's average starts at its parent's weights, full decay


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


def lr_at(step: int, budget: Budget, min_lr: float) -> float:
    """Linear warmup to the peak, then cosine decay to min_lr at the end of the budget."""
    if step < budget.warmup:
        return budget.lr * (step + 1) / budget.warmup
    span = max(budget.steps - budget.warmup, 1)
    cos = 0.5 * (1 + math.cos(math.pi * min(step - budget.warmup, span) / span))
    return min_lr + (budget.lr - min_lr) * cos


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


# Dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "GH200": 989e12, "B200": 2250e12,
                   "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12,
                   "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


@functools.cache
def peak_flops(device_type: str, index: int | None = None) -> tuple[float, str]:
    """The device's peak FLOP/s for MFU and where the figure comes from: the table above for a known GPU
    (bf16, the dtype training runs in there), else a matmul measured once (fp32 on the CPU, at the
    current thread count), which is what the CPU can reach rather than a datasheet figure."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name(index)
        for key, flops in PEAK_BF16_FLOPS.items():  # ordered: "H100 PCIe" before "H100"
            if key in name:
                return flops, f"table: {name}"
    return _matmul_probe(torch.device(device_type, index) if index is not None else torch.device(device_type))


def _matmul_probe(device: torch.device, n: int = 512, reps: int = 8) -> tuple[float, str]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device).manual_seed(0)  # its own stream: drawing from torch's would shift dropout's
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
    best = math.inf
    for _ in range(reps + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, f"matmul probe {n}x{n} {str(dtype).removeprefix('torch.')}"


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
        raise UserError(f"{where} was written by {len(state['data'])} processes; "
                        f"resume with train.nproc = {len(state['data'])} or delete it")
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"][group.rank])
    if device.type == "cuda" and "cuda" in state:  # a CPU checkpoint resumed on a GPU starts CUDA's afresh
        torch.cuda.set_rng_state(state["cuda"][group.rank], device)


def val_loss(model: torch.nn.Module, val: np.ndarray, starts: list[int], tp: TrainParams, device: torch.device) -> float:
    with autocast(device):
        return score(model, val, [(s, tp.seq_len) for s in starts], tp.batch_size, device).loss


def ema_of(model: torch.nn.Module, decay: float, ramp: bool) -> AveragedModel:
    """An exponential moving average of the weights. From a random init its decay ramps up as
    (1 + n) / (10 + n), so that the first steps' weights do not linger in it; a grown rung starts from its
    parent's good weights and averages at the full decay from the first step."""
    def average(avg: list[torch.Tensor], new: list[torch.Tensor], n: torch.Tensor | int) -> None:
        d = min(decay, (1 + float(n)) / (10 + float(n))) if ramp else decay
        torch._foreach_lerp_(avg, new, 1 - d)
    return AveragedModel(model, multi_avg_fn=average)


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
    peak = peak_flops(device.type, device.index)[0] * group.world

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

    bar = tqdm(total=budget.steps, initial=progress.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not group.main)
    stop = StopRequest.install()
    train_losses: list[float] = []
    warming_up = compiled  # the first compiled step includes the compilation: timed apart, once
    clock = time.perf_counter()
    while progress.step < budget.steps and not progress.stopped_early:
        if stop.requested:  # Ctrl-C, honoured between steps: no store call or file write is cut in half
            saved = progress.history[-1]["step"] if progress.history else 0
            raise Interrupted(f"interrupted at step {progress.step}; `dvc repro` resumes from step {saved} "
                              f"({ckpt_dir / 'last.pt'})")
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
            bar.close()
            raise TrainingDiverged(
                f"loss became {loss_sum} at step {progress.step} (lr {lr:.2e}); the last good checkpoint is "
                f"{ckpt_dir / 'last.pt'} (step {progress.history[-1]['step'] if progress.history else 0}); "
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
        train_losses.append(loss_sum)
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
                sink.flush()
        if progress.step % tp.eval_every == 0 or progress.step == budget.steps:
            vl = val_loss(model if ema is None else ema.module, val, starts, tp, device)
            row = {"step": progress.step, "train_loss": float(np.mean(train_losses)), "val_loss": vl, "lr": lr}
            if ema is not None:  # the weights being trained, beside the average that is kept: shown, not used
                row["val_loss_raw"] = val_loss(model, val, starts, tp, device)
            progress.history.append(row)
            train_losses = []
            if vl < progress.best_val:
                progress.best_val, progress.best_step, progress.bad_evals = vl, progress.step, 0
                save("best.pt", with_optimizer=False)
            else:
                progress.bad_evals += 1
            # Rank 0's decision for all: a rank that stopped alone would hang the others' all-reduce.
            progress.stopped_early = distributed.broadcast(0 < tp.patience <= progress.bad_evals, group)
            save("last.pt", with_optimizer=True)
            if group.main:
                bar.write(f"step {progress.step}: val loss {vl:.4f} (best {progress.best_val:.4f} @ {progress.best_step})")
            if sink is not None:
                sink.log(progress.step, **{"loss/val": vl})
                if ema is not None:
                    sink.log(progress.step, **{"loss/val_raw": row["val_loss_raw"]})
                sink.flush()
            clock = time.perf_counter()  # evaluation time is not training throughput
        warming_up = False
    bar.close()
    stop.uninstall()
    return progress


class StopRequest:
    """The first Ctrl-C asks the loop to stop at the next step boundary (it then says where it stopped and
    where a rerun resumes); a second one interrupts at once, as Python would."""

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


def budget_for(params: Params, rung_name: str, world: int = 1) -> Budget:
    """Steps, peak lr, warmup and weight averaging of a rung; `world` processes each take batch_size windows a
    step, so train.max_tokens (all ranks' tokens) caps the steps at max_tokens / (tokens a step x world)."""
    tp, rung = params.train, params.rung(rung_name)
    steps = rung.max_steps or tp.max_steps
    if tp.max_tokens:
        steps = min(steps, math.ceil(tp.max_tokens / (tp.batch_size * tp.seq_len * tp.grad_accum * world)))
    ema = tp.ema_decay if rung.ema_decay is None else rung.ema_decay
    if rung.parent:  # a grown rung starts at its parent's loss: a lower peak keeps AdamW's first steps from undoing it
        return Budget(steps=steps, lr=rung.lr or tp.lr * tp.growth_lr_scale, warmup=min(tp.rewarmup_steps, steps),
                      ema_decay=ema, ema_ramp=False)
    return Budget(steps=steps, lr=rung.lr or tp.lr, warmup=min(tp.warmup_steps, steps), ema_decay=ema)


def fingerprint(params: Params, rung_name: str, header: dict[str, Any], parent_sha: str) -> str:
    """Equal for runs that must produce equal weights: resume only from a checkpoint with this value."""
    p = params.model_dump()
    picked = {"seed": p["seed"], "model": p["model"], "train": p["train"], "rung": p["ladder"][rung_name],
              "growth_noise": p["promote"]["growth_noise"], "tokenizer": header["tokenizer_sha256"],
              "data": header.get("data_sha256", ""), "parent": parent_sha}
    return sha256_text(json.dumps(picked, sort_keys=True))


def train_rung(params: Params, rung_name: str, root: Path = Path(".")) -> dict[str, Any] | None:
    """Train one rung end to end: resume or start, grow from the parent, track, write the DVC outputs.
    Returns the metrics on rank 0 (None on the other ranks of a torchrun job)."""
    from mmrec.tokenizer import load_tokens, read_header

    tp, rung = params.train, params.rung(rung_name)
    paths = RungPaths(root, rung_name, tp.checkpoint_dir)
    header = read_header(paths.tokens)
    train_tokens, val_tokens = load_tokens(paths.tokens, "train"), load_tokens(paths.tokens, "val")
    check_fits(train_tokens, tp.seq_len, "train")
    check_fits(val_tokens, tp.seq_len, "val")
    device = resolve_device(tp.device)
    group = distributed.init(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", group.local_rank)
        torch.cuda.set_device(device)
    # threads: 0 shares the cores with every training running now (each rank counts), re-divided at each flush
    cores = CoreShare(max(1, tp.threads // group.world) if tp.threads else 0)
    cores.apply(force=True)
    cfg = ModelConfig.from_params(params.model, rung, header["vocab_size"])
    budget = budget_for(params, rung_name, group.world)  # after distributed.init: the budget is all ranks'

    parent_best = paths.model(rung.parent) / "best.pt" if rung.parent else None
    if parent_best is not None and not parent_best.exists():
        raise UserError(f"rung {rung_name} grows from {rung.parent}, but {parent_best} is missing; "
                        f"run `dvc repro promote@{rung.parent}`")
    fp = fingerprint(params, rung_name, header, sha256_file(parent_best) if parent_best else "")
    resume = resume_point(paths.ckpt, fp, group)

    generator = seed_everything(params.seed, group.rank)
    model = build_model(cfg).to(device)
    parent_losses: dict[str, float] = {}
    if parent_best is not None and resume is None:
        parent_losses = grow_into(model, parent_best, params, val_tokens, device)
    elif resume is not None:  # kept in the checkpoints, for the head-start figure at the end
        parent_losses = {k: resume[k] for k in ("parent_val_loss", "grown_val_loss") if k in resume}

    run = None
    if group.main:
        run = open_run(params, paths, cfg, header, fp, resume, budget, count_params(model), parent_losses)
    extra = {"config": cfg.to_dict(), "fingerprint": fp, "run_id": run.id if run else "",
             "tokenizer_sha256": header["tokenizer_sha256"], "rung": rung_name, **parent_losses}
    from mmrec.track import closed_on_failure

    with closed_on_failure(run):  # a fault or Ctrl-C ends the run FAILED / KILLED, never left RUNNING
        try:
            progress = fit(model, train_tokens, val_tokens, tp, budget, generator=generator, ckpt_dir=paths.ckpt,
                           extra=extra, sink=SharingSink(run, cores), resume=resume, device=device, group=group)
        finally:
            cores.close()
            distributed.shutdown(group)
        if run is None:
            return None
        if parent_losses:  # did the grown rung keep its head start? the largest rise above the parent at any evaluation
            rise = max(r["val_loss"] for r in progress.history) - parent_losses["parent_val_loss"]
            run.log(progress.step, **{"growth/max_val_rise": rise})
        metrics = write_outputs(paths, run, progress, cfg, count_params(model), params)
    shutil.rmtree(paths.ckpt)  # finished: a forced rerun starts from scratch rather than resuming the end
    return metrics


def resume_point(ckpt_dir: Path, fp: str, group: distributed.Group) -> dict[str, Any] | None:
    """last.pt when it was made with these very params, data and parent; a stale one is deleted."""
    last = ckpt_dir / "last.pt"
    fix = f"delete {ckpt_dir} to train this rung from step 0"
    state = checkpoint.load(last, fix, keys=("model", "progress", "fingerprint")) if last.exists() else None
    distributed.barrier(group)  # every rank has read it before rank 0 may delete it
    if state is not None and state.get("fingerprint") == fp:
        if group.main:
            tqdm.write(f"resuming from step {state['progress']['step']} ({last})")
        return state
    if state is not None and group.main:
        shutil.rmtree(ckpt_dir)  # params or data changed: that run's state means nothing now
    return None


def grow_into(model: torch.nn.Module, parent_best: Path, params: Params, val: np.ndarray,
              device: torch.device) -> dict[str, float]:
    """Load the parent's best weights grown to `model`'s shape; return both step-0 val losses."""
    from mmrec.growth import grow_state_dict

    parent = checkpoint.load(parent_best, dvc_fix(f"train@{parent_best.parent.name}"), keys=("model", "config"))
    parent_cfg = ModelConfig.from_dict(parent["config"])
    grown = grow_state_dict(parent["model"], parent_cfg, model.cfg, noise=params.promote.growth_noise,
                            generator=torch.Generator().manual_seed(params.seed), split=params.train.growth_split)
    model.load_state_dict(grown)
    parent_model = build_model(parent_cfg).to(device)
    parent_model.load_state_dict(parent["model"])
    starts = fixed_starts(len(val), params.train.seq_len, params.train.eval_windows)
    return {"parent_val_loss": val_loss(parent_model, val, starts, params.train, device),
            "grown_val_loss": val_loss(model, val, starts, params.train, device)}


def open_run(params: Params, paths: RungPaths, cfg: ModelConfig, header: dict[str, Any], fp: str,
             resume: dict[str, Any] | None, budget: Budget, n_params: int, parent_losses: dict[str, float]):
    """The rung's MLflow run: the one a resumed checkpoint names, or a new one with params and tags."""
    from mmrec import track  # the only mlflow importer; loaded here so the loop itself stays light to import

    rung_name = paths.rung
    rung = params.rung(rung_name)
    tags = {"rung": rung_name, "params_hash": params.digest(), "fingerprint": fp, "arch": cfg.arch,
            "tokenizer_sha256": header["tokenizer_sha256"], "data_sha256": header.get("data_sha256", ""),
            "dvc_stage": f"train@{rung_name}"}
    if rung.parent:
        tags |= parent_tags(paths, rung.parent)
    if resume is not None:  # the same run, logging nothing twice (or a new one if the store lost it)
        run = track.Run.resume(params.mlflow, resume["run_id"], rung_name, tags, skip_logged=True,
                               system_metrics=params.mlflow.system_metrics)
        if not run.fresh:
            return run
    else:
        track.close_abandoned(params.mlflow, rung_name)  # runs of killed attempts that never checkpointed
        run = track.start_rung_run(params, rung_name, tags, paths.root)
    run.log_params(params.flat() | {"n_params": n_params, "budget.steps": budget.steps, "budget.lr": budget.lr})
    if parent_losses:
        run.log(0, **{f"growth/{k}": v for k, v in parent_losses.items()})
        run.flush()
    return run


def write_outputs(paths: RungPaths, run: Any, progress: Progress, cfg: ModelConfig, n_params: int,
                  params: Params) -> dict[str, Any]:
    """The rung's DVC outputs (best.pt, run.json, metrics, curves, the loss plot) and its MLflow artifacts;
    ends the run."""
    from mmrec import track
    from mmrec.plots import loss_curves

    out = paths.model()
    out.mkdir(parents=True, exist_ok=True)
    copy_atomic(paths.ckpt / "best.pt", paths.best)
    write_json(out / "run.json", {"run_id": run.id, "experiment": params.mlflow.experiment,
                                  "tracking_uri": track.tracking_uri(params.mlflow)})
    last = progress.history[-1]
    metrics = {"best_val_loss": progress.best_val, "best_step": progress.best_step, "steps": progress.step,
               "final_train_loss": last["train_loss"], "final_val_loss": last["val_loss"], "n_params": n_params,
               "tokens_seen": progress.tokens, "stopped_early": progress.stopped_early}
    write_json(paths.metrics, metrics)
    speed = run_speed(run)
    write_json(paths.speed, speed)
    # every step's train loss comes back from the run (a resumed run logged its first steps before the kill)
    train = per_step(run, "loss/train")
    lr = dict(per_step(run, "opt/lr"))
    val = [(int(r["step"]), r["val_loss"]) for r in progress.history]
    write_text(paths.train_curve, "step,train_loss,lr\n" + "".join(f"{s},{v!r},{lr.get(s, 0.0)!r}\n" for s, v in train))
    write_text(paths.val_curve, "step,val_loss\n" + "".join(f"{s},{v!r}\n" for s, v in val))
    with replacing(paths.plot) as png:
        loss_curves(train, val, list(lr.items()), png,
                    title=f"{paths.rung}: {cfg.arch}, {n_params / 1e6:.2f}M params, best val loss "
                          f"{progress.best_val:.4f} at step {progress.best_step}")
    run.log(progress.step, **{"summary/best_val_loss": progress.best_val, "summary/best_step": progress.best_step,
                              "perf/median_tokens_per_s": speed["tokens_per_s"]})
    run.log_artifact(paths.plot, "plots")
    run.log_artifact(paths.tokenizer, "tokenizer")
    run.log_artifact(out / "best.pt", "checkpoint")
    run.end()
    return metrics


def parent_tags(paths: RungPaths, parent: str) -> dict[str, str]:
    from mmrec.files import load_json
    from mmrec.track import read_run_id

    tags = {"parent_rung": parent, "parent_run_id": read_run_id(paths.model(parent))}
    promotion = RungPaths(paths.root, parent).promotion
    if promotion.exists():
        tags["parent_model_version"] = str(load_json(promotion, f"promote@{parent}").get("model_version", ""))
    return tags


def per_step(run: Any, key: str) -> list[tuple[int, float]]:
    """(step, value) of a run's metric in step order, one value a step (the last logged)."""
    return sorted(dict(run.metric_history(key)).items())


def run_speed(run: Any) -> dict[str, float]:
    """Median training throughput and MFU, from the run's own history (kept out of the bit-reproducible metrics)."""
    run.flush()
    medians = {}
    for name, key in [("tokens_per_s", "perf/tokens_per_s"), ("mfu", "perf/mfu")]:
        values = [v for _, v in run.metric_history(key)]
        medians[name] = float(np.median(values)) if values else 0.0
    return medians
