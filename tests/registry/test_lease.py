"""The registry's lease on a real sqlite store: held and given back, taken over from a dead promote of this
machine, waited on (then one line) when a promote on another machine holds it."""
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from mmrec.errors import UserError
from mmrec.procs import owner
from mmrec.registry import lease


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> MlflowClient:
    """One store for the module (a new one costs its schema migration): each test leases a model of its own."""
    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('lease')}/mlflow.db")


def leases(c: MlflowClient, model: str) -> dict[str, str]:
    return {m.name: m.tags.get(lease.OWNER) for m in c.search_registered_models() if m.name.startswith(model)}


def test_the_lease_is_held_for_the_block_and_given_back_even_on_an_error(client):
    with lease.held(client, "held", 1):
        assert leases(client, "held") == {"held.lease": owner()}
    assert leases(client, "held") == {}
    with pytest.raises(KeyError), lease.held(client, "held", 1):
        raise KeyError("boom")
    assert leases(client, "held") == {}


def test_a_lease_left_by_a_dead_promote_of_this_machine_is_taken_over(client, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    client.create_registered_model("dead.lease", tags={lease.OWNER: owner(gone.pid), lease.SINCE: "then"})
    with lease.held(client, "dead", 0):  # no wait: it is taken over at once
        assert leases(client, "dead") == {"dead.lease": owner()}
    assert f"taking over the lease of {owner(gone.pid)} (its process is gone)" in capsys.readouterr().err


def test_a_lease_held_on_another_machine_is_waited_on_then_one_line_naming_it(client, capsys):
    elsewhere = "node7/0f3e/4242.17"
    client.create_registered_model("mmrec.lease", tags={lease.OWNER: elsewhere, lease.SINCE: "2026-12-01T08:53:00Z"})
    with pytest.raises(UserError) as err, lease.held(client, "mmrec", 0.6):
        pass
    head, _, tail = str(err.value).partition(", still after ")
    assert head == ("registered model mmrec: another promote (node7/0f3e/4242.17) has held its lease since "
                    "2026-12-01T08:53:00Z")
    assert tail.endswith("s; if none runs there, delete the registered model mmrec.lease (it has no versions) and "
                         "rerun, or raise mlflow.lock_timeout_s (0.6)")
    assert capsys.readouterr().err.count("waiting for registered model mmrec: another promote (node7/") == 1
    assert leases(client, "mmrec") == {"mmrec.lease": elsewhere}  # never deleted from here
