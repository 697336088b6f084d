"""The promotion gate and the model registry.

The decision reads only DVC-tracked files (the rung's eval metrics, its parent's promotion.json),
never "the latest MLflow run": a stage that DVC restores from its cache creates no run.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mmrec.config import Params
from mmrec.errors import UserError
from mmrec.files import write_json
from mmrec.paths import RungPaths


# The gate's number: test bits per byte with the full context each arch can use (evaluate.test_metrics). Both
# archs are scored the same way on the same stream (every target once, in order, as a compressor would), and
# a rung always meets its parent in the same arch; the windowed test_bpb stays beside it as the control.
GATE_METRIC = "test_bpb_context"


class Rejected(UserError):
    pass


@dataclass
class Decision:
    rung: str
    promoted: bool
    reason: str
    test_bpb: float  # the value of `metric`
    compared_to: str  # "unigram" or the parent rung
    reference_bpb: float
    threshold_bpb: float
    run_id: str = ""
    registered_model: str = ""
    model_version: str = ""
    metric: str = GATE_METRIC


def read_json(path: Path, hint: str) -> dict:
    if not path.exists():
        raise UserError(f"{path} is missing; run `dvc repro {hint}` first")
    return json.loads(path.read_text())


def decide(params: Params, rung: str, root: Path = Path(".")) -> Decision:
    """Promote when GATE_METRIC (test bits/byte, full context) beats the parent by promote.min_improvement (the first rung: the
    unigram baseline by promote.baseline_margin), and stays under promote.max_bpb when that is set."""
    p, parent = params.promote, params.rung(rung).parent
    metrics = read_json(RungPaths(root, rung).eval_metrics, f"evaluate@{rung}")
    bpb = metrics[GATE_METRIC]
    if parent:
        ref = read_json(RungPaths(root, parent).promotion, f"promote@{parent}")["test_bpb"]
        threshold, what = ref - p.min_improvement, f"{parent} ({ref:.4f}) - min_improvement {p.min_improvement}"
    else:
        ref = metrics["unigram_bpb"]
        threshold, what = ref - p.baseline_margin, f"unigram baseline ({ref:.4f}) - baseline_margin {p.baseline_margin}"
    if bpb > threshold:
        reason = f"{GATE_METRIC} {bpb:.4f} missed {what} = {threshold:.4f} by {bpb - threshold:.4f}"
    elif p.max_bpb and bpb > p.max_bpb:
        reason = f"{GATE_METRIC} {bpb:.4f} is above promote.max_bpb {p.max_bpb} by {bpb - p.max_bpb:.4f}"
    else:
        reason = f"{GATE_METRIC} {bpb:.4f} <= {what} = {threshold:.4f}"
        if p.max_bpb:
            reason += f" and <= max_bpb {p.max_bpb}"
        return Decision(rung, True, reason, bpb, parent or "unigram", ref, threshold)
    return Decision(rung, False, reason, bpb, parent or "unigram", ref, threshold)


def promote_rung(params: Params, rung: str, root: Path = Path(".")) -> Decision:
    """Apply the gate; on promotion register the model and move the aliases. Rejection raises
    `Rejected` after writing the decision, unless promote.on_reject is 'continue'."""
    from mmrec import registry, track

    paths = RungPaths(root, rung)
    model_dir = paths.model()
    decision = decide(params, rung, root)
    decision.run_id = track.read_run_id(model_dir)
    run = track.Run.resume(params.mlflow, decision.run_id)
    if decision.promoted:
        decision.registered_model = params.promote.registered_model
        decision.model_version = registry.register(run, params.promote.registered_model, paths.best, paths.tokenizer,
                                                aliases=["champion", rung])
    run.set_tags({"promote.decision": "promoted" if decision.promoted else "rejected",
                  "promote.reason": decision.reason, "promote.threshold_bpb": decision.threshold_bpb,
                  "promote.model_version": decision.model_version})
    run.end()
    write_json(paths.promotion, asdict(decision))
    if not decision.promoted and params.promote.on_reject == "fail":
        raise Rejected(f"{rung} not promoted: {decision.reason} (set promote.on_reject: continue to go on anyway)")
    return decision
