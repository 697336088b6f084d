"""The report stage: what a pipeline execution produced and whether it is any good, on one page.

reports/report.md, read top to bottom: the headline, the ladder's losses with its growth points and the test bits
per byte beside the baselines (two pictures), then the tables: each rung's training and its test figures and gate,
the baselines on the same test text, the corpus, the tokenizer and the machine. Every figure is read from a file
another stage wrote (the stage's DVC deps), except the compressor baselines, which it computes: xz and zstd
conditioned on the train split (`compressor_baselines`). The same page, with its pictures, is an artifact of the
pipeline's parent run in MLflow (tracking/pipeline_run.py: log_report).
"""
from __future__ import annotations

import csv
import lzma
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from mmrec.config import Params
from mmrec.errors import UserError
from mmrec.files import dvc_fix, load_json, replacing_dir
from mmrec.paths import GATE_METRIC, METRICS, PREPARED, REPORT, SPLITS, RungPaths
from mmrec.tracking.compare import interval_text
from mmrec.tracking.plots import bpb_bars, ladder_curves

# The compressors see at most this much text: the train split's last CONTEXT_BYTES as what they are conditioned on,
# the test split's first TEST_BYTES as what they compress, so the stage takes seconds whatever the corpus. Each
# compresses the context twice (with and without the test text): on the default corpus (3.7 MB of train) that took
# 3.1 CPU-seconds for xz, 2.6 for zstd, each time; 8 MB took 6.2 and 2.7. zstd -19 looks back 8 MiB, about
# CONTEXT_BYTES: it can use all of the context it is given.
CONTEXT_BYTES = 8_000_000
TEST_BYTES = 8_000_000
LOSS_CURVES, TEST_BPB = "loss_curves.png", "test_bpb.png"


def xz(data: bytes) -> int:
    """Compressed size with xz -9 (-9e: the same size within 0.01 % on 4 MB of the default corpus, in 2.3 times the
    time)."""
    return len(lzma.compress(data, preset=9))


def zstd(data: bytes) -> int:
    """Compressed size with zstd -19 (pyarrow's, a pinned requirement already)."""
    import pyarrow as pa

    return len(pa.Codec("zstd", compression_level=19).compress(data, asbytes=True))


COMPRESSORS: dict[str, Callable[[bytes], int]] = {"xz -9": xz, "zstd -19": zstd}


def head_lines(path: Path, limit: int) -> bytes:
    """The file's whole lines (documents) within its first `limit` bytes."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data if len(data) <= limit else data[:data.rfind(b"\n", 0, limit) + 1]


def tail_lines(path: Path, limit: int) -> bytes:
    """The file's whole lines (documents) within its last `limit` bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - limit))
        data = f.read()
    return data if size <= limit else data[data.find(b"\n") + 1:]


def compressor_baselines(prepared: Path = PREPARED, context_bytes: int = CONTEXT_BYTES,
                         test_bytes: int = TEST_BYTES) -> dict[str, Any]:
    """Bits per test byte of general-purpose compressors that know the train split: the size of train + test
    compressed minus the size of train compressed alone, over the test documents' bytes (the split files hold one
    document a line: the newlines are encoded, as the model predicts each document's end, but not counted, as the
    model's denominator does not count them; with data.keep_layout a document's own newlines are escaped there,
    two bytes each). Each compression runs in its own thread (both release the GIL)."""
    for split in ("train", "test"):
        if not (prepared / f"{split}.txt").is_file():
            raise UserError(f"{prepared / f'{split}.txt'} is missing; {dvc_fix('download')}")
    context = tail_lines(prepared / "train.txt", context_bytes)
    test = head_lines(prepared / "test.txt", test_bytes)
    text_bytes = len(test) - test.count(b"\n")
    if not text_bytes:
        raise UserError(f"{prepared / 'test.txt'}: no document within its first {test_bytes} bytes")
    jobs = [(name, data) for name in COMPRESSORS for data in (context + test, context)]
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        sizes = list(pool.map(lambda job: COMPRESSORS[job[0]](job[1]), jobs))
    bpb = {name: 8 * (sizes[2 * i] - sizes[2 * i + 1]) / text_bytes for i, name in enumerate(COMPRESSORS)}
    whole = (prepared / "test.txt").stat().st_size == len(test)
    return {"bpb": bpb, "context_bytes": len(context), "test_bytes": text_bytes, "test_documents": test.count(b"\n"),
            "whole_test": whole, "train_bytes": (prepared / "train.txt").stat().st_size}


def read_curve(path: Path, column: str, stage: str) -> list[tuple[int, float]]:
    try:
        with open(path, newline="") as f:
            return [(int(row["step"]), float(row[column])) for row in csv.DictReader(f)]
    except FileNotFoundError:
        raise UserError(f"{path} is missing; run `dvc repro {stage}` first") from None
    except (KeyError, ValueError, TypeError):
        raise UserError(f"{path}: not a curve of step,{column} (damaged?); {dvc_fix(stage)}") from None


