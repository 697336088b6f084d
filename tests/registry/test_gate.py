import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import yaml

from mmrec import paired
from mmrec.config import PromoteParams
from mmrec.errors import UserError
from mmrec.paired import GATE_METRIC
from mmrec.registry.gate import Figure, alias_rule, decide
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


def test_without_per_document_scores_a_rung_must_beat_its_parent_by_the_fixed_margin_and_says_so(root):
    d = decide(tiny_params(root, promote={"min_improvement": 0.05}), "mini", root)
    assert d.promoted and d.compared_to == "tiny" and d.threshold_bpb == pytest.approx(1.45)
    assert d.gain == pytest.approx(0.1) and d.gain_low is None and d.whole_split is None
    d = decide(tiny_params(root, promote={"min_improvement": 0.2}), "mini", root)
    assert not d.promoted and d.reason == ("tiny has no per-document scores, so the fixed margin alone: "
                                           "test_bpb_context 1.4000 gains 0.1000 on tiny (1.5000), short of "
                                           "min_improvement 0.2")


def test_a_rejected_rung_is_never_a_reference(root):
    write(root / "metrics/eval/small.json", {"test_bpb": 1.44, "test_bpb_context": 1.42, "unigram_bpb": 2.20})
    write(root / "models/mini/promotion.json", {"test_bpb": 1.45, "promoted": False})
    params = tiny_params(root, **THREE_RUNGS)
    d = decide(params, "small", root)  # beats the rejected mini (1.45), not the promoted tiny by 0.1
    assert d.compared_to == "tiny" and d.passed_over == ["mini"] and d.promoted
    d = decide(tiny_params(root, promote={"min_improvement": 0.1}, **THREE_RUNGS), "small", root)
    assert not d.promoted and d.reason.endswith("gains 0.0800 on tiny (1.5000), short of min_improvement 0.1 "
                                                "(passed over, not promoted, so no reference: mini)")

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


def legacy(bpb, data="aa" * 32, metric=GATE_METRIC):
    """A figure without per-document scores, as versions registered before them hold."""
    return Figure("v3", bpb, metric, None, data)


def test_a_version_without_per_document_scores_is_passed_by_the_fixed_margin_on_the_same_tokens_only():
    p = PromoteParams(min_improvement=0.01)
    holder = legacy(1.50)
    assert alias_rule("champion", legacy(1.40), None, p, 0)[:2] == (True, "champion pointed at no version")
    moved, why, _ = alias_rule("champion", legacy(1.48), holder, p, 0)
    assert moved and why == ("v3 has no per-document scores, so the fixed margin alone: test_bpb_context 1.4800 "
                             "gains 0.0200 on v3 (1.5000), >= min_improvement 0.01")
    moved, why, _ = alias_rule("champion", legacy(1.495), holder, p, 0)
    assert not moved and why.endswith("gains 0.0050 on v3 (1.5000), short of min_improvement 0.01")
    assert not alias_rule("champion", legacy(1.60), holder, PromoteParams(min_improvement=0), 0)[0]
    assert not alias_rule("champion", legacy(1.50), holder, PromoteParams(min_improvement=0), 0)[0]
    moved, why, _ = alias_rule("champion", legacy(1.0, "bb" * 32), holder, p, 0)
    assert not moved and "another test split" in why and "promote.force_champion: true" in why
    moved, why, _ = alias_rule("champion", legacy(1.9, "bb" * 32), holder, PromoteParams(force_champion=True), 0)
    assert moved and "moved anyway (promote.force_champion)" in why


def test_another_metric_never_moves_an_alias_and_a_non_finite_holder_always_yields():
    p = PromoteParams(min_improvement=0.01)
    windowed = legacy(1.60, metric="test_bpb")  # a version from before the full-context figure: 0.006-0.009 higher
    moved, why, _ = alias_rule("champion", legacy(1.50), windowed, p, 0)
    assert not moved and why == ("v3's figure is test_bpb, this one's test_bpb_context: the figures do not compare; "
                                 "set promote.force_champion: true to move it")
    moved, why, _ = alias_rule("champion", legacy(1.50), legacy(math.nan), p, 0)
    assert moved and why == "v3's figure is nan, no measurement to beat"


# promote_rung on real checkpoints, tokens and an MLflow store

