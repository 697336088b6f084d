"""Training one rung of the ladder end to end: resume or start, grow from the parent, track, write the outputs.

`train_rung` is what `stages/train.py` calls. A killed run resumes from checkpoints/<rung>/last.pt (in a checkpoint_dir
outside the workspace, this workspace's own folder: pipeline/checkpoint_dirs.py) when its fingerprint matches the
current params, data, parent and code (see `fingerprint_inputs`), in the same MLflow run.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mmrec.model import checkpoint
from mmrec.training import distributed
from mmrec.config import Params
from mmrec.training.cores import CoreShare
from mmrec.data.windows import check_fits, fixed_starts
from mmrec.training.device import resolve_device
from mmrec.errors import Interrupted, UserError
from mmrec.files import dvc_fix, sha256_file, sha256_text, write_text
from mmrec.model.lm import ModelConfig, build_model, count_params
from mmrec.pipeline import checkpoint_dirs
from mmrec.pipeline.outputs import write_outputs
from mmrec.paths import RungPaths
from mmrec.training.schedule import Budget, budget_for
from mmrec.sources import source_digests
from mmrec.training.loop import RankLost, SharingSink, Stopped, fit, seed_everything, val_loss


TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "stages" / "train.py"


def fingerprint_inputs(params: Params, rung_name: str, header: dict[str, Any], parent_sha: str) -> dict[str, Any]:
    """What a rung's weights are a function of: the params that train it, the data and tokenizer, the parent's
    checkpoint and the code the train stage runs (its import closure, see mmrec/sources.py). Not where the nodes
    meet: a job restarted with node 0 on another machine resumes."""
    p = params.model_dump()
    train = {k: v for k, v in p["train"].items() if k != "rdzv_endpoint"}
    return {"params": {"seed": p["seed"], "model": p["model"], "train": train, "rung": p["ladder"][rung_name],
                       "growth_noise": p["promote"]["growth_noise"]},
            "tokenizer": header["tokenizer_sha256"], "data": header.get("data_sha256", ""), "parent": parent_sha,
            "code": source_digests(TRAIN_SCRIPT if TRAIN_SCRIPT.exists() else Path(__file__))}


def fingerprint(inputs: dict[str, Any]) -> str:
    """Equal for runs that must produce equal weights: resume only from a checkpoint with this value."""
    return sha256_text(json.dumps(inputs, sort_keys=True))


def what_changed(before: dict[str, Any] | None, now: dict[str, Any]) -> str:
    """The inputs of a stale checkpoint that differ now, for one line: 'mmrec/model/lm.py', 'params (train)'."""
    if not isinstance(before, dict):  # written before checkpoints kept their inputs
        return "its params, data, parent or code"
    changed = []
    for key, value in now.items():
        old = before.get(key)
        if old == value:
            continue
        if key in ("params", "code") and isinstance(old, dict):
            parts = sorted(k for k in old.keys() | value.keys() if old.get(k) != value.get(k))
            changed.append(f"params ({', '.join(parts)})" if key == "params" else ", ".join(parts))
        else:
            changed.append({"parent": "the parent's checkpoint"}.get(key, f"the {key}"))
    return ", ".join(changed)


def train_rung(params: Params, rung_name: str, root: Path = Path(".")) -> dict[str, Any] | None:
    """Train one rung end to end: resume or start, grow from the parent, track, write the DVC outputs.
    Returns the metrics on rank 0 (None on the other ranks of a torchrun job)."""
    from mmrec.data.tokenizer import load_tokens, read_header

    tp, rung = params.train, params.rung(rung_name)
    paths = RungPaths(root, rung_name, tp.checkpoint_dir)
    header = read_header(paths.tokens)
    # train read window by window, never mapped: a long run would otherwise hold the pages of the whole split
    train_tokens, val_tokens = load_tokens(paths.tokens, "train", mapped=False), load_tokens(paths.tokens, "val")
    check_fits(train_tokens, tp.seq_len, "train")
    check_fits(val_tokens, tp.seq_len, "val")
    device = resolve_device(tp.device)
    group = distributed.init(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", group.local_rank)
        torch.cuda.set_device(device)
    # threads: 0 shares the cores with every training running now (each rank counts), re-divided at each flush
    cores = CoreShare(max(1, tp.threads // group.local_world) if tp.threads else 0)
    cores.apply(force=True)
    cfg = ModelConfig.from_params(params.model, rung, header["vocab_size"], tp.seq_len)
    budget = budget_for(params, rung_name, group.world)  # after distributed.init: the budget is all ranks'

    parent_best = paths.model(rung.parent) / "best.pt" if rung.parent else None
    if parent_best is not None and not parent_best.exists():
        raise UserError(f"rung {rung_name} grows from {rung.parent}, but {parent_best} is missing; "
                        f"run `dvc repro promote@{rung.parent}` (on a node that joins another: "
                        f"`dvc pull train@{rung.parent}`)")
    inputs = fingerprint_inputs(params, rung_name, header, sha256_file(parent_best) if parent_best else "")
    fp = fingerprint(inputs)
    try:
        paths = own_folder(paths, group)
        check_nodes_agree(paths, inputs, group)
        resume = resume_point(paths.ckpt, inputs, group)
    except RuntimeError as err:  # a rank that stopped at once (a line of its own says why), or a dead node
        if group.world == 1 or not distributed.lost_peer(err):
            raise
        if not group.main:
            raise SystemExit(distributed.LOST) from None
        raise UserError("lost another rank before the first step (it failed with a line of its own, or its "
                        "process or machine died); start the stage again on every node") from None

    generator = seed_everything(params.seed, group.rank)
    model = build_model(cfg).to(device)
    parent_losses: dict[str, float] = {}
    if parent_best is not None and resume is None:
        parent_losses = grow_into(model, parent_best, params, val_tokens, device)
    elif resume is not None:  # kept in the checkpoints, for the head-start figure at the end
        parent_losses = {k: resume[k] for k in ("parent_val_loss", "grown_val_loss") if k in resume}

    run = None
    if group.main:  # a failure inside it ends the run it opened, as below
        run = open_run(params, paths, cfg, header, fp, resume, budget, count_params(model), parent_losses)
    extra = {"config": cfg.to_dict(), "fingerprint": fp, "fingerprint_inputs": inputs, "run_id": run.id if run else "",
             "tokenizer_sha256": header["tokenizer_sha256"], "rung": rung_name, **parent_losses}
    from mmrec.tracking.run import closed_on_failure

    with closed_on_failure(run):  # a fault or Ctrl-C ends the run FAILED / KILLED, never left RUNNING
        try:
            progress = fit(model, train_tokens, val_tokens, tp, budget, generator=generator, ckpt_dir=paths.ckpt,
                           extra=extra, sink=SharingSink(run, cores), resume=resume, device=device, group=group)
        except Stopped as stop:  # every rank stopped at the same step: each says so in one line
            raise Interrupted(interrupted_line(stop, rung_name, group, paths.root)) from None
        except RankLost as lost:  # rank 0 says where it stopped; the others leave quietly (see distributed.launch)
            if not group.main:
                raise SystemExit(distributed.LOST) from None
            raise UserError(lost_line(lost, rung_name, paths.root)) from None
        finally:
            cores.close()
            distributed.shutdown(group)
            if group.main:  # last.pt stays for a resume: the folder is no longer held
                checkpoint_dirs.release(paths.ckpt)
        if run is None:
            return None
        if parent_losses:  # did the grown rung keep its head start? the largest rise above the parent at any evaluation
            rise = max(r["val_loss"] for r in progress.history) - parent_losses["parent_val_loss"]
            run.log(progress.step, **{"growth/max_val_rise": rise})
        metrics = write_outputs(paths, run, progress, cfg, count_params(model), params)
    shutil.rmtree(paths.ckpt)  # finished: a forced rerun starts from scratch rather than resuming the end
    return metrics


def interrupted_line(stop: Stopped, rung_name: str, group: distributed.Group, root: Path) -> str:
    """Where Ctrl-C stopped the rung and what the next command will do with its checkpoint."""
    if not group.main:
        return f"{stop} (rank {group.rank} of {group.world}; rank 0 saved it)"
    from mmrec.pipeline.rerun import after_interrupt

    return f"{stop}, saved in {stop.last}; {after_interrupt(f'train@{rung_name}', stop.step, stop.last, root)}"


def lost_line(lost: RankLost, rung_name: str, root: Path) -> str:
    """Rank 0's line when another rank died: the step it stopped the others at, and how every node resumes."""
    if lost.saved < 0:
        resume = "nothing was saved yet: running it again starts from step 0"
    else:
        from mmrec.pipeline.rerun import after_interrupt

        resume = after_interrupt(f"train@{rung_name}", lost.saved, lost.last, root)
    return f"{lost} (its process or machine died); {resume}, once every node runs the stage again"


