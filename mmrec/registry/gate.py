"""The promotion gate, and which registry aliases a promoted rung moves.

The gate reads only DVC-tracked files (the rung's eval metrics and per-document scores, its ancestors'
promotion.json and per-document scores), never "the latest MLflow run": a stage that DVC restores from its
cache creates no run. A rung must beat its nearest *promoted* ancestor (a rejected rung is never a
reference), or the unigram baseline by promote.baseline_margin when no ancestor was promoted.

Beating a reference is a paired test (mmrec/paired.py): on the test documents both figures share, the gain
(reference bits per byte minus the rung's) and its bootstrap interval at promote.confidence; the rung
passes when the interval's lower end clears promote.min_improvement. Two figures compare only when they
are the same metric on the same test text, the whole split or exactly the same documents; a tokenizer
experiment scores the same text in other tokens and competes. A reference kept before per-document scores
existed is compared by the fixed margin alone, and the decision says so. A non-finite figure is refused.

A promoted rung is registered once per checkpoint, with its whole-split figure and per-document scores
(a rerun on a subset never replaces them), and `champion` and the rung's own alias move only when the
version beats their current version by the same test. A version from `dvc exp run` also gets
`exp-<name>`, which always moves. The aliases are read, compared with and moved under the registry's lease
(registry/lease.py): one promotion at a time, however many run against one store.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from mmrec import paired
from mmrec.config import Params, PromoteParams
from mmrec.errors import UserError
from mmrec.files import dvc_fix, load_json, sha256_file, write_json
from mmrec.paired import GATE_METRIC, DocScores, Gain
from mmrec.paths import EXPERIMENT_ALIAS, RungPaths


class Rejected(UserError):
    pass


@dataclass
class Decision:
    rung: str
    promoted: bool
    reason: str
    test_bpb: float  # the value of `metric`, the gate's number
    compared_to: str  # "unigram" or the nearest promoted ancestor
    reference_bpb: float
    threshold_bpb: float  # the reference minus the margin: what the figure itself had to reach
    passed_over: list[str] = field(default_factory=list)  # rejected ancestors between the rung and its reference
    # the gate's gain over its reference (reference minus this figure) and, from per-document scores, its interval
    gain: float | None = None
    gain_low: float | None = None
    gain_high: float | None = None
    confidence: float | None = None
    test_documents: int = 0  # documents behind the figure
    whole_split: bool | None = None  # None: no per-document scores
    test_docs_sha256: str = ""  # the document set: figures compare only on equal ones
    checkpoint_sha256: str = ""
    data_sha256: str = ""  # the token files the test split comes from
    dvc_exp_name: str = ""
    run_id: str = ""
    registered_model: str = ""
    model_version: str = ""
    version_figure: str = ""  # whether the version took this figure as its reference, or kept its own
    champion: bool = False  # whether `champion` points at this version after the decision
    champion_reason: str = ""
    champion_gain: float | None = None  # over the version that held champion, when the two compared
    champion_gain_low: float | None = None
    champion_gain_high: float | None = None
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> str(AliasOutcome): "moved: why", ...
    metric: str = GATE_METRIC


@dataclass
class Figure:
    """A test figure and what tells whether another compares with it."""
    label: str  # who it is in a reason: 'tiny', 'v3'
    bpb: float
    metric: str
    scores: DocScores | None  # None: kept before per-document scores were
    data_sha256: str = ""  # the token files': the only sign of the test split when there are no scores


@dataclass
class Verdict:
    better: bool
    comparable: bool
    why: str
    gain: float | None = None  # reference minus candidate
    interval: Gain | None = None  # the paired test's; None when compared by the fixed margin


class Move(Enum):
    """What a promotion did with one alias."""
    MOVED = "moved"  # it points at the promoted version now
    STAYED = "stayed"  # it stays on the version it pointed at (or on none)
    KEPT = "kept"  # it pointed at the promoted version already


@dataclass(frozen=True)
class AliasOutcome:
    move: Move
    why: str
    verdict: Verdict | None = None  # the comparison that decided it, when two figures were compared
    over: str = ""  # the version it pointed at before ('' when none)

    def __str__(self) -> str:  # as promotion.json, the version's champion.decision and the stage's output say it
        return f"{self.move.value}: {self.why}"


def compare(ref: Figure, cand: Figure, p: PromoteParams, seed: int) -> Verdict:
    """Whether `cand` beats `ref`: by the paired test when both have per-document scores, else by the fixed margin."""
    margin = p.min_improvement
    if ref.metric != cand.metric:
        return Verdict(False, False, f"{ref.label}'s figure is {ref.metric}, this one's {cand.metric}")
    if ref.scores is not None and cand.scores is not None:
        differ = paired.difference(ref.scores, cand.scores, ref.label)
        if differ:
            return Verdict(False, False, differ)
        g = paired.paired_gain(ref.scores, cand.scores, p.confidence, p.bootstrap_samples, seed)
        head = f"{cand.metric} {cand.bpb:.4f} gains {g} on {ref.label} ({ref.bpb:.4f})"
        if g.clears(margin):
            return Verdict(True, True, f"{head}: the lower end clears min_improvement {margin}", g.mean, g)
        return Verdict(False, True, f"{head}: the lower end does not clear min_improvement {margin}", g.mean, g)
    if cand.scores is not None and not cand.scores.whole_split:
        return Verdict(False, False, f"this figure is on {cand.scores.describe()} and {ref.label} has no per-document "
                                     "scores to match them")
    if ref.scores is None and ref.data_sha256 and ref.data_sha256 != cand.data_sha256:
        return Verdict(False, False, f"{ref.label} was measured on another test split (data {ref.data_sha256[:12]}, "
                                     f"this one {cand.data_sha256[:12]}) and has no per-document scores to match "
                                     "the text")
    gain = ref.bpb - cand.bpb
    better = gain > 0 and gain >= margin
    who = ref.label if ref.scores is None else "this one"
    return Verdict(better, True, f"{who} has no per-document scores, so the fixed margin alone: {cand.metric} "
                                 f"{cand.bpb:.4f} gains {gain:.4f} on {ref.label} ({ref.bpb:.4f}), "
                                 f"{'>=' if better else 'short of'} min_improvement {margin}", gain)


def refuse_non_finite(rung: str, where: Path, figures: dict[str, float]) -> None:
    """NaN passes every `>` test: a non-finite figure stops the stage before anything is registered."""
    for name, value in figures.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{rung}: {name} is {value} in {where}: a figure that is not a finite number is never "
                            f"promoted; nothing was registered (retrain it: `dvc repro -f train@{rung}`)")


def doc_scores(paths: RungPaths) -> DocScores | None:
    """A rung's per-document scores, or None for outputs evaluated before they were kept."""
    return paired.load(paths.doc_scores, f"evaluate@{paths.rung}") if paths.doc_scores.exists() else None


