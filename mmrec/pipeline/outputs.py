"""A trained rung's outputs: best.pt, run.json, metrics, curves and the loss plot (DVC), and its MLflow artifacts."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from mmrec.config import Params
from mmrec.files import copy_atomic, replacing, write_json, write_text
from mmrec.memory import peak_rss_mb
from mmrec.model.lm import ModelConfig
from mmrec.paths import RungPaths
from mmrec.training.loop import Progress


def write_outputs(paths: RungPaths, run: Any, progress: Progress, cfg: ModelConfig, n_params: int,
                  params: Params) -> dict[str, Any]:
    """The rung's DVC outputs (best.pt, run.json, metrics, curves, the loss plot) and its MLflow artifacts;
    ends the run."""
    from mmrec.tracking import store
    from mmrec.tracking.plots import loss_curves

    out = paths.model()
    out.mkdir(parents=True, exist_ok=True)
    copy_atomic(paths.ckpt / "best.pt", paths.best)
    write_json(out / "run.json", {"run_id": run.id, "experiment": params.mlflow.experiment,
                                  "tracking_uri": store.tracking_uri(params.mlflow)})
    last = progress.history[-1]
    metrics = {"best_val_loss": progress.best_val, "best_step": progress.best_step, "steps": progress.step,
               "final_train_loss": last["train_loss"], "final_val_loss": last["val_loss"], "n_params": n_params,
               "tokens_seen": progress.tokens, "stopped_early": progress.stopped_early}
    write_json(paths.metrics, metrics)
    speed = run_speed(run) | {"peak_rss_mb": peak_rss_mb()}  # the stage's, whatever the train split's size
    write_json(paths.speed, speed)
    # every step's train loss comes back from the run (a resumed run logged its first steps before the kill)
    train = per_step(run, "loss/train")
    lr = dict(per_step(run, "opt/lr"))
    val = [(int(r["step"]), r["val_loss"]) for r in progress.history]
    write_text(paths.train_curve, "step,train_loss,lr\n" + "".join(f"{s},{v!r},{lr.get(s, 0.0)!r}\n" for s, v in train))
    write_text(paths.val_curve, "step,val_loss\n" + "".join(f"{s},{v!r}\n" for s, v in val))
    with replacing(paths.plot) as png:
        loss_curves(train, val, list(lr.items()), png,
                    title=f"{paths.rung}: {cfg.arch}, {n_params / 1e6:.2f}M params, best val loss "
                          f"{progress.best_val:.4f} at step {progress.best_step}")
    run.log(progress.step, **{"summary/best_val_loss": progress.best_val, "summary/best_step": progress.best_step,
                              "perf/median_tokens_per_s": speed["tokens_per_s"]})
    run.log_artifact(paths.plot, "plots")
    run.log_artifact(paths.tokenizer, "tokenizer")
    run.log_artifact(out / "best.pt", "checkpoint")
    run.end()
    return metrics


def per_step(run: Any, key: str) -> list[tuple[int, float]]:
    """(step, value) of a run's metric in step order, one value a step (the last logged)."""
    return sorted(dict(run.metric_history(key)).items())


def run_speed(run: Any) -> dict[str, float]:
    """Median training throughput and MFU, from the run's own history, and the rung's wall time: seconds from its
    run's start to now (a resumed rung keeps its run, so the pause between attempts counts too). Kept out of the
    bit-reproducible metrics."""
    run.flush()
    medians = {}
    for name, key in [("tokens_per_s", "perf/tokens_per_s"), ("mfu", "perf/mfu")]:
        values = [v for _, v in run.metric_history(key)]
        medians[name] = float(np.median(values)) if values else 0.0
    started_ms = run.store.call(run.client.get_run, run.id).info.start_time
    medians["seconds"] = round(time.time() - started_ms / 1000, 1)
    return medians