def read_rungs(params: Params, root: Path = Path(".")) -> list[dict[str, Any]]:
    """Each rung of the ladder, in order, with what its stages wrote: training figures, wall clock, test figures,
    the gate's decision and both curves."""
    rungs = []
    for name, rung in params.ladder.items():
        p = RungPaths(root, name)
        train, evaluate, promote = f"train@{name}", f"evaluate@{name}", f"promote@{name}"
        rungs.append({"name": name, "parent": rung.parent, "train": load_json(p.metrics, train),
                      "speed": load_json(p.speed, train), "eval": load_json(p.eval_metrics, evaluate),
                      "eval_speed": load_json(p.eval_speed, evaluate),
                      "promotion": load_json(p.promotion, promote),
                      "train_curve": read_curve(p.train_curve, "train_loss", train),
                      "val_curve": read_curve(p.val_curve, "val_loss", train)})
    return rungs


def eval_time(rung: dict[str, Any]) -> str:
    """evaluate's seconds and its speed as a multiple of the rung's training tokens/s."""
    e, t = rung["eval_speed"], rung["speed"]["tokens_per_s"]
    return f"{e['seconds']:.1f} s ({e['model_tokens_per_s'] / t:.1f}x)" if t else f"{e['seconds']:.1f} s"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment() -> dict[str, str]:
    """The machine and code that wrote the report."""
    import torch

    from mmrec.tracking.context import git_commit

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"CPU": cpu_model(), "cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()),
            "GPU": gpu, "torch": torch.__version__, "python": platform.python_version(), "git commit": git_commit(),
            "written": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# Rendering: every figure goes through one of these, so a test can read it back the same way.

def num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def count(value: int | float | None) -> str:
    return "-" if value is None else f"{int(value):,}"


def table(header: list[str], rows: list[list[str]], text_from: int | None = None) -> str:
    """A markdown table: the first column names the row, figures follow (right-aligned), from column `text_from`
    on text (left-aligned)."""
    text_from = len(header) if text_from is None else text_from
    rule = ["---" if i == 0 or i >= text_from else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *rows]) + "\n"


def gain(promo: dict[str, Any]) -> str:
    """The gate's gain and its interval, '0.0183 [0.0157,0.0211]' (the interval '-' for a fixed margin)."""
    return f"{num(promo.get('gain'))} {interval_text(promo.get('gain_low'), promo.get('gain_high'))}"


def decision(promo: dict[str, Any]) -> str:
    if not promo.get("promoted"):
        return "rejected"
    version = f"v{promo['model_version']}" if promo.get("model_version") else ""
    return " ".join(filter(None, ["promoted", version, "(champion)" if promo.get("champion") else ""]))