def eval_outputs(paths: RungPaths) -> tuple[dict[str, Any], DocScores | None]:
    """A rung's test figures (metrics/eval/<rung>.json) and their per-document scores, as one evaluation's:
    evaluate writes the scores first and the figures then, naming the scores' sha256 (paired.SCORES_FILE_SHA256),
    so a pair from two evaluations (a kill between the writes, a file restored alone) is one line, never a gate
    on one evaluation's documents and another's figure. Figures from before that name none must still equal
    the scores' sum."""
    stage = f"evaluate@{paths.rung}"
    metrics = load_json(paths.eval_metrics, stage)
    if not isinstance(metrics, dict):
        raise UserError(f"{paths.eval_metrics}: not a JSON object (damaged?); {dvc_fix(stage)}")
    named = metrics.pop(paired.SCORES_FILE_SHA256, None)
    if named is not None and not paths.doc_scores.exists():
        raise UserError(f"{paths.doc_scores} is missing, though {paths.eval_metrics} was written with it; "
                        f"{dvc_fix(stage)}")
    if named is not None and sha256_file(paths.doc_scores) != named:
        raise UserError(f"{paths.doc_scores} is not the file {paths.eval_metrics} was written with: they are from "
                        f"two evaluations; {dvc_fix(stage)}")
    scores = doc_scores(paths)
    if scores is not None:
        same_evaluation(scores, metrics.get(GATE_METRIC), paths.doc_scores, paths.eval_metrics, dvc_fix(stage))
    return metrics, scores