def own_folder(paths: RungPaths, group: distributed.Group) -> RungPaths:
    """`paths` with the checkpoint folder of this training, which rank 0 names for every rank and claims (one line
    when a training that may still run holds it)."""
    name = checkpoint_dirs.training_dir(paths.root, paths.rung, paths.checkpoint_dir).name if group.main else None
    paths = dataclasses.replace(paths, training=distributed.broadcast(name, group))
    if group.main:
        checkpoint_dirs.claim(paths.ckpt, paths.rung, paths.root)
    return paths


def check_nodes_agree(paths: RungPaths, inputs: dict[str, Any], group: distributed.Group) -> None:
    """On several machines each node runs the stage in a clone of its own: every rank must train this rung from
    the same params, data and code, and see the files rank 0 writes in train.checkpoint_dir (a rerun resumes
    every rank from rank 0's last.pt). One line on every rank when they do not."""
    if group.world == 1:
        return
    probe, last = paths.ckpt / ".written-by-rank-0", paths.ckpt / "last.pt"
    if group.main:
        write_text(probe, uuid.uuid4().hex)
    distributed.barrier(group)
    seen = distributed.gather({"host": distributed.host(), "rung": paths.rung, "inputs": inputs,
                               "probe": probe.read_text() if probe.exists() else None,
                               "last": sha256_file(last) if last.exists() else None}, group)
    if group.main:
        probe.unlink()
    lead = seen[0]
    for rank, node in enumerate(seen):
        where = f"rank {rank} on {node['host']}"
        if node["rung"] != lead["rung"]:
            raise UserError(f"{where} was started for rung {node['rung']}, rank 0 on {lead['host']} for "
                            f"{lead['rung']}; start the same stage on every node")
        if node["inputs"] != lead["inputs"]:
            raise UserError(f"{where} would train {lead['rung']} from other inputs than rank 0 on {lead['host']} "
                            f"({what_changed(lead['inputs'], node['inputs'])} differ); run the same commit and "
                            "params.yaml on every node, with the same data (`dvc pull`)")
        fix = "make it a folder every node shares (rank 0 saves last.pt there, and every rank resumes from it)"
        if node["last"] != lead["last"]:
            raise UserError(f"train.checkpoint_dir {paths.checkpoint_dir}: {where} sees {last_pt(node)} in "
                            f"{paths.ckpt}, rank 0 on {lead['host']} sees {last_pt(lead)}; {fix}")
        if node["probe"] != lead["probe"]:
            raise UserError(f"train.checkpoint_dir {paths.checkpoint_dir}: {where} does not see the file rank 0 on "
                            f"{lead['host']} wrote in {paths.ckpt}; {fix}")


