import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmrec.config import ADDED_LATER, Params, ParamsError, flatten, load_params, parse_params
from tests.conftest import REPO


def test_shipped_params_yaml_equals_schema_defaults():
    assert load_params(REPO / "params.yaml") == Params()


# Each passed validation and failed only in a later stage, after DVC had removed that stage's outputs.
GAPS_BEFORE_ISSUE_19 = [
    ({"model": {"arch": "gpt", "head_dim": 24}},
     "ladder.tiny.width 128 must be a multiple of model.head_dim 24 (arch 'gpt' splits the width into heads)"),
    ({"model": {"arch": "gpt", "head_dim": 12}, "ladder": {"a": {"width": 96, "layers": 1},  # every rung
                                                           "b": {"width": 40, "layers": 1}}},
     "ladder.b.width 40 must be a multiple of model.head_dim 12"),
    ({"model": {"arch": "gpt", "head_dim": 9}, "ladder": {"a": {"width": 72, "layers": 1, "memories": 1}}},
     "model: head_dim 9 must be even for arch 'gpt'"),
    ({"model": {"arch": "gpt", "uboo_weight": 0.1}}, "model: uboo_weight 0.1 needs arch 'mmrec'"),
    ({"ladder": {"tokenizer": {"width": 64, "layers": 1}}},
     "rung name 'tokenizer' is taken: the rung's models/tokenizer is another stage's output"),
    ({"ladder": {"tiny": {"width": 64, "layers": 1}, "download": {"width": 64, "layers": 1}}},
     "rung name 'download' is taken: the rung's metrics/speed/download.json is another stage's output"),
    ({"train": {"checkpoint_dir": "data"}}, "train.checkpoint_dir = 'data'"),  # its rung folders: data/tokens, ...
    ({"train": {"checkpoint_dir": "./models/ckpt"}}, "puts last.pt under models/, where DVC keeps (and deletes) stage outputs"),
    ({"train": {"checkpoint_dir": "attempts/ckpt"}}, "puts last.pt under attempts/, the stages' markers"),
    ({"evaluate": {"max_tokens": 1}}, "evaluate: max_tokens 1 must be 0 (every test token) or at least "
                                      "train.seq_len + 1 = 257"),
    ({"train": {"seq_len": 32}, "evaluate": {"max_tokens": 32}}, "at least train.seq_len + 1 = 33"),
]

# Each passed validation; promote then registered the version, moved champion and failed on the rung's alias,
# and so did every rerun (v<digits>, latest), or the rung's alias and champion were one (champion, exp-<name>).
ALIAS = "cannot be the rung's registry alias: "
GAPS_BEFORE_ISSUE_24 = [
    ({"ladder": {"v2": {"width": 64, "layers": 1}}},
     f"rung name 'v2' {ALIAS}MLflow reserves v<digits> and 'latest' as names of versions; rename the rung"),
    ({"ladder": {"tiny": {"width": 64, "layers": 1}, "v10": {"width": 64, "layers": 1}}}, f"rung name 'v10' {ALIAS}"),
    ({"ladder": {"latest": {"width": 64, "layers": 1}}}, f"rung name 'latest' {ALIAS}"),
    ({"ladder": {"champion": {"width": 64, "layers": 1}}},
     f"rung name 'champion' {ALIAS}'champion' is the alias of the best version of any rung"),
    ({"ladder": {"exp-a": {"width": 64, "layers": 1}}}, f"rung name 'exp-a' {ALIAS}'exp-<name>' is the alias"),
]


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
    ({"train": {"nnodes": 2}}, "params.yaml: train: rdzv_endpoint is required when nnodes = 2: host:port of the "
                               "node that runs `dvc repro`"),
    ({"train": {"nnodes": 2, "rdzv_endpoint": "node0"}}, "train.rdzv_endpoint = 'node0': must be host:port"),
    ({"train": {"rdzv_endpoint": "node0:65536"}}, "train.rdzv_endpoint = 'node0:65536': must be host:port"),
    *GAPS_BEFORE_ISSUE_19,
    *GAPS_BEFORE_ISSUE_24,
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
    from mmrec.model.lm import ModelConfig

    p = parse_params({"model": {"dropout": 0.05}, "ladder": {
        "tiny": {"width": 128, "layers": 4},
        "mini": {"width": 256, "layers": 6, "after": "models/tiny/handoff.json", "dropout": 0.2}}})
    assert ModelConfig.from_params(p.model, p.rung("tiny"), 100).dropout == 0.05
    assert ModelConfig.from_params(p.model, p.rung("mini"), 100).dropout == 0.2
    with pytest.raises(ParamsError, match="ladder.mini.dropout"):
        parse_params({"ladder": {"mini": {"width": 256, "layers": 6, "dropout": 1.5}}})