def same_evaluation(scores: DocScores, bpb: Any, scores_path: Path, figure_path: Path, fix: str) -> None:
    """Per-document scores sum to the figure they were kept with (a micro-bit per document of rounding)."""
    if isinstance(bpb, (int, float)) and abs(scores.bpb - bpb) > 1e-6:
        raise UserError(f"{scores_path} gives {scores.bpb:.6f}, {figure_path} {bpb:.6f}: they are from two "
                        f"evaluations; {fix}")


def reference(params: Params, rung: str, root: Path) -> tuple[str | None, dict | None, list[str]]:
    """The nearest promoted ancestor and its decision (promotion.json), and the rejected ancestors passed on the way."""
    passed = []
    ancestor = params.rung(rung).parent
    while ancestor:
        promo = load_json(RungPaths(root, ancestor).promotion, f"promote@{ancestor}")
        if promo["promoted"]:
            return ancestor, promo, passed
        passed.append(ancestor)
        ancestor = params.rung(ancestor).parent
    return None, None, passed


def ancestor_figure(ancestor: str, promo: dict, root: Path) -> Figure:
    """The nearest promoted ancestor's figure, with its per-document scores when it has them. One decided on
    per-document scores (promotion.json names them) that are now missing is one line, not the fixed margin."""
    paths = RungPaths(root, ancestor)
    bpb = promo["test_bpb"]
    refuse_non_finite(ancestor, paths.promotion, {"test_bpb": bpb})
    fix = f"rerun `dvc repro promote@{ancestor}`"
    scores = doc_scores(paths)
    if scores is None and promo.get("test_docs_sha256"):
        raise UserError(f"{paths.doc_scores} is missing, though {paths.promotion} was decided on it; {fix}")
    if scores is not None:
        same_evaluation(scores, bpb, paths.doc_scores, paths.promotion, fix)
    return Figure(ancestor, bpb, promo.get("metric", GATE_METRIC), scores)


def decide(params: Params, rung: str, root: Path = Path(".")) -> Decision:
    """Promote when GATE_METRIC (test bits/byte, full context) beats the nearest promoted ancestor (see compare;
    none: the unigram baseline by promote.baseline_margin), and stays under promote.max_bpb when that is set."""
    p = params.promote
    paths = RungPaths(root, rung)
    metrics, scores = eval_outputs(paths)
    bpb = metrics.get(GATE_METRIC)
    refuse_non_finite(rung, paths.eval_metrics, {GATE_METRIC: bpb, "unigram_bpb": metrics.get("unigram_bpb")})
    if scores is not None:
        refuse_non_finite(rung, paths.doc_scores, {f"{scores.metric} summed over its documents": scores.bpb})
    ref_rung, ref_promo, passed = reference(params, rung, root)
    interval = None
    if ref_rung is not None:
        ancestor = ancestor_figure(ref_rung, ref_promo, root)
        ref = ancestor.bpb
        v = compare(ancestor, Figure(rung, bpb, GATE_METRIC, scores), p, params.seed)
        threshold, promoted, reason, gain, interval = ref - p.min_improvement, v.better, v.why, v.gain, v.interval
        if not v.comparable:
            reason += f": the figures do not compare; rerun `dvc repro evaluate@{ref_rung} evaluate@{rung}`"
    else:
        ref = metrics["unigram_bpb"]
        threshold, gain = ref - p.baseline_margin, ref - bpb
        what = f"unigram baseline ({ref:.4f}) - baseline_margin {p.baseline_margin}"
        promoted = bpb <= threshold
        reason = (f"{GATE_METRIC} {bpb:.4f} <= {what} = {threshold:.4f}" if promoted else
                  f"{GATE_METRIC} {bpb:.4f} missed {what} = {threshold:.4f} by {bpb - threshold:.4f}")
    if passed:
        reason += f" (passed over, not promoted, so no reference: {', '.join(passed)})"
    if promoted and p.max_bpb and bpb > p.max_bpb:
        promoted = False
        reason = f"{GATE_METRIC} {bpb:.4f} is above promote.max_bpb {p.max_bpb} by {bpb - p.max_bpb:.4f}"
    elif promoted and p.max_bpb:
        reason += f" and <= max_bpb {p.max_bpb}"
    d = Decision(rung, promoted, reason, bpb, ref_rung or "unigram", ref, threshold, passed, gain=gain,
                 test_documents=int(metrics.get("test_documents", 0)))
    if interval is not None:
        d.gain_low, d.gain_high, d.confidence = interval.low, interval.high, interval.confidence
    if scores is not None:
        d.whole_split, d.test_docs_sha256, d.test_documents = scores.whole_split, scores.digest, len(scores.ids)
    return d


