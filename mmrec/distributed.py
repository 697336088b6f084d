"""Data-parallel plumbing: the few collective calls the training loop needs, no-ops in one process.

`torchrun --nproc_per_node N stages/train.py <rung>` (or `train.nproc: N`, which re-launches the stage
under torchrun) sets RANK/WORLD_SIZE/LOCAL_RANK; gloo carries CPU runs, nccl GPU runs.
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
