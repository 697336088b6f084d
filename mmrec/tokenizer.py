"""SentencePiece: train on the train split, encode every split into flat uint16 token files.

data/tokens/{split}.bin holds the ids of each document followed by EOS, back to back; header.json says
how many tokens and UTF-8 bytes each file holds (bits per byte divides by those bytes), and which
tokenizer made them. Readers go through read_header()/load_tokens(), which refuse a file whose size
disagrees with its header.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import re
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import sentencepiece as spm
from mmrec.config import TokenizerParams
from mmrec.errors import UserError
from mmrec.files import dvc_fix, replacing, sha256_file, write_json, write_text
from mmrec.paths import SPLITS

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
TOKEN_DTYPE = np.uint16
MAX_DOC_BYTES = 1 << 20  # longer train documents are left out of training (still encoded)
BATCH_CHARS = 1 << 22  # text encoded per batch: bounds memory whatever the corpus size
HEADER = "header.json"




def read_docs(path: Path) -> Iterator[str]:
    """One document per line. Split on '\\n' only, so the text (and its byte count) is kept exactly."""
    with open(path, encoding="utf-8", newline="\n") as f:
        try:
            for line in f:
                yield line.removesuffix("\n")
        except UnicodeDecodeError:
            raise UserError(f"{path}: not valid UTF-8 (rerun `dvc repro download`)") from None


def _train_docs(path: Path, limit: int, seed: int) -> Iterator[str]:
    """The train documents SentencePiece learns from: all, or `limit` of them drawn with `seed`.

    We sample here because sentencepiece 0.2.3's own sampling (input_sentence_size) differs from run
    to run even after set_random_generator_seed.
    """
    n = sum(1 for _ in read_docs(path))
    keep = set(random.Random(seed).sample(range(n), limit)) if 0 < limit < n else None
    skipped = 0
    for i, doc in enumerate(read_docs(path)):
        if keep is not None and i not in keep:
            continue
        if len(doc.encode()) > MAX_DOC_BYTES:
            skipped += 1
            continue
        yield doc
    if skipped:
        print(f"note: {skipped} train documents over {MAX_DOC_BYTES} bytes left out of tokenizer training "
              "(they are still encoded)", file=sys.stderr)


def _user_error(err: RuntimeError) -> UserError | None:
    """SentencePiece's messages for a vocab the corpus cannot fit, as one line the user can act on."""
    msg = str(err)
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg):
        return UserError(f"tokenizer.vocab_size = {m[1]}: the train split can fill at most {m[2]} pieces; "
                         "lower tokenizer.vocab_size")
    if m := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg):
        return UserError(f"tokenizer.vocab_size = {m[1]}: this corpus needs at least {m[2]} pieces "
                         "(special, byte-fallback and character pieces); raise tokenizer.vocab_size "
                         "or lower tokenizer.character_coverage")
    return None


def train_tokenizer(train_txt: Path, out_dir: Path, params: TokenizerParams, seed: int) -> Path:
    """Train on the train split only; writes out_dir/spm.model and spm.vocab, returns the model path.

    The documents go in through an iterator and the model comes back as bytes, so no file path is
    stored inside the model: equal text and params give a byte-identical spm.model wherever it runs.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)  # for anything random inside the trainer
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_train_docs(Path(train_txt), params.input_sentence_size, seed),
            model_writer=model,
            model_type=params.model_type,
            vocab_size=params.vocab_size,
            character_coverage=params.character_coverage,
            byte_fallback=params.byte_fallback,
            split_digits=params.split_digits,
            # Text kept exactly as is (decode(encode(doc)) == doc), so bits per byte are honest.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            num_threads=params.num_threads,
            input_sentence_size=0,  # sampled above, reproducibly
            max_sentence_length=MAX_DOC_BYTES,
            minloglevel=2,  # errors only
        )
    except RuntimeError as err:
        raise (_user_error(err) or err) from None
    model_path = out_dir / "spm.model"
    with replacing(model_path) as tmp:
        tmp.write_bytes(model.getvalue())
    sp = load_tokenizer(model_path)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    write_text(out_dir / "spm.vocab", vocab)  # the same text spm_train writes
    return model_path


def load_tokenizer(model_dir_or_path: str | Path) -> spm.SentencePieceProcessor:
    path = Path(model_dir_or_path)
    if path.is_dir():
        path = path / "spm.model"
    if not path.is_file():
        raise UserError(f"{path}: tokenizer not found (run `dvc repro tokenizer`)")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as err:
        raise UserError(f"{path}: not a SentencePiece model ({str(err).splitlines()[0][:120]}); "
                        f"{dvc_fix('tokenizer')}") from None


def _batches(path: Path) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in read_docs(path):
        batch.append(doc)
        size += len(doc)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_split(sp: spm.SentencePieceProcessor, txt: Path, out: Path, num_threads: int, digest) -> dict:
    """Write one split's tokens to `out`; `digest` sees every token byte written."""
    is_byte = np.array([sp.is_byte(i) for i in range(sp.get_piece_size())])
    eos = np.array([EOS_ID], dtype=np.int32)
    docs_n = chars = text_bytes = tokens = unk = byte_pieces = 0
    with replacing(out) as tmp, open(tmp, "wb") as f:
        for docs in _batches(txt):
            ids = sp.encode(docs, return_type="numpy", num_threads=num_threads)
            flat = np.concatenate([a for doc_ids in ids for a in (doc_ids, eos)])
            chunk = flat.astype(TOKEN_DTYPE).tobytes()
            f.write(chunk)
            digest.update(chunk)
            docs_n += len(docs)
            chars += sum(map(len, docs))
            text_bytes += sum(len(d.encode()) for d in docs)
            tokens += len(flat)
            unk += int((flat == UNK_ID).sum())
            byte_pieces += int(is_byte[flat].sum())
    return dict(documents=docs_n, characters=chars, bytes=text_bytes, tokens=tokens,
                bytes_per_token=round(text_bytes / max(tokens, 1), 4), unk_rate=unk / max(tokens, 1),
                byte_fallback_rate=byte_pieces / max(tokens, 1))