def alias_rule(alias: str, cand: Figure, current: Figure | None, p: PromoteParams,
               seed: int) -> tuple[bool, str, Verdict | None]:
    """Whether a promoted version (its figure `cand`) takes `alias` from the version holding it (`current`), and why."""
    force = "moved anyway (promote.force_champion)"
    ask = "set promote.force_champion: true to move it"
    if current is None:
        if cand.scores is not None and not cand.scores.whole_split:
            why = (f"{alias} points at no version, but this figure is on {cand.scores.describe()}: an alias starts "
                   "only on the whole split")
            return (True, f"{why}; {force}", None) if p.force_champion else (False, f"{why}; {ask}", None)
        return True, f"{alias} pointed at no version", None
    if not math.isfinite(current.bpb):
        return True, f"{current.label}'s figure is {current.bpb}, no measurement to beat", None
    v = compare(current, cand, p, seed)
    if v.comparable:
        return v.better, v.why, v
    return (True, f"{v.why}: the figures do not compare; {force}", v) if p.force_champion else \
        (False, f"{v.why}: the figures do not compare; {ask}", v)


def exp_alias(name: str) -> str:
    return EXPERIMENT_ALIAS + re.sub(r"[^\w-]", "-", name)[:200]


def check_checkpoint(paths: RungPaths, header: dict[str, Any], run_id: str, seq_len: int) -> str:
    """Load best.pt the way the served model will (weights only) and score one test window, so that a torn,
    foreign or mismatched checkpoint stops the stage before the registry is touched. Returns its sha256."""
    import torch

    from mmrec.model.inference import load_model, score
    from mmrec.data.tokenizer import load_tokens

    best, rung = paths.best, paths.rung
    fix = f"rerun `dvc repro -f train@{rung}`; nothing was registered"
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle's protocol: the error below says it all
            warnings.simplefilter("ignore")
            model, ckpt = load_model(best)
    except Exception as err:  # the safe loader refused it, or it is a readable dict but no checkpoint of ours
        cause = err.__context__ if isinstance(err, UserError) and err.__context__ else err
        why = type(cause).__name__ if cause is not err or not isinstance(err, UserError) else str(err)
        raise UserError(f"{best} is not a loadable model checkpoint ({why}); {fix}") from None
    mismatch = [f"{key} {ckpt.get(key)!r} != {want!r}" for key, want in
                [("rung", rung), ("run_id", run_id), ("tokenizer_sha256", header["tokenizer_sha256"])]
                if ckpt.get(key) != want]
    if model.cfg.vocab_size != header["vocab_size"]:
        mismatch.append(f"vocab_size {model.cfg.vocab_size} != {header['vocab_size']}")
    if mismatch:
        raise UserError(f"{best} does not belong to this rung's run and tokens ({'; '.join(mismatch)}); {fix}")
    test = load_tokens(paths.tokens, "test")
    try:
        loss = score(model, test, [(0, min(seq_len, len(test) - 1))], 1, torch.device("cpu")).loss
    except Exception as err:
        raise UserError(f"{best}: a forward pass on a test window failed ({type(err).__name__}); {fix}") from None
    if not math.isfinite(loss):
        raise UserError(f"{best}: loss {loss} on a test window; {fix}")
    return sha256_file(best)


