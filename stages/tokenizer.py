"""Stage `tokenizer`: train SentencePiece on a sample of data/prepared/train.txt, encode every split to data/tokens."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mmrec is not pip-installed

from mmrec.config import load_params  # noqa: E402
from mmrec.attempts import marked  # noqa: E402
from mmrec.data.tokenizer import build_tokenizer  # noqa: E402
from mmrec.errors import exits_cleanly  # noqa: E402
from mmrec.paths import SPLITS  # noqa: E402


@exits_cleanly
@marked
def main() -> None:
    header = build_tokenizer(load_params(), progress=sys.stderr.isatty())  # bars for a person, not a log
    bpt = ", ".join(f"{s} {header['splits'][s]['bytes_per_token']:.3f}" for s in SPLITS)
    print(f"tokenizer: vocab {header['vocab_size']}, {header['splits']['train']['tokens']:,} train tokens, "
          f"bytes/token {bpt}, {header['seconds']:.1f}s")


if __name__ == "__main__":
    main()
