"""Running a trained model: scoring token windows or a whole stream with its full context (token-weighted NLL,
accuracy, bits per byte), generating text, and loading a checkpoint. No tracking, no files besides the checkpoint read."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmrec.model import checkpoint
from mmrec.data.windows import tiling_starts, window
from mmrec.errors import UserError
from mmrec.model.lm import ModelConfig, build_model


@dataclass
class Scores:
    nll_sum: float = 0.0  # nats, summed over every scored token
    tokens: int = 0
    top1: int = 0
    top5: int = 0
    inputs: int = 0  # tokens fed to the model: a sliding window reads more than it scores

    @property
    def loss(self) -> float:
        """Mean NLL per target token: the sum over all tokens divided by their count, not a mean of batch means."""
        return self.nll_sum / max(self.tokens, 1)

    def add(self, other: "Scores") -> None:
        self.nll_sum += other.nll_sum
        self.tokens += other.tokens
        self.top1 += other.top1
        self.top5 += other.top5
        self.inputs += other.inputs


def bits_per_byte(nll_sum: float, n_bytes: int) -> float:
    """Total NLL in bits over the UTF-8 bytes of the text those tokens encode: comparable across tokenizers."""
    return nll_sum / math.log(2) / n_bytes


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows past ~709


class DocumentTally:
    """NLL summed per document of a token stream. Documents are separated by EOS, and the EOS after a document
    is its own (predicting the end is part of modelling it); a stream cut short ends in a partial document."""

    def __init__(self, tokens: np.ndarray, eos_id: int):
        self.n_tokens = len(tokens)
        self.ends = np.flatnonzero(np.asarray(tokens) == eos_id)  # stream position of each EOS
        self.nll = np.zeros(len(self.ends) + 1)  # nats; the last entry: the tokens after the last EOS, if any

    def add(self, positions: np.ndarray, nll: np.ndarray) -> None:
        """Add the NLL of the targets at these stream positions (target p is tokens[p])."""
        np.add.at(self.nll, np.searchsorted(self.ends, positions), nll)  # EOS before p: p's document

    def spans(self) -> list[tuple[int, int]]:
        """(first, last + 1) stream positions of each document, its EOS included; the last one only if it
        holds a token (a stream that does not end in EOS)."""
        starts = np.concatenate([[0], self.ends + 1])
        stops = np.concatenate([self.ends + 1, [self.n_tokens]])
        return [(int(a), int(b)) for a, b in zip(starts, stops) if b > a]


Advance = Callable[[int], object]  # told how many targets were just scored (a progress bar, a thread re-check)


def _scores(logits: torch.Tensor, y: torch.Tensor, positions: torch.Tensor | None = None,
            tally: DocumentTally | None = None, ranks: bool = True) -> Scores:
    """Summed NLL and top-1/top-5 hits of targets y (none counted with ranks=False: a top-k over the vocabulary
    costs about as much as the loss); with a tally, each target's NLL also goes to its document (positions:
    the stream position of each target) and the sum is taken in float64, as the tally's is."""
    logits = logits.float()
    if tally is None:
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    else:
        per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").double().cpu().numpy()
        tally.add(positions.flatten().numpy(), per_token)
        nll = float(per_token.sum())
    if not ranks:
        return Scores(nll, y.numel())
    top5 = logits.topk(min(5, logits.size(-1)), dim=-1).indices
    return Scores(nll, y.numel(), (top5[..., 0] == y).sum().item(), (top5 == y[..., None]).any(-1).sum().item())


@torch.inference_mode()  # forward only: no autograd records, no version counters
def score(model: torch.nn.Module, tokens: np.ndarray, windows: list[tuple[int, ...]],
          batch_size: int, device: torch.device, tally: DocumentTally | None = None, ranks: bool = True,
          advance: Advance | None = None) -> Scores:
    """Score (start, length) windows, or (start, length, skip) ones whose first `skip` targets are context only;
    windows of equal shape are batched together. A tally also gets each target's NLL by document."""
    was_training = model.training
    model.eval()
    total = Scores()
    by_shape: dict[tuple[int, int], list[int]] = {}
    for start, length, *skip in windows:
        by_shape.setdefault((length, skip[0] if skip else 0), []).append(start)
    for (length, skip), starts in by_shape.items():
        for i in range(0, len(starts), batch_size):
            batch = starts[i:i + batch_size]
            pairs = [window(tokens, s, length) for s in batch]
            x = torch.stack([p[0] for p in pairs]).to(device)
            y = torch.stack([p[1] for p in pairs]).to(device)
            positions = torch.tensor(batch)[:, None] + torch.arange(1 + skip, length + 1)
            scored = _scores(model(x).logits[:, skip:], y[:, skip:], positions, tally, ranks)
            scored.inputs = x.numel()
            total.add(scored)
            if advance is not None:
                advance(scored.tokens)
    model.train(was_training)
    return total