def render(rungs: list[dict[str, Any]], corpus: dict[str, Any], tokenizer: dict[str, Any],
           baselines: dict[str, Any], env: dict[str, str], source: str) -> str:
    """The page, top to bottom: headline, pictures, rungs, baselines, corpus, tokenizer, environment."""
    best = min(rungs, key=lambda r: r["eval"][GATE_METRIC])
    champions = [r for r in rungs if r["promotion"].get("champion")]
    unigram = rungs[0]["eval"]["unigram_bpb"]
    compressors = ", ".join(f"{name} {num(v)}" for name, v in baselines["bpb"].items())
    context = (f"the whole train split, {count(baselines['context_bytes'])} bytes"
               if baselines["context_bytes"] == baselines["train_bytes"]
               else f"the train split's last {count(baselines['context_bytes'])} bytes")
    out = ["# Pipeline report\n",
           f"**{best['name']}** reaches **{num(best['eval'][GATE_METRIC])}** bits per test byte with full context "
           f"(unigram {num(unigram)}, {compressors} conditioned on the train split); "
           + (f"`champion` is v{champions[-1]['promotion']['model_version']} ({champions[-1]['name']})."
              if champions else f"no rung of this run moved `champion` (for {rungs[-1]['name']}, it "
                                f"{rungs[-1]['promotion'].get('aliases', {}).get('champion', 'stayed')}).") + "\n",
           f"![loss curves of every rung]({LOSS_CURVES})\n",
           f"![test bits per byte of every rung and the baselines]({TEST_BPB})\n",
           "## Rungs: training\n",
           table(["rung", "grown from", "params", "steps", "tokens", "wall time", "tokens/s", "MFU", "best val loss"],
                 [[r["name"], r["parent"] or "-", count(r["train"]["n_params"]), count(r["train"]["steps"]),
                   count(r["train"]["tokens_seen"]),
                   f"{r['speed']['seconds']:.1f} s" if "seconds" in r["speed"] else "-",
                   count(round(r["speed"]["tokens_per_s"])), f"{100 * r['speed']['mfu']:.2f} %",
                   num(r["train"]["best_val_loss"])] for r in rungs]),
           "Wall time runs from the rung's MLflow run start to its outputs (evaluations and, for a resumed rung, the "
           "pause between attempts included); tokens/s and MFU are medians over its training steps, on the machine "
           "that trained it.\n",
           "## Rungs: test and gate\n",
           table(["rung", "test bpb, full context", "test bpb, windows", "test documents", "evaluate",
                  "gain [interval]", "over", "decision"],
                 [[r["name"], num(r["eval"][GATE_METRIC]), num(r["eval"]["test_bpb"]),
                   count(r["eval"]["test_documents"]), eval_time(r), gain(r["promotion"]),
                   r["promotion"].get("compared_to", "-"), decision(r["promotion"])] for r in rungs], text_from=6),
           "Bits per test byte: the test split's bits under the model over its UTF-8 bytes; full context is the "
           "gate's figure (MM-Rec carries its state through the whole split), windows score it in train.seq_len "
           "pieces. The gain is the figure of `over` minus this one, with its bootstrap interval over test documents "
           "(docs/registry.md, \"Reading the gain and its interval\"). Evaluate: its wall time, and the tokens its "
           "two passes fed the model a second over training's tokens/s (forward only, so well above 1). The gate's "
           "reasons:\n",
           "".join(f"- {r['name']}: {r['promotion'].get('reason', '')}\n" for r in rungs),
           "## Baselines on the same test text\n",
           table(["baseline", "bits per test byte", "what it knows"],
                 [["unigram", num(unigram), "train token frequencies (add-one smoothed), in this tokenizer"]]
                 + [[name, num(v), context] for name, v in baselines["bpb"].items()], text_from=2),
           f"A compressor's figure is the size of the train context and the test text compressed together minus the "
           f"context's alone, over the test documents' bytes: {count(baselines['test_bytes'])} bytes in "
           f"{count(baselines['test_documents'])} documents"
           + (", the whole test split" if baselines["whole_test"] else f", as many as fit in {count(TEST_BYTES)} bytes")
           + f". The context is at most the train split's last {count(CONTEXT_BYTES)} bytes, to keep this stage to "
             "seconds on any corpus.\n",
           "## Corpus\n",
           f"Source `{source}`; {count(corpus.get('duplicates', 0))} duplicate and {count(corpus.get('short', 0))} "
           "too-short documents dropped.\n",
           table(["split", "documents", "bytes", "characters"],
                 [[s, count(corpus[s]["documents"]), count(corpus[s]["bytes"]), count(corpus[s]["characters"])]
                  for s in SPLITS]),
           "Bytes of the split's file: one newline ends each document.\n",
           "## Tokenizer\n",
           f"Vocabulary {count(tokenizer['vocab_size'])} pieces.\n",
           table(["split", "tokens", "bytes", "bytes per token", "byte fallback rate"],
                 [[s, count(tokenizer[s]["tokens"]), count(tokenizer[s]["bytes"]), num(tokenizer[s]["bytes_per_token"]),
                   num(tokenizer[s]["byte_fallback_rate"])] for s in SPLITS]),
           "Bytes of the documents' text, without the newlines between them.\n",
           "## Environment\n",
           table(["", ""], [[k, v] for k, v in env.items()], text_from=1),
           "The machine and commit that wrote this page; each rung's speed is from the machine that trained it.\n"]
    return "\n".join(out)


def write_report(params: Params, root: Path = Path("."), log: bool = True) -> Path:
    """Read every figure, compute the compressor baselines, draw both pictures and write the page into reports/
    (replaced whole, or left as it was on a failure); then log it to the pipeline's MLflow run."""
    rungs = read_rungs(params, root)
    corpus = load_json(root / METRICS / "download.json", "download")
    tokenizer = load_json(root / METRICS / "tokenizer.json", "tokenizer")
    baselines = compressor_baselines(root / PREPARED)
    page = render(rungs, corpus, tokenizer, baselines, environment(), params.data.source)
    offsets: dict[str, float] = {}
    curves = []
    for r in rungs:
        per_step = r["train"]["tokens_seen"] / max(r["train"]["steps"], 1)
        parent = next((p for p in rungs if p["name"] == r["parent"]), None)
        # a grown rung starts from its parent's best checkpoint: where the parent's curve stood at its best step
        offsets[r["name"]] = 0.0 if parent is None else (
            offsets[parent["name"]] + parent["train"]["best_step"] * parent["train"]["tokens_seen"]
            / max(parent["train"]["steps"], 1))
        curves.append({"name": r["name"], "parent": r["parent"], "offset": offsets[r["name"]],
                       "tokens_per_step": per_step, "train": r["train_curve"], "val": r["val_curve"]})
    bars = [(f"{r['name']} (full context)", r["eval"][GATE_METRIC], False) for r in rungs]
    bars += [("unigram", rungs[0]["eval"]["unigram_bpb"], True)]
    bars += [(name, v, True) for name, v in baselines["bpb"].items()]
    out = root / REPORT
    with replacing_dir(out.parent) as tmp:
        ladder_curves(curves, tmp / LOSS_CURVES)
        bpb_bars(bars, tmp / TEST_BPB)
        (tmp / out.name).write_text(page, encoding="utf-8")
    if log:
        from mmrec.tracking.pipeline_run import log_report

        log_report(params, out, [out.parent / LOSS_CURVES, out.parent / TEST_BPB])
    return out
