"""Stage `tokenizer`: train SentencePiece on a sample of data/prepared/train.txt, encode every split to data/tokens."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mmrec is not pip-installed

from mmrec.config import load_params  # noqa: E402
from mmrec.attempts import marked  # noqa: E402
from mmrec.errors import UserError, exits_cleanly  # noqa: E402
from mmrec.files import replacing_dir, write_json  # noqa: E402
from mmrec.memory import peak_rss_mb  # noqa: E402
from mmrec.paths import PREPARED, SPLITS, TOKENIZER, TOKENS  # noqa: E402
from mmrec.data.tokenizer import encode_splits, train_tokenizer  # noqa: E402

METRICS = Path("metrics/tokenizer.json")
SPEED = Path("metrics/speed/tokenizer.json")  # wall clock, apart from the reproducible metrics


@exits_cleanly
@marked
def main() -> None:
    params = load_params()
    for split in SPLITS:
        txt = PREPARED / f"{split}.txt"
        if not txt.is_file() or txt.stat().st_size == 0:
            raise UserError(f"{txt}: missing or empty (run `dvc repro download` first)")
    progress = sys.stderr.isatty()  # bars for a person watching, not for a log
    start = time.perf_counter()
    # Both dirs are built beside their final place and renamed in only when everything succeeded.
    with replacing_dir(TOKENIZER) as model_dir, replacing_dir(TOKENS) as tokens_dir:
        model = train_tokenizer(PREPARED / "train.txt", model_dir, params.tokenizer, params.seed, progress)
        trained = time.perf_counter()
        # encoding is the same on any thread count, so it takes every core (training keeps its fixed count)
        threads = os.cpu_count() or 1
        header = encode_splits(model, PREPARED, tokens_dir, threads, progress)
    seconds, encode_s = time.perf_counter() - start, time.perf_counter() - trained
    write_json(METRICS, dict(vocab_size=header["vocab_size"], **header["splits"]))
    text = sum(split["bytes"] for split in header["splits"].values())
    write_json(SPEED, {"seconds": round(seconds, 2), "bytes": text, "mb_per_s": round(text / 1e6 / seconds, 2),
                       "train_seconds": round(trained - start, 2), "encode_seconds": round(encode_s, 2),
                       "encode_mb_per_s": round(text / 1e6 / encode_s, 2), "encode_threads": threads,
                       "peak_rss_mb": peak_rss_mb()})
    bpt = ", ".join(f"{s} {header['splits'][s]['bytes_per_token']:.3f}" for s in SPLITS)
    print(f"tokenizer: vocab {header['vocab_size']}, {header['splits']['train']['tokens']:,} train tokens, "
          f"bytes/token {bpt}, {seconds:.1f}s")


if __name__ == "__main__":
    main()
