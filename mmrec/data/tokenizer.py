"""SentencePiece: train on a sample of the train split, encode every split into flat token files.

data/tokens/{split}.bin holds the ids of each document followed by EOS, back to back, as uint16 (uint32
for a vocabulary over 65536 pieces); header.json names the dtype, says how many tokens and UTF-8 bytes each
file holds (bits per byte divides by those bytes), and which tokenizer made them. Readers go through
read_header()/load_tokens(), which refuse a file whose size disagrees with its header.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from mmrec.config import Params, TokenizerParams
from mmrec.cpus import usable_cpus
from mmrec.errors import UserError
from mmrec.files import dvc_fix, replacing, replacing_dir, sha256_file, write_json, write_text
from mmrec.memory import peak_rss_mb
from mmrec.paths import PREPARED, SPLITS, TOKENIZER, TOKENIZER_METRICS, TOKENIZER_SPEED, TOKENS

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MAX_DOC_BYTES = 1 << 20  # longer train documents are left out of training (still encoded)
BATCH_BYTES = 1 << 20  # text encoded per batch: bounds memory whatever the corpus size
SAMPLE_SHARE = 0.95  # a sampled document is drawn with this share of sample_bytes / train bytes
HEADER = "header.json"
READ_TOKENS = 1 << 20  # ids read at a time by a pass over a whole split (np.bincount makes 8 bytes of each)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (the default vocabularies), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ------------------------------------------------------------------------------------ split files


def layout_kept(prepared_dir: Path) -> bool:
    """Whether the split files hold escaped documents (data.keep_layout), as their manifest says."""
    manifest = Path(prepared_dir) / "manifest.json"
    return manifest.is_file() and bool(json.loads(manifest.read_text(encoding="utf-8")).get("keep_layout"))


def unescape(line: str) -> str:
    """Undo mmrec.data.corpus.escape: '\\\\' -> '\\', '\\n' -> newline. NUL never survives cleaning, so it
    can stand for an escaped backslash while the newlines are put back."""
    if "\\" not in line:
        return line
    return line.replace("\\\\", "\0").replace("\\n", "\n").replace("\0", "\\")


def _text_blocks(path: Path) -> Iterator[tuple[str, int]]:
    """Whole lines of a split file, about BATCH_BYTES at a time: (text ending in a newline, its bytes)."""
    with open(path, "rb") as f:
        carry: list[bytes] = []
        for block in iter(lambda: f.read(BATCH_BYTES), b""):
            cut = block.rfind(b"\n") + 1
            if not cut:  # a line longer than a block: keep collecting
                carry.append(block)
                continue
            yield _utf8(b"".join([*carry, block[:cut]]), path)
            carry = [block[cut:]]
        if tail := b"".join(carry):
            yield _utf8(tail + b"\n", path)  # a last line without its newline


def _utf8(data: bytes, path: Path) -> tuple[str, int]:
    try:
        return data.decode("utf-8"), len(data)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8 (rerun `dvc repro download`)") from None


def read_docs(path: Path, escaped: bool = False) -> Iterator[str]:
    """The documents of a split file, one per line (split on '\\n' only, so the text and its byte count are
    kept exactly); `escaped` files (data.keep_layout) get their newlines back."""
    for text, _ in _text_blocks(path):
        lines = text.split("\n")[:-1]
        yield from map(unescape, lines) if escaped else lines


@dataclass
class SampleCount:
    """What the sampler saw: documents read, drawn, drawn but over MAX_DOC_BYTES, and taken."""
    read: int = 0
    drawn: int = 0
    too_long: int = 0
    taken: int = 0


def sample_docs(path: Path, sample_bytes: int, seed: int, escaped: bool = False,
                count: SampleCount | None = None) -> Iterator[str]:
    """The train documents SentencePiece learns from: all of them when the file holds at most `sample_bytes`,
    else each drawn (seeded) with probability SAMPLE_SHARE * sample_bytes / file size, never more than
    `sample_bytes` in all: the margin keeps the bound from cutting off the end of the file. Documents over
    MAX_DOC_BYTES are left out (they are still encoded).

    We sample here because sentencepiece 0.2.3's own sampling (input_sentence_size) differs from run
    to run even after set_random_generator_seed, and counts sentences, not bytes.
    """
    size = path.stat().st_size
    keep = 1.0 if size <= sample_bytes else SAMPLE_SHARE * sample_bytes / size
    draw = random.Random(seed).random
    count = SampleCount() if count is None else count
    taken = 0
    for doc in read_docs(path, escaped):
        count.read += 1
        if keep < 1.0 and draw() >= keep:
            continue
        doc_bytes = len(doc.encode("utf-8"))
        count.drawn += 1
        if doc_bytes > MAX_DOC_BYTES:
            count.too_long += 1
        elif taken + doc_bytes + 1 <= sample_bytes:
            taken += doc_bytes + 1
            count.taken += 1
            yield doc
    if count.too_long and count.taken:
        print(f"note: {count.too_long} train documents over {MAX_DOC_BYTES} bytes left out of tokenizer training "
              "(they are still encoded)", file=sys.stderr)


def empty_sample(count: SampleCount, sample_bytes: int, train_bytes: int) -> UserError:
    """Why SentencePiece got no document at all, as one line naming what to change."""
    if count.drawn and count.too_long == count.drawn:
        return UserError(f"tokenizer sample: all {count.drawn} train documents drawn are over {MAX_DOC_BYTES} bytes, "
                         "the most SentencePiece trains on as one document; split the source into smaller "
                         "documents (records of data.text_field, or blank lines in a .txt)")
    return UserError(f"tokenizer.sample_bytes = {sample_bytes} takes in no train document (they average "
                     f"{train_bytes // max(count.read, 1):,} bytes); raise tokenizer.sample_bytes")


def _user_error(err: RuntimeError, sampled: int) -> UserError | None:
    """SentencePiece's messages for a vocab the corpus cannot fit, as one line the user can act on.
    `sampled`: tokenizer.sample_bytes when it took only a part of the train split, else 0."""
    msg = str(err)
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg):
        if sampled:
            return UserError(f"tokenizer.vocab_size = {m[1]}: the tokenizer's sample of the train split "
                             f"(tokenizer.sample_bytes = {sampled}) can fill at most {m[2]} pieces; lower "
                             "tokenizer.vocab_size or raise tokenizer.sample_bytes")
        return UserError(f"tokenizer.vocab_size = {m[1]}: the train split can fill at most {m[2]} pieces; "
                         "lower tokenizer.vocab_size")
    if m := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg):
        return UserError(f"tokenizer.vocab_size = {m[1]}: this corpus needs at least {m[2]} pieces "
                         "(special, byte-fallback and character pieces); raise tokenizer.vocab_size "
                         "or lower tokenizer.character_coverage")
    return None


def train_tokenizer(train_txt: Path, out_dir: Path, params: TokenizerParams, seed: int,
                    progress: bool = False) -> Path:
    """Train on a sample of the train split (tokenizer.sample_bytes, seeded); writes out_dir/spm.model and
    spm.vocab, returns the model path.

    The documents go in through an iterator and the model comes back as bytes, so no file path is
    stored inside the model: equal text and params give a byte-identical spm.model wherever it runs.
    """
    train_txt, out_dir = Path(train_txt), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)  # for anything random inside the trainer
    model = io.BytesIO()
    count = SampleCount()
    sample = sample_docs(train_txt, params.sample_bytes, seed, layout_kept(train_txt.parent), count)
    total = min(params.sample_bytes, train_txt.stat().st_size)
    # the bar fills while SentencePiece loads the sample; its training that follows reports nothing
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizer sample", disable=not progress) as bar:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_counted(sample, bar.update),
                model_writer=model,
                model_type=params.model_type,
                vocab_size=params.vocab_size,
                character_coverage=params.character_coverage,
                byte_fallback=params.byte_fallback,
                split_digits=params.split_digits,
                # set only when on: the model stores every option passed, and a default-params model stays
                # byte-identical to the ones made before this option existed
                **({"allow_whitespace_only_pieces": True} if params.allow_whitespace_only_pieces else {}),
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
            if not count.taken and "sentences_.empty()" in str(err):
                raise empty_sample(count, params.sample_bytes, train_txt.stat().st_size) from None
            sampled = params.sample_bytes if params.sample_bytes < train_txt.stat().st_size else 0
            raise (_user_error(err, sampled) or err) from None
    model_path = out_dir / "spm.model"
    with replacing(model_path) as tmp:
        tmp.write_bytes(model.getvalue())
    sp = load_tokenizer(model_path)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    write_text(out_dir / "spm.vocab", vocab)  # the same text spm_train writes
    return model_path


def _counted(docs: Iterable[str], advance: Callable[[int], object]) -> Iterator[str]:
    for doc in docs:
        advance(len(doc.encode("utf-8")) + 1)
        yield doc


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


class Batch(NamedTuple):
    docs: list[str]
    chars: int  # characters of the documents
    bytes: int  # UTF-8 bytes of the documents


def _batches(path: Path, escaped: bool) -> Iterator[Batch]:
    """The documents of a split file, about BATCH_BYTES at a time."""
    for text, size in _text_blocks(path):
        lines = text.split("\n")[:-1]
        docs = [unescape(line) for line in lines] if escaped else lines
        chars = sum(map(len, docs))
        # an escape is two ASCII characters for one: what unescaping saves in characters it saves in bytes
        yield Batch(docs, chars, size - len(lines) - (len(text) - len(lines) - chars))


def _encoded(sp: spm.SentencePieceProcessor, batches: Iterable[Batch],
             num_threads: int) -> Iterator[tuple[Batch, list[np.ndarray]]]:
    """(batch, ids of each of its documents), in order. Each of `num_threads` threads encodes a batch of
    its own with SentencePiece (which releases the GIL) while this one reads the next: no thread waits
    for the longest document of a shared batch, as in one multi-threaded call per batch."""
    with ThreadPoolExecutor(num_threads) as pool:
        pending: collections.deque = collections.deque()
        try:
            for batch in batches:
                pending.append((batch, pool.submit(sp.encode, batch.docs, return_type="numpy", num_threads=1)))
                if len(pending) > num_threads:
                    done, ids = pending.popleft()
                    yield done, ids.result()
            while pending:
                done, ids = pending.popleft()
                yield done, ids.result()
        finally:
            for _, ids in pending:
                ids.cancel()


def encode_split(sp: spm.SentencePieceProcessor, txt: Path, out: Path, num_threads: int, digest,
                  escaped: bool, dtype: np.dtype, advance: Callable[[int], object]) -> dict:
    """Write one split's tokens to `out`; `digest` sees every token byte written."""
    is_byte = np.array([sp.is_byte(i) for i in range(sp.get_piece_size())])
    eos = np.array([EOS_ID], dtype=np.int32)
    docs_n = chars = text_bytes = tokens = unk = byte_pieces = 0
    with replacing(out) as tmp, open(tmp, "wb") as f:
        for batch, ids in _encoded(sp, _batches(txt, escaped), num_threads):
            flat = np.concatenate([a for doc_ids in ids for a in (doc_ids, eos)])
            chunk = flat.astype(dtype).tobytes()
            f.write(chunk)
            digest.update(chunk)
            docs_n += len(batch.docs)
            chars += batch.chars
            text_bytes += batch.bytes
            tokens += len(flat)
            unk += int((flat == UNK_ID).sum())
            byte_pieces += int(is_byte[flat].sum())
            advance(batch.bytes + len(batch.docs))
    return dict(documents=docs_n, characters=chars, bytes=text_bytes, tokens=tokens,
                bytes_per_token=round(text_bytes / max(tokens, 1), 4), unk_rate=unk / max(tokens, 1),
                byte_fallback_rate=byte_pieces / max(tokens, 1))