def score_docs(root, rung, bpb, jitter=0.0, max_tokens=0):
    """metrics/eval/<rung>.docs.json over the real test documents of `root` (ids and bytes as evaluate finds
    them, through the real tokens and tokenizer) with bits that make the figure `bpb`: document d gets
    bpb x (1 + jitter[d]) bits per byte, rescaled so that the whole is exactly `bpb`."""
    from mmrec.pipeline.evaluate import document_scores
    from mmrec.model.inference import DocumentTally
    from mmrec.paths import RungPaths
    from mmrec.data.tokenizer import load_tokenizer, load_tokens, read_header

    sp, test = load_tokenizer(root / "models/tokenizer"), load_tokens(root / "data/tokens", "test")
    whole = not max_tokens or max_tokens >= len(test)
    test = test if whole else test[:max_tokens]
    split_documents = read_header(root / "data/tokens")["splits"]["test"]["documents"]
    base = document_scores(sp, test, DocumentTally(test, sp.eos_id()), GATE_METRIC, whole, split_documents)
    bits = base.bytes * bpb * (1 + np.broadcast_to(np.asarray(jitter, float), base.bytes.shape))
    scores = dataclasses.replace(base, bits=bits * bpb * base.bytes.sum() / bits.sum())
    paired.save(scores, RungPaths(root, rung).doc_scores)
    return scores


def rung_with_checkpoint(root, params, rung, test_bpb, unigram_bpb=2.2, seed=0, docs=True, jitter=0.0, max_tokens=0):
    """models/<rung>/best.pt (a freshly initialised model in the train stage's format), its MLflow run and
    run.json as train wrote them, metrics/eval/<rung>.json with the given test bits per byte, and (docs)
    per-document scores over the real test documents that sum to it (see score_docs)."""
    import torch

    from mmrec.tracking import run as track
    from mmrec.model.checkpoint import save_atomic
    from mmrec.model.lm import ModelConfig, build_model
    from mmrec.paths import RungPaths
    from mmrec.data.tokenizer import read_header

    paths = RungPaths(root, rung)
    header = read_header(paths.tokens)
    cfg = ModelConfig.from_params(params.model, params.rung(rung), header["vocab_size"])
    torch.manual_seed(seed)
    run = track.Run.start(params.mlflow, rung, {"rung": rung, "data_sha256": header["data_sha256"],
                                                "tokenizer_sha256": header["tokenizer_sha256"],
                                                "params_hash": params.digest(), "arch": cfg.arch})
    run.end()
    save_atomic({"model": build_model(cfg).state_dict(), "progress": {"step": 0, "best_val": 5.0},
                 "config": cfg.to_dict(), "run_id": run.id, "tokenizer_sha256": header["tokenizer_sha256"],
                 "rung": rung}, paths.best)
    write(paths.run_file, {"run_id": run.id})
    write(paths.eval_metrics, {"test_bpb": test_bpb + 0.01, "test_bpb_context": test_bpb, "unigram_bpb": unigram_bpb,
                               "test_loss": 3.0})
    paths.doc_scores.unlink(missing_ok=True)
    if docs:
        score_docs(root, rung, test_bpb, jitter, max_tokens)
    return paths


def registry_state(params):
    from mlflow import MlflowClient

    from mmrec.tracking import store

    c = MlflowClient(store.tracking_uri(params.mlflow))
    versions = [c.get_model_version(m.name, v.version)  # search leaves out the aliases
                for m in c.search_registered_models() for v in c.search_model_versions(f"name='{m.name}'")]
    return sorted((str(v.version), sorted(v.aliases), v.tags.get("checkpoint_sha256")) for v in versions)


def test_a_rejected_first_rung_leaves_the_next_to_the_baseline_margin(workdir):
    from mmrec.registry.gate import promote_rung

    params = tiny_params(workdir, promote={"baseline_margin": 0.9, "on_reject": "continue"})  # threshold 1.3
    rung_with_checkpoint(workdir, params, "tiny", 1.5)
    rung_with_checkpoint(workdir, params, "mini", 1.4, seed=1)
    assert not promote_rung(params, "tiny", workdir).promoted
    d = promote_rung(params, "mini", workdir)  # better than tiny, but tiny was no promotion to beat
    assert not d.promoted and d.compared_to == "unigram" and d.passed_over == ["tiny"]
    assert registry_state(params) == []

    write(workdir / "metrics/eval/mini.json", {"test_bpb": 1.26, "test_bpb_context": 1.25, "unigram_bpb": 2.2})
    score_docs(workdir, "mini", 1.25)  # the figure and its documents are one evaluation's
    d = promote_rung(params, "mini", workdir)
    assert d.promoted and d.model_version == "1" and d.champion
    assert d.aliases == {"champion": "moved: champion pointed at no version",
                         "mini": "moved: mini pointed at no version"}
    assert json.loads((workdir / "models/mini/handoff.json").read_text()) == {
        "rung": "mini", "promoted": True, "checkpoint_sha256": d.checkpoint_sha256}


