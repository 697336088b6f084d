"""DVC stage evaluate@<rung>: see mmrec/pipeline/evaluate.py.

    python stages/evaluate.py tiny
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

from mmrec.config import load_rung_params  # noqa: E402
from mmrec.attempts import marked  # noqa: E402
from mmrec.errors import exits_cleanly  # noqa: E402


@exits_cleanly
@marked
def main(argv: list[str]) -> None:
    params, rung = load_rung_params(argv, "evaluate")
    from mmrec.pipeline.evaluate import evaluate_rung

    m = evaluate_rung(params, rung, progress=sys.stderr.isatty())  # a bar for a person, not for a log
    print(f"{rung}: test bits/byte {m['test_bpb_context']:.4f} with full context, {m['test_bpb']:.4f} in "
          f"{params.train.seq_len}-token windows (unigram {m['unigram_bpb']:.4f}), "
          f"loss {m['test_loss']:.4f}, ppl {m['test_ppl']:.1f}, top-1 {m['test_top1']:.3f}; "
          f"{m['test_documents']} test documents")


if __name__ == "__main__":
    main(sys.argv[1:])
