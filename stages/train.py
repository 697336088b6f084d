"""DVC stage train@<rung>: train one rung of the ladder (grown from its parent when it has one).

    python stages/train.py tiny
    torchrun --nproc_per_node 2 stages/train.py tiny     # data-parallel (train.nproc > 1 does this for you)

With train.nnodes > 1, `dvc repro` on one node and `python stages/train.py tiny` on each other node, in clones
at the same commit with the same params (docs/gpus.md, "More than one machine").
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

from mmrec.config import load_rung_params  # noqa: E402
from mmrec.attempts import marked  # noqa: E402
from mmrec.errors import exits_cleanly  # noqa: E402


@exits_cleanly
@marked
def main(argv: list[str]) -> None:
    params, rung = load_rung_params(argv, "train")
    tp = params.train
    if tp.nproc * tp.nnodes > 1 and "LOCAL_RANK" not in os.environ:  # run again under torch's own launcher
        from mmrec.training.distributed import launch

        sys.exit(launch(__file__, [rung], tp.nproc, tp.nnodes, tp.rdzv_endpoint))
    from mmrec.pipeline.rung import train_rung

    metrics = train_rung(params, rung)
    if metrics is not None:  # rank 0
        print(f"{rung}: best val loss {metrics['best_val_loss']:.4f} at step {metrics['best_step']} "
              f"({metrics['n_params'] / 1e6:.2f}M params)")


if __name__ == "__main__":
    main(sys.argv[1:])