def encode_splits(model_path: Path, prepared_dir: Path, tokens_dir: Path, num_threads: int,
                  progress: bool = False) -> dict:
    """Encode {train,val,test}.txt into tokens_dir/{split}.bin (EOS after each document) + header.json.

    Returns the header. Per split: documents, characters, bytes (UTF-8, newlines between documents not
    counted), tokens (EOS included), bytes_per_token, unk_rate and byte_fallback_rate (shares of all tokens).
    data_sha256 is the sha256 of train.bin, val.bin and test.bin read back to back.
    """
    sp = load_tokenizer(model_path)
    vocab_size = sp.get_piece_size()
    dtype = token_dtype(vocab_size)
    prepared_dir, tokens_dir = Path(prepared_dir), Path(tokens_dir)
    tokens_dir.mkdir(parents=True, exist_ok=True)
    escaped = layout_kept(prepared_dir)
    digest = hashlib.sha256()
    total = sum((prepared_dir / f"{s}.txt").stat().st_size for s in SPLITS)
    with tqdm(total=total, unit="B", unit_scale=True, desc="encode", disable=not progress) as bar:
        splits = {s: encode_split(sp, prepared_dir / f"{s}.txt", tokens_dir / f"{s}.bin", num_threads, digest,
                                   escaped, dtype, bar.update)
                  for s in SPLITS}
    header = dict(dtype=dtype.name, vocab_size=vocab_size, eos_id=EOS_ID, bos_id=BOS_ID,
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
    if header.get("dtype") not in ("uint16", "uint32") or not isinstance(header.get("splits"), dict):
        raise UserError(f"{tokens_dir / HEADER}: not a token header (rerun `dvc repro tokenizer`)")
    itemsize = np.dtype(header["dtype"]).itemsize
    for split, stats in header["splits"].items():
        path = tokens_dir / f"{split}.bin"
        size = path.stat().st_size if path.is_file() else None
        if size != stats["tokens"] * itemsize:
            found = "missing" if size is None else f"{size} bytes"
            raise UserError(f"{path}: {found}, header says {stats['tokens']} tokens "
                            f"({stats['tokens'] * itemsize} bytes); rerun `dvc repro tokenizer`")
    return header


def _split_file(tokens_dir: str | Path, split: str) -> tuple[Path, dict]:
    """The token file of one split and the header, both checked."""
    header = read_header(tokens_dir)
    if split not in header["splits"]:
        raise UserError(f"unknown split {split!r}; {Path(tokens_dir) / HEADER} has: {', '.join(header['splits'])}")
    return Path(tokens_dir) / f"{split}.bin", header


def _blocks_of(path: Path, dtype: str) -> Iterator[np.ndarray]:
    """The ids of a token file, READ_TOKENS at a time, read (not mapped): a pass over a split of any size holds
    one block, and none of the file's pages count as this process's memory."""
    with open(path, "rb") as f:
        while len(block := np.fromfile(f, dtype=dtype, count=READ_TOKENS)):
            yield block


def _beyond_vocab(path: Path, vocab_size: int) -> UserError:
    # a damaged file: one line instead of an embedding IndexError mid-training
    return UserError(f"{path}: holds ids beyond vocab_size {vocab_size} (damaged?); {dvc_fix('tokenizer')}")


def token_counts(tokens_dir: str | Path, split: str) -> np.ndarray:
    """How often each id occurs in a split (int64, vocab_size entries), counted a block at a time."""
    path, header = _split_file(tokens_dir, split)
    vocab = header["vocab_size"]
    counts = np.zeros(vocab, dtype=np.int64)
    for block in _blocks_of(path, header["dtype"]):
        found = np.bincount(block, minlength=vocab)
        if len(found) > vocab:
            raise _beyond_vocab(path, vocab)
        counts += found
    return counts


class TokenFile:
    """A split's ids read on demand (os.pread): `tokens[a:b]` is read from the file, which is never mapped, so
    the windows a long training draws from a large train split never add up to its size in memory."""

    def __init__(self, path: Path, dtype: str):
        self.path, self.dtype = path, np.dtype(dtype)
        self._fd = os.open(path, os.O_RDONLY)
        self._len = os.fstat(self._fd).st_size // self.dtype.itemsize

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenFile takes contiguous slices only")
        start, stop, _ = key.indices(self._len)
        size = self.dtype.itemsize
        return np.frombuffer(os.pread(self._fd, max(stop - start, 0) * size, start * size), dtype=self.dtype)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


def load_tokens(tokens_dir: str | Path, split: str, mapped: bool = True) -> np.memmap | TokenFile:
    """The token ids of one split (uint16 or uint32, as header.json says), read-only: mapped (not loaded), or
    with mapped=False read on demand (TokenFile, for the train split whose size must not count). Either way
    the ids are checked first, a block at a time."""
    path, header = _split_file(tokens_dir, split)
    for block in _blocks_of(path, header["dtype"]):
        if int(block.max()) >= header["vocab_size"]:
            raise _beyond_vocab(path, header["vocab_size"])
    if not mapped:
        return TokenFile(path, header["dtype"])
    return np.memmap(path, dtype=header["dtype"], mode="r")


# ------------------------------------------------------------------------------------------ stage


def build_tokenizer(params: Params, root: Path = Path("."), progress: bool = False) -> dict:
    """The tokenizer stage: train SentencePiece on a sample of train.txt, encode every split; writes
    models/tokenizer, data/tokens, metrics/tokenizer.json and metrics/speed/tokenizer.json under `root`.
    Returns the token header plus `seconds`."""
    prepared = root / PREPARED
    for split in SPLITS:
        txt = prepared / f"{split}.txt"
        if not txt.is_file() or txt.stat().st_size == 0:
            raise UserError(f"{txt}: missing or empty (run `dvc repro download` first)")
    start = time.perf_counter()
    # Both dirs are built beside their final place and renamed in only when everything succeeded.
    with replacing_dir(root / TOKENIZER) as model_dir, replacing_dir(root / TOKENS) as tokens_dir:
        model = train_tokenizer(prepared / "train.txt", model_dir, params.tokenizer, params.seed, progress)
        trained = time.perf_counter()
        # encoding is the same on any thread count, so it takes every usable CPU (training keeps its fixed count)
        threads = usable_cpus()
        header = encode_splits(model, prepared, tokens_dir, threads, progress)
    seconds, encode_s = time.perf_counter() - start, time.perf_counter() - trained
    write_json(root / TOKENIZER_METRICS, dict(vocab_size=header["vocab_size"], **header["splits"]))
    text = sum(split["bytes"] for split in header["splits"].values())
    write_json(root / TOKENIZER_SPEED, {
        "seconds": round(seconds, 2), "bytes": text, "mb_per_s": round(text / 1e6 / seconds, 2),
        "train_seconds": round(trained - start, 2), "encode_seconds": round(encode_s, 2),
        "encode_mb_per_s": round(text / 1e6 / encode_s, 2), "encode_threads": threads, "peak_rss_mb": peak_rss_mb()})
    return {**header, "seconds": seconds}
