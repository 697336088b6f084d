"""mmrec/model/checkpoint.py: atomic writes, weights-only reads, and one line for every file it refuses."""
import pickle

import pytest
import torch

from mmrec.errors import UserError
from mmrec.model import checkpoint


def test_a_checkpoint_round_trips_tensors_and_plain_types_and_leaves_no_temp(tmp_path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "progress": {"step": 3, "history": [{"a": 1.0}]}}
    checkpoint.save_atomic(state, tmp_path / "last.pt")
    back = checkpoint.load(tmp_path / "last.pt", keys=("model", "progress"))
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["progress"] == state["progress"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_missing_checkpoint_is_one_line_with_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"^checkpoint .*nowhere.pt not found; run the train stage$"):
        checkpoint.load(tmp_path / "nowhere.pt", fix="run the train stage")


class Planted:
    def __reduce__(self):  # unpickling this would run code
        return (print, ("planted code ran",))


def test_a_pickle_that_would_run_code_is_refused_not_executed(tmp_path, capsys):
    path = tmp_path / "best.pt"
    torch.save({"model": Planted()}, path)
    with pytest.raises(UserError, match="cannot be read .*not a checkpoint of ours, or damaged"):
        checkpoint.load(path)
    assert "planted code ran" not in capsys.readouterr().out


def test_a_torn_file_and_a_foreign_one_are_refused_in_one_line(tmp_path):
    torn = tmp_path / "torn.pt"
    checkpoint.save_atomic({"model": {"w": torch.ones(1000)}}, torn)
    torn.write_bytes(torn.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot be read"):
        checkpoint.load(torn)
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(pickle.dumps({"weights": [1, 2]}))
    with pytest.raises(UserError, match="cannot be read|has no model"):
        checkpoint.load(foreign)


def test_a_checkpoint_without_the_keys_asked_for_names_them(tmp_path):
    checkpoint.save_atomic({"model": {}}, tmp_path / "best.pt")
    with pytest.raises(UserError, match=r"has no optimizer, rng \(not a checkpoint of ours\?\)"):
        checkpoint.load(tmp_path / "best.pt", keys=("model", "optimizer", "rng"))
