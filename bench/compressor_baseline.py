"""What a general-purpose compressor makes of the test split, given the train text first: the bar a model's
test bits per byte should clear on a corpus that repeats itself (library code across packages).

    python bench/compressor_baseline.py --train-mb 64          # after `dvc repro download`

For each compressor, bits per byte of the test documents = (size of train + test compressed - size of train
compressed) x 8 / test bytes, so the compressor has seen the same train text a model learned from (its
window permitting: xz -9e keeps 64 MiB, zstd --long=27 128 MiB). The documents are read from
data/prepared as the tokenizer reads them (escapes undone when data.keep_layout), joined by newlines; the
bytes divided by are the documents' own UTF-8 bytes, as metrics/eval/<rung>.json's test_bpb_context
divides by (it leaves out the stream's first token, a few bytes). xz runs through Python's lzma; zstd is
the `zstd` command when there is one.

How much of the test split is already in train, which a compressor's window exploits by copying: the share
of the test bytes in lines (stripped, of at least --min-line characters) that occur verbatim in the whole
train split and in the part the compressor saw, and the share of test documents that are near-copies (at
least 80 % of their long-line bytes seen in train). Never run by the tests.
"""
from __future__ import annotations

import argparse
import array
import json
import lzma
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mmrec.data.tokenizer import layout_kept, read_docs  # noqa: E402
from mmrec.paired import doc_id  # noqa: E402
from mmrec.paths import PREPARED  # noqa: E402


def text_of(path: Path, escaped: bool, max_bytes: int = 0) -> tuple[bytes, int]:
    """The documents of a split file joined by newlines (the first `max_bytes` of them), and their own bytes."""
    parts, size = [], 0
    for doc in read_docs(path, escaped):
        data = doc.encode("utf-8")
        if max_bytes and size + len(data) > max_bytes:
            break
        parts.append(data)
        size += len(data)
    return b"\n".join(parts) + b"\n", size


def long_lines(text: str, min_chars: int) -> list[str]:
    return [line for line in (raw.strip() for raw in text.splitlines()) if len(line) >= min_chars]


def line_hashes(path: Path, escaped: bool, min_chars: int, window_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique hashes of the long lines of a split's documents: of all of them, and of those within the
    first `window_bytes` (what the compressors see), in one read of the split."""
    hashes, size, window = array.array("q"), 0, None
    for doc in read_docs(path, escaped):
        size += len(doc.encode("utf-8"))
        if window is None and size > window_bytes:
            window = len(hashes)
        hashes.extend(hash(line) for line in long_lines(doc, min_chars))
    every = np.frombuffer(hashes, dtype=np.int64)
    return np.unique(every), np.unique(every[:window])


def overlap(test_docs: list[str], seen: np.ndarray, min_chars: int) -> tuple[float, list[bool]]:
    """Share of the test bytes in long lines found in `seen` (sorted), and for each test document whether it
    is a near-copy (>= 80 % of its long-line bytes found)."""
    found = total = 0
    near = []
    for doc in test_docs:
        lines = long_lines(doc, min_chars)
        sizes = np.array([len(line.encode("utf-8")) for line in lines], dtype=np.int64)
        hashes = np.array([hash(line) for line in lines], dtype=np.int64)
        where = np.searchsorted(seen, hashes).clip(max=max(len(seen) - 1, 0))  # no re-sort per document
        hits = seen[where] == hashes if len(seen) else np.zeros(len(hashes), dtype=bool)
        doc_found, doc_long = int(sizes[hits].sum()), int(sizes.sum())
        found, total = found + doc_found, total + len(doc.encode("utf-8"))
        near.append(doc_long > 0 and doc_found >= 0.8 * doc_long)
    return found / max(total, 1), near


def model_bpb(root: Path, rung: str, docs: list[str]) -> float | None:
    """The rung's gate figure (evaluate's bits document by document) over these documents, if it was scored."""
    path = root / "metrics" / "eval" / f"{rung}.docs.json"
    if not path.exists():
        return None
    scores = json.loads(path.read_text())
    if not scores["whole_split"]:  # evaluate.max_tokens cut the split: not the same documents
        return None
    by_id = {i: (b, n) for i, b, n in zip(scores["ids"], scores["bits"], scores["bytes"])}
    picked = [by_id[doc_id(d)] for d in docs if doc_id(d) in by_id]
    return sum(b for b, _ in picked) / sum(n for _, n in picked) if picked else None


def xz(data: bytes) -> int:
    return len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def zstd(data: bytes) -> int:
    out = subprocess.run(["zstd", "-19", "--long=27", "-T1", "-c"], input=data, capture_output=True, check=True)
    return len(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="the project whose data/prepared to read")
    ap.add_argument("--train-mb", type=float, default=64, help="train text the compressor sees first")
    ap.add_argument("--min-line", type=int, default=20, help="characters a stripped line needs to count as shared")
    ap.add_argument("--rungs", default="tiny,mini", help="rungs whose scored test documents to set beside")
    args = ap.parse_args()
    prepared = args.root / PREPARED
    escaped = layout_kept(prepared)
    train, train_bytes = text_of(prepared / "train.txt", escaped, int(args.train_mb * 1e6))
    test_docs = list(read_docs(prepared / "test.txt", escaped))
    print(f"train {train_bytes / 1e6:.1f} MB first, test {sum(len(d.encode()) for d in test_docs) / 1e6:.2f} MB "
          "(documents' own bytes)")
    near: list[bool] = []
    seen = line_hashes(prepared / "train.txt", escaped, args.min_line, train_bytes)
    for where, hashes in zip(("the whole train split", f"the first {train_bytes / 1e6:.0f} MB"), seen):
        share, near = overlap(test_docs, hashes, args.min_line)
        print(f"test bytes in lines of >= {args.min_line} characters found verbatim in {where}: {share:.1%}; "
              f"near-copies: {sum(near)} of {len(near)} test documents", flush=True)
    # near: of what the compressors see. Every figure twice: all test documents, and all but those near-copies.
    subsets = {"all": test_docs, "no near-copies": [d for d, n in zip(test_docs, near) if not n]}
    for rung in args.rungs.split(","):
        got = {k: model_bpb(args.root, rung, docs) for k, docs in subsets.items()}
        if None not in got.values():
            print(f"{rung} (evaluate's gate figure): all {got['all']:.3f}, no near-copies {got['no near-copies']:.3f}")
    compressors = {"xz -9e": xz, **({"zstd -19 --long=27": zstd} if shutil.which("zstd") else {})}
    for name, size_of in compressors.items():
        train_size = size_of(train)
        for subset, docs in subsets.items():
            test = "\n".join(docs).encode("utf-8") + b"\n"
            n_bytes = sum(len(d.encode("utf-8")) for d in docs)
            alone, given = size_of(test), size_of(train + test) - train_size
            print(f"{name}, {subset} ({len(docs)} documents): test alone {alone * 8 / n_bytes:.3f} bits/byte, "
                  f"after the train text {given * 8 / n_bytes:.3f} bits/byte", flush=True)


if __name__ == "__main__":
    main()
