import json
import subprocess
import sys

import pytest
import yaml

from mmrec.config import PromoteParams
from mmrec.errors import UserError
from mmrec.promote import alias_rule, decide
from tests.conftest import REPO, TINY_PARAMS, tiny_params

THREE_RUNGS = {"ladder": {**TINY_PARAMS["ladder"],
                          "small": {"width": 128, "layers": 2, "memories": 2, "after": "models/mini/handoff.json"}}}


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def root(tmp_path):
    write(tmp_path / "metrics/eval/tiny.json", {"test_bpb": 1.55, "test_bpb_context": 1.50, "unigram_bpb": 2.20})
    write(tmp_path / "metrics/eval/mini.json", {"test_bpb": 1.45, "test_bpb_context": 1.40, "unigram_bpb": 2.20})
    write(tmp_path / "models/tiny/promotion.json", {"test_bpb": 1.50, "promoted": True})
    (tmp_path / "models/tiny/best.pt").write_bytes(b"weights")
    return tmp_path


def test_first_rung_is_judged_against_the_unigram_baseline(root):
    assert decide(tiny_params(root, promote={"baseline_margin": 0.5}), "tiny", root).promoted
    d = decide(tiny_params(root, promote={"baseline_margin": 0.8}), "tiny", root)
    assert not d.promoted and d.compared_to == "unigram"
    assert d.reason == "test_bpb_context 1.5000 missed unigram baseline (2.2000) - baseline_margin 0.8 = 1.4000 by 0.1000"


def test_later_rungs_must_beat_their_parent_by_the_margin(root):
    d = decide(tiny_params(root, promote={"min_improvement": 0.05}), "mini", root)
    assert d.promoted and d.compared_to == "tiny" and d.threshold_bpb == pytest.approx(1.45)
    d = decide(tiny_params(root, promote={"min_improvement": 0.2}), "mini", root)
    assert not d.promoted and "missed tiny (1.5000) - min_improvement 0.2 = 1.3000 by 0.1000" in d.reason


def test_a_rejected_rung_is_never_a_reference(root):
    write(root / "metrics/eval/small.json", {"test_bpb": 1.44, "test_bpb_context": 1.42, "unigram_bpb": 2.20})
    write(root / "models/mini/promotion.json", {"test_bpb": 1.45, "promoted": False})
    params = tiny_params(root, **THREE_RUNGS)
    d = decide(params, "small", root)  # beats the rejected mini (1.45), not the promoted tiny by 0.1
    assert d.compared_to == "tiny" and d.passed_over == ["mini"] and d.promoted
    d = decide(tiny_params(root, promote={"min_improvement": 0.1}, **THREE_RUNGS), "small", root)
    assert not d.promoted and "missed tiny (1.5000) - min_improvement 0.1 (not promoted, so no reference: mini)" in d.reason

    write(root / "models/tiny/promotion.json", {"test_bpb": 1.50, "promoted": False})
    d = decide(tiny_params(root, promote={"baseline_margin": 0.9}, **THREE_RUNGS), "small", root)
    assert d.compared_to == "unigram" and d.passed_over == ["mini", "tiny"] and not d.promoted
    assert d.threshold_bpb == pytest.approx(1.3)


def test_max_bpb_is_a_ceiling_on_top_of_the_margin(root):
    d = decide(tiny_params(root, promote={"min_improvement": 0.0, "max_bpb": 1.3}), "mini", root)
    assert not d.promoted and d.reason == "test_bpb_context 1.4000 is above promote.max_bpb 1.3 by 0.1000"


def test_missing_inputs_name_the_stage_to_run(root):
    (root / "models/tiny/promotion.json").unlink()
    with pytest.raises(UserError, match=r"models/tiny/promotion.json is missing; run `dvc repro promote@tiny`"):
        decide(tiny_params(root), "mini", root)


