"""The registry's lease: one promotion at a time reads and moves a registered model's aliases, on any store.

Queued experiments and several machines promote into one registry. Reading which version holds `champion`,
comparing with it and moving it has to be one step: two promotes that both read v1 both beat it, both move
it, and the last writer wins, worse or not, with `champion.previous` naming v1 where it replaced the other.

MLflow sets tags and aliases without a compare, so neither can be the lock. Creating a registered model is
the one step that every store makes atomic (its name is unique: a second create fails, on sqlite as on a
server), so the lease is a registered model `<name>.lease` without versions: a promote creates it to take the
lease and deletes it to give it back; its tags say who holds it (procs.owner()) and since when.

A promote killed while it holds the lease leaves it behind. The next promote on the machine it ran on sees
that its process is gone and takes the lease over (promotes of that machine do that one at a time, under a
local file lock, so none deletes a lease another has just taken). From another machine nothing tells whether
it still runs: a promote there waits mlflow.lock_timeout_s, then stops with one line naming the holder.
"""
from __future__ import annotations

import contextlib
import hashlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from mlflow.exceptions import MlflowException

from mmrec.errors import UserError
from mmrec.procs import owner, owner_alive

SUFFIX = ".lease"
OWNER, SINCE = "mmrec.lease.owner", "mmrec.lease.since"
POLL_S = 0.5  # a lease is held for a few registry calls: seconds


def name_of(model: str) -> str:
    return model + SUFFIX


@contextlib.contextmanager
def held(client: Any, model: str, wait_s: float) -> Iterator[None]:
    """Hold the lease of registered model `model` for the block: wait up to `wait_s` while another holds it."""
    lease, me = name_of(model), owner()
    start, announced = time.monotonic(), False
    while not _take(client, lease, me):
        holder = _holder(client, lease)
        if holder is None:  # given back between our try and this look: try again at once
            continue
        if owner_alive(holder[OWNER]) is False:  # a promote of this machine, killed while it held it
            _take_over(client, lease, holder)
            continue
        waited = time.monotonic() - start
        if waited >= wait_s:
            raise UserError(f"registered model {model}: another promote ({holder[OWNER]}) has held its lease since "
                            f"{holder[SINCE]}, still after {waited:.0f}s; if none runs there, delete the registered "
                            f"model {lease} (it has no versions) and rerun, or raise mlflow.lock_timeout_s "
                            f"({wait_s:g})")
        if not announced:
            announce_wait(model, holder[OWNER], wait_s)
            announced = True
        time.sleep(POLL_S)
    try:
        yield
    finally:
        _give_back(client, lease, me)


def announce_wait(model: str, holder: str, wait_s: float) -> None:
    print(f"waiting for registered model {model}: another promote ({holder}) moves its aliases "
          f"(up to {wait_s:.0f}s, mlflow.lock_timeout_s)", file=sys.stderr, flush=True)


def _take(client: Any, lease: str, me: str) -> bool:
    """Create the lease; False when it exists (another holds it)."""
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        client.create_registered_model(lease, tags={OWNER: me, SINCE: since},
                                       description="held while a promote moves this model's aliases; no versions")
    except MlflowException as err:
        if err.error_code == "RESOURCE_ALREADY_EXISTS":
            return False
        raise
    return True


def _holder(client: Any, lease: str) -> dict[str, str] | None:
    """The lease's tags (who holds it, since when), or None when nobody does."""
    try:
        tags = client.get_registered_model(lease).tags
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return {OWNER: tags.get(OWNER, "unknown"), SINCE: tags.get(SINCE, "unknown")}


def _take_over(client: Any, lease: str, dead: dict[str, str]) -> None:
    """Delete a lease whose holder, a process of this machine, is gone. Only this machine's promotes can tell it
    is gone, and they do this one at a time: the lease deleted is the dead one, never one just taken."""
    from filelock import FileLock

    key = hashlib.sha256(f"{client.tracking_uri} {lease}".encode()).hexdigest()[:16]
    with FileLock(Path(tempfile.gettempdir()) / f"mmrec-lease-{key}.lock", mode=0o666):  # any user of the machine
        if _holder(client, lease) == dead:
            print(f"registered model {lease.removesuffix(SUFFIX)}: taking over the lease of {dead[OWNER]} "
                  "(its process is gone)", file=sys.stderr, flush=True)
            _delete(client, lease)


def _give_back(client: Any, lease: str, me: str) -> None:
    holder = _holder(client, lease)
    if holder is not None and holder[OWNER] == me:
        _delete(client, lease)


def _delete(client: Any, lease: str) -> None:
    try:
        client.delete_registered_model(lease)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
