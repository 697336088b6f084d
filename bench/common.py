"""What the training benchmarks share: the pipeline's own tokens, params and training loop."""
from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mmrec.config import Params, load_params  # noqa: E402
from mmrec.errors import UserError  # noqa: E402
from mmrec.model import checkpoint  # noqa: E402
from mmrec.model.lm import ModelConfig, build_model  # noqa: E402
from mmrec.training.schedule import Budget  # noqa: E402
from mmrec.data.tokenizer import load_tokens, read_header  # noqa: E402
from mmrec.training.loop import MetricSink, Progress, fit, seed_everything  # noqa: E402


def setup(root: Path = ROOT) -> tuple[Params, dict, object, object]:
    """params.yaml and the token files that `dvc repro tokenizer` made."""
    params = load_params(root / "params.yaml")
    try:
        header = read_header(root / "data" / "tokens")
    except UserError as err:
        sys.exit(f"{err} -- run `dvc repro tokenizer` first")
    return params, header, load_tokens(root / "data/tokens", "train"), load_tokens(root / "data/tokens", "val")


def train(cfg: ModelConfig, params: Params, steps: int, warmup: int, train_tokens, val_tokens,
          state: dict | None = None, eval_every: int | None = None,
          sink: MetricSink | None = None, lr: float | None = None,
          ema_decay: float = 0.0, keep_best: bool = False) -> tuple[torch.nn.Module, Progress, float]:
    """The pipeline's own loop (fit) on a fresh model, or on `state` (a parent's grown weights), at peak `lr`
    (default train.lr), evaluating an EMA of the weights when `ema_decay` (ramped up on a fresh model only, as
    the pipeline does); returns model, progress, seconds. The model holds the last weights trained, or with
    `keep_best` the weights the pipeline keeps (best.pt: the best evaluation's, the EMA's when there is one)."""
    tp = params.train.model_copy(update={"eval_every": eval_every or params.train.eval_every})
    generator = seed_everything(params.seed)
    model = build_model(cfg)
    if state is not None:
        model.load_state_dict(state)
    budget = Budget(steps, lr or params.train.lr, warmup, ema_decay, ema_ramp=state is None)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as ckpt:
        progress = fit(model, train_tokens, val_tokens, tp, budget,
                       generator=generator, ckpt_dir=Path(ckpt), extra={}, sink=sink)
        if keep_best:
            model.load_state_dict(checkpoint.load(Path(ckpt) / "best.pt")["model"])
    return model, progress, time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