def test_a_rerun_on_the_same_checkpoint_reuses_its_version_and_keeps_the_handoff(workdir):
    from mmrec.registry.gate import promote_rung

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
    from mmrec.registry.gate import promote_rung

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


def redo_data(root, test_fraction=0.1, vocab_size=None):
    """The data stages again in `root`, for real: another test split (test_fraction) or another tokenizer."""
    from mmrec.config import DataParams, TokenizerParams
    from mmrec.data.corpus import write_splits
    from mmrec.data.tokenizer import encode_splits, train_tokenizer
    from tests.conftest import synthetic_documents

    prepared, model = root / "data/prepared", root / "models/tokenizer/spm.model"
    write_splits(synthetic_documents(), prepared, DataParams(val_fraction=0.1, test_fraction=test_fraction))
    if vocab_size:
        model = train_tokenizer(prepared / "train.txt", root / "models/tokenizer",
                                TokenizerParams(vocab_size=vocab_size), seed=0)
    return encode_splits(model, prepared, root / "data/tokens", num_threads=1)


def version_tags(params, version):
    from mlflow import MlflowClient

    return MlflowClient(params.mlflow.tracking_uri).get_model_version("mmrec", version).tags  # absolute in tests


JITTER = [0.03, -0.02, 0.05, 0.0, -0.04, 0.02, 0.01, -0.03, 0.04, -0.01, 0.0, 0.02, -0.02]


def test_a_tokenizer_experiment_better_on_the_same_text_takes_champion(workdir):
    from mmrec.registry.gate import promote_rung

    params = tiny_params(workdir, promote={"min_improvement": 0.05})
    rung_with_checkpoint(workdir, params, "tiny", 1.5, jitter=JITTER[:11])
    v1 = promote_rung(params, "tiny", workdir)
    header = redo_data(workdir, vocab_size=360)  # `dvc exp run -S tokenizer.vocab_size=360`: same text, other tokens
    assert header["data_sha256"] != v1.data_sha256 and header["vocab_size"] == 360
    rung_with_checkpoint(workdir, params, "tiny", 1.4, seed=1, jitter=JITTER[:11])
    d = promote_rung(params, "tiny", workdir)
    assert d.promoted and d.model_version == "2" and d.test_docs_sha256 == v1.test_docs_sha256  # the same documents
    assert d.champion and d.champion_reason.startswith("moved: test_bpb_context 1.4000 gains 0.1000 (95% interval "
                                                       "[0.09")
    assert d.champion_reason.endswith("11 documents) on v1 (1.5000): the lower end clears min_improvement 0.05")
    assert 0.09 < d.champion_gain_low < 0.1 < d.champion_gain_high < 0.11
    tags = version_tags(params, "2")
    assert tags["gain_over"] == "v1" and float(tags["gain_low"]) == d.champion_gain_low
    assert tags["test_whole_split"] == "true" and tags["test_documents"] == "11"


def test_champion_stays_on_another_test_text_unless_forced(workdir):
    from mmrec.registry.gate import promote_rung

    params = tiny_params(workdir)
    rung_with_checkpoint(workdir, params, "tiny", 1.5)
    promote_rung(params, "tiny", workdir)
    redo_data(workdir, test_fraction=0.2)  # the test split grew since v1
    score_docs(workdir, "tiny", 1.5)  # the gate's reference, evaluated again on the new split as DVC would
    rung_with_checkpoint(workdir, params, "mini", 1.2, seed=1)
    d = promote_rung(params, "mini", workdir)
    assert d.promoted and d.model_version == "2" and not d.champion
    assert d.champion_reason.startswith("stayed: another test text: 11 of v1's 11 documents are among these 2")
    assert d.champion_reason.endswith("the figures do not compare; set promote.force_champion: true to move it")
    assert json.loads((workdir / "models/mini/promotion.json").read_text())["champion_reason"] == d.champion_reason
    assert ("1", ["champion", "tiny"]) in [(v, a) for v, a, _ in registry_state(params)]

    forced = tiny_params(workdir, promote={"force_champion": True})
    d = promote_rung(forced, "mini", workdir)  # the same checkpoint: version 2 again, now champion
    assert d.model_version == "2" and d.champion and "moved anyway (promote.force_champion)" in d.champion_reason
    assert ("2", ["champion", "mini"]) in [(v, a) for v, a, _ in registry_state(params)]