def promote_rung(params: Params, rung: str, root: Path = Path(".")) -> Decision:
    """Check the checkpoint, apply the gate; on promotion register the model (or reuse the version holding the same
    checkpoint) and move the aliases by alias_rule. Writes promotion.json (the whole decision) and handoff.json
    (rung, verdict, checkpoint sha256). A rejection raises `Rejected` unless promote.on_reject is 'continue'."""
    from mmrec.tracking import run as track
    from mmrec.tracking.store import faults_as_errors
    from mmrec.data.tokenizer import read_header

    paths = RungPaths(root, rung)
    run_id = track.read_run_id(paths.model())
    header = read_header(paths.tokens)
    sha = check_checkpoint(paths, header, run_id, params.train.seq_len)  # before anything touches MLflow
    d = decide(params, rung, root)  # refuses a non-finite figure, before MLflow too
    d.run_id, d.checkpoint_sha256, d.data_sha256 = run_id, sha, header["data_sha256"]
    d.dvc_exp_name = os.environ.get("DVC_EXP_NAME", "")
    run = track.Run.resume(params.mlflow, run_id, rung, {"rung": rung})
    with track.closed_on_failure(run), faults_as_errors(run.store.uri):
        if d.promoted:
            publish(run, d, params, paths)
        tags = {"promote.decision": "promoted" if d.promoted else "rejected", "promote.reason": d.reason,
                "promote.threshold_bpb": d.threshold_bpb, "promote.model_version": d.model_version,
                "promote.champion": d.champion, "promote.champion_reason": d.champion_reason,
                "promote.compared_to": d.compared_to}
        run.set_tags(tags | gain_tags("promote.", d.gain, d.gain_low, d.gain_high, d.confidence))
        run.end()
    write_json(paths.promotion, asdict(d))
    # the child's dependency: only the verdict and the weights, never a threshold or a reason
    write_json(paths.handoff(), {"rung": rung, "promoted": d.promoted, "checkpoint_sha256": sha})
    if not d.promoted and params.promote.on_reject == "fail":
        raise Rejected(f"{rung} not promoted: {d.reason} (set promote.on_reject: continue to go on anyway)")
    return d


def gain_tags(prefix: str, gain: float | None, low: float | None, high: float | None,
              confidence: float | None) -> dict[str, str]:
    """<prefix>gain, gain_low, gain_high and confidence, for those that are known (repr: they read back exactly)."""
    values = {"gain": gain, "gain_low": low, "gain_high": high, "confidence": confidence}
    return {prefix + k: repr(float(v)) for k, v in values.items() if v is not None}


def figure_tags(d: Decision) -> dict[str, str]:
    """A version's reference figure: what later promotions compare against (its per-document scores beside it)."""
    tags = {"test_bpb": repr(d.test_bpb), "gate_metric": d.metric}
    if d.whole_split is not None:
        tags |= {"test_docs_sha256": d.test_docs_sha256, "test_documents": str(d.test_documents),
                 "test_whole_split": str(d.whole_split).lower()}
    return tags


def held_figure(client, name: str, held: dict[str, Any]) -> Figure:
    """The figure of the version an alias points at, with its per-document scores when it keeps them."""
    scores = stored_scores(client, name, held) if held["docs_sha256"] else None
    bpb = math.nan if held["test_bpb"] is None else held["test_bpb"]
    return Figure(f"v{held['version']}", bpb, held["metric"], scores, held["data_sha256"])


def stored_scores(client, name: str, held: dict[str, Any]) -> DocScores:
    """The per-document scores a version's tags claim (test_docs_sha256), as its logged model holds them. One that
    does not hold them, or holds others, is one line naming the fix: never compared by the fixed margin instead,
    which passes gains the paired test refuses."""
    scores, problem = check_stored(client, name, held)
    if scores is None:
        rung = held["rung"] or "<its rung>"
        raise UserError(f"{problem}, though the version claims per-document scores: rerun `dvc repro -f "
                        f"promote@{rung}` where its weights are (it stores them again), or delete the version's tag "
                        "test_docs_sha256 to compare it by the fixed margin")
    return scores


