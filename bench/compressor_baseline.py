"""What a general-purpose compressor makes of the test split, given the train text first: the bar a model's
test bits per byte should clear on a corpus that repeats itself (library code across packages).

    python bench/compressor_baseline.py --train-mb 64          # after `dvc repro download`

For each compressor, bits per byte of the test documents = (size of train + test compressed - size of train
compressed) x 8 / test bytes, so the compressor has seen the same train text a model learned from (its
window permitting: xz -9e keeps 64 MiB, zstd --long=27 128 MiB). The documents are read from
data/prepared as the tokenizer reads them (escapes undone when data.keep_layout), joined by newlines; the
bytes divided by are the documents' own UTF-8 bytes, as metrics/eval/<rung>.json's test_bpb_context
divides by (it leaves out the stream's first token, a few bytes). xz runs through Python's lzma; zstd is
the `zstd` command when there is one. Never run by the tests.
"""
from __future__ import annotations

import argparse
import lzma
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mmrec.data.tokenizer import layout_kept, read_docs  # noqa: E402
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


def xz(data: bytes) -> int:
    return len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def zstd(data: bytes) -> int:
    out = subprocess.run(["zstd", "-19", "--long=27", "-T1", "-c"], input=data, capture_output=True, check=True)
    return len(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="the project whose data/prepared to read")
    ap.add_argument("--train-mb", type=float, default=64, help="train text the compressor sees first")
    args = ap.parse_args()
    prepared = args.root / PREPARED
    escaped = layout_kept(prepared)
    train, train_bytes = text_of(prepared / "train.txt", escaped, int(args.train_mb * 1e6))
    test, test_bytes = text_of(prepared / "test.txt", escaped)
    print(f"train {train_bytes / 1e6:.1f} MB first, test {test_bytes / 1e6:.2f} MB (documents' own bytes)")
    compressors = {"xz -9e": xz, **({"zstd -19 --long=27": zstd} if shutil.which("zstd") else {})}
    for name, size_of in compressors.items():
        alone, given = size_of(test), size_of(train + test) - size_of(train)
        print(f"{name}: test alone {alone * 8 / test_bytes:.3f} bits/byte, after the train text "
              f"{given * 8 / test_bytes:.3f} bits/byte", flush=True)


if __name__ == "__main__":
    main()