def test_an_alias_moves_only_forward_on_the_same_test_split():
    p = PromoteParams(min_improvement=0.01)
    holder = {"version": "3", "test_bpb": 1.50, "data_sha256": "aa" * 32}
    assert alias_rule("champion", 1.40, "aa" * 32, None, p) == (True, "champion pointed at no version")
    moved, why = alias_rule("champion", 1.48, "aa" * 32, holder, p)
    assert moved and why == "test_bpb 1.4800 beats v3 (1.5000) by 0.0200 >= min_improvement 0.01"
    moved, why = alias_rule("champion", 1.495, "aa" * 32, holder, p)
    assert not moved and why == "test_bpb 1.4950 does not beat v3 (1.5000) by min_improvement 0.01"
    assert not alias_rule("champion", 1.60, "aa" * 32, holder, PromoteParams(min_improvement=0))[0]
    assert not alias_rule("champion", 1.50, "aa" * 32, holder, PromoteParams(min_improvement=0))[0]
    moved, why = alias_rule("champion", 1.0, "bb" * 32, holder, p)
    assert not moved and "another test split" in why and "promote.force_champion: true" in why
    moved, why = alias_rule("champion", 1.9, "bb" * 32, holder, PromoteParams(force_champion=True))
    assert moved and "moved anyway (promote.force_champion)" in why


# promote_rung on real checkpoints, tokens and an MLflow store

def rung_with_checkpoint(root, params, rung, test_bpb, unigram_bpb=2.2, seed=0):
    """models/<rung>/best.pt (a freshly initialised model in the train stage's format), its MLflow run and
    run.json as train wrote them, and metrics/eval/<rung>.json with the given test bits per byte."""
    import torch

    from mmrec import track
    from mmrec.checkpoint import save_atomic
    from mmrec.model import ModelConfig, build_model
    from mmrec.paths import RungPaths
    from mmrec.tokenizer import read_header

    paths = RungPaths(root, rung)
    header = read_header(paths.tokens)
    cfg = ModelConfig.from_params(params.model, params.rung(rung), header["vocab_size"])
    torch.manual_seed(seed)
    run = track.Run.start(params.mlflow, rung, {"rung": rung, "data_sha256": header["data_sha256"],
                                                "tokenizer_sha256": header["tokenizer_sha256"],
                                                "params_hash": params.digest(), "arch": cfg.arch})
    run.end()
    save_atomic({"model": build_model(cfg).state_dict(), "progress": {"step": 0}, "config": cfg.to_dict(),
                 "run_id": run.id, "tokenizer_sha256": header["tokenizer_sha256"], "rung": rung}, paths.best)
    write(paths.run_file, {"run_id": run.id})
    write(paths.eval_metrics, {"test_bpb": test_bpb + 0.01, "test_bpb_context": test_bpb, "unigram_bpb": unigram_bpb,
                               "test_loss": 3.0})
    return paths


def registry_state(params):
    from mlflow import MlflowClient

    from mmrec import store

    c = MlflowClient(store.tracking_uri(params.mlflow))
    versions = [c.get_model_version(m.name, v.version)  # search leaves out the aliases
                for m in c.search_registered_models() for v in c.search_model_versions(f"name='{m.name}'")]
    return sorted((str(v.version), sorted(v.aliases), v.tags.get("checkpoint_sha256")) for v in versions)


def test_a_rejected_first_rung_leaves_the_next_to_the_baseline_margin(workdir):
    from mmrec.promote import promote_rung

    params = tiny_params(workdir, promote={"baseline_margin": 0.9, "on_reject": "continue"})  # threshold 1.3
    rung_with_checkpoint(workdir, params, "tiny", 1.5)
    rung_with_checkpoint(workdir, params, "mini", 1.4, seed=1)
    assert not promote_rung(params, "tiny", workdir).promoted
    d = promote_rung(params, "mini", workdir)  # better than tiny, but tiny was no promotion to beat
    assert not d.promoted and d.compared_to == "unigram" and d.passed_over == ["tiny"]
    assert registry_state(params) == []

    write(workdir / "metrics/eval/mini.json", {"test_bpb": 1.26, "test_bpb_context": 1.25, "unigram_bpb": 2.2})
    d = promote_rung(params, "mini", workdir)
    assert d.promoted and d.model_version == "1" and d.champion
    assert d.aliases == {"champion": "moved: champion pointed at no version",
                         "mini": "moved: mini pointed at no version"}
    assert json.loads((workdir / "models/mini/handoff.json").read_text()) == {
        "rung": "mini", "promoted": True, "checkpoint_sha256": d.checkpoint_sha256}


