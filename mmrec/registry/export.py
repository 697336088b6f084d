"""`python -m mmrec.registry export <alias | version | checkpoint> DIR`: a model to take elsewhere, no pickle in it.

DIR gets model.safetensors (the weights), config.json (the architecture and where the weights come from),
tokenizer.model (SentencePiece) and README.md (a model card: figures, data digest, training params, intended use
and limits). `mmrec.model.inference.load_model(DIR)` loads it back, with the very logits of the checkpoint; the
export checks that before it takes DIR's place.

From the registry (an alias such as champion, or a version number) the checkpoint and tokenizer come from the
version's logged model and the figures from its tags and run; from a checkpoint file (models/mini/best.pt) the
tokenizer is the project's models/tokenizer/spm.model, which must be the one it was trained with, and the test
figures those of metrics/eval/<rung>.json when the file is a rung's best.pt.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mmrec.config import flatten
from mmrec.errors import UserError
from mmrec.files import load_json, replacing_dir, sha256_file
from mmrec.model import checkpoint
from mmrec.model.inference import load_model
from mmrec.model.lm import count_params
from mmrec.paths import GATE_METRIC, RungPaths

TOKENIZER_FILE, CARD = "tokenizer.model", "README.md"
EXPORT_FILES = {checkpoint.EXPORT_WEIGHTS, checkpoint.EXPORT_CONFIG, TOKENIZER_FILE, CARD}
# Params of the training that say nothing about the weights (where and how fast it ran), left off the card.
NOT_ON_CARD = {"threads", "nproc", "nnodes", "rdzv_endpoint", "device", "compile", "checkpoint_dir", "log_every"}


def is_checkpoint_path(source: str) -> bool:
    """A path names a file (a separator or a .pt suffix, or it exists); an alias or a version number does not."""
    return "/" in source or source.endswith(".pt") or Path(source).is_file()


def check_target(out: Path) -> None:
    """DIR must be a new folder, an empty one, or an earlier export (replaced whole): never a file, or a folder of
    other things that the export would delete."""
    if out.exists() and not out.is_dir():
        raise UserError(f"export folder {out} is a file; name a new folder")
    if out.is_dir() and any(out.iterdir()) and not set(p.name for p in out.iterdir()) <= EXPORT_FILES:
        raise UserError(f"export folder {out} holds other files; name a new or empty folder (an earlier export is "
                        "replaced)")


def from_registry(client: Any, name: str, source: str, tmp: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The checkpoint and tokenizer of a version (by alias or number), downloaded into tmp, and what the card says
    of it: its version, aliases, tags and the run's params and test figures."""
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        raise UserError(f"no registered model {name!r} in {client.tracking_uri}; promote a rung first (dvc repro), "
                        "or export a checkpoint file (models/<rung>/best.pt)") from None
    try:
        v = client.get_model_version(name, source) if source.isdigit() else \
            client.get_model_version_by_alias(name, source)
    except MlflowException:
        what = "version" if source.isdigit() else "alias"
        known = ", ".join(sorted(registered.aliases)) if what == "alias" else \
            ", ".join(str(x.version) for x in client.search_model_versions(f"name='{name}'"))
        raise UserError(f"{name} has no {what} {source!r}; it has: {known or 'none'} (or give a version number, "
                        "an alias or a checkpoint file)") from None
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(name, v.version), dst_path=str(tmp),
        tracking_uri=client.tracking_uri))
    files = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]["artifacts"]
    run = client.get_run(v.run_id).data if v.run_id else None
    aliases = sorted(a for a, ver in registered.aliases.items() if str(ver) == str(v.version))
    origin = {"registered_model": name, "version": str(v.version), "aliases": aliases, "tags": dict(v.tags),
              "source_params": dict(run.params) if run else {}, "test": _test_figures(run.metrics if run else {})}
    return local / files["checkpoint"]["path"], local / files["tokenizer"]["path"], origin


def _test_figures(metrics: dict[str, float]) -> dict[str, float]:
    """A run's test/* metrics under evaluate's keys (test/bpb_context -> test_bpb_context)."""
    return {("" if k.startswith("test/unigram") else "test_") + k.removeprefix("test/"): v
            for k, v in metrics.items() if k.startswith("test/")}


