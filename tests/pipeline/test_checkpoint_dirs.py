"""Each training's checkpoint folder is its own: named for its rung and workspace, claimed by its process, never
resumed or deleted by another while that process lives (pipeline/checkpoint_dirs.py)."""
import json
import socket
import subprocess
import sys

import pytest

from mmrec import procs
from mmrec.errors import UserError
from mmrec.pipeline import checkpoint_dirs
from mmrec.pipeline.rung import train_rung
from tests.conftest import tiny_params
from tests.base.test_procs import a_dead_stamp


@pytest.fixture
def live_process():
    """A process of this machine that runs until the test ends: another training, as far as a folder can tell."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield child
    child.stdin.close()
    child.wait()


def hold(folder, process: str, host: str = socket.gethostname(), workspace: str = "/nowhere") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "training.json").write_text(json.dumps({"rung": "tiny", "host": host, "workspace": workspace,
                                                      "experiment": "", "process": process}))


def test_a_folder_outside_the_workspace_is_named_for_its_rung_host_and_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    a, b, shared = tmp_path / "alice" / "mmrec", tmp_path / "bob" / "mmrec", tmp_path / "shared"
    assert checkpoint_dirs.training_dir(a, "tiny", "checkpoints") == a / "checkpoints" / "tiny"  # private already
    mine = checkpoint_dirs.training_dir(a, "tiny", str(shared))
    host = socket.gethostname().split(".")[0]
    assert mine.parent == shared and mine.name.startswith(f"tiny.{host}.mmrec.")
    assert mine == checkpoint_dirs.training_dir(a, "tiny", str(shared))  # the same after a kill: it resumes
    assert checkpoint_dirs.training_dir(b, "tiny", str(shared)) != mine  # another clone, of the same name
    assert checkpoint_dirs.training_dir(a, "tiny", "../shared").parent == a / "../shared"  # out through `..`

    queued = a / ".dvc/tmp/exps/run/tmpab12cd"  # a queued experiment's temporary copy names it
    monkeypatch.setenv("DVC_ROOT", str(a))
    monkeypatch.setenv("DVC_EXP_NAME", "lr-low")
    assert checkpoint_dirs.training_dir(queued, "tiny", str(shared)).name.startswith(f"tiny.{host}.lr-low.")
    assert checkpoint_dirs.training_dir(a, "tiny", str(shared)) == mine  # `dvc exp run` in the workspace: its own


def test_a_folder_whose_training_lives_is_never_taken(tmp_path, live_process):
    folder = tmp_path / "tiny"
    hold(folder, procs.owner(live_process.pid))
    with pytest.raises(UserError, match=rf"^{folder} is in use by another training of tiny on this machine "
                                        rf"\(pid {live_process.pid}\); wait for it to end, or stop it$"):
        checkpoint_dirs.claim(folder, "tiny", tmp_path)

    hold(folder, f"gpu2/some-boot/{a_dead_stamp()}", host="gpu2")  # only gpu2 can tell: never guessed
    with pytest.raises(UserError, match=rf"in use by a training on gpu2 \(pid \d+\), and only that machine can tell "
                                        rf"whether it still runs; if it does not, delete {folder}/training.json"):
        checkpoint_dirs.claim(folder, "tiny", tmp_path)

    hold(folder, procs.owner(int(a_dead_stamp().split(".")[0])))  # a killed training's: this one resumes it
    checkpoint_dirs.claim(folder, "tiny", tmp_path)
    held = json.loads((folder / "training.json").read_text())
    assert held["process"] == procs.owner() and held["workspace"] == str(tmp_path.resolve())
    checkpoint_dirs.release(folder)
    assert json.loads((folder / "training.json").read_text())["process"] == ""


def test_a_training_stops_with_one_line_before_it_touches_a_folder_that_a_live_training_holds(workdir, live_process):
    folder = workdir / "checkpoints" / "tiny"
    hold(folder, procs.owner(live_process.pid), workspace=str(workdir))
    (folder / "last.pt").write_bytes(b"the other training's")
    with pytest.raises(UserError, match="is in use by another training of tiny on this machine"):
        train_rung(tiny_params(workdir), "tiny", workdir)
    assert (folder / "last.pt").read_bytes() == b"the other training's"
    assert json.loads((folder / "training.json").read_text())["process"] == procs.owner(live_process.pid)


def test_the_sweep_removes_a_folder_only_when_its_training_and_its_workspace_are_gone(tmp_path, live_process):
    dead = procs.owner(int(a_dead_stamp().split(".")[0]))
    cases = {"gone": (dead, "/nowhere"), "resumable": (dead, str(tmp_path)), "running": (
        procs.owner(live_process.pid), "/nowhere"), "released": ("", "/nowhere")}
    for name, (process, workspace) in cases.items():
        hold(tmp_path / name, process, workspace=workspace)
    hold(tmp_path / "theirs", f"gpu2/some-boot/{a_dead_stamp()}", host="gpu2")
    workspace = tmp_path / "elsewhere"
    workspace.mkdir()
    assert checkpoint_dirs.sweep(workspace / "checkpoints", workspace) == ([], [])  # nothing to judge
    assert checkpoint_dirs.sweep(tmp_path, tmp_path) == ([], [])  # in the workspace: a moved clone resumes from it
    lines, elsewhere = checkpoint_dirs.sweep(tmp_path, workspace)
    assert lines == [f"removed {tmp_path / 'gone'} (its training is gone, and so is its workspace /nowhere)",
                     f"removed {tmp_path / 'released'} (its training is gone, and so is its workspace /nowhere)"]
    assert elsewhere == [tmp_path / "theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "resumable", "running", "theirs"]
