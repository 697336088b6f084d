"""The evaluate stage: test-split metrics of a rung's best checkpoint (the gate's figure also document by document),
its samples, and their record in MLflow."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mmrec import paired
from mmrec.memory import peak_rss_mb
from mmrec.tracking import run as track
from mmrec.training.cores import CoreShare
from mmrec.data.windows import tiling_starts
from mmrec.training.device import resolve_device
from mmrec.errors import UserError
from mmrec.files import dvc_fix, sha256_file, write_json, write_text
from mmrec.model.inference import (DocumentTally, bits_per_byte, generate, load_model, perplexity, score, score_context,
                             text_bytes)
from mmrec.model.lm import count_params
from mmrec.paired import GATE_METRIC, DocScores, doc_id
from mmrec.paths import EVAL_ARTIFACTS, RungPaths
from mmrec.data.tokenizer import load_tokenizer, load_tokens, read_header, token_counts


def unigram_nll(train_counts: np.ndarray, test_tokens: np.ndarray) -> float:
    """Summed NLL (nats) of the test targets under train-split token frequencies (the count of each id,
    add-one smoothed)."""
    counts = train_counts.astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    test_counts = np.bincount(test_tokens[1:], minlength=len(counts))
    return float(-(test_counts * logp).sum())


def samples(model: torch.nn.Module, sp, prompts: list[str], max_new_tokens: int, temperature: float,
            top_k: int, seed: int) -> str:
    """Greedy and sampled continuations of fixed prompts with a fixed seed, as readable text."""
    out = []
    for i, prompt in enumerate(prompts):
        ids = sp.encode(prompt)
        greedy = generate(model, ids, max_new_tokens, greedy=True, eos_id=sp.eos_id())
        sampled = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                           generator=torch.Generator().manual_seed(seed + i), eos_id=sp.eos_id())
        out.append(f"## {prompt}\n[greedy] {sp.decode(ids + greedy)}\n"
                   f"[t={temperature}, top_k={top_k}] {sp.decode(ids + sampled)}\n")
    return "\n".join(out)


def document_scores(sp, tokens: np.ndarray, tally: DocumentTally, metric: str, whole_split: bool,
                    split_documents: int) -> DocScores:
    """Each document of a scored stream: its id (a digest of its whole text, the text the download stage
    split and deduplicated), its scored UTF-8 bytes (all of it but the stream's first token, which nothing
    predicts) and its bits. The bytes sum to test_bytes_scored, the bits over them to the figure itself."""
    eos = sp.eos_id()
    ids, n_bytes = [], []
    for start, stop in tally.spans():
        text = sp.decode([int(t) for t in tokens[start:stop] if t != eos])
        ids.append(doc_id(text))
        n_bytes.append(len(text.encode("utf-8")) if start else text_bytes(sp, tokens[1:stop], eos))
    bits = tally.nll[:len(ids)] / math.log(2)
    return DocScores(metric, tuple(ids), np.array(n_bytes, dtype=np.int64), bits, whole_split, split_documents)


def test_metrics(model: torch.nn.Module, params, root: Path = Path("."),
                 device: torch.device = torch.device("cpu"), progress: bool = False,
                 cores: CoreShare | None = None) -> tuple[dict[str, float], DocScores, int]:
    """Every test token scored once, two ways. test_*: windows of seq_len tokens, each from an empty state or
    context (both archs see exactly the same history, 128 tokens on average). test_*_context: the whole stream
    with all the context the arch can use (MM-Rec carries its state through it, GPT slides its window by half);
    the gate's number (GATE_METRIC), also kept document by document. Plus perplexity, top-1/top-5 and
    the unigram baseline; and the tokens both passes fed the model. A bar counts the targets of both passes;
    `cores` is re-checked as they go."""
    paths = RungPaths(root, "")
    tokens_dir = paths.tokens
    header = read_header(tokens_dir)
    sp = load_tokenizer(paths.tokenizer_dir)
    test = load_tokens(tokens_dir, "test")
    whole = not params.evaluate.max_tokens or params.evaluate.max_tokens >= len(test)
    if not whole:
        test = test[:params.evaluate.max_tokens]
    seq_len, batch = params.train.seq_len, params.evaluate.batch_size
    with tqdm(total=2 * (len(test) - 1), unit="tok", unit_scale=True, desc="evaluate", dynamic_ncols=True,
              disable=not progress) as bar:
        def advance(n: int) -> None:
            bar.update(n)
            if cores is not None:
                cores.apply()  # the thread count follows the load, as training's does

        s = score(model, test, tiling_starts(len(test), seq_len), batch, device, advance=advance)
        tally = DocumentTally(test, sp.eos_id())
        # top-1/top-5 come from the windows: the context pass skips that top-k over the vocabulary
        c = score_context(model, test, seq_len, batch, device, tally, ranks=False, advance=advance)
    assert c.tokens == s.tokens  # the same targets, so the same bytes
    docs = document_scores(sp, test, tally, GATE_METRIC, whole, header["splits"]["test"]["documents"])
    n_bytes = int(docs.bytes.sum())
    uni = unigram_nll(token_counts(tokens_dir, "train"), test)  # counted a block at a time, never loaded whole
    # test_bytes_scored: UTF-8 bytes of the scored tokens (all but the first, which nothing predicts), the
    # denominator of bits per byte; it is a little under the split's text bytes in metrics/tokenizer.json
    return {"test_loss": s.loss, "test_ppl": perplexity(s.loss), "test_bpb": bits_per_byte(s.nll_sum, n_bytes),
            "test_top1": s.top1 / s.tokens, "test_top5": s.top5 / s.tokens, "test_tokens_scored": s.tokens,
            "test_bytes_scored": n_bytes, "test_documents": len(docs.ids), "unigram_loss": uni / s.tokens,
            "unigram_bpb": bits_per_byte(uni, n_bytes), "test_loss_context": c.loss,
            "test_bpb_context": bits_per_byte(c.nll_sum, n_bytes)}, docs, s.inputs + c.inputs


def summary(rung: str, test_bpb: float, best_val_loss: float, n_params: int) -> dict[str, dict[str, float]]:
    """The rung's headline under its own name, so `dvc exp show` heads the columns 'tiny.bpb', 'mini.bpb', ...
    (keys unique across files keep DVC from prefixing the file path)."""
    return {rung: {"bpb": round(test_bpb, 5), "val_loss": round(best_val_loss, 5), "params": n_params}}


def evaluate_rung(params, rung: str, root: Path = Path("."), progress: bool = False) -> dict[str, float]:
    """Test-split metrics of a rung's best checkpoint: DVC metrics JSON, samples, and the rung's MLflow run;
    its speed in metrics/speed/eval/<rung>.json, beside training's."""
    paths = RungPaths(root, rung)
    model_dir = paths.model()
    model, ckpt = load_model(paths.best, dvc_fix(f"train@{rung}"))
    if ckpt.get("tokenizer_sha256") != read_header(paths.tokens)["tokenizer_sha256"]:
        raise UserError(f"{paths.best} was trained with another tokenizer; rerun `dvc repro train@{rung}`")
    device = resolve_device(params.train.device)  # a bad device fails here, before the run is set RUNNING
    run = track.Run.resume(params.mlflow, track.read_run_id(model_dir), rung, {"rung": rung},
                           system_metrics=params.mlflow.system_metrics)
    with track.closed_on_failure(run):  # a failure ends the run FAILED, never left RUNNING
        with CoreShare(params.train.threads) as cores:  # threads: 0 shares the cores with what runs beside it
            start = time.perf_counter()
            metrics, docs, inputs = test_metrics(model.to(device), params, root, device, progress, cores)
            seconds = time.perf_counter() - start
            # tokens/s: test tokens, each scored twice (windows, full context); model_tokens_per_s: what went
            # through the model in both passes, the count a training step's tokens/s compares with
            speed = {"seconds": round(seconds, 2), "tokens": metrics["test_tokens_scored"],
                     "tokens_per_s": round(metrics["test_tokens_scored"] / seconds, 1),
                     "model_tokens_per_s": round(inputs / seconds, 1), "threads": cores.current,
                     "peak_rss_mb": peak_rss_mb()}
            e = params.evaluate
            text = samples(model, load_tokenizer(paths.tokenizer_dir), e.prompts, e.sample_tokens, e.temperature,
                           e.top_k, params.seed)
        paired.save(docs, paths.doc_scores)  # first: the figures name the scores they were written with
        write_json(paths.eval_metrics, metrics | {paired.SCORES_FILE_SHA256: sha256_file(paths.doc_scores)})
        write_json(paths.eval_speed, speed)  # wall clock: an output beside the metrics, never one of them
        # the headline is the gate's number: every test token once, with all the context the arch can use
        write_json(paths.summary, summary(rung, metrics["test_bpb_context"], ckpt["progress"]["best_val"],
                                          count_params(model)))
        write_text(model_dir / "samples.txt", text)
        run.log(ckpt["progress"]["step"], **track.test_metric_names(metrics),
                **{"perf/eval_tokens_per_s": speed["tokens_per_s"]})
        run.log_artifact(model_dir / "samples.txt", "samples")
        run.log_artifact(paths.doc_scores, EVAL_ARTIFACTS)  # the latest evaluation; a registered version keeps its own copy
        run.end()
    return metrics