def test_a_rung_may_override_the_weight_average_and_defaults_to_train_ema_decay():
    from mmrec.training.schedule import budget_for

    p = parse_params({"train": {"ema_decay": 0.9}, "ladder": {
        "tiny": {"width": 128, "layers": 4},
        "mini": {"width": 256, "layers": 6, "after": "models/tiny/handoff.json", "ema_decay": 0.995}}})
    assert budget_for(p, "tiny").ema_decay == 0.9
    assert budget_for(p, "mini").ema_decay == 0.995
    off = parse_params({"ladder": {"tiny": {"width": 128, "layers": 4, "ema_decay": 0.0}}})
    assert budget_for(off, "tiny").ema_decay == 0.0
    with pytest.raises(ParamsError, match="ladder.mini.ema_decay"):
        parse_params({"ladder": {"mini": {"width": 256, "layers": 6, "ema_decay": 1.0}}})


@pytest.mark.parametrize("raw, expected", GAPS_BEFORE_ISSUE_19 + GAPS_BEFORE_ISSUE_24)
def test_the_validate_stage_refuses_each_gap_in_one_line_and_marks_nothing_valid(tmp_path, raw, expected):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "validate.py")], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: params.yaml: ") and expected in line
    assert not (tmp_path / "data" / "params.ok").exists()  # so no later stage may start


def _builds_and_trains(model: dict, ladder: dict) -> bool:
    """Whether the model alone (no schema rule in the way) builds every rung and takes a training step."""
    import torch

    from mmrec.config import ModelParams, RungParams
    from mmrec.errors import UserError
    from mmrec.model.lm import ModelConfig, build_model

    unchecked = ModelParams.model_construct(**(ModelParams().model_dump() | model))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small only wait on each other's threads
    try:
        for rung in ladder.values():
            net = build_model(ModelConfig.from_params(unchecked, RungParams(**rung), 64))
            idx = torch.randint(0, 64, (1, 6))
            net(idx, targets=idx).loss.backward()
    except (UserError, RuntimeError, ValueError):
        return False
    finally:
        torch.set_num_threads(threads)
    return True


def test_validate_accepts_exactly_the_models_that_build_and_train_for_either_arch():
    """The schema and the model agree on every combination, for every rung: nothing refused that would work,
    nothing passed that fails later (GPT: heads of head_dim channels, rotary pairs, no UBOO)."""
    verdicts = []
    for arch in ("mmrec", "gpt"):
        for head_dim in (8, 9, 12, 16, 24):
            for width in (16, 24, 48):
                for uboo in (0.0, 0.5):
                    model = {"arch": arch, "head_dim": head_dim, "uboo_weight": uboo, "dpg_rank": 4}
                    ladder = {"a": {"width": 48, "layers": 1, "memories": 2},
                              "b": {"width": width, "layers": 1, "memories": 2}}
                    try:
                        parse_params({"model": model, "ladder": ladder})
                        accepted = True
                    except ParamsError:
                        accepted = False
                    assert accepted == _builds_and_trains(model, ladder), (model, ladder)
                    verdicts.append(accepted)
    assert any(verdicts) and not all(verdicts)


def test_the_names_a_rung_may_not_take_come_from_the_outputs_dvc_yaml_declares():
    """paths.SHARED_OUTS are exactly the outs of the stages that run once, and RungPaths.outs hold every out of
    a rung's stages: so `taken_by` sees every collision DVC would make (and only those)."""
    from mmrec.paths import SHARED_OUTS, RungPaths, taken_by

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    shared = {Path(o) for s in stages.values() if "foreach" not in s for o in s.get("outs", [])}
    assert shared == set(SHARED_OUTS)
    rung_outs = {Path(o.replace("${key}", "x")) for s in stages.values() if "foreach" in s for o in s["do"]["outs"]}
    mine = RungPaths(Path(), "x").outs
    assert all(any(o == p or p in o.parents for p in mine) for o in rung_outs)
    assert [n for n in ("tiny", "mini", "tokenizer", "download", "validate", "train", "speed") if taken_by(n)] \
        == ["tokenizer", "download"]


