"""mmrec.data.corpus: sources, cleaning, the stable split, outputs, and real HTTP downloads on 127.0.0.1."""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import mmrec.data.corpus
from mmrec.config import DataParams
from mmrec.data.corpus import (
    DigestSet,
    DownloadError,
    build_corpus,
    clean,
    download,
    escape,
    package_file,
    read_documents,
    resolve_source,
    split_of,
)
from mmrec.errors import UserError

from tests.conftest import REPO  # noqa: E402


def docs(n: int, tag: str = "doc") -> list[str]:
    return [f"{tag} number {i} says something about item {i * 7 % 13}." for i in range(n)]


def write_txt(path: Path, documents: list[str]) -> Path:
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path


def params(source: Path | str, **kw) -> DataParams:
    return DataParams(source=str(source), group_by=kw.pop("group_by", []), **kw)


def prepared(root: Path, split: str) -> list[str]:
    return (root / "data/prepared" / f"{split}.txt").read_text(encoding="utf-8").splitlines()


def compressed(path: Path, data: bytes, codec: str) -> Path:
    """`data` written through pyarrow's streaming compressor, as a real .gz/.zst file of a corpus would be."""
    with pa.CompressedOutputStream(str(path), codec) as out:
        out.write(data)
    return path


def jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def outputs(root: Path) -> dict[str, str]:
    """sha256 of every file of data/prepared."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "data/prepared").iterdir())}


# ----------------------------------------------------------------------------------- cleaning


def test_clean_normalizes_drops_controls_and_collapses_whitespace():
    assert clean("  Cafe\u0301\tau\n\nlait \x00\x07end\u200b \ufeff ") == "Caf\u00e9 au lait end"
    assert clean("a\r\nb\u00a0\u2028c") == "a b c"  # every whitespace run, newlines included, is one space
    assert clean("\u0928\u094d\u200d") == "\u0928\u094d\u200d"  # ZWJ carries meaning: kept
    assert clean("lone \ud800 surrogate") == "lone surrogate"  # could not be written as UTF-8


def test_clean_keeping_the_layout_keeps_lines_and_indentation():
    text = "\n\n  def f(x):\r\n\treturn x \\ 2   \r\n\n\n    # done\u2028last\x00 line\t\n  \n"
    assert clean(text, keep_layout=True) == "  def f(x):\n\treturn x \\ 2\n\n\n    # done\nlast line"
    assert clean(text) == "def f(x): return x \\ 2 # done last line"
    assert clean(" \n \t\n", keep_layout=True) == ""


def test_escape_keeps_a_document_on_one_line():
    doc = "a\\nb\n\\\n c\\"  # a backslash before n, before a newline, and at the end
    line = escape(doc)
    assert "\n" not in line and line == "a\\\\nb\\n\\\\\\n c\\\\"


def test_digest_set_matches_a_python_set():
    rng = np.random.default_rng(0)
    seen, reference = DigestSet(), set()
    for _ in range(40):  # batches with repeats inside and across them, as corpus chunks have
        batch = rng.integers(0, 3000, rng.integers(1, 200)).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        new = seen.add_new(batch)
        expected = []
        for value in batch.tolist():
            expected.append(value not in reference)
            reference.add(value)
        assert new.tolist() == expected
    assert len(seen) == len(reference) and seen.runs <= 12  # runs merge: about log2(n) of them


def test_digest_set_stays_fast_when_each_batch_brings_fewer_new_documents():
    """A corpus sorted by length: each chunk brings fewer new documents than the last. Runs must merge anyway;
    they once piled up one per batch, and every lookup walked them all (82 s against 1.7 s for 2,000 batches)."""
    rng = np.random.default_rng(1)
    sizes = {"equal": [300] * 600, "shrinking": list(range(600, 0, -1))}  # about 180,000 digests each
    seconds = {}
    for name, counts in sizes.items():
        batches = np.split(rng.integers(0, 2**63, sum(counts), dtype=np.uint64), np.cumsum(counts)[:-1])
        seen, start = DigestSet(), time.perf_counter()
        for batch in batches:
            seen.add_new(batch)
        seconds[name] = time.perf_counter() - start
        assert len(seen) == sum(counts)
    assert seconds["shrinking"] < 3 * seconds["equal"], seconds  # quadratic, it was 10x and more here


def test_digest_set_peaks_near_its_steady_8_bytes_a_document():
    import tracemalloc

    rng = np.random.default_rng(2)
    n, seen = 1 << 19, DigestSet()
    tracemalloc.start()
    try:
        for _ in range(n // 4096):  # a full merge of the last runs comes with the last batch
            seen.add_new(rng.integers(0, 2**63, 4096, dtype=np.uint64))
        steady, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert steady / n < 8.5
    assert peak / n < 11, (steady / n, peak / n)  # a merge of whole sets held three copies: 25 bytes a document


def test_duplicates_and_short_documents_are_dropped_and_counted(tmp_path):
    corpus = docs(60) + ["doc number 3 says  something about item 8.", "tiny", "   "]
    m = build_corpus(params(write_txt(tmp_path / "c.txt", corpus), min_doc_chars=10), root=tmp_path)
    assert m["duplicates_dropped"] == 1  # the same text as doc 3 once whitespace is collapsed
    assert m["short_dropped"] == 1  # "tiny"; the blank piece is not a document at all
    lines = [line for split in ("train", "val", "test") for line in prepared(tmp_path, split)]
    assert sorted(lines) == sorted(docs(60))


# ---------------------------------------------------------------------------------- the split


def test_split_is_stable_when_documents_are_added(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    build_corpus(params(write_txt(tmp_path / "a.txt", docs(200)), val_fraction=0.1, test_fraction=0.1), root=small)
    build_corpus(
        params(write_txt(tmp_path / "b.txt", docs(300, "other") + docs(200)), val_fraction=0.1, test_fraction=0.1),
        root=large,
    )
    for split in ("train", "val", "test"):
        before = set(prepared(small, split))
        assert before <= set(prepared(large, split)), split
        assert before  # each split got some documents
    # about the configured fractions
    assert 20 <= len(prepared(large, "val")) <= 80
    assert split_of(hashlib.sha256(b"x").digest(), 0.1, 0.1) == split_of(hashlib.sha256(b"x").digest(), 0.1, 0.1)


def test_split_boundaries():
    digest = lambda u: int(u * 2**64).to_bytes(8, "big") + bytes(24)  # noqa: E731
    assert split_of(digest(0.04), 0.05, 0.1) == "val"
    assert split_of(digest(0.10), 0.05, 0.1) == "test"
    assert split_of(digest(0.20), 0.05, 0.1) == "train"


def test_empty_corpus_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"no documents after cleaning \(2 read, 2 shorter"):
        build_corpus(params(write_txt(tmp_path / "c.txt", ["a", "b"]), min_doc_chars=5), root=tmp_path)


def test_too_few_documents_for_the_splits(tmp_path):
    with pytest.raises(UserError, match=r"the corpus has 3 documents .* fractions need about \d+\+ documents"):
        build_corpus(params(write_txt(tmp_path / "c.txt", docs(3))), root=tmp_path)
    assert not (tmp_path / "data/prepared").exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["raw"]  # no temp directory left behind


def test_outputs_manifest_metrics_and_failure_keeps_old_outputs(tmp_path):
    source = write_txt(tmp_path / "c.txt", docs(100))
    m = build_corpus(params(source, val_fraction=0.1, test_fraction=0.1), root=tmp_path)
    manifest = json.loads((tmp_path / "data/prepared/manifest.json").read_text())
    assert manifest["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert manifest["raw_bytes"] == source.stat().st_size
    for split in ("train", "val", "test"):
        data = (tmp_path / "data/prepared" / f"{split}.txt").read_bytes()
        assert manifest["splits"][split]["bytes"] == len(data)
        assert manifest["splits"][split]["documents"] == data.count(b"\n")
        assert manifest["splits"][split]["characters"] == len(data.decode()) - data.count(b"\n")
    assert sum(s["documents"] for s in manifest["splits"].values()) == 100
    metrics = json.loads((tmp_path / "metrics/download.json").read_text())
    assert metrics["train"] == manifest["splits"]["train"] and "seconds" not in metrics  # reproducible bytes
    assert json.loads((tmp_path / "metrics/speed/download.json").read_text())["seconds"] == m["seconds"] >= 0
    assert json.loads((tmp_path / "data/raw/manifest.json").read_text())["sha256"] == manifest["source_sha256"]

    before = {p.name: p.read_bytes() for p in (tmp_path / "data/prepared").iterdir()}
    with pytest.raises(UserError):
        build_corpus(params(write_txt(tmp_path / "small.txt", docs(2))), root=tmp_path)
    assert {p.name: p.read_bytes() for p in (tmp_path / "data/prepared").iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared", "raw"]


# ---------------------------------------------------------------------------- local formats


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"\n\nfirst line\nsame doc\n \t\nsecond\r\n\r\nthird\n\n\n")
    assert [clean(d) for d in read_documents(path)] == ["first line same doc", "second", "third"]


def test_jsonl_group_by_joins_consecutive_records_only(tmp_path):
    rows = [("A", 1, "one"), ("A", 1, "two"), ("A", 2, "three"), ("B", 1, "four"), ("A", 1, "five")]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"book": b, "chapter": c, "body": t}) + "\n" for b, c, t in rows) + "\n")
    grouped = [clean(d) for d in read_documents(path, "body", ["book", "chapter"])]
    assert grouped == ["one two", "three", "four", "five"]  # the last ("A", 1) is not consecutive
    assert list(read_documents(path, "body", [])) == ["one", "two", "three", "four", "five"]
    with pytest.raises(UserError, match=r"c\.jsonl:1: no field 'text'"):
        list(read_documents(path, "text", []))


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match=r"c\.jsonl:2: not valid JSON"):
        list(read_documents(path))
    path.write_text('{"text": 5}\n')
    with pytest.raises(UserError, match="expected a string"):
        list(read_documents(path))


def test_parquet_with_group_by(tmp_path):
    path = tmp_path / "c.parquet"
    pd.DataFrame({"doc": [1, 1, 2], "text": ["alpha", "beta", None]}).to_parquet(path)
    assert [clean(d) for d in read_documents(path, "text", ["doc"])] == ["alpha beta", ""]
    with pytest.raises(UserError, match="no column 'content'.*it has: doc, text"):
        list(read_documents(path, "content", []))


def test_directory_reads_every_supported_file_sorted(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    write_txt(corpus / "b.txt", ["from b"])
    (corpus / "a.jsonl").write_text('{"text": "from a"}\n')
    (corpus / "sub" / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "from c"}\n'))
    (corpus / "notes.md").write_text("not corpus")
    path, digest = resolve_source(params(corpus))
    assert path == corpus and len(digest) == 64
    from mmrec.data.corpus import input_files

    assert [p.relative_to(corpus).as_posix() for p in input_files(corpus)] == ["a.jsonl", "b.txt", "sub/c.jsonl.gz"]
    got = [clean(d) for f in input_files(corpus) for d in read_documents(f)]
    assert got == ["from a", "from b", "from c"]


def test_undecodable_bytes_name_file_and_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good text\n\nbad \xff here")
    with pytest.raises(UserError, match=r"bad\.txt: not UTF-8 at byte offset 15"):
        build_corpus(params(path), root=tmp_path)


def test_unknown_source_kind_and_missing_path(tmp_path):
    with pytest.raises(UserError, match=r"'ftp://example\.com/c\.txt': unknown source kind; allowed: an http"):
        resolve_source(params("ftp://example.com/c.txt"), root=tmp_path)
    with pytest.raises(UserError, match=r"no such file or directory; allowed"):
        resolve_source(params("missing.txt"), root=tmp_path)
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(UserError, match="unsupported file type"):
        build_corpus(params(tmp_path / "c.csv"), root=tmp_path)


# ----------------------------------------------------------------------------- package source


def test_package_file_is_found_without_importing_the_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "explodes"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / "data" / "c.jsonl").write_text('{"text": "packaged"}\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert package_file("explodes/data/c.jsonl") == pkg / "data" / "c.jsonl"
    assert "explodes" not in sys.modules
    with pytest.raises(UserError, match="no installed Python package 'not_a_package_xyz'"):
        package_file("not_a_package_xyz/data.jsonl")
    with pytest.raises(UserError, match="has no file 'data/missing.jsonl'"):
        package_file("explodes/data/missing.jsonl")


def test_default_source_is_the_kjv_by_chapter():
    data = DataParams()
    path, _ = resolve_source(data)
    chapters = list(read_documents(path, data.text_field, data.group_by))
    assert len(chapters) == 1189
    assert clean(chapters[0]).startswith("In the beginning God created the heaven and the earth. And the earth")
    assert "bible" not in sys.modules


# ------------------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    """Serves server.routes[path] = (body, content type, mode); logs (path, Range) per request."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output quiet
        pass

    def do_GET(self):
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        if self.path not in srv.routes:
            self.send_error(404)
            return
        body, content_type, mode = srv.routes[self.path]
        if mode == "hang":  # accepts the connection, never answers
            srv.release.wait(10)
            return
        start, rng = 0, self.headers.get("Range")
        if rng and mode != "ignore_range":
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", content_type)
        if mode == "no_length":  # the body runs until the connection closes
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if mode in ("cut", "ignore_range") and len(srv.log) == 1:  # first request: half the body, then hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.routes, srv.log, srv.release = {}, [], threading.Event()
    srv.url = f"http://127.0.0.1:{srv.server_port}"
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


