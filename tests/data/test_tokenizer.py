"""mmrec.data.tokenizer and stages/tokenizer.py on small generated corpora, with the real SentencePiece."""
import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from sentencepiece import sentencepiece_model_pb2

import mmrec.data.tokenizer
from mmrec.config import DataParams, TokenizerParams
from mmrec.data.corpus import build_corpus, clean, escape
from mmrec.errors import UserError
from mmrec.files import replacing_dir, sha256_file
from mmrec.model.inference import text_bytes
from mmrec.data.tokenizer import (EOS_ID, encode_splits, load_tokenizer, load_tokens, read_docs, read_header, sample_docs,
                             train_tokenizer, unescape)

from tests.conftest import REPO  # noqa: E402
WORDS = ("the lord said unto moses and aaron behold house of israel 12 tribes 40 days; "
         "let there be light: it was good, thou shalt not").split()
ONLY_IN_HELD_OUT = "ж"  # a character the train split never shows
PARAMS = TokenizerParams(vocab_size=320, num_threads=1)


def make_docs(n: int, seed: int, extra: str = "") -> list[str]:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(n)]
    return [d + f" {extra}" if extra and i % 3 == 0 else d for i, d in enumerate(docs)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prepared")
    (d / "train.txt").write_text("\n".join(make_docs(300, 0)) + "\n", encoding="utf-8")
    for i, split in enumerate(("val", "test")):
        (d / f"{split}.txt").write_text("\n".join(make_docs(30, i + 1, ONLY_IN_HELD_OUT)) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def model(prepared, tmp_path_factory) -> Path:
    return train_tokenizer(prepared / "train.txt", tmp_path_factory.mktemp("tok"), PARAMS, seed=7)


@pytest.fixture(scope="module")
def tokens(model, prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens")
    encode_splits(model, prepared, out, num_threads=2)
    return out


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


@pytest.mark.parametrize("sample_bytes", [10**9, 20_000])
def test_rerun_gives_the_same_model_bytes(prepared, model, tmp_path, sample_bytes):
    params = PARAMS.model_copy(update=dict(sample_bytes=sample_bytes))
    first = train_tokenizer(prepared / "train.txt", tmp_path / "a", params, seed=7)
    again = train_tokenizer(prepared / "train.txt", tmp_path / "b", params, seed=7)  # another dir: no paths inside
    assert first.read_bytes() == again.read_bytes()
    assert (tmp_path / "a/spm.vocab").read_bytes() == (tmp_path / "b/spm.vocab").read_bytes()
    whole = sample_bytes >= (prepared / "train.txt").stat().st_size
    assert (first.read_bytes() == model.read_bytes()) == whole  # a sample as large as the split is all of it
    assert not list(tmp_path.glob("*/*.tmp"))


def test_the_sample_is_bounded_by_bytes_and_drawn_with_the_seed(prepared, tmp_path):
    train = prepared / "train.txt"
    size = train.stat().st_size
    assert list(sample_docs(train, size, seed=1)) == lines(train)  # as large as the split: all, in order
    a, b = list(sample_docs(train, size // 3, seed=1)), list(sample_docs(train, size // 3, seed=2))
    for sample in (a, b):
        taken = sum(len(d.encode()) + 1 for d in sample)
        assert size // 6 < taken <= size // 3  # bounded, and not far below the bound
        assert set(sample) <= set(lines(train))
    assert a == list(sample_docs(train, size // 3, seed=1)) and a != b
    params = PARAMS.model_copy(update=dict(sample_bytes=size // 3))
    one = train_tokenizer(train, tmp_path / "a", params, seed=1)
    two = train_tokenizer(train, tmp_path / "b", params, seed=2)
    assert one.read_bytes() != two.read_bytes()


def test_special_ids_and_vocab_file(model):
    sp = load_tokenizer(model.parent)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert sp.get_piece_size() == PARAMS.vocab_size
    vocab = (model.parent / "spm.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == PARAMS.vocab_size
    assert vocab[:4] == ["<unk>\t0", "<s>\t0", "</s>\t0", "<pad>\t0"]


@pytest.mark.parametrize("text", ["🙂 日本語 naïve", "the  lord\tsaid ", ONLY_IN_HELD_OUT])
def test_unseen_characters_round_trip_through_bytes(model, text):
    sp = load_tokenizer(model)
    ids = sp.encode(text)
    assert 0 not in ids
    assert sp.decode(ids) == text


def test_without_byte_fallback_unseen_characters_are_unk(prepared, tmp_path):
    params = PARAMS.model_copy(update=dict(byte_fallback=False, vocab_size=100))
    sp = load_tokenizer(train_tokenizer(prepared / "train.txt", tmp_path, params, seed=7))
    assert 0 in sp.encode("🙂 the")


def test_bin_holds_each_document_then_eos(model, prepared, tokens):
    sp = load_tokenizer(model)
    for split in ("train", "val", "test"):
        docs, ids = lines(prepared / f"{split}.txt"), load_tokens(tokens, split)
        assert ids.dtype == np.uint16 and not ids.flags.writeable
        ends = np.flatnonzero(ids == EOS_ID)
        assert len(ends) == len(docs) and ends[-1] == len(ids) - 1
        starts = np.concatenate([[0], ends[:-1] + 1])
        assert [sp.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)] == docs


def test_header_counts(model, prepared, tokens):
    header = read_header(tokens)
    assert header["vocab_size"] == PARAMS.vocab_size and header["eos_id"] == EOS_ID
    assert header["tokenizer_sha256"] == sha256_file(model)
    token_bytes = b"".join((tokens / f"{s}.bin").read_bytes() for s in ("train", "val", "test"))
    assert header["data_sha256"] == hashlib.sha256(token_bytes).hexdigest()
    for split, stats in header["splits"].items():
        docs = lines(prepared / f"{split}.txt")
        assert stats["tokens"] == len(load_tokens(tokens, split)) == os.path.getsize(tokens / f"{split}.bin") // 2
        assert stats["documents"] == len(docs)
        assert stats["bytes"] == sum(len(d.encode()) for d in docs)
        assert stats["bytes_per_token"] == pytest.approx(stats["bytes"] / stats["tokens"], abs=1e-4)
    val = header["splits"]["val"]
    assert val["bytes"] > val["characters"]  # 'ж' is two bytes: bytes are counted, not characters


def test_encoding_uses_the_tokenizer_trained_on_train_only(model, tokens):
    sp = load_tokenizer(model)
    assert not any(ONLY_IN_HELD_OUT in sp.id_to_piece(i) for i in range(sp.get_piece_size()))
    splits = read_header(tokens)["splits"]
    assert splits["train"]["byte_fallback_rate"] == 0
    assert splits["val"]["byte_fallback_rate"] > 0 and splits["test"]["byte_fallback_rate"] > 0
    assert all(s["unk_rate"] == 0 for s in splits.values())


def test_vocab_too_large_says_how_many_the_corpus_can_fill(prepared, tmp_path):
    params = PARAMS.model_copy(update=dict(vocab_size=20000))
    with pytest.raises(UserError, match=r"tokenizer.vocab_size = 20000: .* at most (\d+) pieces") as err:
        train_tokenizer(prepared / "train.txt", tmp_path, params, seed=7)
    fillable = int(re.search(r"at most (\d+)", str(err.value))[1])
    sp = load_tokenizer(train_tokenizer(prepared / "train.txt", tmp_path,
                                        PARAMS.model_copy(update=dict(vocab_size=fillable)), seed=7))
    assert sp.get_piece_size() == fillable


def test_vocab_too_large_for_a_sample_says_the_sample_may_grow(prepared, tmp_path):
    params = PARAMS.model_copy(update=dict(vocab_size=20000, sample_bytes=5000))
    with pytest.raises(UserError, match=r"the tokenizer's sample of the train split \(tokenizer.sample_bytes = 5000\) "
                                        r"can fill at most \d+ pieces; .* or raise tokenizer.sample_bytes$"):
        train_tokenizer(prepared / "train.txt", tmp_path, params, seed=7)


def test_vocab_too_small_for_byte_fallback(prepared, tmp_path):
    with pytest.raises(UserError, match=r"vocab_size = 100: this corpus needs at least \d+ pieces"):
        train_tokenizer(prepared / "train.txt", tmp_path, PARAMS.model_copy(update=dict(vocab_size=100)), seed=7)


def test_a_sample_bytes_that_holds_no_document_says_raise_it(tmp_path):
    (tmp_path / "train.txt").write_text("\n".join(make_docs(400, 0)) + "\n", encoding="utf-8")
    params = PARAMS.model_copy(update=dict(sample_bytes=20))  # every document is longer
    with pytest.raises(UserError, match=r"^tokenizer.sample_bytes = 20 takes in no train document \(they average "
                                        r"\d+ bytes\); raise tokenizer.sample_bytes$"):
        train_tokenizer(tmp_path / "train.txt", tmp_path / "tok", params, seed=7)


def test_documents_all_over_the_sentence_limit_say_split_them(tmp_path):
    long = " ".join(["the lord said unto moses"] * 45_000)  # 1.1 MB each: SentencePiece takes at most 1 MB
    (tmp_path / "train.txt").write_text(f"{long}\n{long} and aaron\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"^tokenizer sample: all 2 train documents drawn are over 1048576 bytes, .*"
                                        r"split the source into smaller documents"):
        train_tokenizer(tmp_path / "train.txt", tmp_path / "tok", PARAMS, seed=7)


def test_text_that_is_not_utf8_is_refused(tmp_path):
    (tmp_path / "train.txt").write_bytes(b"in the beginning\n\xff\xfe\n")
    with pytest.raises(UserError, match=r"train\.txt: not valid UTF-8"):
        train_tokenizer(tmp_path / "train.txt", tmp_path, PARAMS, seed=7)


@pytest.mark.parametrize("damage", ["truncate", "drop_byte", "delete"])
def test_a_damaged_token_file_is_refused(tokens, tmp_path, damage):
    copy = tmp_path / "tokens"
    copy.mkdir()
    for f in tokens.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    bin_file = copy / "val.bin"
    size = bin_file.stat().st_size
    if damage == "delete":
        bin_file.unlink()
    else:
        os.truncate(bin_file, size // 2 if damage == "truncate" else size - 1)
    with pytest.raises(UserError, match=r"val\.bin: .*header says \d+ tokens"):
        load_tokens(copy, "train")  # any read checks every file the header names


def test_whole_split_reads_hold_a_block_not_the_split(workdir):
    """Counting a train split and checking its ids read it a block at a time; the train split that training
    draws windows from is read window by window. None of it is mapped, so its size never counts as memory."""
    from tests.conftest import grow_train_split

    tokens = workdir / "data/tokens"
    ids = np.fromfile(grow_train_split(workdir, 12_000_000), dtype=np.uint16)  # 24 MB
    code = f"""
import sys, tracemalloc
sys.path.insert(0, {str(REPO)!r})
import numpy as np
from mmrec.data.tokenizer import load_tokens, token_counts
def rss_mb():  # resident now: anonymous memory and mapped file pages alike
    status = open("/proc/self/status").read().split("VmRSS:")[1]
    return int(status.split()[0]) / 1024
before = rss_mb()
tracemalloc.start()
counts = token_counts({str(tokens)!r}, "train")
train = load_tokens({str(tokens)!r}, "train", mapped=False)
rng = np.random.default_rng(0)
windows = [train[s:s + 257] for s in rng.integers(0, len(train) - 257, 2000).tolist()]
print(tracemalloc.get_traced_memory()[1] / 2**20, rss_mb() - before, len(train), counts.tolist())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    traced_mb, rss_mb, n, counts = done.stdout.split(maxsplit=3)
    assert int(n) == len(ids) and json.loads(counts) == np.bincount(ids, minlength=400).tolist()
    assert float(traced_mb) < 16  # np.bincount of the whole split made 8 bytes of every id: 96 MB
    assert float(rss_mb) < 16  # mapping it and reading it through held its 24 MB


def test_a_token_file_slices_like_the_mapped_split(tokens):
    mapped, read = load_tokens(tokens, "train"), load_tokens(tokens, "train", mapped=False)
    assert len(read) == len(mapped)
    for a, b in [(0, 10), (5, 5), (len(mapped) - 3, len(mapped) + 7), (-4, None)]:
        assert read[a:b].tolist() == mapped[a:b].tolist()


def test_missing_header_and_tokenizer_say_what_to_run(tmp_path):
    with pytest.raises(UserError, match="dvc repro tokenizer"):
        read_header(tmp_path)
    with pytest.raises(UserError, match="dvc repro tokenizer"):
        load_tokenizer(tmp_path)


def test_replacing_dir_keeps_the_old_dir_when_the_build_fails(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), replacing_dir(final) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("build failed")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (final / "old.txt").exists()
    with replacing_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in final.iterdir()] == ["new.txt"]


def run_stage(cwd: Path, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "stages/tokenizer.py")], cwd=cwd, capture_output=True,
                          text=True, timeout=120, **popen)


def test_stage_writes_every_output(prepared, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tokenizer": {"vocab_size": 320}}))
    (tmp_path / "data").mkdir()
    os.symlink(prepared, tmp_path / "data/prepared")
    done = run_stage(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tokenizer: vocab 320") and done.stderr == ""
    assert sorted(p.name for p in (tmp_path / "data/tokens").iterdir()) == ["header.json", "test.bin", "train.bin",
                                                                            "val.bin"]
    assert sorted(p.name for p in (tmp_path / "models/tokenizer").iterdir()) == ["spm.model", "spm.vocab"]
    metrics = json.loads((tmp_path / "metrics/tokenizer.json").read_text())
    assert metrics["vocab_size"] == 320 and "seconds" not in metrics  # reproducible bytes
    speed = json.loads((tmp_path / "metrics/speed/tokenizer.json").read_text())
    assert speed["seconds"] >= speed["train_seconds"] > 0 and speed["encode_seconds"] > 0
    assert speed["bytes"] == sum(metrics[s]["bytes"] for s in ("train", "val", "test"))
    assert speed["mb_per_s"] > 0 and speed["encode_mb_per_s"] > 0 and 20 < speed["peak_rss_mb"] < 1000
    assert metrics["test"]["tokens"] == read_header(tmp_path / "data/tokens")["splits"]["test"]["tokens"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared", "tokens"]  # no temp dirs left


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_encoding_threads_follow_the_cpus_the_process_may_use(prepared, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tokenizer": {"vocab_size": 320}}))
    (tmp_path / "data").mkdir()
    os.symlink(prepared, tmp_path / "data/prepared")
    one_cpu = min(os.sched_getaffinity(0))
    done = run_stage(tmp_path, preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu}))  # as taskset -c would
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "metrics/speed/tokenizer.json").read_text())["encode_threads"] == 1


def test_stage_without_prepared_data_says_run_download(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    done = run_stage(tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: data/prepared/train.txt: missing or empty (run `dvc repro download` first)"


def documents(tokens_dir: Path, split: str, sp) -> list[str]:
    """Each document of a token file, decoded (EOS ends each one)."""
    ids = load_tokens(tokens_dir, split)
    ends = np.flatnonzero(ids == EOS_ID)
    return [sp.decode(ids[s:e].tolist()) for s, e in zip(np.concatenate([[0], ends[:-1] + 1]), ends)]


def test_encoding_threads_and_batches_change_nothing(model, prepared, tokens, tmp_path, monkeypatch):
    monkeypatch.setattr(mmrec.data.tokenizer, "BATCH_BYTES", 1000)  # many batches through the prefetching reader
    header = encode_splits(model, prepared, tmp_path, num_threads=1)
    assert header == read_header(tokens)
    for split in ("train", "val", "test"):
        assert (tmp_path / f"{split}.bin").read_bytes() == (tokens / f"{split}.bin").read_bytes()


@pytest.mark.parametrize("seed", range(3))
def test_unescape_undoes_escape(seed):
    rng = random.Random(seed)
    for _ in range(500):
        doc = "".join(rng.choice(["\\", "n", "\n", "a", " ", "\\n"]) for _ in range(rng.randint(1, 12)))
        line = escape(doc)
        assert "\n" not in line and unescape(line) == doc


CODE = [
    "def f(x):\r\n\tif x:\r\n        return '\\\\n'  \r\n\n\n    # done \u00e9\n",  # CRLF, a tab, a backslash-n
    "first line\n\n    indented after a blank line\n  \\\n ends with a backslash\\",
    "  leading spaces kept\n\u2028 a unicode line separator",
]


def layout_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"# doc {seed}-{i}\n" + "\n".join("    " * rng.randrange(4) + " ".join(rng.choices(WORDS, k=6))
                                               for _ in range(rng.randint(2, 12))) for i in range(n)]


def test_layout_survives_download_tokenizer_and_text_bytes(tmp_path):
    texts = layout_docs(200, 0) + CODE
    source = tmp_path / "code.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    data = DataParams(source=str(source), group_by=[], keep_layout=True, val_fraction=0.2, test_fraction=0.2)
    build_corpus(data, root=tmp_path)
    prepared_dir = tmp_path / "data/prepared"
    params = TokenizerParams(vocab_size=400, num_threads=1, allow_whitespace_only_pieces=True)
    model = train_tokenizer(prepared_dir / "train.txt", tmp_path / "tok", params, seed=0)
    header = encode_splits(model, prepared_dir, tmp_path / "tokens", num_threads=2)
    sp = load_tokenizer(model)
    assert any(set(sp.id_to_piece(i)) == {"\u2581"} and len(sp.id_to_piece(i)) > 1
               for i in range(sp.get_piece_size()))  # indentation has pieces of its own
    kept = []
    for split in ("train", "val", "test"):
        docs = list(read_docs(prepared_dir / f"{split}.txt", escaped=True))
        assert documents(tmp_path / "tokens", split, sp) == docs  # decode(encode(doc)) == doc
        ids = load_tokens(tmp_path / "tokens", split)
        assert text_bytes(sp, ids, EOS_ID) == header["splits"][split]["bytes"] == sum(len(d.encode()) for d in docs)
        kept += docs
    assert sorted(kept) == sorted(clean(t, keep_layout=True) for t in texts)
    assert "def f(x):\n\tif x:\n        return '\\\\n'\n\n\n    # done \u00e9" in kept
    assert sum("\n" in d for d in kept) == len(texts)


def big_vocabulary(model: Path, out: Path, pieces: int) -> Path:
    """`model` with user-defined pieces appended up to `pieces`: SentencePiece cannot train a vocabulary of
    70,000 on a test corpus, but encodes with one; 'zq<number>' in a text becomes that piece's id."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    for i in range(pieces - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece, piece.score = f"zq{i}", 0.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    out.mkdir()
    (out / "spm.model").write_bytes(proto.SerializeToString())
    return out / "spm.model"


def test_a_vocabulary_over_65536_writes_uint32_tokens(model, tmp_path):
    assert TokenizerParams(vocab_size=70_000).vocab_size == 70_000  # params allow it
    big = big_vocabulary(model, tmp_path / "tok", 70_000)
    sp = load_tokenizer(big)
    docs = ["the lord zq69000 said", "zq5 and zq65300 behold"]
    prepared_dir = tmp_path / "prepared"
    prepared_dir.mkdir()
    for split in ("train", "val", "test"):
        (prepared_dir / f"{split}.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    header = encode_splits(big, prepared_dir, tmp_path / "tokens", num_threads=2)
    assert header["dtype"] == "uint32" and header["vocab_size"] == 70_000
    ids = load_tokens(tmp_path / "tokens", "test")
    assert ids.dtype == np.uint32 and int(ids.max()) == sp.piece_to_id("zq69000") > 65535
    assert (tmp_path / "tokens/test.bin").stat().st_size == 4 * header["splits"]["test"]["tokens"]
    assert documents(tmp_path / "tokens", "test", sp) == docs
    assert text_bytes(sp, ids, EOS_ID) == header["splits"]["test"]["bytes"]


def test_split_files_are_read_in_blocks_without_cutting_a_line(tmp_path, monkeypatch):
    monkeypatch.setattr(mmrec.data.tokenizer, "BATCH_BYTES", 8)  # lines longer than a block, characters across blocks
    docs = ["short", "a line much longer than one block", "ж日本語🙂 across", "x", "last without newline"]
    path = tmp_path / "train.txt"
    path.write_text("\n".join(docs), encoding="utf-8")
    assert list(read_docs(path)) == docs
