"""DVC stage `download`: fetch, clean and split the corpus named by params.yaml `data`.

    python stages/download.py     (from the repository root)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mmrec is not pip-installed

from mmrec.config import load_params  # noqa: E402
from mmrec.data.corpus import build_corpus  # noqa: E402
from mmrec.attempts import marked  # noqa: E402
from mmrec.errors import exits_cleanly  # noqa: E402


@exits_cleanly
@marked
def main() -> None:
    params = load_params()
    manifest = build_corpus(params.data, progress=sys.stderr.isatty())  # bars for a person, not a log
    print(
        f"corpus {manifest['source']}: {manifest['documents_read']} documents read, "
        f"{manifest['short_dropped']} too short, {manifest['duplicates_dropped']} duplicates dropped"
    )
    for name, split in manifest["splits"].items():
        print(f"  {name:5s} {split['documents']:7d} docs {split['characters']:11,d} chars {split['bytes']:11,d} bytes")
    print(f"wrote data/prepared/ and metrics/download.json in {manifest['seconds']:.1f}s")


if __name__ == "__main__":
    main()
