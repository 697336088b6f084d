"""Per-document test scores, and the paired bootstrap that says by how much one model beats another on them.

evaluate keeps, for the gate's figure, each test document's id (a digest of its text), its scored UTF-8
bytes and its bits (metrics/eval/<rung>.docs.json). Two such score sets compare when they hold the same
documents scored by the same metric: the same text, whatever the tokenizer that cut it into tokens. The
gain of a candidate over a reference is then a ratio of sums over the shared documents, reference bits per
byte minus the candidate's, and resampling the documents with replacement gives its confidence interval:
how much of the gain is which documents happen to be in the test split. Training noise (another seed) is
not in it: that is the gain of one model over another. Of one config over another (several seeds each, runs of
`python -m mmrec.tracking.compare`), `config_gain` counts both; bench/bench_seeds.py measures the seeds' spread.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmrec.errors import UserError
from mmrec.files import dvc_fix, load_json, write_text
from mmrec.paths import GATE_METRIC

# The gate's figure (paths.GATE_METRIC): both archs are scored the same way on the same stream (every target
# once, in order, as a compressor would), and a rung always meets its parent in the same arch; the windowed
# test_bpb stays beside it as the control.
# A document's id: the first 64 bits of the sha256 of its UTF-8 text. n distinct documents share an id with
# odds of about n^2 / 2^65: 3e-17 for 55 chapters, 3e-8 for a million documents.
ID_HEX = 16
# In metrics/eval/<rung>.json, beside the figures: the sha256 of the <rung>.docs.json written just before it, so
# that the two are one evaluation's (registry/gate.py eval_outputs refuses a pair from two).
SCORES_FILE_SHA256 = "docs_file_sha256"
CELLS = 1 << 21  # bootstrap resamples x documents drawn at once: bounds memory (~16 MB a block) at any split size


def doc_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:ID_HEX]


@dataclass(frozen=True)
class DocScores:
    """One figure, document by document: bits / bytes summed over the documents is the figure itself."""
    metric: str  # which figure (GATE_METRIC)
    ids: tuple[str, ...]
    bytes: np.ndarray  # UTF-8 bytes scored in each document (all of it but the stream's first token)
    bits: np.ndarray  # the model's bits on those bytes (the EOS that ends a document is its own)
    whole_split: bool  # every token of the split was scored (False: evaluate.max_tokens cut it)
    split_documents: int  # documents in the whole split

    @property
    def bpb(self) -> float:
        return float(self.bits.sum() / self.bytes.sum())

    @property
    def digest(self) -> str:
        """The document set (sha256 of the sorted ids): equal digests, the same test text."""
        return hashlib.sha256("\n".join(sorted(self.ids)).encode()).hexdigest()

    def describe(self) -> str:
        """'the whole test split (55 documents)' or 'a subset of the test split (12 of its 55 documents)'."""
        if self.whole_split:
            return f"the whole test split ({len(self.ids)} documents)"
        return (f"a subset of the test split ({len(self.ids)} of its {self.split_documents} documents, "
                "evaluate.max_tokens)")

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "whole_split": self.whole_split, "split_documents": self.split_documents,
                "ids": list(self.ids), "bytes": [int(b) for b in self.bytes],
                "bits": [round(float(b), 6) for b in self.bits]}  # a micro-bit per document: far below any gain

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "per-document scores") -> "DocScores":
        try:
            ids = tuple(map(str, d["ids"]))
            n_bytes, bits = np.asarray(d["bytes"], np.int64), np.asarray(d["bits"], float)
            scores = cls(str(d["metric"]), ids, n_bytes, bits, bool(d["whole_split"]), int(d["split_documents"]))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where}: not a per-document score file (damaged?)") from None
        if not len(ids) == len(n_bytes) == len(bits) or not len(ids) or n_bytes.sum() <= 0:
            raise UserError(f"{where}: {len(ids)} ids, {len(n_bytes)} byte counts and {len(bits)} bit counts "
                            "(damaged?)")
        return scores


def save(scores: DocScores, path: Path) -> None:
    """Compact JSON (about 45 bytes a document), written atomically."""
    write_text(path, json.dumps(scores.to_dict(), separators=(",", ":")) + "\n")


def load(path: Path, stage: str) -> DocScores:
    data = load_json(path, stage)
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a per-document score file (damaged?); {dvc_fix(stage)}")
    return DocScores.from_dict(data, str(path))


def difference(ref: DocScores, cand: DocScores, ref_label: str) -> str | None:
    """Why the two figures do not compare, in words naming what differs; None when they do (the same
    documents, scored by the same metric: the whole split on both sides, or exactly the same subset)."""
    if ref.metric != cand.metric:
        return f"{ref_label}'s figure is {ref.metric}, this one's {cand.metric}"
    if ref.digest == cand.digest:
        return None
    parts = []
    if not cand.whole_split:
        parts.append(f"this figure is on {cand.describe()}")
    if not ref.whole_split:
        parts.append(f"{ref_label}'s is on {ref.describe()}")
    if cand.whole_split and ref.whole_split:
        shared = sum((Counter(ref.ids) & Counter(cand.ids)).values())
        parts.append(f"another test text: {shared} of {ref_label}'s {len(ref.ids)} documents are among these "
                     f"{len(cand.ids)}")
    return "; ".join(parts)


@dataclass(frozen=True)
class Gain:
    """Reference bits per byte minus the candidate's on the shared documents, and its bootstrap interval."""
    mean: float
    low: float
    high: float
    confidence: float
    documents: int

    def clears(self, margin: float) -> bool:
        """The interval's lower end is at least `margin`, and above zero (a margin of 0 still asks for a gain)."""
        return self.low >= margin and self.low > 0

    def __str__(self) -> str:
        return (f"{self.mean:.4f} ({self.confidence:.0%} interval [{self.low:.4f}, {self.high:.4f}], "
                f"{self.documents} documents)")


