"""The model registry: promoted checkpoints as pyfunc text generators, their versions, tags and aliases.

    python -m mmrec.registry list                                   # every version side by side
    python -m mmrec.registry set-champion 3 --reason "v4 repeats itself"
    python -m mmrec.registry rollback --reason "undo"               # champion back to the one it replaced
    python -m mmrec.registry export champion out/                   # safetensors, config, tokenizer, card (export.py)

A version stores best.pt, the tokenizer and the few mmrec modules the model imports, once: the pyfunc
wrapper holds no weights and reads them in load_context through the weights-only loader.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from mmrec.errors import UserError, exits_cleanly
from mmrec.paths import CHAMPION, GATE_METRIC, GATE_METRIC_NAME
from mmrec.sources import PACKAGE, closure, module_file, with_parents

# predict's params: default, lowest and highest allowed value. The signature carries the defaults;
# predict checks the range, so a served model answers HTTP 400 naming the param.
GENERATION: dict[str, tuple[int | float, int | float, int | float]] = {
    "max_new_tokens": (40, 1, 2048),
    "temperature": (0.0, 0.0, 10.0),  # 0: greedy
    "top_k": (0, 0, 65535),  # 0: every token
    "seed": (0, 0, 2**32 - 1),  # sampling is reproducible: prompt i draws from seed + i
}
DEFAULTS = {name: spec[0] for name, spec in GENERATION.items()}


def generation_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """The params of one predict call, defaults filled in; an out-of-range value raises INVALID_PARAMETER_VALUE."""
    out = {}
    for name, (default, lo, hi) in GENERATION.items():
        value = (params or {}).get(name)
        value = default if value is None else value
        kind = type(default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
        if not ok or (kind is int and value != int(value)):
            what = "an integer" if kind is int else "a number"
            raise MlflowException(f"param {name} = {value!r}: must be {what} in [{lo}, {hi}]", INVALID_PARAMETER_VALUE)
        out[name] = kind(value)
    return out


class MMRecPyfunc(mlflow.pyfunc.PythonModel):
    """`models:/<name>@champion` as a text generator: a list of prompts in, each continued out. Params:
    max_new_tokens (40), temperature (0: greedy), top_k (0: off), seed; generation stops early at EOS."""

    def load_context(self, context) -> None:
        import sentencepiece as spm

        from mmrec.model.inference import load_model

        self.model, _ = load_model(context.artifacts["checkpoint"])  # weights only: a planted pickle never runs
        self.sp = spm.SentencePieceProcessor(model_file=context.artifacts["tokenizer"])

    def __getstate__(self) -> dict:
        return {}  # mlflow tries the model on the input example, then pickles it: keep the weights out

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        import torch

        from mmrec.model.inference import generate

        p = generation_params(params)
        out = []
        for i, prompt in enumerate(model_input):
            ids = self.sp.encode(prompt)
            new = generate(self.model, ids, p["max_new_tokens"], greedy=p["temperature"] == 0,
                           temperature=p["temperature"] or 1.0, top_k=p["top_k"],
                           generator=torch.Generator().manual_seed(p["seed"] + i), eos_id=self.sp.eos_id())
            out.append(self.sp.decode(ids + new))
        return out


def served_modules() -> set[str]:
    """The mmrec modules a served model imports: this module, the inference one, and what their top-level
    imports pull in (the deferred ones of the pipeline never run in a served model)."""
    here = Path(__file__)
    return {"mmrec.registry.models", "mmrec.model.inference",
            *closure(here, top_level_only=True), *closure(PACKAGE / "model/inference.py", top_level_only=True)}


def log_model(run, checkpoint: Path, tokenizer: Path, *, metrics: dict[str, float],
              doc_scores: Path | None) -> str:
    """Log the checkpoint as a pyfunc model of `run` carrying `metrics` and, beside its MLmodel, the per-document
    scores (DOC_SCORES): everything a version claims is stored before any version exists. Returns its model id."""
    from mmrec.procs import owner
    from mmrec.tracking.store import fluent_store
    from mmrec.tracking.run import OWNER_TAG

    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)  # the pickled wrapper is stateless: no warning
    logging.getLogger("mlflow.models.signature").setLevel(logging.WARNING)  # "running predict on the example"
    call = run.store.call  # each store call waits on a locked store, within mlflow.lock_timeout_s
    with fluent_store(run.client.tracking_uri), _served_code() as code:
        call(mlflow.start_run, run_id=run.id)  # the logged model belongs to the run
        try:
            info = call(
                mlflow.pyfunc.log_model, name="model", python_model=MMRecPyfunc(), code_paths=[str(code)],
                input_example=(["In the beginning"], DEFAULTS),  # input and params: the signature and its defaults
                artifacts={"checkpoint": str(checkpoint), "tokenizer": str(tokenizer)},
                pip_requirements=[f"{p}=={_version(p)}" for p in ("torch", "sentencepiece", "numpy", "pydantic")],
                tags={OWNER_TAG: owner()})  # a kill before it has a version leaves it to mmrec/pipeline/cleanup.py
            call(mlflow.log_metrics, metrics, model_id=info.model_id)
        finally:
            call(mlflow.end_run)
    if doc_scores is not None:
        call(_store_doc_scores, run.client, info.model_id, doc_scores)
    return info.model_id


def register(run, name: str, model_id: str, *, tags: dict[str, str], description: str) -> str:
    """Register a logged model as a new version of `name`, with `tags` (set as it is created) and a one-line
    `description`. Returns the version number."""
    from mmrec.tracking.store import fluent_store

    call = run.store.call
    with fluent_store(run.client.tracking_uri):
        # through models:/<model_id>, so the version knows its logged model and the model lists the version
        version = call(mlflow.register_model, f"models:/{model_id}", name, tags=tags | {"model_id": model_id}).version
    call(run.client.update_model_version, name, version, description=description)
    return str(version)


@contextlib.contextmanager
def _served_code() -> Iterator[Path]:
    """A temporary copy of the mmrec package holding only the modules a served model imports."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "mmrec"
        for module in ["mmrec", *sorted(with_parents(served_modules()))]:
            src = module_file(module)
            dst = code / src.relative_to(PACKAGE)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
        yield code


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def versions(client, name: str) -> list:
    """Every version of `name`, oldest first (none when the model is not registered)."""
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def with_checkpoint(client, name: str, sha256: str) -> str | None:
    """The version already holding a checkpoint with this sha256: a rerun reuses it instead of registering again."""
    return next((str(v.version) for v in versions(client, name) if v.tags.get("checkpoint_sha256") == sha256), None)


