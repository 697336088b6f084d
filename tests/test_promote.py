import json

import pytest

from mmrec.errors import UserError
from mmrec.promote import decide
from tests.conftest import tiny_params


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def root(tmp_path):
    write(tmp_path / "metrics/eval/tiny.json", {"test_bpb": 1.55, "test_bpb_context": 1.50, "unigram_bpb": 2.20})
    write(tmp_path / "metrics/eval/mini.json", {"test_bpb": 1.45, "test_bpb_context": 1.40, "unigram_bpb": 2.20})
    write(tmp_path / "models/tiny/promotion.json", {"test_bpb": 1.50, "promoted": True})
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


def test_max_bpb_is_a_ceiling_on_top_of_the_margin(root):
    d = decide(tiny_params(root, promote={"min_improvement": 0.0, "max_bpb": 1.3}), "mini", root)
    assert not d.promoted and d.reason == "test_bpb_context 1.4000 is above promote.max_bpb 1.3 by 0.1000"


def test_missing_inputs_name_the_stage_to_run(root):
    (root / "models/tiny/promotion.json").unlink()
    with pytest.raises(UserError, match=r"models/tiny/promotion.json is missing; run `dvc repro promote@tiny`"):
        decide(tiny_params(root), "mini", root)


def test_a_rejection_with_on_reject_continue_records_and_moves_no_alias(root):
    from mlflow import MlflowClient

    from mmrec import track
    from mmrec.promote import Rejected, promote_rung

    params = tiny_params(root, promote={"baseline_margin": 0.9, "on_reject": "continue"})
    run = track.Run.start(params.mlflow, "tiny", {"rung": "tiny"})
    write(root / "models/tiny/run.json", {"run_id": run.id})
    d = promote_rung(params, "tiny", root)
    assert not d.promoted and json.loads((root / "models/tiny/promotion.json").read_text())["promoted"] is False
    client = MlflowClient(track.tracking_uri(params.mlflow))
    assert client.get_run(run.id).data.tags["promote.decision"] == "rejected"
    assert client.search_registered_models() == []
    with pytest.raises(Rejected, match="tiny not promoted: test_bpb_context 1.5000 missed"):
        promote_rung(params.model_copy(update={"promote": params.promote.model_copy(update={"on_reject": "fail"})}),
                     "tiny", root)