def last_pt(node: dict[str, Any]) -> str:
    return f"last.pt {node['last'][:12]}" if node["last"] else "no last.pt"


def resume_point(ckpt_dir: Path, inputs: dict[str, Any], group: distributed.Group) -> dict[str, Any] | None:
    """last.pt when it was made with these very params, data, parent and code; a stale one is deleted, saying why."""
    last = ckpt_dir / "last.pt"
    fix = f"delete {ckpt_dir} to train this rung from step 0"
    state = checkpoint.load(last, fix, keys=("model", "progress", "fingerprint")) if last.exists() else None
    distributed.barrier(group)  # every rank has read it before rank 0 may delete it
    if state is not None and state.get("fingerprint") == fingerprint(inputs):
        if group.main:
            tqdm.write(f"resuming from step {state['progress']['step']} ({last})")
        return state
    if state is not None and group.main:  # that run's state means nothing now
        tqdm.write(f"not resuming {last} from step {state['progress']['step']}: "
                   f"{what_changed(state.get('fingerprint_inputs'), inputs)} changed since; training from step 0")
        for name in ("last.pt", "best.pt"):  # not the folder: this training holds it (its training.json)
            (ckpt_dir / name).unlink(missing_ok=True)
    return None


def grow_into(model: torch.nn.Module, parent_best: Path, params: Params, val: np.ndarray,
              device: torch.device) -> dict[str, float]:
    """Load the parent's best weights grown to `model`'s shape; return both step-0 val losses. Torch's global
    generator is left as it was, so the child trains as bench/bench_seeds.py's grown rung of the same seed."""
    from mmrec.model.growth import grow_state_dict

    parent = checkpoint.load(parent_best, dvc_fix(f"train@{parent_best.parent.name}"), keys=("model", "config"))
    parent_cfg = ModelConfig.from_dict(parent["config"])
    grown = grow_state_dict(parent["model"], parent_cfg, model.cfg, noise=params.promote.growth_noise,
                            generator=torch.Generator().manual_seed(params.seed), split=params.train.growth_split)
    model.load_state_dict(grown)
    with torch.random.fork_rng(devices=[]):  # its init draws nothing from the child's dropout stream
        parent_model = build_model(parent_cfg).to(device)
    parent_model.load_state_dict(parent["model"])
    starts = fixed_starts(len(val), params.train.seq_len, params.train.eval_windows)
    return {"parent_val_loss": val_loss(parent_model, val, starts, params.train, device),
            "grown_val_loss": val_loss(model, val, starts, params.train, device)}