def test_a_subset_never_moves_champion_nor_replaces_a_versions_figure(workdir, capsys):
    from mmrec.registry.gate import promote_rung
    from mmrec.registry.models import main as registry_cli

    params = tiny_params(workdir)
    rung_with_checkpoint(workdir, params, "tiny", 1.5)
    promote_rung(params, "tiny", workdir)
    # `dvc exp run -S evaluate.max_tokens=600`: the same tiny scored on the first 600 test tokens
    write(workdir / "metrics/eval/tiny.json", {"test_bpb_context": 1.3, "unigram_bpb": 2.2})
    subset = score_docs(workdir, "tiny", 1.3, max_tokens=600)
    assert not subset.whole_split and 1 < len(subset.ids) < subset.split_documents == 11
    d = promote_rung(params, "tiny", workdir)
    assert d.model_version == "1" and d.aliases["champion"] == "kept: v1 is champion already"
    assert d.version_figure == (f"v1 keeps its reference figure (test_bpb_context 1.5000, the whole test split); this "
                                f"one on {subset.describe()} is in promotion.json only")
    tags = version_tags(params, "1")
    assert tags["test_bpb"] == "1.5" and tags["test_whole_split"] == "true" and tags["test_documents"] == "11"

    rung_with_checkpoint(workdir, params, "mini", 1.2, seed=1, max_tokens=600)  # another model, the same subset
    d = promote_rung(params, "mini", workdir)
    assert d.promoted and "on tiny (1.3000)" in d.reason  # the gate compares the two on the same subset
    assert d.model_version == "2" and not d.champion
    assert d.champion_reason == (f"stayed: this figure is on {subset.describe()}: the figures do not compare; "
                                 "set promote.force_champion: true to move it")
    assert d.aliases["mini"].startswith("stayed: mini points at no version, but this figure is on a subset")
    tags = version_tags(params, "2")
    assert tags["test_whole_split"] == "false" and tags["test_bpb"] == "1.2"
    assert registry_cli(["--tracking-uri", f"sqlite:///{workdir}/mlflow.db", "list"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0][:4] == ["version", "rung", "test_bpb", "docs"]
    assert rows[2][:4] == ["2", "mini", "1.2000", f"{len(subset.ids)}*"]

    for rung, bpb in [("tiny", 1.5), ("mini", 1.2)]:  # the same weights, both scored on the whole split after all
        write(workdir / f"metrics/eval/{rung}.json", {"test_bpb_context": bpb, "unigram_bpb": 2.2})
        score_docs(workdir, rung, bpb)
    write(workdir / "models/tiny/promotion.json", {"test_bpb": 1.5, "promoted": True})
    d = promote_rung(params, "mini", workdir)
    assert d.model_version == "2" and d.version_figure == ("v2 takes this figure on the whole test split "
                                                           "(11 documents) as its reference")
    assert d.champion and version_tags(params, "2")["test_whole_split"] == "true"


def test_a_gain_whose_interval_straddles_min_improvement_is_not_promoted(workdir):
    params = tiny_params(workdir, promote={"min_improvement": 0.01})
    write(workdir / "models/tiny/promotion.json", {"test_bpb": 1.5, "promoted": True})
    write(workdir / "metrics/eval/mini.json", {"test_bpb_context": 1.48, "unigram_bpb": 2.2})
    score_docs(workdir, "tiny", 1.5)
    score_docs(workdir, "mini", 1.48, jitter=[0.06 * (-1) ** i for i in range(11)])  # better on some, worse on others
    d = decide(params, "mini", workdir)
    assert d.gain == pytest.approx(0.02) and d.gain_low < 0.01 < 0.02 < d.gain_high
    assert not d.promoted and d.reason.startswith("test_bpb_context 1.4800 gains 0.0200 (95% interval [")
    assert d.reason.endswith("11 documents) on tiny (1.5000): the lower end does not clear min_improvement 0.01")
    narrower = decide(tiny_params(workdir, promote={"min_improvement": 0.01, "confidence": 0.5}), "mini", workdir)
    assert d.gain_low < narrower.gain_low < 0.02 < narrower.gain_high < d.gain_high  # a lower confidence

    (workdir / "metrics/eval/tiny.docs.json").unlink()  # the same figures by the fixed margin alone would pass
    d = decide(params, "mini", workdir)
    assert d.promoted and d.reason.startswith("tiny has no per-document scores, so the fixed margin alone")


def test_an_older_version_without_per_document_scores_is_compared_by_the_fixed_margin_and_says_so(workdir):
    from mmrec.registry.gate import promote_rung

    params = tiny_params(workdir, promote={"min_improvement": 0.01})
    rung_with_checkpoint(workdir, params, "tiny", 1.5, docs=False)
    promote_rung(params, "tiny", workdir)
    assert "test_docs_sha256" not in version_tags(params, "1")
    rung_with_checkpoint(workdir, params, "mini", 1.48, seed=1)
    d = promote_rung(params, "mini", workdir)
    assert d.champion and d.champion_reason == ("moved: v1 has no per-document scores, so the fixed margin alone: "
                                                "test_bpb_context 1.4800 gains 0.0200 on v1 (1.5000), "
                                                ">= min_improvement 0.01")
    assert d.champion_gain == pytest.approx(0.02) and d.champion_gain_low is None
    tags = version_tags(params, "2")
    assert tags["gain_over"] == "v1" and tags["gain_low"] == "" and tags["test_documents"] == "11"


def test_a_non_finite_figure_is_refused_with_one_line_before_anything_is_registered(workdir):
    from mmrec.registry.gate import promote_rung

    params = tiny_params(workdir)
    rung_with_checkpoint(workdir, params, "tiny", math.nan, docs=False)
    proc = run_stage(workdir, params, "tiny")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line == ("error: tiny: test_bpb_context is nan in metrics/eval/tiny.json: a figure that is not a finite "
                    "number is never promoted; nothing was registered (retrain it: `dvc repro -f train@tiny`)")
    assert registry_state(params) == [] and not (workdir / "models/tiny/promotion.json").exists()

    write(workdir / "metrics/eval/tiny.json", {"test_bpb_context": 1.5, "unigram_bpb": math.inf})
    with pytest.raises(UserError, match="tiny: unigram_bpb is inf in "):
        promote_rung(params, "tiny", workdir)
    rung_with_checkpoint(workdir, params, "tiny", 1.5)
    promote_rung(params, "tiny", workdir)
    write(workdir / "models/tiny/promotion.json", {"test_bpb": math.nan, "promoted": True})  # from an older gate
    rung_with_checkpoint(workdir, params, "mini", 1.4, seed=1)
    with pytest.raises(UserError, match=r"^tiny: test_bpb is nan in .*models/tiny/promotion.json"):
        promote_rung(params, "mini", workdir)
    assert [v for v, _, _ in registry_state(params)] == ["1"]


def test_an_ancestor_decided_on_per_document_scores_that_are_gone_is_one_line_not_the_fixed_margin(workdir):
    from mmrec.registry.gate import promote_rung

    params = tiny_params(workdir, promote={"min_improvement": 0.01})
    rung_with_checkpoint(workdir, params, "tiny", 1.5)
    promote_rung(params, "tiny", workdir)
    write(workdir / "metrics/eval/mini.json", {"test_bpb_context": 1.48, "unigram_bpb": 2.2})
    score_docs(workdir, "mini", 1.48, jitter=[0.06 * (-1) ** i for i in range(11)])  # the paired test refuses it
    (workdir / "metrics/eval/tiny.docs.json").unlink()
    with pytest.raises(UserError) as err:
        decide(params, "mini", workdir)
    assert str(err.value).endswith("metrics/eval/tiny.docs.json is missing, though "
                                   f"{workdir}/models/tiny/promotion.json was decided on it; rerun "
                                   "`dvc repro promote@tiny`")


def test_promote_refuses_a_figure_and_per_document_scores_from_two_evaluations(workdir):
    from mmrec.pipeline.evaluate import evaluate_rung

    params = tiny_params(workdir)
    paths = rung_with_checkpoint(workdir, params, "tiny", 1.5, docs=False)
    evaluate_rung(params, "tiny", workdir)
    assert decide(params, "tiny", workdir).test_docs_sha256  # the pair evaluate wrote goes together
    figures = paths.eval_metrics.read_bytes()
    evaluate_rung(tiny_params(workdir, evaluate={"max_tokens": 600}), "tiny", workdir)
    paths.eval_metrics.write_bytes(figures)  # killed between writing the new scores and the figures that go with them
    with pytest.raises(UserError) as err:
        decide(params, "tiny", workdir)
    assert str(err.value) == (f"{paths.doc_scores} is not the file {paths.eval_metrics} was written with: they are "
                              "from two evaluations; restore it with `dvc checkout --force evaluate@tiny` or rebuild "
                              "it with `dvc repro -f evaluate@tiny`")