def encode_splits(model_path: Path, prepared_dir: Path, tokens_dir: Path, num_threads: int) -> dict:
    """Encode {train,val,test}.txt into tokens_dir/{split}.bin (uint16, EOS after each document) + header.json.

    Returns the header. Per split: documents, characters, bytes (UTF-8, newlines not counted), tokens
    (EOS included), bytes_per_token, unk_rate and byte_fallback_rate (shares of all tokens).
    data_sha256 is the sha256 of train.bin, val.bin and test.bin read back to back.
    """
    sp = load_tokenizer(model_path)
    vocab_size = sp.get_piece_size()
    if vocab_size > np.iinfo(TOKEN_DTYPE).max:
        raise UserError(f"tokenizer vocab_size = {vocab_size}: token files are uint16, at most 65535 allowed")
    tokens_dir = Path(tokens_dir)
    tokens_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    splits = {s: _encode_split(sp, Path(prepared_dir) / f"{s}.txt", tokens_dir / f"{s}.bin", num_threads, digest)
              for s in SPLITS}
    header = dict(dtype=np.dtype(TOKEN_DTYPE).name, vocab_size=vocab_size, eos_id=EOS_ID, bos_id=BOS_ID,
                  unk_id=UNK_ID, pad_id=PAD_ID, tokenizer_sha256=sha256_file(model_path),
                  data_sha256=digest.hexdigest(), splits=splits)
    write_json(tokens_dir / HEADER, header)
    return header


def read_header(tokens_dir: str | Path) -> dict:
    """header.json, checked against the size of every token file it describes."""
    tokens_dir = Path(tokens_dir)
    try:
        header = json.loads((tokens_dir / HEADER).read_text())
    except FileNotFoundError:
        raise UserError(f"{tokens_dir / HEADER}: not found (run `dvc repro tokenizer`)") from None
    except json.JSONDecodeError:
        raise UserError(f"{tokens_dir / HEADER}: not valid JSON (run `dvc repro tokenizer`)") from None
    if header.get("dtype") != np.dtype(TOKEN_DTYPE).name or not isinstance(header.get("splits"), dict):
        raise UserError(f"{tokens_dir / HEADER}: not a uint16 token header (rerun `dvc repro tokenizer`)")
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    for split, stats in header["splits"].items():
        path = tokens_dir / f"{split}.bin"
        size = path.stat().st_size if path.is_file() else None
        if size != stats["tokens"] * itemsize:
            found = "missing" if size is None else f"{size} bytes"
            raise UserError(f"{path}: {found}, header says {stats['tokens']} tokens "
                            f"({stats['tokens'] * itemsize} bytes); rerun `dvc repro tokenizer`")
    return header


def load_tokens(tokens_dir: str | Path, split: str) -> np.memmap:
    """The token ids of one split, read-only, mapped (not loaded) from disk."""
    header = read_header(tokens_dir)
    if split not in header["splits"]:
        raise UserError(f"unknown split {split!r}; {Path(tokens_dir) / HEADER} has: {', '.join(header['splits'])}")
    tokens = np.memmap(Path(tokens_dir) / f"{split}.bin", dtype=TOKEN_DTYPE, mode="r")
    if len(tokens) and int(tokens.max()) >= header["vocab_size"]:  # one pass over a few MB: cheap, and it
        # turns a damaged file into one line instead of an embedding IndexError mid-training
        raise UserError(f"{Path(tokens_dir) / f'{split}.bin'}: holds ids beyond vocab_size {header['vocab_size']} "
                        f"(damaged?); {dvc_fix('tokenizer')}")
    return tokens