def holder(client, name: str, alias: str) -> dict[str, Any] | None:
    """The version `alias` points at, as version_figure describes it, or None."""
    try:
        v = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return version_figure(client, v)


def version_figure(client, v) -> dict[str, Any]:
    """A version's reference figure: its number, test bits per byte, the metric they are, the test split (data
    sha256), when it keeps per-document scores their document set and whether it is the whole split; its rung."""
    bpb, data, metric = v.tags.get("test_bpb"), v.tags.get("data_sha256", ""), v.tags.get("gate_metric", "")
    if (bpb is None or not metric) and v.run_id:  # registered before versions were tagged so: the run tells
        run = client.get_run(v.run_id).data
        if bpb is None:
            bpb, data = run.metrics.get("test/bpb", run.metrics.get("test_bpb")), run.tags.get("data_sha256", "")
        metric = metric or _legacy_metric(run.metrics, bpb)
    return {"version": str(v.version), "test_bpb": None if bpb is None else float(bpb), "data_sha256": data,
            "metric": metric or "test_bpb", "docs_sha256": v.tags.get("test_docs_sha256", ""),
            "whole_split": v.tags.get("test_whole_split") == "true", "rung": v.tags.get("rung", "")}


def _legacy_metric(run_metrics: dict[str, float], bpb: Any) -> str:
    """Which figure a version tagged before `gate_metric` holds: the full-context one when its run logged one
    equal to it, else the windowed test_bpb (the gate's figure before full-context evaluation existed)."""
    context = run_metrics.get(GATE_METRIC_NAME, run_metrics.get(GATE_METRIC))
    if context is not None and bpb is not None and abs(context - float(bpb)) < 1e-9:
        return GATE_METRIC
    return "test_bpb"


DOC_SCORES = "test_docs.json"  # a version's per-document test scores, in its logged model beside MLmodel


def _store_doc_scores(client, model_id: str, path: Path) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / DOC_SCORES
        shutil.copyfile(path, copy)
        client.log_model_artifact(model_id, str(copy))


def keep_doc_scores(client, name: str, version: str, path: Path, tags: dict[str, str]) -> None:
    """Give a version its reference figure: per-document scores (as DOC_SCORES in its logged model), then `tags`,
    which claim them."""
    _store_doc_scores(client, client.get_model_version(name, version).tags["model_id"], path)
    set_tags(client, name, version, tags)


class MissingScores(UserError):
    """A version claims per-document scores (its tag test_docs_sha256) that its logged model does not hold."""


def doc_scores(client, name: str, version: str) -> dict[str, Any]:
    """A version's per-document test scores as stored (see paired.DocScores). MissingScores when its logged model
    holds none or a damaged copy; a store that cannot be reached raises as such (never: "it has none")."""
    import json
    import tempfile

    model_id = client.get_model_version(name, version).tags.get("model_id")
    if not model_id:
        raise MissingScores(f"{name} v{version} names no logged model (tag model_id)")
    if DOC_SCORES not in {a.path for a in client.list_logged_model_artifacts(model_id)}:
        raise MissingScores(f"{name} v{version}'s logged model {model_id} holds no {DOC_SCORES}")
    location = client.get_logged_model(model_id).artifact_location
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{DOC_SCORES}", dst_path=tmp,
                                                    tracking_uri=client.tracking_uri)
        try:
            return json.loads(Path(local).read_text())
        except ValueError:
            raise MissingScores(f"{name} v{version}'s {DOC_SCORES} is not JSON (damaged?)") from None