def sliding_windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, length, skip) windows over a stream that score every target (tokens[1:]) exactly once: the first
    window scores all of its seq_len targets, each later one slides by `stride` and scores only its last
    `stride` targets, so each of those has at least seq_len - stride tokens of context."""
    out, done = [], 0  # done: targets scored so far; target p is tokens[p + 1], predicted from tokens[:p + 1]
    while done < n_tokens - 1:
        end = min(done + (stride if out else seq_len), n_tokens - 1)
        start = max(0, end - seq_len)
        out.append((start, end - start, done - start))
        done = end
    return out


@torch.inference_mode()
def score_carried(model: torch.nn.Module, tokens: np.ndarray, window_len: int, device: torch.device,
                  tally: DocumentTally | None = None, ranks: bool = True, advance: Advance | None = None) -> Scores:
    """MM-Rec over the whole stream in one pass: consecutive windows, each starting from the recurrent state
    the previous one ended in, so every target is scored once with its whole history (the window length
    only bounds memory, it changes no number beyond float rounding)."""
    was_training = model.training
    model.eval()
    total, state = Scores(), None
    for start, length in tiling_starts(len(tokens), window_len):
        x, y = window(tokens, start, length)
        out = model(x[None].to(device), state=state)
        state = out.state
        scored = _scores(out.logits, y[None].to(device), torch.arange(start + 1, start + length + 1), tally, ranks)
        scored.inputs = length
        total.add(scored)
        if advance is not None:
            advance(length)
    model.train(was_training)
    return total


def score_context(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int,
                  device: torch.device, tally: DocumentTally | None = None, ranks: bool = True,
                  advance: Advance | None = None) -> Scores:
    """Every target of the stream scored once, with all the context its arch can use: MM-Rec carries its state
    through the whole stream, seq_len * batch_size tokens a forward; GPT, whose attention was trained on
    seq_len tokens, slides windows of seq_len by seq_len / 2, so each target after the first window sees at
    least half a window."""
    if model.cfg.arch == "mmrec":
        return score_carried(model, tokens, seq_len * batch_size, device, tally, ranks, advance)
    return score(model, tokens, sliding_windows(len(tokens), seq_len, max(1, seq_len // 2)), batch_size, device,
                 tally, ranks, advance)


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, greedy: bool = False, generator: torch.Generator | None = None,
             eos_id: int | None = None) -> list[int]:
    """Continue `prompt_ids` by sampling (argmax with greedy=True); stops early at eos_id.
    MM-Rec carries its recurrent state, so each new token costs one step; GPT rereads its context, cropped
    to the last seq_len tokens it was trained on (as nanoGPT does): no position past those, no cost growing
    with the length generated."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids or [eos_id or 0]], dtype=torch.long, device=device)
    context = model.cfg.seq_len if model.cfg.arch == "gpt" else 0  # 0: the whole context
    out = model(ids[:, -context:])
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
        out = model(ids[:, -1:], state=out.state) if out.state is not None else model(ids[:, -context:])
    model.train(was_training)
    return new


def load_model(path: str | Path, fix: str = "") -> tuple[torch.nn.Module, dict]:
    """A model in eval mode and what it was saved with: from a best.pt checkpoint (weights only) and its dict, or
    from the folder of an export (safetensors, `python -m mmrec.registry export`) and its config.json."""
    path = Path(path)
    if path.is_dir():
        fix = fix or "export it again"
        saved = checkpoint.read_export(path, fix)
    else:
        fix = fix or "retrain it"
        saved = checkpoint.load(path, fix, keys=("model", "config"))
    try:
        model = build_model(ModelConfig.from_dict(saved["config"]))
        if path.is_dir():
            checkpoint.load_export_weights(model, path, fix)
        else:
            model.load_state_dict(saved["model"])
    except (RuntimeError, TypeError, KeyError) as err:  # shapes or names that do not fit the config
        raise UserError(f"{'export' if path.is_dir() else 'checkpoint'} {path}: its weights do not fit its config "
                        f"({type(err).__name__}); {fix}") from None
    return model.eval(), saved


def text_bytes(sp, ids: np.ndarray, eos_id: int) -> int:
    """UTF-8 bytes of the text that `ids` encode, document by document (EOS separates documents)."""
    ids = np.asarray(ids)
    cuts = np.flatnonzero(ids == eos_id)
    pieces = np.split(ids, cuts)
    return sum(len(sp.decode([int(t) for t in piece if t != eos_id]).encode("utf-8")) for piece in pieces)