def from_checkpoint(path: Path, ckpt: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The tokenizer a checkpoint was trained with (the project's models/tokenizer/spm.model, of the checkpoint's
    project or the current one, checked by sha256) and, for a rung's best.pt, its test figures."""
    root = path.resolve().parents[2] if len(path.resolve().parents) > 2 else Path(".")
    rung = str(ckpt.get("rung", path.resolve().parent.name))
    candidates = [RungPaths(root, rung).tokenizer, RungPaths(Path("."), rung).tokenizer]
    want = ckpt.get("tokenizer_sha256")
    tokenizer = next((t for t in candidates if t.is_file() and (not want or sha256_file(t) == want)), None)
    if tokenizer is None:
        raise UserError(f"{path}: no tokenizer it was trained with (sha256 {str(want)[:12]}) in "
                        f"{' or '.join(sorted({str(c) for c in candidates}))}; export it from its project, or by "
                        "alias or version from the registry")
    origin: dict[str, Any] = {"checkpoint_file": str(path), "tags": {}, "source_params": {}, "test": {}}
    paths = RungPaths(root, rung)
    if paths.best.resolve() == path.resolve() and paths.eval_metrics.is_file():
        origin["test"] = load_json(paths.eval_metrics, f"evaluate@{rung}")
    return tokenizer, origin


def export(client: Any, name: str, source: str, out: Path) -> str:
    """Write `source` (an alias, a version number or a checkpoint file) into `out`; returns the line to print."""
    check_target(out)
    with tempfile.TemporaryDirectory() as tmp:
        if is_checkpoint_path(source):
            ckpt_path = Path(source)
            model, ckpt = load_model(ckpt_path)
            tokenizer, origin = from_checkpoint(ckpt_path, ckpt)
        else:
            ckpt_path, tokenizer, origin = from_registry(client, name, source, Path(tmp))
            model, ckpt = load_model(ckpt_path, "the version's checkpoint is damaged; export another version")
        meta = {"config": ckpt["config"], "weights": checkpoint.EXPORT_WEIGHTS, "tokenizer": TOKENIZER_FILE,
                "tokenizer_sha256": sha256_file(tokenizer), "checkpoint_sha256": sha256_file(ckpt_path),
                "rung": ckpt.get("rung", ""), "source": {k: v for k, v in origin.items() if k in (
                    "registered_model", "version", "aliases", "checkpoint_file")}}
        try:
            with replacing_dir(out) as build:
                checkpoint.save_export(model, meta, build)
                shutil.copyfile(tokenizer, build / TOKENIZER_FILE)
                (build / CARD).write_text(model_card(model, ckpt, meta, origin), encoding="utf-8")
                same_logits(model, build)
        except OSError as err:  # no permission, a file where a parent folder should be, a full disk
            raise UserError(f"cannot write export folder {out}: {err.strerror or err}; name a folder you can "
                            "write") from None
    what = f"{origin['registered_model']} v{origin['version']}" if "version" in origin else str(ckpt_path)
    return f"exported {what} to {out}: {', '.join(sorted(EXPORT_FILES))}"


def same_logits(model: torch.nn.Module, folder: Path) -> None:
    """The export loads back into the very same function: equal logits on a fixed window of tokens."""
    back, _ = load_model(folder)
    x = torch.arange(min(64, max(2, model.cfg.seq_len or 64)))[None] % model.cfg.vocab_size
    with torch.no_grad():
        if not torch.equal(model(x).logits, back(x).logits):
            raise UserError(f"{folder}: the exported weights give other logits than the checkpoint's (a bug: please "
                            "report it)")


def _rows(pairs: list[tuple[str, Any]]) -> str:
    return "".join(f"| {k} | {v} |\n" for k, v in pairs)


def model_card(model: torch.nn.Module, ckpt: dict[str, Any], meta: dict[str, Any], origin: dict[str, Any]) -> str:
    """README.md of an export: what the model is, its figures, its data and training, how to load it, its limits."""
    cfg, tags, test = model.cfg, origin["tags"], origin["test"]
    progress = ckpt.get("progress", {})
    inputs = ckpt.get("fingerprint_inputs", {})
    params = inputs.get("params", {})
    n = count_params(model)
    rung = meta["rung"] or tags.get("rung", "")
    title = " ".join(filter(None, ["mmrec", rung, f"({cfg.arch}, {n / 1e6:.2f}M parameters)"]))
    gate = test.get(GATE_METRIC, tags.get("test_bpb"))
    figures = [("test bits per byte, full context (the gate's figure)", _fmt(gate)),
               ("test bits per byte, seq_len windows", _fmt(test.get("test_bpb"))),
               ("test documents", _int(test.get("test_documents", tags.get("test_documents")))),
               ("unigram baseline, bits per byte", _fmt(test.get("unigram_bpb"))),
               ("best validation loss (nats / token)", _fmt(progress.get("best_val"))),
               ("steps, tokens trained", f"{_int(progress.get('step'))}, {_int(progress.get('tokens'))}")]
    if tags.get("gain"):
        interval = f" [{_fmt(tags.get('gain_low'))}, {_fmt(tags.get('gain_high'))}]" if tags.get("gain_low") else ""
        confidence = f"{float(tags['confidence']):.0%} interval" if tags.get("confidence") else "no interval"
        figures.append((f"gain over {tags.get('gain_over', '-')} (bits per byte, {confidence})",
                        f"{_fmt(tags['gain'])}{interval}"))
    data_sha = inputs.get("data") or tags.get("data_sha256", "")
    data = [("source", origin["source_params"].get("data.source", "- (not recorded in a checkpoint file)")),
            ("token files sha256 (data_sha256)", data_sha or "-"),
            ("tokenizer sha256", meta["tokenizer_sha256"]),
            ("vocabulary", cfg.vocab_size)]
    trained = {k: v for k, v in flatten({"seed": params.get("seed"), "rung": params.get("rung", {}),
                                         "model": params.get("model", {}), "train": params.get("train", {})}).items()
               if v is not None and k.split(".")[-1] not in NOT_ON_CARD}
    provenance = [(k, v) for k, v in [
        ("registered model", origin.get("registered_model")), ("version", origin.get("version")),
        ("aliases", ", ".join(origin.get("aliases", [])) or None), ("checkpoint file", origin.get("checkpoint_file")),
        ("checkpoint sha256", meta["checkpoint_sha256"]), ("MLflow run", ckpt.get("run_id") or None),
        ("git commit", tags.get("git_commit")), ("exported", time.strftime("%Y-%m-%d %H:%M:%S %Z"))] if v]
    arch = ("MM-Rec: a gated linear recurrence with multi-timescale memories (docs/model.md in the mmrec repository)"
            if cfg.arch == "mmrec" else "a GPT baseline (causal attention, rotary positions)")
    return "\n".join([
        f"# {title}\n",
        f"A small language model, {arch}, trained by the mmrec pipeline (DVC + MLflow). Width {cfg.width}, "
        f"{cfg.layers} layers, {cfg.memories} memories, {cfg.vocab_size} SentencePiece pieces"
        + (f", trained on {cfg.seq_len}-token windows." if cfg.seq_len else "."),
        "\n## Files\n",
        "| file | what |\n| --- | --- |\n" + _rows([
            (checkpoint.EXPORT_WEIGHTS, "the weights (safetensors: tensors and a JSON header, no pickle); the "
                                        "embedding and the output head are one tensor, stored once: the header's "
                                        "metadata names the alias"),
            (checkpoint.EXPORT_CONFIG, "the architecture (`config`) and where the weights come from"),
            (TOKENIZER_FILE, "the SentencePiece tokenizer it was trained with"),
            (CARD, "this card")]),
        "## Use\n",
        "```python\nfrom mmrec.data.tokenizer import load_tokenizer\nfrom mmrec.model.inference import generate, "
        "load_model\n\nmodel, config = load_model(\"path/to/this/folder\")\n"
        "sp = load_tokenizer(\"path/to/this/folder/tokenizer.model\")\n"
        "ids = sp.encode(\"In the beginning\")\n"
        "print(sp.decode(ids + generate(model, ids, 40, temperature=0.8, top_k=50, eos_id=sp.eos_id())))\n```\n",
        "The model code is the mmrec package (mmrec/model/lm.py); the weights' names are its state_dict's. "
        "Elsewhere, `safetensors.torch.load_file(\"model.safetensors\")` gives the tensors.\n",
        "## Figures\n",
        "| figure | value |\n| --- | ---: |\n" + _rows(figures),
        "Bits per byte: the test split's bits under the model over its UTF-8 bytes, comparable across tokenizers. "
        "The test split is held out of the same corpus as the training text.\n",
        "## Data\n",
        "| | |\n| --- | --- |\n" + _rows(data),
        "## Training params\n",
        ("| param | value |\n| --- | --- |\n" + _rows(sorted(trained.items()))) if trained else
        "Not recorded in this checkpoint.\n",
        "## Intended use and limits\n",
        "- For research and teaching: studying small recurrent language models, the pipeline that trains them, and "
        "function-preserving growth. Not for production or for any decision about people.\n"
        "- It models the text it was trained on and nothing else: its style, language and era. Outside that text "
        "it is far worse than its test figure, which was measured on held-out documents of the same corpus.\n"
        "- It is small and was trained briefly: it repeats itself and invents fluent nonsense. It states no facts "
        "reliably, follows no instructions and has had no safety tuning; it reproduces whatever biases its "
        "corpus holds.\n"
        "- Its license is that of its training text and of the mmrec code; check both before passing it on.\n",
        "## Provenance\n",
        "| | |\n| --- | --- |\n" + _rows(provenance)])


def _int(value: Any) -> str:
    try:
        return f"{int(float(value)):,}"
    except (TypeError, ValueError):
        return "-"


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return "-"
