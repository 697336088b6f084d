import subprocess
import sys

import pytest
import yaml

from mmrec.config import Params, ParamsError, load_params, parse_params
from tests.conftest import REPO


def test_shipped_params_yaml_equals_schema_defaults():
    assert load_params(REPO / "params.yaml") == Params()


@pytest.mark.parametrize("raw, expected", [
    ({"train": {"lr": -1}}, "train.lr = -1"),
    ({"tokenizer": {"vocab_size": 50}}, "tokenizer.vocab_size = 50"),
    ({"data": {"val_fraction": 0.7}}, "data.val_fraction = 0.7"),
    ({"data": {"test_fraction": 0}}, "data.test_fraction = 0"),
    ({"trian": {}}, "unknown key 'trian'"),
    ({"train": {"lrr": 0.1}}, "unknown key 'train.lrr'"),
    ({"train": {"max_steps": "many"}}, "train.max_steps = 'many'"),
    ({"model": {"arch": "lstm"}}, "model.arch = 'lstm'"),
    ({"train": {"lr": 1e-4, "min_lr": 1e-3}}, "min_lr 0.001 must not exceed lr 0.0001"),
    ({"ladder": {"a": {"width": 130, "layers": 1, "memories": 4}}}, "multiple of memories"),
    ({"ladder": {"mini": {"width": 64, "layers": 1, "after": "models/tiny/handoff.json"}}}, "not a rung above it"),
    ({"ladder": {"tiny": {"width": 64, "layers": 1, "after": "somewhere"}}}, "ladder.tiny.after = 'somewhere'"),
    ({"data": {"sha256": "xyz"}}, "64 lowercase hex"),
    ({"ladder": {"tiny": {"width": 128, "layers": 4}, "mini": {"width": 192, "layers": 6,
                                                              "after": "models/tiny/handoff.json"}}},
     "ladder.mini.width 192 must be an integer multiple of ladder.tiny.width 128"),
    ({"ladder": {"tiny": {"width": 128, "layers": 4}, "mini": {"width": 256, "layers": 2,
                                                              "after": "models/tiny/handoff.json"}}},
     "must not be fewer than ladder.tiny.layers 4"),
    ({"ladder": {"tiny": {"width": 128, "layers": 4}, "mini": {"width": 256, "layers": 6, "memories": 8,
                                                              "after": "models/tiny/handoff.json"}}},
     "must equal ladder.tiny.memories 4"),
    ({"ladder": {"tiny": {"width": 64, "layers": 1}, "mini": {"width": 128, "layers": 1,
                                                             "after": "models/tiny/promotion.json"}}},
     "must be 'data/tokens' or 'models/<rung>/handoff.json'"),
])
def test_bad_values_name_the_dotted_key(raw, expected):
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_rung_parent_comes_from_after():
    p = Params()
    assert p.rung("tiny").parent is None
    assert p.rung("mini").parent == "tiny"
    with pytest.raises(ParamsError, match="unknown rung 'huge'"):
        p.rung("huge")


def test_digest_tracks_content():
    a, b = Params(), parse_params({"train": {"lr": 1e-3}})
    assert a.digest() == Params().digest()
    assert a.digest() != b.digest()
    assert a.digest("data") == b.digest("data")


def test_flat_has_dotted_keys():
    flat = Params().flat()
    assert flat["train.lr"] == 5e-3
    assert flat["ladder.tiny.width"] == 128


def test_stage_prints_one_line_and_no_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": -0.5}}))
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "train.py"), "tiny"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: params.yaml: train.lr = -0.5: Input should be greater than 0"


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)


def test_a_rung_may_override_dropout_and_defaults_to_the_models():
    from mmrec.model import ModelConfig

    p = parse_params({"model": {"dropout": 0.05}, "ladder": {
        "tiny": {"width": 128, "layers": 4},
        "mini": {"width": 256, "layers": 6, "after": "models/tiny/handoff.json", "dropout": 0.2}}})
    assert ModelConfig.from_params(p.model, p.rung("tiny"), 100).dropout == 0.05
    assert ModelConfig.from_params(p.model, p.rung("mini"), 100).dropout == 0.2
    with pytest.raises(ParamsError, match="ladder.mini.dropout"):
        parse_params({"ladder": {"mini": {"width": 256, "layers": 6, "dropout": 1.5}}})


def test_a_rung_may_override_the_weight_average_and_defaults_to_train_ema_decay():
    from mmrec.schedule import budget_for

    p = parse_params({"train": {"ema_decay": 0.9}, "ladder": {
        "tiny": {"width": 128, "layers": 4},
        "mini": {"width": 256, "layers": 6, "after": "models/tiny/handoff.json", "ema_decay": 0.995}}})
    assert budget_for(p, "tiny").ema_decay == 0.9
    assert budget_for(p, "mini").ema_decay == 0.995
    off = parse_params({"ladder": {"tiny": {"width": 128, "layers": 4, "ema_decay": 0.0}}})
    assert budget_for(off, "tiny").ema_decay == 0.0
    with pytest.raises(ParamsError, match="ladder.mini.ema_decay"):
        parse_params({"ladder": {"mini": {"width": 256, "layers": 6, "ema_decay": 1.0}}})