def test_a_rerun_on_the_same_checkpoint_reuses_its_version_and_keeps_the_handoff(workdir):
    from mmrec.promote import promote_rung

    params = tiny_params(workdir)
    rung_with_checkpoint(workdir, params, "tiny", 1.5)
    assert promote_rung(params, "tiny", workdir).model_version == "1"
    handoff = (workdir / "models/tiny/handoff.json").read_bytes()
    again = tiny_params(workdir, promote={"baseline_margin": 0.3})  # a new threshold, the same weights
    d = promote_rung(again, "tiny", workdir)
    assert d.model_version == "1" and d.aliases["champion"] == "kept: v1 is champion already"
    assert "2.2000) - baseline_margin 0.3" in json.loads((workdir / "models/tiny/promotion.json").read_text())["reason"]
    assert (workdir / "models/tiny/handoff.json").read_bytes() == handoff
    assert [v for v, _, _ in registry_state(params)] == ["1"]


class Payload:
    """Unpickling this runs `touch <marker>`: the safe loader must refuse it before it runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def plant_pickle(path, marker):
    import pickle

    path.write_bytes(pickle.dumps({"model": Payload(marker)}))


def run_stage(root, params, rung):
    """`python stages/promote.py <rung>` in `root`, with `params` as its params.yaml."""
    (root / "params.yaml").write_text(yaml.safe_dump(json.loads(params.model_dump_json()), sort_keys=False))
    return subprocess.run([sys.executable, str(REPO / "stages/promote.py"), rung], cwd=root,
                          capture_output=True, text=True)


def test_a_bad_checkpoint_stops_promote_with_one_line_and_leaves_the_registry_alone(workdir):
    from mmrec.promote import promote_rung

    params = tiny_params(workdir)
    rung_with_checkpoint(workdir, params, "tiny", 1.5)
    promote_rung(params, "tiny", workdir)
    before = registry_state(params)
    paths = rung_with_checkpoint(workdir, params, "mini", 1.2, seed=1)
    good, marker = paths.best.read_bytes(), workdir / "payload-ran"
    damages = {"pickle": lambda: plant_pickle(paths.best, marker),
               "truncated": lambda: paths.best.write_bytes(good[:5000]),
               "another rung": lambda: paths.best.write_bytes((workdir / "models/tiny/best.pt").read_bytes())}
    for damage, do in damages.items():
        do()
        proc = run_stage(workdir, params, "mini")
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        line = proc.stderr.strip()
        assert line.startswith("error: models/mini/best.pt ") and line.endswith("nothing was registered"), line
        assert {"pickle": "(UnpicklingError)", "truncated": "is not a loadable model checkpoint (",
                "another rung": "rung 'tiny' != 'mini'"}[damage] in line, line
    assert not marker.exists()
    assert registry_state(params) == before
    assert not (workdir / "models/mini/promotion.json").exists()


def test_champion_stays_on_another_test_split_unless_forced(workdir):
    from mmrec.promote import promote_rung

    params = tiny_params(workdir)
    rung_with_checkpoint(workdir, params, "tiny", 1.5)
    promote_rung(params, "tiny", workdir)
    header_file = workdir / "data/tokens/header.json"
    header = json.loads(header_file.read_text())
    header_file.write_text(json.dumps(header | {"data_sha256": "ab" * 32}))  # the test split changed since v1
    rung_with_checkpoint(workdir, params, "mini", 1.2, seed=1)
    d = promote_rung(params, "mini", workdir)
    assert d.promoted and d.model_version == "2" and not d.champion
    assert d.champion_reason.startswith(f"stayed: v1 was measured on another test split (data {header['data_sha256'][:12]}")
    assert json.loads((workdir / "models/mini/promotion.json").read_text())["champion_reason"] == d.champion_reason
    assert ("1", ["champion", "tiny"]) in [(v, a) for v, a, _ in registry_state(params)]

    forced = tiny_params(workdir, promote={"force_champion": True})
    d = promote_rung(forced, "mini", workdir)  # the same checkpoint: version 2 again, now champion
    assert d.model_version == "2" and d.champion and "moved anyway (promote.force_champion)" in d.champion_reason
    assert ("2", ["champion", "mini"]) in [(v, a) for v, a, _ in registry_state(params)]
