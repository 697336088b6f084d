"""mmrec.tokenizer and stages/tokenizer.py on small generated corpora, with the real SentencePiece."""
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
from mmrec.config import TokenizerParams
from mmrec.errors import UserError
from mmrec.files import replacing_dir, sha256_file
from mmrec.tokenizer import (EOS_ID, encode_splits, load_tokenizer, load_tokens, read_header,
                             train_tokenizer)

REPO = Path(__file__).resolve().parents[1]
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


@pytest.mark.parametrize("sample", [0, 100])
def test_rerun_gives_the_same_model_bytes(prepared, model, tmp_path, sample):
    params = PARAMS.model_copy(update=dict(input_sentence_size=sample))
    first = train_tokenizer(prepared / "train.txt", tmp_path / "a", params, seed=7)
    again = train_tokenizer(prepared / "train.txt", tmp_path / "b", params, seed=7)  # another dir: no paths inside
    assert first.read_bytes() == again.read_bytes()
    assert (tmp_path / "a/spm.vocab").read_bytes() == (tmp_path / "b/spm.vocab").read_bytes()
    assert (first.read_bytes() == model.read_bytes()) == (sample == 0)
    assert not list(tmp_path.glob("*/*.tmp"))


def test_a_sampled_subset_depends_on_the_seed(prepared, tmp_path):
    params = PARAMS.model_copy(update=dict(input_sentence_size=20))
    a = train_tokenizer(prepared / "train.txt", tmp_path / "a", params, seed=1)
    b = train_tokenizer(prepared / "train.txt", tmp_path / "b", params, seed=2)
    assert a.read_bytes() != b.read_bytes()


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


def test_vocab_too_small_for_byte_fallback(prepared, tmp_path):
    with pytest.raises(UserError, match=r"vocab_size = 100: this corpus needs at least \d+ pieces"):
        train_tokenizer(prepared / "train.txt", tmp_path, PARAMS.model_copy(update=dict(vocab_size=100)), seed=7)


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


def run_stage(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "stages/tokenizer.py")], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


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
    assert json.loads((tmp_path / "metrics/speed/tokenizer.json").read_text())["seconds"] >= 0
    assert metrics["test"]["tokens"] == read_header(tmp_path / "data/tokens")["splits"]["test"]["tokens"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared", "tokens"]  # no temp dirs left


def test_stage_without_prepared_data_says_run_download(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    done = run_stage(tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: data/prepared/train.txt: missing or empty (run `dvc repro download` first)"