BODY = "".join(json.dumps({"text": t}) + "\n" for t in docs(5000)).encode()  # a few download chunks
BODY_SHA = hashlib.sha256(BODY).hexdigest()
FAST = dict(retries=2, timeout_s=5.0, backoff_s=0.01)


def resumed_at(range_header: str) -> int:
    assert range_header.startswith("bytes=") and range_header.endswith("-"), range_header
    return int(range_header[6:-1])


def test_download_verifies_and_reuses_the_cached_file(server, tmp_path):
    server.routes["/c.jsonl"] = (BODY, "application/octet-stream", "ok")
    path = download(server.url + "/c.jsonl", tmp_path, BODY_SHA, **FAST)
    assert path == tmp_path / "c.jsonl" and path.read_bytes() == BODY
    assert not (tmp_path / "c.jsonl.part").exists()
    server.log.clear()
    assert download(server.url + "/c.jsonl", tmp_path, BODY_SHA, **FAST) == path
    assert server.log == []  # the verified file was reused: no request at all


def test_download_resumes_a_cut_connection_with_range(server, tmp_path):
    server.routes["/c.jsonl"] = (BODY, "application/octet-stream", "cut")
    path = download(server.url + "/c.jsonl", tmp_path, BODY_SHA, **FAST)
    assert path.read_bytes() == BODY
    (_, first_range), (_, second_range) = server.log
    assert first_range is None
    assert 0 < resumed_at(second_range) <= len(BODY) // 2  # what arrived before the cut was kept