def check_stored(client, name: str, held: dict[str, Any]) -> tuple[DocScores | None, str]:
    """(the scores a version claims, '') when its logged model holds them, else (None, what is wrong)."""
    from mmrec.registry import models as registry

    where = f"{name} v{held['version']} {registry.DOC_SCORES}"
    try:
        scores = DocScores.from_dict(registry.doc_scores(client, name, held["version"]), where)
    except UserError as err:  # registry.MissingScores, or a damaged file
        return None, str(err)
    if scores.digest != held["docs_sha256"]:
        return None, f"{where} holds other documents than its tag test_docs_sha256 names"
    if held["test_bpb"] is not None and abs(scores.bpb - held["test_bpb"]) > 1e-6:
        return None, f"{where} gives {scores.bpb:.6f}, its tag test_bpb {held['test_bpb']:.6f}"
    return scores, ""


def version_tags(client, run_id: str, d: Decision, params: Params) -> dict[str, str]:
    """Where a promoted version comes from: its rung's run, commit, data, tokenizer, params and weights."""
    run_tags = client.get_run(run_id).data.tags
    return {"rung": d.rung, "dvc_exp_name": d.dvc_exp_name, "git_commit": run_tags.get("git_commit", ""),
            "data_sha256": d.data_sha256, "tokenizer_sha256": run_tags.get("tokenizer_sha256", ""),
            "params_hash": run_tags.get("params_hash", params.digest()), "checkpoint_sha256": d.checkpoint_sha256,
            "arch": run_tags.get("arch", params.model.arch), "promote.reason": d.reason}


def publish(run, d: Decision, params: Params, paths: RungPaths) -> None:
    """Register the promoted checkpoint (once) and move its aliases; fills in d's registry fields. The weights are
    uploaded first; then, holding the registry's lease (registry/lease.py), the version is registered (or the one
    holding the same weights reused) and each alias read, compared with and moved, one promotion at a time."""
    from mmrec.registry import lease
    from mmrec.registry import models as registry
    from mmrec.tracking import run as track

    client = run.store.waiting()  # every registry call waits on a locked store
    name = d.registered_model = params.promote.registered_model
    tags = version_tags(client, run.id, d, params)
    metrics, scores = eval_outputs(paths)

    def log_model() -> str:
        return registry.log_model(run, paths.best, paths.tokenizer, metrics=track.test_metric_names(metrics),
                                  doc_scores=paths.doc_scores if scores is not None else None)

    logged = log_model() if registry.with_checkpoint(client, name, d.checkpoint_sha256) is None else None
    aliases = [registry.CHAMPION, d.rung]
    with lease.held(client, name, params.mlflow.lock_timeout_s):
        # again: a promote beside this one may have registered the same weights meanwhile (our logged model then
        # has no version, and goes with mmrec/pipeline/cleanup.py once this process has ended)
        version = registry.with_checkpoint(client, name, d.checkpoint_sha256)
        # what the aliases point at, read before anything is registered: a holder that claims per-document
        # scores it does not hold stops the promotion here
        current = {alias: registry.holder(client, name, alias) for alias in aliases}
        figures = {held["version"]: held_figure(client, name, held) for held in current.values()
                   if held is not None and held["version"] != version}
        if version is None:
            on = f" on {scores.describe()}" if scores is not None else ""
            where = f"dvc exp {d.dvc_exp_name}" if d.dvc_exp_name else "dvc repro"
            description = (f"{d.rung} ({tags['arch']}): test {d.test_bpb:.4f} bits/byte{on}, {d.reason}; "
                           f"{where} at {tags['git_commit'][:8]}, data {d.data_sha256[:12]}")
            version = registry.register(run, name, logged or log_model(), tags=tags | figure_tags(d),
                                        description=description)
            d.version_figure = f"v{version} registered with this figure{on}"
        else:
            registry.set_tags(client, name, version, tags)  # a rerun on the same weights: where it ran now
            d.version_figure = reuse_figure(client, name, version, d, scores, paths)
        d.model_version = version
        candidate = Figure(f"v{version}", d.test_bpb, d.metric, scores, d.data_sha256)
        outcomes = {alias: settle_alias(client, name, alias, version, candidate, current[alias], figures, params,
                                        d.rung) for alias in aliases}
        if d.dvc_exp_name:
            client.set_registered_model_alias(name, exp_alias(d.dvc_exp_name), version)
            outcomes[exp_alias(d.dvc_exp_name)] = AliasOutcome(Move.MOVED, "the experiment's own alias")
        d.aliases = {alias: str(outcome) for alias, outcome in outcomes.items()}
        record_champion(client, name, version, d, outcomes[registry.CHAMPION])