def _pairs(ref: DocScores, cand: DocScores) -> tuple[np.ndarray, np.ndarray]:
    """Row indices into ref and cand of each shared document (a repeated text pairs occurrence by occurrence)."""
    def keyed(ids: tuple[str, ...]) -> dict[tuple[str, int], int]:
        seen: Counter = Counter()
        out = {}
        for i, key in enumerate(ids):
            out[(key, seen[key])] = i
            seen[key] += 1
        return out

    r, c = keyed(ref.ids), keyed(cand.ids)
    shared = [k for k in r if k in c]
    return np.array([r[k] for k in shared], dtype=np.int64), np.array([c[k] for k in shared], dtype=np.int64)


def gain_of(ref_bits: np.ndarray, ref_bytes: np.ndarray, cand_bits: np.ndarray, cand_bytes: np.ndarray,
            weights: np.ndarray | None = None) -> np.ndarray | float:
    """sum(ref bits) / sum(ref bytes) - sum(cand bits) / sum(cand bytes), each document counted `weights`
    times (rows of weights: one resample each). Both sides score the same text, so the bytes are equal but
    for the stream's first document, whose first token (cut by each tokenizer its own way) nothing predicts:
    the gain is then the bit differences summed over the bytes summed, a ratio of sums, not a mean of ratios."""
    if weights is None:
        return float(ref_bits.sum() / ref_bytes.sum() - cand_bits.sum() / cand_bytes.sum())
    return weights @ ref_bits / (weights @ ref_bytes) - weights @ cand_bits / (weights @ cand_bytes)


def bootstrap(n: int, statistic: Callable[[np.ndarray], np.ndarray], confidence: float, samples: int,
              seed: int) -> tuple[float, float]:
    """Percentile interval at `confidence` of statistic(weights) over `samples` resamples of n documents with
    replacement, drawn from `seed` (see resample)."""
    return percentiles(resample(n, statistic, samples, seed), confidence)


def percentiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return float(low), float(high)


