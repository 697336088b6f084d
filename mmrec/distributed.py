"""Data-parallel plumbing: the few collective calls the training loop needs, no-ops in one process.

`torchrun --nproc_per_node N stages/train.py <rung>` (or `train.nproc: N`, which runs the stage again under
torchrun, see `launch`) sets RANK/WORLD_SIZE/LOCAL_RANK; gloo carries CPU runs, nccl GPU runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone writes checkpoints and outputs and talks to MLflow."""
        return self.rank == 0


def launched() -> bool:
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch(nproc: int, script: str, args: list[str]) -> int:
    """Run `script args` as `nproc` processes under torchrun, started from this process, and return the exit
    code to leave with. Ctrl-C reaches torchrun, which forwards it to every rank (each in a session of its
    own): the ranks stop at the same step and each says so in one line, then this process returns 130
    without a traceback of torchrun's. A failed rank said why in its own line: its exit code is returned."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", script, *args]))
    except SignalException as stop:  # Ctrl-C or a kill of this process: every rank was sent the same signal
        return 128 + stop.sigval
    except ChildFailedError as failed:
        code = failed.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code  # a rank killed by signal N: 128 + N, as a shell says
    return 0


def init(device_type: str) -> Group:
    if not launched():
        return Group()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))


def mean(value: float, group: Group) -> float:
    """The mean of a float over all ranks (every rank gets the same answer)."""
    if group.world == 1:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces GPU tensors only
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / group.world


def any_rank(flag: bool, group: Group) -> bool:
    """True on every rank when `flag` is true on any: one decision (stop on Ctrl-C) that no rank takes alone."""
    if group.world == 1:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj: Any, group: Group) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if group.world == 1:
        return [obj]
    out: list[Any] = [None] * group.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, group: Group) -> Any:
    """Rank 0's `obj` on every rank: one decision (early stopping) for all, whatever each rank computed."""
    if group.world == 1:
        return obj
    box = [obj if group.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(group: Group) -> None:
    if group.world > 1:
        dist.barrier()


def shutdown(group: Group) -> None:
    if group.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