def open_run(params: Params, paths: RungPaths, cfg: ModelConfig, header: dict[str, Any], fp: str,
             resume: dict[str, Any] | None, budget: Budget, n_params: int, parent_losses: dict[str, float]):
    """The rung's MLflow run: the one a resumed checkpoint names, or a new one with params and tags."""
    from mmrec.tracking import pipeline_run, run as track  # mlflow is slow to import: only when a run opens

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
        run = pipeline_run.start_rung_run(params, rung_name, tags, paths.root)
    with track.closed_on_failure(run):  # a store fault or Ctrl-C from here on must not leave it RUNNING
        run.log_params(params.flat() | {"n_params": n_params, "budget.steps": budget.steps, "budget.lr": budget.lr})
        if parent_losses:
            run.log(0, **{f"growth/{k}": v for k, v in parent_losses.items()})
            run.flush()
    return run


def parent_tags(paths: RungPaths, parent: str) -> dict[str, str]:
    from mmrec.files import load_json
    from mmrec.tracking.run import read_run_id

    tags = {"parent_rung": parent, "parent_run_id": read_run_id(paths.model(parent))}
    promotion = RungPaths(paths.root, parent).promotion
    if promotion.exists():
        tags["parent_model_version"] = str(load_json(promotion, f"promote@{parent}").get("model_version", ""))
    return tags