def set_tags(client, name: str, version: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def move_champion(client, name: str, version: str, by: str, reason: str) -> None:
    """Point `champion` at `version`, recording on it who moved it, when, why and from which version."""
    previous = holder(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, version)
    tags = {"champion.set_by": by, "champion.set_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "champion.reason": reason}
    if previous is None or previous["version"] != version:  # re-setting the champion keeps what it replaced
        tags["champion.previous"] = previous["version"] if previous else ""
    set_tags(client, name, version, tags)


# The command line: list versions, move champion by hand.

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other user mistake
        raise UserError(f"{self.prog}: {message}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m mmrec.registry", description="The model registry: list, move champion, export.")
    p.add_argument("--model", help="registered model (default: params.yaml promote.registered_model)")
    p.add_argument("--tracking-uri", help="MLflow store (default: params.yaml mlflow.tracking_uri / MLFLOW_TRACKING_URI)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every version: rung, test bpb, its documents, its gain and interval over what it "
                                "was compared with, experiment, commit, aliases, created")
    s = sub.add_parser("set-champion", help="point champion at a version")
    s.add_argument("version")
    s.add_argument("--reason", required=True, help="why: kept as a tag on the version")
    r = sub.add_parser("rollback", help="point champion back at the version it replaced (or --to VERSION)")
    r.add_argument("--to", dest="version", help="this version instead")
    r.add_argument("--reason", required=True, help="why: kept as a tag on the version")
    e = sub.add_parser("export", help="a version as safetensors, config.json, tokenizer and model card in DIR")
    e.add_argument("source", help="an alias (champion), a version number, or a checkpoint file (models/mini/best.pt)")
    e.add_argument("dir", type=Path, help="the folder to write: new, empty, or an earlier export (replaced)")
    return p.parse_args(argv)


def table(client, name: str) -> str:
    import pandas as pd

    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():  # search omits them on versions
        aliases.setdefault(str(version), []).append(alias)
    rows = [{"version": str(v.version), "rung": v.tags.get("rung", "-"), "test_bpb": _number(v.tags.get("test_bpb")),
             "docs": _documents(v.tags), "gain": _number(v.tags.get("gain")), "interval": _interval(v.tags),
             "over": v.tags.get("gain_over") or "-", "experiment": v.tags.get("dvc_exp_name") or "-",
             "commit": v.tags.get("git_commit", "-")[:8],
             "aliases": ",".join(sorted(aliases.get(str(v.version), []))) or "-",
             "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(v.creation_timestamp / 1000))}
            for v in versions(client, name)]
    return pd.DataFrame(rows).to_string(index=False)


def _number(tag: str | None) -> str:
    return f"{float(tag):.4f}" if tag else "-"


def _documents(tags: dict[str, str]) -> str:
    """The test documents behind the figure: '55', '12*' on a subset (evaluate.max_tokens), '-' when not kept."""
    n = tags.get("test_documents")
    return "-" if not n else n if tags.get("test_whole_split") == "true" else f"{n}*"


def _interval(tags: dict[str, str]) -> str:
    """'[low,high]' of the gain at its confidence, '-' when it was compared by a fixed margin."""
    from mmrec.tracking.compare import interval_text

    low, high = tags.get("gain_low"), tags.get("gain_high")
    return interval_text(float(low), float(high)) if low and high else "-"


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mlflow import MlflowClient

    from mmrec.config import PARAMS_FILE, Params, load_params
    from mmrec.procs import user
    from mmrec.registry import lease
    from mmrec.tracking.store import store_settings

    if args.command == "export":  # export.py; a checkpoint file needs no store, an alias or a version opens it below
        from mmrec.registry.export import export, is_checkpoint_path

        if is_checkpoint_path(args.source):
            print(export(None, "", args.source, args.dir))
            return 0
    uri, _ = store_settings(args.tracking_uri, None)
    params = load_params() if PARAMS_FILE.exists() else Params()
    name = args.model or params.promote.registered_model
    client = MlflowClient(uri, uri)
    if args.command == "export":  # before the versions check, whose line says less
        print(export(client, name, args.source, args.dir))
        return 0
    known = versions(client, name)
    if not known:
        raise UserError(f"no versions of registered model {name!r} in {uri}; promote a rung first (dvc repro)")
    if args.command == "list":
        print(table(client, name))
        return 0
    numbers = [str(v.version) for v in known]
    with lease.held(client, name, params.mlflow.lock_timeout_s):  # no promote moves champion meanwhile
        current = holder(client, name, CHAMPION)
        target = args.version
        if target is None:  # rollback: the version the current champion replaced
            previous = current and client.get_model_version(name, current["version"]).tags.get("champion.previous")
            if not previous:
                raise UserError(f"{name}@{CHAMPION} records no earlier champion; use --to VERSION")
            target = previous
        if target not in numbers:
            raise UserError(f"{name} has no version {target!r}; it has: {', '.join(numbers)}")
        move_champion(client, name, target, f"{user()} via {args.command}", args.reason)
    was = f" (was v{current['version']})" if current else ""
    print(f"{name}@{CHAMPION} -> v{target}{was}: {args.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