def reuse_figure(client, name: str, version: str, d: Decision, scores: DocScores | None, paths: RungPaths) -> str:
    """A rerun on a version's weights: whether the version takes this figure as its reference (it had none on the
    whole split, or lost the per-document scores it claims) or keeps its own; in words for promotion.json."""
    from mmrec.registry import models as registry

    held = registry.version_figure(client, client.get_model_version(name, version))
    on = f" on {scores.describe()}" if scores is not None else ""
    lost = ""
    if scores is not None and scores.whole_split and held["docs_sha256"]:
        lost = check_stored(client, name, held)[1]
    if scores is not None and scores.whole_split and (lost or not held["whole_split"]):
        registry.keep_doc_scores(client, name, version, paths.doc_scores, figure_tags(d))  # the scores, then tags
        return f"v{version} takes this figure{on} as its reference" + (f", in place of the one it lost ({lost})"
                                                                         if lost else "")
    # a subset never replaces a version's figure, nor one whole split another
    kept = "none" if held["test_bpb"] is None else f"{held['metric']} {held['test_bpb']:.4f}"
    return (f"v{version} keeps its reference figure ({kept}{', the whole test split' if held['whole_split'] else ''}); "
            f"this one{on} is in promotion.json only")


def settle_alias(client, name: str, alias: str, version: str, candidate: Figure, current: dict[str, Any] | None,
                 figures: dict[str, Figure], params: Params, rung: str) -> AliasOutcome:
    """Compare the candidate with the version `alias` points at (`current`, its figure in `figures`) by
    alias_rule, and move the alias if it wins. The caller holds the registry's lease: nothing moves it meanwhile."""
    from mmrec.procs import user
    from mmrec.registry import models as registry

    if current is not None and current["version"] == version:
        return AliasOutcome(Move.KEPT, f"v{version} is {alias} already", over=version)
    held = None if current is None else figures[current["version"]]
    moved, why, verdict = alias_rule(alias, candidate, held, params.promote, params.seed)
    if moved and alias == registry.CHAMPION:
        registry.move_champion(client, name, version, f"{user()} via promote@{rung}", why)
    elif moved:
        client.set_registered_model_alias(name, alias, version)
    return AliasOutcome(Move.MOVED if moved else Move.STAYED, why, verdict, current["version"] if current else "")


def record_champion(client, name: str, version: str, d: Decision, champion: AliasOutcome) -> None:
    """d's champion fields; on the version, the decision and the comparison that decided champion for it (the
    gate's when no version held champion to compare with)."""
    from mmrec.registry import models as registry

    d.champion = champion.move is not Move.STAYED
    d.champion_reason = str(champion)
    shown = gain_tags("", d.gain, d.gain_low, d.gain_high, d.confidence) | {"gain_over": d.compared_to}
    verdict = champion.verdict
    if verdict is not None and verdict.gain is not None:
        g = verdict.interval
        d.champion_gain = verdict.gain
        d.champion_gain_low, d.champion_gain_high = (g.low, g.high) if g else (None, None)
        shown = gain_tags("", verdict.gain, d.champion_gain_low, d.champion_gain_high,
                          g.confidence if g else None) | {"gain_over": f"v{champion.over}"}
    tags = {"champion.decision": d.champion_reason}
    if champion.move is not Move.KEPT:  # a fixed-margin figure has no interval: clear the one shown before
        tags = dict.fromkeys(["gain", "gain_low", "gain_high", "confidence"], "") | shown | tags
    registry.set_tags(client, name, version, tags)
