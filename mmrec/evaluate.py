"""Scoring a model on token windows: token-weighted NLL, accuracy, bits per byte; and text generation."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmrec.data import tiling_starts, window
from mmrec.errors import UserError


@dataclass
class Scores:
    nll_sum: float = 0.0  # nats, summed over every scored token
    tokens: int = 0
    top1: int = 0
    top5: int = 0

    @property
    def loss(self) -> float:
        """Mean NLL per target token: the sum over all tokens divided by their count, not a mean of batch means."""
        return self.nll_sum / max(self.tokens, 1)

    def add(self, other: "Scores") -> None:
        self.nll_sum += other.nll_sum
        self.tokens += other.tokens
        self.top1 += other.top1
        self.top5 += other.top5


def bits_per_byte(nll_sum: float, n_bytes: int) -> float:
    """Total NLL in bits over the UTF-8 bytes of the text those tokens encode: comparable across tokenizers."""
    return nll_sum / math.log(2) / n_bytes


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows past ~709


@torch.no_grad()
def score(model: torch.nn.Module, tokens: np.ndarray, windows: list[tuple[int, int]],
          batch_size: int, device: torch.device) -> Scores:
    """Score (start, length) windows; windows of equal length are batched together."""
    was_training = model.training
    model.eval()
    total = Scores()
    by_len: dict[int, list[int]] = {}
    for start, length in windows:
        by_len.setdefault(length, []).append(start)
    for length, starts in by_len.items():
        for i in range(0, len(starts), batch_size):
            pairs = [window(tokens, s, length) for s in starts[i:i + batch_size]]
            x = torch.stack([p[0] for p in pairs]).to(device)
            y = torch.stack([p[1] for p in pairs]).to(device)
            logits = model(x).logits.float()
            nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
            top5 = logits.topk(min(5, logits.size(-1)), dim=-1).indices
            total.add(Scores(nll.item(), y.numel(), (top5[..., 0] == y).sum().item(),
                             (top5 == y[..., None]).any(-1).sum().item()))
    model.train(was_training)
    return total


def unigram_nll(train_tokens: np.ndarray, test_tokens: np.ndarray, vocab_size: int) -> float:
    """Summed NLL (nats) of the test targets under train-split token frequencies (add-one smoothed)."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    test_counts = np.bincount(test_tokens[1:], minlength=vocab_size)
    return float(-(test_counts * logp).sum())


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, greedy: bool = False, generator: torch.Generator | None = None,
             eos_id: int | None = None) -> list[int]:
    """Continue `prompt_ids` by sampling (argmax with greedy=True); stops early at eos_id.
    MM-Rec carries its recurrent state, so each new token costs one step; GPT rereads the context."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids or [eos_id or 0]], dtype=torch.long, device=device)
    out = model(ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1].float()
        if greedy:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, -math.inf)
            nxt = int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))
        if nxt == eos_id:
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
        out = model(ids[:, -1:], state=out.state) if out.state is not None else model(ids)
    model.train(was_training)
    return new


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """A model from a best.pt checkpoint (weights only), in eval mode, and the checkpoint dict."""
    from mmrec import checkpoint
    from mmrec.model import ModelConfig, build_model

    ckpt = checkpoint.load(path)
    model = build_model(ModelConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def text_bytes(sp, ids: np.ndarray, eos_id: int) -> int:
    """UTF-8 bytes of the text that `ids` encode, document by document (EOS separates documents)."""
    ids = np.asarray(ids)
    cuts = np.flatnonzero(ids == eos_id)
    pieces = np.split(ids, cuts)
    return sum(len(sp.decode([int(t) for t in piece if t != eos_id]).encode("utf-8")) for piece in pieces)


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
    from mmrec.tokenizer import load_tokenizer, load_tokens, read_header

    tokens_dir = root / "data" / "tokens"
    header = read_header(tokens_dir)
    sp = load_tokenizer(root / "models" / "tokenizer")
    test = load_tokens(tokens_dir, "test")
    if params.evaluate.max_tokens:
        test = test[:params.evaluate.max_tokens]
    s = score(model, test, tiling_starts(len(test), params.train.seq_len), params.evaluate.batch_size, device)
    n_bytes = text_bytes(sp, test[1:], sp.eos_id())
    uni = unigram_nll(load_tokens(tokens_dir, "train"), test, header["vocab_size"])
    return {"test_loss": s.loss, "test_ppl": perplexity(s.loss), "test_bpb": bits_per_byte(s.nll_sum, n_bytes),
            "test_top1": s.top1 / s.tokens, "test_top5": s.top5 / s.tokens, "test_tokens": s.tokens,
            "test_bytes": n_bytes, "unigram_loss": uni / s.tokens, "unigram_bpb": bits_per_byte(uni, n_bytes)}


def evaluate_rung(params, rung: str, root: Path = Path(".")) -> dict[str, float]:
    """Test-split metrics of a rung's best checkpoint: DVC metrics JSON, samples, and the rung's MLflow run."""
    from mmrec import track
    from mmrec.files import write_json, write_text
    from mmrec.tokenizer import load_tokenizer, read_header
    from mmrec.train import resolve_device

    model_dir = root / "models" / rung
    model, ckpt = load_model(model_dir / "best.pt")
    if ckpt.get("tokenizer_sha256") != read_header(root / "data" / "tokens")["tokenizer_sha256"]:
        raise UserError(f"{model_dir / 'best.pt'} was trained with another tokenizer; rerun `dvc repro train@{rung}`")
    torch.set_num_threads(params.train.threads or torch.get_num_threads())
    device = resolve_device(params.train.device)
    metrics = test_metrics(model.to(device), params, root, device)
    e = params.evaluate
    text = samples(model, load_tokenizer(root / "models" / "tokenizer"), e.prompts, e.sample_tokens, e.temperature,
                   e.top_k, params.seed)
    write_json(root / "metrics" / "eval" / f"{rung}.json", metrics)
    write_text(model_dir / "samples.txt", text)

    run = track.Run.resume(params.mlflow, read_run_id(model_dir))
    run.log(ckpt["progress"]["step"], **metrics)
    run.log_artifact(model_dir / "samples.txt", "samples")
    run.end()
    return metrics


def read_run_id(model_dir: Path) -> str:
    import json

    path = model_dir / "run.json"
    if not path.exists():
        raise UserError(f"{path} is missing; run `dvc repro train@{model_dir.name}` first")
    return json.loads(path.read_text())["run_id"]
