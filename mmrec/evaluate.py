"""The evaluate stage: test-split metrics of a rung's best checkpoint, its samples, and their record in MLflow."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmrec import track
from mmrec.data import tiling_starts
from mmrec.device import resolve_device
from mmrec.errors import UserError
from mmrec.files import write_json, write_text
from mmrec.cores import CoreShare
from mmrec.inference import bits_per_byte, generate, load_model, perplexity, score, text_bytes
from mmrec.model import count_params
from mmrec.paths import RungPaths
from mmrec.tokenizer import load_tokenizer, load_tokens, read_header


def unigram_nll(train_tokens: np.ndarray, test_tokens: np.ndarray, vocab_size: int) -> float:
    """Summed NLL (nats) of the test targets under train-split token frequencies (add-one smoothed)."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    test_counts = np.bincount(test_tokens[1:], minlength=vocab_size)
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


def test_metrics(model: torch.nn.Module, params, root: Path = Path("."),
                 device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Every test token scored once: loss, perplexity, bits per byte, top-1/top-5, and the unigram baseline."""
    paths = RungPaths(root, "")
    tokens_dir = paths.tokens
    header = read_header(tokens_dir)
    sp = load_tokenizer(paths.tokenizer_dir)
    test = load_tokens(tokens_dir, "test")
    if params.evaluate.max_tokens:
        test = test[:params.evaluate.max_tokens]
    s = score(model, test, tiling_starts(len(test), params.train.seq_len), params.evaluate.batch_size, device)
    n_bytes = text_bytes(sp, test[1:], sp.eos_id())
    uni = unigram_nll(load_tokens(tokens_dir, "train"), test, header["vocab_size"])
    # test_bytes_scored: UTF-8 bytes of the scored tokens (all but the first, which nothing predicts), the
    # denominator of bits per byte; it is a little under the split's text bytes in metrics/tokenizer.json
    return {"test_loss": s.loss, "test_ppl": perplexity(s.loss), "test_bpb": bits_per_byte(s.nll_sum, n_bytes),
            "test_top1": s.top1 / s.tokens, "test_top5": s.top5 / s.tokens, "test_tokens_scored": s.tokens,
            "test_bytes_scored": n_bytes, "unigram_loss": uni / s.tokens, "unigram_bpb": bits_per_byte(uni, n_bytes)}


def mlflow_names(metrics: dict[str, float]) -> dict[str, float]:
    """test_bpb -> test/bpb, unigram_bpb -> test/unigram_bpb: MLflow charts them in one 'test' section."""
    return {f"test/{k.removeprefix('test_')}": v for k, v in metrics.items()}


def summary(rung: str, test_bpb: float, best_val_loss: float, n_params: int) -> dict[str, dict[str, float]]:
    """The rung's headline under its own name, so `dvc exp show` heads the columns 'tiny.bpb', 'mini.bpb', ...
    (keys unique across files keep DVC from prefixing the file path)."""
    return {rung: {"bpb": round(test_bpb, 5), "val_loss": round(best_val_loss, 5), "params": n_params}}


def evaluate_rung(params, rung: str, root: Path = Path(".")) -> dict[str, float]:
    """Test-split metrics of a rung's best checkpoint: DVC metrics JSON, samples, and the rung's MLflow run."""
    paths = RungPaths(root, rung)
    model_dir = paths.model()
    model, ckpt = load_model(paths.best)
    if ckpt.get("tokenizer_sha256") != read_header(paths.tokens)["tokenizer_sha256"]:
        raise UserError(f"{paths.best} was trained with another tokenizer; rerun `dvc repro train@{rung}`")
    run = track.Run.resume(params.mlflow, track.read_run_id(model_dir), system_metrics=params.mlflow.system_metrics)
    device = resolve_device(params.train.device)
    try:
        with CoreShare(params.train.threads):  # threads: 0 shares the cores with trainings running beside it
            metrics = test_metrics(model.to(device), params, root, device)
            e = params.evaluate
            text = samples(model, load_tokenizer(paths.tokenizer_dir), e.prompts, e.sample_tokens, e.temperature,
                           e.top_k, params.seed)
    except BaseException:
        run.end("FAILED")
        raise
    write_json(paths.eval_metrics, metrics)
    write_json(paths.summary, summary(rung, metrics["test_bpb"], ckpt["progress"]["best_val"], count_params(model)))
    write_text(model_dir / "samples.txt", text)

    run.log(ckpt["progress"]["step"], **mlflow_names(metrics))
    run.log_artifact(model_dir / "samples.txt", "samples")
    run.end()
    return metrics