def test_download_restarts_when_the_server_ignores_range(server, tmp_path):
    server.routes["/c.jsonl"] = (BODY, "application/octet-stream", "ignore_range")
    path = download(server.url + "/c.jsonl", tmp_path, BODY_SHA, **FAST)
    assert path.read_bytes() == BODY  # the 200 body replaced the half part instead of being appended
    assert len(server.log) == 2 and resumed_at(server.log[1][1]) > 0


def test_checksum_mismatch_leaves_no_file(server, tmp_path):
    server.routes["/c.jsonl"] = (BODY, "application/octet-stream", "ok")
    with pytest.raises(DownloadError, match=f"expected sha256 {'0' * 64}, got {BODY_SHA}"):
        download(server.url + "/c.jsonl", tmp_path, "0" * 64, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_404_names_the_code_and_url_without_retrying(server, tmp_path):
    url = server.url + "/missing.jsonl"
    with pytest.raises(DownloadError, match=f"HTTP 404 .* for {url}"):
        download(url, tmp_path, BODY_SHA, **FAST)
    assert len(server.log) == 1 and not (tmp_path / "missing.jsonl").exists()


def test_a_server_that_never_answers_times_out(server, tmp_path):
    server.routes["/c.jsonl"] = (BODY, "application/octet-stream", "hang")
    start = time.perf_counter()
    with pytest.raises(DownloadError, match=r"timed out after 2 tries \(data.timeout_s=0.2\)"):
        download(server.url + "/c.jsonl", tmp_path, BODY_SHA, retries=1, timeout_s=0.2, backoff_s=0.01)
    assert time.perf_counter() - start < 5
    assert len(server.log) == 2 and not (tmp_path / "c.jsonl").exists()


def test_html_and_oversized_answers_are_refused(server, tmp_path):
    server.routes["/login"] = (b"<html>sign in</html>", "text/html; charset=utf-8", "ok")
    with pytest.raises(DownloadError, match="HTML page"):
        download(server.url + "/login", tmp_path, BODY_SHA, **FAST)
    server.routes["/c.jsonl"] = (BODY, "application/octet-stream", "ok")
    with pytest.raises(DownloadError, match=f"is {len(BODY)} bytes, over data.max_bytes=100"):
        download(server.url + "/c.jsonl", tmp_path, BODY_SHA, max_bytes=100, **FAST)
    server.routes["/stream"] = (BODY, "application/octet-stream", "no_length")
    with pytest.raises(DownloadError, match=r"sent more than data.max_bytes=100000 bytes"):
        download(server.url + "/stream", tmp_path, BODY_SHA, max_bytes=100_000, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_a_url_needs_sha256_before_any_request(server, tmp_path):
    server.routes["/c.jsonl"] = (BODY, "application/octet-stream", "ok")
    with pytest.raises(UserError, match="data.sha256 is empty"):
        build_corpus(params(server.url + "/c.jsonl"), root=tmp_path)
    assert server.log == []


def test_url_source_end_to_end(server, tmp_path):
    server.routes["/c.jsonl"] = (BODY, "application/json", "ok")
    m = build_corpus(params(server.url + "/c.jsonl", sha256=BODY_SHA, timeout_s=5), root=tmp_path)
    assert (tmp_path / "data/raw/c.jsonl").read_bytes() == BODY
    assert m["source_sha256"] == BODY_SHA and sum(s["documents"] for s in m["splits"].values()) == 5000


# -------------------------------------------------------------------------------------- stage


def test_stage_script_exits_cleanly_on_a_user_error(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  source: nowhere://x\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages/download.py")], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: data.source = 'nowhere://x': unknown source kind; allowed: "
        "an http(s):// URL, a local file or directory (.txt/.jsonl/.parquet), or package:<import name>/<path>"
    ]


# ------------------------------------------------------------------------ compressed streams


def test_zst_and_gz_files_stream_like_plain_ones(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    compressed(corpus / "a.jsonl.zst", jsonl(["from a zst", "second a"]), "zstd")
    compressed(corpus / "b.txt.gz", b"from b gz\n\nsecond b\n", "gzip")
    gz = gzip.compress(b'{"text": "c one"}\n') + gzip.compress(b'{"text": "c two"}\n')  # two gzip members
    (corpus / "c.jsonl.gz").write_bytes(gz)
    table = pa.table({"text": ["from d parquet", "second d"]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    compressed(corpus / "d.parquet.zst", sink.getvalue().to_pybytes(), "zstd")
    from mmrec.data.corpus import input_files

    files = input_files(corpus)
    assert [p.name for p in files] == ["a.jsonl.zst", "b.txt.gz", "c.jsonl.gz", "d.parquet.zst"]
    assert [d for f in files for d in read_documents(f)] == [
        "from a zst", "second a", "from b gz", "second b", "c one", "c two", "from d parquet", "second d"]


@pytest.mark.parametrize("name, codec", [("c.jsonl.zst", "zstd"), ("c.jsonl.gz", "gzip")])
def test_a_cut_off_compressed_file_is_one_error_line_naming_it(tmp_path, name, codec):
    whole = compressed(tmp_path / "whole", jsonl(docs(3000)), codec).read_bytes()
    path = tmp_path / name
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError) as err:
        build_corpus(params(path), root=tmp_path)
    message = str(err.value)
    assert message.startswith(f"{path}: not a whole {'.zst' if codec == 'zstd' else '.gz'} stream, cut off or damaged")
    assert "\n" not in message and not (tmp_path / "data/prepared").exists()


def test_max_documents_reads_only_the_start_of_a_source(tmp_path):
    texts = code_docs(2000, seed=0)  # 6 MB
    whole = compressed(tmp_path / "whole", jsonl(texts), "zstd").read_bytes()
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(whole[: len(whole) // 2])  # cut off: reading it to the end would fail
    m = build_corpus(params(path, max_documents=200), root=tmp_path)
    assert m["documents_read"] == 200
    kept = {line for split in ("train", "val", "test") for line in prepared(tmp_path, split)}
    assert kept == {clean(t) for t in texts[:200]}


# Each reader runs in a fresh interpreter on a small and a 10x larger file, shaped like a multi-GB source by
# small blocks and row groups; peak RSS must not follow the file (reading whole, it grew about 3x the file).
RSS_SCRIPT = """
import sys
from pathlib import Path
import mmrec.data.corpus as corpus
from mmrec.config import DataParams
from mmrec.memory import peak_rss_mb
corpus.BLOCK_BYTES, corpus.PARQUET_BATCH_ROWS = 1 << 16, 64
source, root = sys.argv[1], Path(sys.argv[2])
corpus.build_corpus(DataParams(source=source, group_by=[], keep_layout=True), root=root, workers=1)
print(peak_rss_mb())
"""


def peak_rss_mb(source: Path, root: Path) -> float:
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(source), str(root)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


@functools.cache
def code_lines() -> tuple[str, ...]:
    rng = random.Random(0)
    words = "def return self value for in if else import from class while yield".split()
    return tuple("    " * rng.randrange(4) + " ".join(rng.choices(words, k=8)) for _ in range(4096))


def code_docs(n: int, seed: int) -> list[str]:
    """Documents shaped like source files: about 3 KB of indented lines each, all different."""
    lines = code_lines()
    return [f"# file {seed}-{i}\n" + "\n".join(lines[(start := (i * 997 + seed) % 4000):start + 60])
            for i in range(n)]


@pytest.mark.parametrize("fmt", ["jsonl.zst", "parquet"])
def test_peak_memory_does_not_grow_with_the_file(tmp_path, fmt):
    sizes = {}
    for n in (400, 4_000):  # about 1 MB and 12 MB of text
        texts = code_docs(n, seed=n)
        path = tmp_path / f"c{n}.{fmt}"
        if fmt == "parquet":
            pq.write_table(pa.table({"text": texts}), path, row_group_size=256)
        else:
            compressed(path, jsonl(texts), "zstd")
        text_mb = sum(len(t) for t in texts) / 1e6
        sizes[n] = (text_mb, peak_rss_mb(path, tmp_path / f"root{n}"))
    (small_mb, small_rss), (large_mb, large_rss) = sizes[400], sizes[4_000]
    assert large_mb - small_mb > 10
    # a whole-file read adds 3x the 10 MB more text and more (30+ MB); streaming adds allocator noise, up to
    # 5 MB seen when another test runs beside it
    assert large_rss - small_rss < 15, sizes


def test_workers_follow_the_cpus_the_process_may_use_not_the_host(tmp_path):
    """Pinned to one CPU (taskset, a cpuset), a source large enough for parallel cleaning gets one worker."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this OS")
    block = "\n\n".join(code_docs(400, seed=3)) + "\n\n"
    source = tmp_path / "c.txt"
    with open(source, "w", encoding="utf-8") as f:
        while f.tell() < mmrec.data.corpus.PARALLEL_MIN_BYTES:
            f.write(block)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": str(source), "max_documents": 200}}))
    one_cpu = min(os.sched_getaffinity(0))
    proc = subprocess.run([sys.executable, str(REPO / "stages/download.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu}))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "metrics/speed/download.json").read_text())["workers"] == 1


# ------------------------------------------------------------------------ parallel, caps


def test_parallel_cleaning_writes_the_same_bytes_as_serial(tmp_path, monkeypatch):
    monkeypatch.setattr(mmrec.data.corpus, "CHUNK_DOCS", 40)  # many chunks, duplicates across them
    texts = code_docs(300, seed=1)
    source = tmp_path / "c.jsonl"
    source.write_bytes(jsonl(texts + texts[::7] + ["x"] * 5))
    data = params(source, keep_layout=True, min_doc_chars=2)
    serial = build_corpus(data, root=tmp_path / "serial", workers=1)
    parallel = build_corpus(data, root=tmp_path / "parallel", workers=2)
    assert outputs(tmp_path / "serial") == outputs(tmp_path / "parallel")
    assert serial["duplicates_dropped"] == len(texts[::7]) and serial["short_dropped"] == 5
    assert {k: v for k, v in parallel.items() if k != "seconds"} == {k: v for k, v in serial.items() if k != "seconds"}
    speed = json.loads((tmp_path / "parallel/metrics/speed/download.json").read_text())
    assert speed["workers"] == 2 and speed["worker_peak_rss_mb"] > 0 and speed["mb_per_s"] > 0


def test_size_caps_keep_the_lowest_hashes_and_stay_stable_when_documents_are_added(tmp_path):
    data = dict(val_fraction=0.2, test_fraction=0.2, val_max_bytes=2_000, test_max_bytes=3_000)
    small = build_corpus(params(write_txt(tmp_path / "a.txt", docs(400)), **data), root=tmp_path / "small")
    large = build_corpus(params(write_txt(tmp_path / "b.txt", docs(600, "other") + docs(400)), **data),
                         root=tmp_path / "large")
    assert small["moved_to_train"]["val"] > 0 and small["moved_to_train"]["test"] > 0
    digest = lambda d: hashlib.sha256(d.encode()).digest()  # noqa: E731
    for m, root in ((small, tmp_path / "small"), (large, tmp_path / "large")):
        for split, cap in (("val", 2_000), ("test", 3_000)):
            lines = prepared(root, split)
            size = (root / "data/prepared" / f"{split}.txt").stat().st_size
            assert size == m["splits"][split]["bytes"] <= cap and size > cap - 100  # full up to one document
            # the kept ones are the lowest digests of the split's hash range; the rest went to train
            moved = [d for d in prepared(root, "train") if split_of(digest(d), 0.2, 0.2) == split]
            assert len(moved) == m["moved_to_train"][split]
            assert max(map(digest, lines)) < min(map(digest, moved))
    old = set(docs(400))
    for split in ("val", "test"):
        assert set(prepared(tmp_path / "large", split)) & old <= set(prepared(tmp_path / "small", split))
    assert set(prepared(tmp_path / "small", "train")) <= set(prepared(tmp_path / "large", "train"))
    with pytest.raises(UserError, match=r"data.val_max_bytes = 10 is smaller than every val document"):
        build_corpus(params(tmp_path / "a.txt", val_max_bytes=10), root=tmp_path / "tiny")
