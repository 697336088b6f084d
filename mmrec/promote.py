"""The promotion gate, and which registry aliases a promoted rung moves.

The gate reads only DVC-tracked files (the rung's eval metrics, its ancestors' promotion.json), never
"the latest MLflow run": a stage that DVC restores from its cache creates no run. A rung must beat its
nearest *promoted* ancestor by promote.min_improvement (a rejected rung is never a reference), or the
unigram baseline by promote.baseline_margin when no ancestor was promoted.

A promoted rung is registered (once per checkpoint), but `champion` and the rung's own alias move
only when its test bits per byte beat their current version's on the same test split. A version
from `dvc exp run` also gets `exp-<name>`, which always moves.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmrec.config import Params, PromoteParams
from mmrec.errors import UserError
from mmrec.files import load_json, sha256_file, write_json
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
    test_bpb: float  # the value of `metric`, the gate's number
    compared_to: str  # "unigram" or the nearest promoted ancestor
    reference_bpb: float
    threshold_bpb: float
    passed_over: list[str] = field(default_factory=list)  # rejected ancestors between the rung and its reference
    checkpoint_sha256: str = ""
    data_sha256: str = ""  # the tokens the test split comes from: bits per byte compare only on equal ones
    dvc_exp_name: str = ""
    run_id: str = ""
    registered_model: str = ""
    model_version: str = ""
    champion: bool = False  # whether `champion` points at this version after the decision
    champion_reason: str = ""
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> "moved: why" / "stayed: why" / "kept: ..."
    metric: str = GATE_METRIC


def reference(params: Params, rung: str, root: Path) -> tuple[str | None, float | None, list[str]]:
    """The nearest promoted ancestor and its test bits per byte, and the rejected ancestors passed on the way."""
    passed = []
    ancestor = params.rung(rung).parent
    while ancestor:
        promo = load_json(RungPaths(root, ancestor).promotion, f"promote@{ancestor}")
        if promo["promoted"]:
            return ancestor, promo["test_bpb"], passed
        passed.append(ancestor)
        ancestor = params.rung(ancestor).parent
    return None, None, passed


def decide(params: Params, rung: str, root: Path = Path(".")) -> Decision:
    """Promote when GATE_METRIC (test bits/byte, full context) beats the nearest promoted ancestor by
    promote.min_improvement (none: the unigram baseline by promote.baseline_margin), and stays under
    promote.max_bpb when that is set."""
    p = params.promote
    metrics = load_json(RungPaths(root, rung).eval_metrics, f"evaluate@{rung}")
    bpb = metrics[GATE_METRIC]
    ref_rung, ref, passed = reference(params, rung, root)
    if ref_rung is not None:
        threshold, what = ref - p.min_improvement, f"{ref_rung} ({ref:.4f}) - min_improvement {p.min_improvement}"
    else:
        ref = metrics["unigram_bpb"]
        threshold, what = ref - p.baseline_margin, f"unigram baseline ({ref:.4f}) - baseline_margin {p.baseline_margin}"
    if passed:
        what += f" (not promoted, so no reference: {', '.join(passed)})"
    if bpb > threshold:
        promoted, reason = False, f"{GATE_METRIC} {bpb:.4f} missed {what} = {threshold:.4f} by {bpb - threshold:.4f}"
    elif p.max_bpb and bpb > p.max_bpb:
        promoted, reason = False, f"{GATE_METRIC} {bpb:.4f} is above promote.max_bpb {p.max_bpb} by {bpb - p.max_bpb:.4f}"
    else:
        promoted, reason = True, f"{GATE_METRIC} {bpb:.4f} <= {what} = {threshold:.4f}"
        if p.max_bpb:
            reason += f" and <= max_bpb {p.max_bpb}"
    return Decision(rung, promoted, reason, bpb, ref_rung or "unigram", ref, threshold, passed)


def alias_rule(alias: str, bpb: float, data_sha256: str, current: dict[str, Any] | None,
               p: PromoteParams) -> tuple[bool, str]:
    """Whether a promoted version takes `alias` from `current` (its version, test_bpb, data_sha256), and why."""
    if current is None:
        return True, f"{alias} pointed at no version"
    v, ref = current["version"], current["test_bpb"]
    if current["data_sha256"] != data_sha256 or ref is None:
        if p.force_champion:
            return True, f"v{v} was measured on another test split; moved anyway (promote.force_champion)"
        return False, (f"v{v} was measured on another test split (data {current['data_sha256'][:12] or '?'}, "
                       f"this one {data_sha256[:12]}): bits per byte do not compare; "
                       f"set promote.force_champion: true to move it")
    gain = ref - bpb
    if gain > 0 and gain >= p.min_improvement:
        return True, f"test_bpb {bpb:.4f} beats v{v} ({ref:.4f}) by {gain:.4f} >= min_improvement {p.min_improvement}"
    return False, f"test_bpb {bpb:.4f} does not beat v{v} ({ref:.4f}) by min_improvement {p.min_improvement}"


def exp_alias(name: str) -> str:
    return "exp-" + re.sub(r"[^\w-]", "-", name)[:200]


def check_checkpoint(paths: RungPaths, header: dict[str, Any], run_id: str, seq_len: int) -> str:
    """Load best.pt the way the served model will (weights only) and score one test window, so that a torn,
    foreign or mismatched checkpoint stops the stage before the registry is touched. Returns its sha256."""
    import torch

    from mmrec.inference import load_model, score
    from mmrec.tokenizer import load_tokens

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
    from mmrec import track
    from mmrec.store import faults_as_errors
    from mmrec.tokenizer import read_header

    paths = RungPaths(root, rung)
    run_id = track.read_run_id(paths.model())
    header = read_header(paths.tokens)
    sha = check_checkpoint(paths, header, run_id, params.train.seq_len)  # before anything touches MLflow
    d = decide(params, rung, root)
    d.run_id, d.checkpoint_sha256, d.data_sha256 = run_id, sha, header["data_sha256"]
    d.dvc_exp_name = os.environ.get("DVC_EXP_NAME", "")
    run = track.Run.resume(params.mlflow, run_id, rung, {"rung": rung})
    with track.closed_on_failure(run), faults_as_errors(run.store.uri):
        if d.promoted:
            publish(run, d, params, paths)
        run.set_tags({"promote.decision": "promoted" if d.promoted else "rejected", "promote.reason": d.reason,
                      "promote.threshold_bpb": d.threshold_bpb, "promote.model_version": d.model_version,
                      "promote.champion": d.champion, "promote.champion_reason": d.champion_reason})
        run.end()
    write_json(paths.promotion, asdict(d))
    # the child's dependency: only the verdict and the weights, never a threshold or a reason
    write_json(paths.handoff(), {"rung": rung, "promoted": d.promoted, "checkpoint_sha256": sha})
    if not d.promoted and params.promote.on_reject == "fail":
        raise Rejected(f"{rung} not promoted: {d.reason} (set promote.on_reject: continue to go on anyway)")
    return d


def publish(run, d: Decision, params: Params, paths: RungPaths) -> None:
    """Register the promoted checkpoint (once) and move its aliases; fills in d's registry fields."""
    from mmrec import registry, track

    p, c, rung = params.promote, run.store.waiting(), d.rung  # every registry call waits on a locked store
    name = d.registered_model = p.registered_model
    run_tags = c.get_run(run.id).data.tags
    tags = {"rung": rung, "test_bpb": repr(d.test_bpb), "gate_metric": d.metric, "dvc_exp_name": d.dvc_exp_name,
            "git_commit": run_tags.get("git_commit", ""), "data_sha256": d.data_sha256,
            "tokenizer_sha256": run_tags.get("tokenizer_sha256", ""),
            "params_hash": run_tags.get("params_hash", params.digest()), "checkpoint_sha256": d.checkpoint_sha256,
            "arch": run_tags.get("arch", params.model.arch), "promote.reason": d.reason}
    metrics = load_json(paths.eval_metrics, f"evaluate@{rung}")
    with registry.locked(c.tracking_uri):
        version = registry.with_checkpoint(c, name, d.checkpoint_sha256)
        if version is None:
            where = f"dvc exp {d.dvc_exp_name}" if d.dvc_exp_name else "dvc repro"
            description = (f"{rung} ({tags['arch']}): test {d.test_bpb:.4f} bits/byte, {d.reason}; "
                           f"{where} at {tags['git_commit'][:8]}, data {d.data_sha256[:12]}")
            version = registry.register(run, name, paths.best, paths.tokenizer, tags=tags, description=description,
                                        metrics=track.test_metric_names(metrics))
        else:
            registry.set_tags(c, name, version, tags)  # a rerun on the same weights: the latest measurement
        d.model_version = version
        for alias in [registry.CHAMPION, rung]:
            current = registry.holder(c, name, alias)
            if current is not None and current["version"] == version:
                d.aliases[alias] = f"kept: v{version} is {alias} already"
                continue
            moved, why = alias_rule(alias, d.test_bpb, d.data_sha256, current, p)
            if moved and alias == registry.CHAMPION:
                registry.move_champion(c, name, version, f"{registry.who()} via promote@{rung}", why)
            elif moved:
                c.set_registered_model_alias(name, alias, version)
            d.aliases[alias] = f"{'moved' if moved else 'stayed'}: {why}"
        if d.dvc_exp_name:
            alias = exp_alias(d.dvc_exp_name)
            c.set_registered_model_alias(name, alias, version)
            d.aliases[alias] = "moved: the experiment's own alias"
        d.champion = not d.aliases[registry.CHAMPION].startswith("stayed")
        d.champion_reason = d.aliases[registry.CHAMPION]
        registry.set_tags(c, name, version, {"champion.decision": d.champion_reason})


