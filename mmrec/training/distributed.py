"""Data-parallel plumbing: the few collective calls the training loop needs, no-ops in one process.

`torchrun --nproc_per_node N stages/train.py <rung>` (or `train.nproc: N`, which runs the stage again under
torchrun, see `launch`) sets RANK/WORLD_SIZE/LOCAL_RANK; gloo carries CPU runs, nccl GPU runs. With
`train.nnodes > 1` every machine runs the same stage and they meet at `train.rdzv_endpoint` (torchrun's c10d
rendezvous): the node that runs it under DVC leads (see `lead_first`), the others join (docs/gpus.md).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

# The launcher's rendezvous client dumps a C++ stack as a warning when the node that hosts the rendezvous goes
# away, on top of the one line each rank prints then: quiet in the launcher only (read once, as torch loads).
_QUIET_CPP = "torch" not in sys.modules and "TORCH_CPP_LOG_LEVEL" not in os.environ
if _QUIET_CPP:
    os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

if _QUIET_CPP:
    del os.environ["TORCH_CPP_LOG_LEVEL"]  # the workers it starts keep torch's default

from mmrec.errors import UserError  # noqa: E402

LEADS = "DVC_STAGE"  # DVC sets it for every stage it runs: the node where `dvc repro` runs writes the outputs
RDZV_ID = "mmrec"  # one job per endpoint; nodes started for another rung or params meet and are told (rung.py)
JOIN_TIMEOUT_S = 600  # torchrun's default: how long the nodes wait for each other
# How long torchrun waits, once it has forwarded Ctrl-C, for the ranks to agree on a step, save it and leave,
# before it SIGKILLs them: its own default (30 s, TORCH_ELASTIC_SHUTDOWN_TIMEOUT) is shorter than a first compiled
# step, a long evaluation or a large save on a network disk, and a rank killed then loses the agreed save.
SHUTDOWN_GRACE_S = 600
LOST = os.EX_TEMPFAIL  # the exit of a rank that lost another and leaves the telling to rank 0 or its launcher


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this machine
    ranks: tuple[int, ...] | None = None  # torch's rank of our rank 0, 1, ...; None: the same numbers

    @property
    def main(self) -> bool:
        """Rank 0 alone writes checkpoints and outputs and talks to MLflow."""
        return self.rank == 0

    @property
    def order(self) -> tuple[int, ...]:
        return self.ranks or tuple(range(self.world))


def launched() -> bool:
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_args(nproc: int, nnodes: int = 1, endpoint: str = "", leads: bool = False) -> list[str]:
    """torchrun's flags for `nproc` processes on each of `nnodes` machines: standalone on one machine, else the
    c10d rendezvous at `endpoint`, which the node that leads hosts and the others join, whichever starts first
    (a node joining waits for it as long as torchrun waits for every node: its join timeout)."""
    # a longer grace that a user sets is kept; a shorter one is raised: the agreed save must not be cut short
    theirs = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "")
    grace = max(int(theirs) if theirs.isdigit() else 0, SHUTDOWN_GRACE_S)
    each = [f"--nproc_per_node={nproc}", f"--shutdown-timeout={grace}"]
    if nnodes == 1:
        return ["--standalone", *each]
    role = "is_host=1" if leads else f"is_host=0,read_timeout={JOIN_TIMEOUT_S}"
    return [f"--nnodes={nnodes}", *each, "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id={RDZV_ID}",
            f"--rdzv_conf={role},join_timeout={JOIN_TIMEOUT_S}"]


def launch(script: str, args: list[str], nproc: int, nnodes: int = 1, endpoint: str = "") -> int:
    """Run `script args` as `nproc` processes under torchrun (with the other nodes' when `nnodes` > 1), started
    from this process, and return the exit code to leave with. Ctrl-C reaches torchrun, which forwards it to
    every rank (each in a session of its own): the ranks stop at the same step and each says so in one line,
    then this process returns 130 without a traceback of torchrun's. A failed rank said why in its own line:
    its exit code is returned, torchrun's report left out. When another node dies, rank 0 says where it stopped
    the others (rung.lost_line) and the ranks of the other nodes leave quietly: their launchers say it, once."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError, RendezvousTimeoutError
    from torch.distributed.run import parse_args, run

    leads = bool(os.environ.get(LEADS))
    if nnodes > 1:
        role = "leads: it writes the outputs" if leads else "joins the node that runs `dvc repro`"
        print(f"waiting at {endpoint} for {nnodes} nodes of {nproc} process(es) (this node {role})",
              file=sys.stderr, flush=True)
    quiet = logging.getLogger("torch.distributed.elastic")  # each rank says what went wrong, in one line
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    try:
        run(parse_args([*torchrun_args(nproc, nnodes, endpoint, leads), script, *args]))
    except SignalException as stop:  # Ctrl-C or a kill of this process: every rank was sent the same signal
        return 128 + stop.sigval
    except ChildFailedError as failed:
        if {f.exitcode for f in failed.failures.values()} == {LOST}:  # rank 0 is on another node
            raise UserError(lost_node(endpoint)) from None
        code = failed.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code  # a rank killed by signal N: 128 + N, as a shell says
    except RendezvousTimeoutError:
        raise UserError(f"train.nnodes = {nnodes}, but not every node reached {endpoint} in "
                        f"{JOIN_TIMEOUT_S // 60} minutes; start the stage on each of them (docs/gpus.md, more than "
                        "one machine)") from None
    except RendezvousError as err:
        if leads:  # is_host: it failed to listen there
            raise UserError(f"cannot host the rendezvous at {endpoint} on this node ({type(err).__name__}): is "
                            "the port taken, or does train.rdzv_endpoint name another machine?") from None
        raise UserError(lost_node(endpoint, type(err).__name__)) from None  # never reached, or it went away
    return 0


def lost_node(endpoint: str, why: str = "a process or machine of the job died") -> str:
    """The one line of a node that does not lead when the job stops without it (torchrun stopped its ranks)."""
    return (f"lost the job at {endpoint}, or found none there ({why}); start `dvc repro` on the node it names, "
            "then this stage here again: a killed run resumes from its last checkpoint")


def lead_first(nodes: list[tuple[bool, int]]) -> list[int]:
    """Our rank order over torch's ranks, given each torch rank's (runs under DVC, node): c10d numbers the nodes
    in the order of their host names, but the node where DVC runs must hold rank 0, which writes the outputs
    DVC records (and the MLflow runs of its pipeline). Without DVC anywhere, torch's order stands."""
    leading = {node for under_dvc, node in nodes if under_dvc}
    if len(leading) > 1:
        raise UserError(f"{len(leading)} nodes run this stage under DVC; run `dvc repro` on one node only and "
                        "`python stages/train.py <rung>` on the others (docs/gpus.md, more than one machine)")
    return sorted(range(len(nodes)), key=lambda r: (nodes[r][1] not in leading, r))


def init(device_type: str) -> Group:
    if not launched():
        return Group()
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":  # before any nccl collective: each rank of a machine on its own GPU
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    world = dist.get_world_size()
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, (bool(os.environ.get(LEADS)), int(os.environ.get("GROUP_RANK", "0"))))
    order = lead_first(nodes)
    return Group(order.index(dist.get_rank()), world, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                 tuple(order))


def lost_peer(err: BaseException) -> bool:
    """A collective that failed because another rank is gone (its process or machine died, or it stopped
    answering for the backend's timeout): gloo says so from its TCP transport, torch with a DistError."""
    return isinstance(err, dist.DistError) or "gloo/transport" in str(err)


def host() -> str:
    return socket.gethostname()


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
    return mean(float(flag), group) > 0


def gather(obj: Any, group: Group) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if group.world == 1:
        return [obj]
    out: list[Any] = [None] * group.world
    dist.all_gather_object(out, obj)
    return [out[r] for r in group.order]


def broadcast(obj: Any, group: Group) -> Any:
    """Rank 0's `obj` on every rank: one decision (early stopping) for all, whatever each rank computed."""
    if group.world == 1:
        return obj
    box = [obj if group.main else None]
    dist.broadcast_object_list(box, src=group.order[0])
    return box[0]


def barrier(group: Group) -> None:
    if group.world > 1:
        dist.barrier()


def shutdown(group: Group) -> None:
    if group.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
