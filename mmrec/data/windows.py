"""Windows of tokens from a memmapped split: random ones for training, fixed ones for evaluation."""
from __future__ import annotations

import numpy as np
import torch

from mmrec.errors import UserError


def check_fits(tokens: np.ndarray, seq_len: int, split: str) -> None:
    if len(tokens) < seq_len + 1:
        raise UserError(f"the {split} split has {len(tokens)} tokens, fewer than train.seq_len + 1 = {seq_len + 1}; "
                        "lower train.seq_len or use a larger corpus")


def window(tokens: np.ndarray, start: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs tokens[start : start+T] and targets shifted by exactly one, tokens[start+1 : start+T+1]."""
    chunk = torch.from_numpy(tokens[start:start + seq_len + 1].astype(np.int64))
    return chunk[:-1], chunk[1:]


def stack(tokens: np.ndarray, starts: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [window(tokens, s, seq_len) for s in starts]
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def random_batch(tokens: np.ndarray, batch_size: int, seq_len: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniformly random windows; the generator (seeded from params, saved in checkpoints) makes it reproducible."""
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
    return stack(tokens, starts.tolist(), seq_len)


def fixed_starts(n_tokens: int, seq_len: int, count: int) -> list[int]:
    """`count` evenly spaced windows (fewer if the split is short): the same set at every evaluation."""
    last = n_tokens - seq_len - 1
    count = max(1, min(count, last + 1))
    return sorted({round(i * last / max(count - 1, 1)) for i in range(count)})


def tiling_starts(n_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """Non-overlapping windows that score every token after the first exactly once: (start, length) pairs."""
    out, start = [], 0
    while start < n_tokens - 1:
        length = min(seq_len, n_tokens - 1 - start)
        out.append((start, length))
        start += length
    return out