def test_the_smallest_max_tokens_validation_allows_evaluates(tokenized):
    """evaluate.max_tokens: one full window is the least the test figures surely have text to divide by; 2 tokens
    (one target) are not: here that target is the '▁' before a digit, which decodes to no text (bpb: 1 / 0)."""
    import math

    import torch

    from mmrec.pipeline.evaluate import test_metrics
    from mmrec.model.lm import ModelConfig, build_model
    from tests.conftest import tiny_params

    p = tiny_params(tokenized, evaluate={"max_tokens": 33})  # train.seq_len 32
    model = build_model(ModelConfig.from_params(p.model, p.rung("tiny"), 400))
    m, docs, _ = test_metrics(model, p, tokenized, torch.device("cpu"))
    assert m["test_tokens_scored"] == 32 and m["test_bytes_scored"] > 0 and math.isfinite(m["test_bpb_context"])
    assert docs.bytes.sum() == m["test_bytes_scored"] and not docs.whole_split


def test_a_rendezvous_endpoint_is_a_host_and_a_port():
    for endpoint in ["node0:29500", "10.0.0.7:29500", "[fd00::7]:29500", "gpu-3.cluster.internal:1"]:
        assert parse_params({"train": {"nnodes": 2, "rdzv_endpoint": endpoint}}).train.rdzv_endpoint == endpoint


def test_a_param_added_later_is_out_of_the_identity_at_its_older_value_so_older_runs_keep_their_group():
    assert set(ADDED_LATER) <= set(flatten(Params().model_dump()))  # each names a real param
    sections: dict = {}
    for key, value in ADDED_LATER.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    older = parse_params(sections)
    assert not set(ADDED_LATER) & set(older.config_identity("tiny"))  # as a run tagged before they existed
    # today's defaults are not what those runs trained with: their runs must be another config
    assert Params().config_identity("tiny")["train.optimizer"] == Params().train.optimizer
    assert older.config_digest("tiny") != Params().config_digest("tiny")
    assert parse_params({"train": {"optimizer": "muon"}}).config_identity("tiny")["train.optimizer"] == "muon"


def test_a_configs_identity_leaves_out_the_seed_and_what_cannot_change_the_model():
    base = Params()
    tiny, mini = base.config_digest("tiny"), base.config_digest("mini")
    assert len(tiny) == 12 and tiny != mini

    def digests(**sections) -> tuple[str, str]:
        p = parse_params(sections)
        return p.config_digest("tiny"), p.config_digest("mini")

    # one config over seeds, whatever the threads, logging, gate, store or comparison settings
    assert digests(seed=7, train={"threads": 1, "log_every": 5, "checkpoint_dir": "elsewhere"},
                   data={"retries": 9}, evaluate={"batch_size": 4, "top_k": 0},
                   promote={"min_improvement": 0.05, "on_reject": "continue"},
                   mlflow={"experiment": "x"}, compare={"seed_std": 0.02}) == (tiny, mini)
    # a change the weights or the test figures follow is another config, for every rung it reaches
    for sections in [{"train": {"lr": 0.004}}, {"model": {"dropout": 0.1}}, {"tokenizer": {"vocab_size": 4000}},
                     {"data": {"test_fraction": 0.1}}, {"evaluate": {"max_tokens": 5000}},
                     {"train": {"optimizer": "adamw"}}, {"train": {"schedule": "cosine"}},
                     {"ladder": {"tiny": {"width": 64, "layers": 4},
                                 "mini": {"width": 256, "layers": 6, "after": "models/tiny/handoff.json"}}}]:
        t, m = digests(**sections)
        assert t != tiny and m != mini, sections
    # a grown rung's own entry and what shapes growth are its config alone: its parent is trained the same
    for sections in [{"train": {"growth_lr_scale": 0.3}}, {"train": {"rewarmup_steps": 5}}, {"ladder": {"tiny": {"width": 128, "layers": 4},
                                 "mini": {"width": 256, "layers": 6, "after": "models/tiny/handoff.json",
                                          "max_steps": 500}}},
                     {"promote": {"growth_noise": 0.01}}]:
        t, m = digests(**sections)
        assert t == tiny and m != mini, sections
