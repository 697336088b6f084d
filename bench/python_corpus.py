"""A real corpus no one tuned for: every .py file of this Python installation, once each, as one parquet file.

    python bench/python_corpus.py --out ~/corpora/python-src.parquet
    python bench/python_corpus.py --out /tmp/py.parquet --max-mb 100        # the first 100 MB only

One row per file: `text` (the file as it is, layout and all) and `path` (where it lives under its
installation root, e.g. site-packages/numpy/linalg/_linalg.py). Files are taken in sorted path order from
the standard library and every site-packages directory of the running interpreter; a file that is not
UTF-8 is skipped. Unlike bench_data.py's generated corpora nothing is copied twice, so what the download
stage's dedupe drops are files that really are identical (vendored copies, empty __init__.py files).
Rows go out 1,024 to a row group, which is what the download stage holds in memory at a time.

docs/data.md ("A real corpus: Python sources") has the params that read it and the whole-ladder recipe.
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP = 1024


def installation_roots() -> list[Path]:
    """The standard library and the site-packages directories of this interpreter, without repeats."""
    roots = {Path(sysconfig.get_paths()[key]).resolve() for key in ("stdlib", "purelib", "platlib")}
    return sorted(roots)


def sources(roots: list[Path]) -> list[tuple[Path, str]]:
    """(file, its path under its root's parent) of every .py file, each once, in a fixed order. A root inside
    another (site-packages under the stdlib's lib/) keeps its files for itself."""
    seen: dict[Path, str] = {}
    for root in sorted(roots, key=lambda r: len(r.parts), reverse=True):  # deepest root first
        for path in root.rglob("*.py"):
            if path.is_file() and path.resolve() not in seen:
                seen[path.resolve()] = path.relative_to(root.parent).as_posix()
    return sorted(((p, rel) for p, rel in seen.items()), key=lambda item: item[1])


def write(out: Path, files: list[tuple[Path, str]], max_bytes: int) -> tuple[int, int, int]:
    """Write the files' text as parquet rows; (files written, bytes of text, files skipped as not UTF-8)."""
    schema = pa.schema([("text", pa.string()), ("path", pa.string())])
    tmp = out.with_name(out.name + ".part")
    written = size = skipped = 0
    rows: dict[str, list[str]] = {"text": [], "path": []}
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for path, rel in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                skipped += 1
                continue
            rows["text"].append(text)
            rows["path"].append(rel)
            written, size = written + 1, size + len(text.encode("utf-8"))
            if len(rows["text"]) == ROW_GROUP:
                writer.write_table(pa.table(rows, schema=schema))
                rows = {"text": [], "path": []}
            if max_bytes and size >= max_bytes:
                break
        if rows["text"]:
            writer.write_table(pa.table(rows, schema=schema))
    tmp.rename(out)
    return written, size, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the .parquet file to write")
    ap.add_argument("--max-mb", type=float, default=0, help="stop after this much text (0: every file)")
    args = ap.parse_args()
    out = args.out.expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    roots = installation_roots()
    files = sources(roots)
    n, size, skipped = write(out, files, int(args.max_mb * 1e6))
    print(f"{out}: {n:,} files, {size / 1e6:,.1f} MB of text from {', '.join(map(str, roots))}"
          f"{f'; {skipped} not UTF-8, skipped' if skipped else ''}", file=sys.stderr)


if __name__ == "__main__":
    main()