def resample(n: int, statistic: Callable[[np.ndarray], np.ndarray], samples: int, seed: int) -> np.ndarray:
    """statistic(weights) over `samples` resamples of n documents with replacement, drawn from `seed`; weights:
    one row per resample, how many times each document was drawn."""
    rng = np.random.default_rng(seed)
    stats = np.empty(samples)
    block = max(1, CELLS // n)
    for start in range(0, samples, block):
        rows = min(block, samples - start)
        draws = rng.integers(0, n, size=(rows, n))
        # each resample as counts per document: one bincount over the block, offset row by row
        weights = np.bincount((draws + n * np.arange(rows)[:, None]).ravel(), minlength=rows * n).reshape(rows, n)
        stats[start:start + rows] = statistic(weights.astype(float))
    return stats


def figure_interval(scores: DocScores, confidence: float, samples: int, seed: int) -> tuple[float, float]:
    """How far the figure itself would move with other documents of the same kind in the test split."""
    bits, n_bytes = scores.bits, scores.bytes.astype(float)
    return bootstrap(len(bits), lambda w: w @ bits / (w @ n_bytes), confidence, samples, seed)


def paired_gain(ref: DocScores, cand: DocScores, confidence: float, samples: int, seed: int) -> Gain:
    """The candidate's gain over the reference on their shared documents, with a percentile bootstrap interval
    at `confidence`: `samples` resamples of the documents with replacement, drawn from `seed`."""
    ri, ci = _pairs(ref, cand)
    if not len(ri):
        raise UserError("the two figures share no test document: there is no paired gain")
    cols = [ref.bits[ri], ref.bytes[ri].astype(float), cand.bits[ci], cand.bytes[ci].astype(float)]
    low, high = bootstrap(len(ri), lambda w: gain_of(*cols, weights=w), confidence, samples, seed)
    return Gain(gain_of(*cols), low, high, confidence, len(ri))


@dataclass(frozen=True)
class ConfigGain:
    """The reference config's mean figure over its seeds minus the candidate's, with an interval that counts both
    the seeds' spread and the test documents (see config_gain), and the documents' part alone beside it."""
    mean: float
    low: float
    high: float
    docs_low: float  # the paired percentile interval over the test documents alone: what the gate's would be
    docs_high: float
    confidence: float
    seed_std: tuple[float, float]  # the std over seeds taken for the reference and the candidate ...
    measured: tuple[bool, bool]  # ... measured over its own seeds (2 or more), else the default given
    documents: int


def config_gain(ref: list[DocScores], cand: list[DocScores], confidence: float, samples: int, seed: int,
                default_std: float) -> ConfigGain:
    """How much better the candidate config is than the reference, each a list of runs over other seeds.

    The gain is the difference of the two mean figures. Its interval adds two variances and is read off a t
    distribution: the seeds' (each side's std over its seeds squared over their number, Welch's; a side with one
    seed takes `default_std`, no measurement of its own) and the test documents' (the variance of the same
    difference over `samples` paired resamples of the documents, every run scored on each resample). Its degrees
    of freedom are Welch-Satterthwaite's, where the documents' part and a default std count as known: with 2-3
    seeds a side the t quantile is large, as it should be. Every run must hold the same test documents."""
    if not ref or not cand:
        raise UserError("a config without runs has no figure to compare")
    runs = [*ref, *cand]
    for other in runs[1:]:
        if (why := difference(runs[0], other, "the reference's first run")) is not None:
            raise UserError(f"the figures do not compare: {why}")
    idx = [_pairs(runs[0], r)[1] for r in runs]  # every run's documents in the first run's order
    bits = np.stack([r.bits[i] for r, i in zip(runs, idx)], axis=1)
    n_bytes = np.stack([r.bytes[i] for r, i in zip(runs, idx)], axis=1).astype(float)
    k = len(ref)

    def gain(w: np.ndarray) -> np.ndarray:
        figures = (w @ bits) / (w @ n_bytes)  # each run's figure on each resample
        return figures[..., :k].mean(axis=-1) - figures[..., k:].mean(axis=-1)

    figures = bits.sum(axis=0) / n_bytes.sum(axis=0)
    mean = float(figures[:k].mean() - figures[k:].mean())
    stats = resample(len(bits), gain, samples, seed)
    docs_low, docs_high = percentiles(stats, confidence)
    stds, measured, terms, welch = [], [], [], 0.0
    for side in (figures[:k], figures[k:]):
        own = len(side) > 1
        std = float(side.std(ddof=1)) if own else default_std
        stds.append(std)
        measured.append(own)
        terms.append(std ** 2 / len(side))
        if own:
            welch += terms[-1] ** 2 / (len(side) - 1)
    total = sum(terms) + float(stats.var(ddof=1))
    from scipy import stats as dist  # a second's import, only when configs are compared

    tail = (1 - confidence) / 2
    q = float(dist.t.ppf(1 - tail, total ** 2 / welch) if welch > 0 else dist.norm.ppf(1 - tail))
    half = q * total ** 0.5
    return ConfigGain(mean, mean - half, mean + half, docs_low, docs_high, confidence, (stds[0], stds[1]),
                      (measured[0], measured[1]), len(bits))
