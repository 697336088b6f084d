"""How much compute does growth save? A child grown from a trained parent against one trained from scratch
with the same total compute, the parent's own training counted.

    python bench/bench_growth.py --parent-steps 200 --steps 80 --batch-size 8 --eval-every 10   # ~8 min, 2 cores

1. The parent (`--parent` rung shape) trains from scratch for --parent-steps with the pipeline's loop and
   schedule (cached under checkpoints/bench/, so a second run with other child settings skips it); or, with
   --parent-steps 0, the pipeline's own models/<parent>/best.pt is used and its whole budget is counted.
2. The grown child trains --steps with the pipeline's post-growth schedule (train.growth_lr_scale,
   train.rewarmup_steps, train.growth_split, the child's ema_decay; each can be overridden here). Reported: its
   val loss at every evaluation and the largest rise above the parent's val loss (the goal: never more than
   0.02 nats). With an EMA, the loss is the EMA's (the weights the pipeline keeps); the trained weights' own
   loss is shown beside it.
3. The scratch child trains for as many steps as the parent and the grown child cost together, in FLOPs
   (6 x params per token; GPT adds its attention), with the same EMA. Reported: the FLOPs the grown child needs, parent included,
   to reach the val loss the scratch child ends with, and the saving against the scratch child's FLOPs.
Never run by the tests.
"""
from __future__ import annotations

import argparse

import torch

from common import ROOT, setup, train
from mmrec.model import checkpoint
from mmrec.model.growth import grow_state_dict
from mmrec.model.lm import ModelConfig, build_model, count_params
from mmrec.config import TrainParams
from mmrec.data.windows import fixed_starts
from mmrec.training.schedule import budget_for
from mmrec.training.loop import val_loss


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x params (forward + backward of every matmul, the tied head counted once);
    GPT's attention adds ~6 x layers x seq_len x width (QK^T and AV over a causal half, forward + backward)."""
    attention = 6 * cfg.layers * seq_len * cfg.width if cfg.arch == "gpt" else 0
    return 6 * count_params(build_model(cfg)) + attention


def reach_step(history: list[dict], target: float) -> float | None:
    """The (linearly interpolated) step at which a val-loss curve first gets to `target`; None if it never does."""
    prev_step, prev_loss = history[0]["step"], history[0]["val_loss"]
    for row in history:
        if row["val_loss"] <= target:
            if row["val_loss"] == prev_loss or row is history[0]:
                return float(row["step"])
            frac = (prev_loss - target) / (prev_loss - row["val_loss"])
            return prev_step + frac * (row["step"] - prev_step)
        prev_step, prev_loss = row["step"], row["val_loss"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", default="tiny")
    ap.add_argument("--child", default="mini")
    ap.add_argument("--parent-steps", type=int, default=0, help="train the parent here for this many steps "
                    "(0: use models/<parent>/best.pt)")
    ap.add_argument("--steps", type=int, default=300, help="budget of the grown child")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=0, help="override train.batch_size (0: params.yaml)")
    ap.add_argument("--seq-len", type=int, default=0, help="override train.seq_len (0: params.yaml)")
    ap.add_argument("--lr-scale", type=float, default=None, help="override train.growth_lr_scale")
    ap.add_argument("--rewarmup", type=int, default=None, help="override train.rewarmup_steps")
    ap.add_argument("--split", type=float, default=None, help="override train.growth_split")
    ap.add_argument("--ema", type=float, default=None, help="override the child's ema_decay (0: off)")
    ap.add_argument("--no-scratch", action="store_true", help="only the grown child (to compare schedules)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    params, header, train_tokens, val_tokens = setup()
    update = {"batch_size": args.batch_size, "seq_len": args.seq_len, "growth_lr_scale": args.lr_scale,
              "rewarmup_steps": args.rewarmup, "growth_split": args.split}
    tp = params.train.model_copy(update={k: v for k, v in update.items() if v})  # 0 / None: keep params.yaml's
    if args.split == 0:
        tp = tp.model_copy(update={"growth_split": 0.0})
    params = params.model_copy(update={"train": tp})
    parent_cfg = ModelConfig.from_params(params.model, params.rung(args.parent), header["vocab_size"])
    cfg = ModelConfig.from_params(params.model, params.rung(args.child), header["vocab_size"])
    tokens_per_step = tp.batch_size * tp.seq_len * tp.grad_accum
    f_parent, f_child = flops_per_token(parent_cfg, tp.seq_len), flops_per_token(cfg, tp.seq_len)

    # 1. the parent
    if args.parent_steps:
        growth_knobs = {"growth_lr_scale", "growth_split", "rewarmup_steps"}  # the parent does not depend on them
        key = params.model_copy(update={"train": params.train.model_copy(update=TrainParams().model_dump(include=growth_knobs))})
        cache = ROOT / "checkpoints" / "bench" / f"{args.parent}-{args.parent_steps}-{key.digest('seed', 'model', 'train')}.pt"
        if cache.exists():
            parent_sd, parent_steps = torch.load(cache, weights_only=True), args.parent_steps
        else:
            parent, _, secs = train(parent_cfg, params, args.parent_steps, tp.warmup_steps, train_tokens, val_tokens,
                                    eval_every=args.parent_steps)
            parent_sd, parent_steps = parent.state_dict(), args.parent_steps
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(parent_sd, cache)
            print(f"parent trained {parent_steps} steps in {secs:.0f} s -> {cache.relative_to(ROOT)}")
    else:
        ckpt = checkpoint.load(ROOT / "models" / args.parent / "best.pt")
        parent_cfg, parent_sd = ModelConfig.from_dict(ckpt["config"]), ckpt["model"]
        parent_steps = budget_for(params, args.parent).steps  # what it cost: its whole budget, not its best step
    parent_model = build_model(parent_cfg)
    parent_model.load_state_dict(parent_sd)
    starts = fixed_starts(len(val_tokens), tp.seq_len, tp.eval_windows)
    parent_val = val_loss(parent_model, val_tokens, starts, tp, torch.device("cpu"))
    parent_flops = parent_steps * tokens_per_step * f_parent
    child_step_flops = tokens_per_step * f_child

    # 2. the grown child, on the pipeline's post-growth schedule
    b = budget_for(params, args.child)
    ema = b.ema_decay if args.ema is None else args.ema
    grown_state = grow_state_dict(parent_sd, parent_cfg, cfg, noise=params.promote.growth_noise,
                                  generator=torch.Generator().manual_seed(params.seed), split=tp.growth_split)
    print(f"{args.parent} ({count_params(parent_model):,} params, {parent_steps} steps, val loss {parent_val:.4f}) -> "
          f"{args.child} ({count_params(build_model(cfg)):,} params); {tokens_per_step} tokens a step, "
          f"{torch.get_num_threads()} threads\n"
          f"grown: {args.steps} steps, peak lr {b.lr:.2e} (x{tp.growth_lr_scale} of {tp.lr}), re-warmup "
          f"{min(b.warmup, args.steps)}, split {tp.growth_split}, EMA decay {ema or 'off'}")
    _, grown, t_grown = train(cfg, params, args.steps, min(b.warmup, args.steps), train_tokens, val_tokens,
                              state=grown_state, eval_every=args.eval_every, lr=b.lr, ema_decay=ema)
    rise = max(r["val_loss"] for r in grown.history) - parent_val
    print("| step | grown val loss | above parent | trained weights (no EMA) |\n|---:|---:|---:|---:|")
    for r in grown.history:
        raw = f"{r['val_loss_raw']:.4f}" if "val_loss_raw" in r else "(same)"
        print(f"| {r['step']} | {r['val_loss']:.4f} | {r['val_loss'] - parent_val:+.4f} | {raw} |")
    print(f"grown: {t_grown:.0f} s, best val loss {grown.best_val:.4f}; largest rise above the parent "
          f"{rise:+.4f} nats ({'within' if rise <= 0.02 else 'over'} the 0.02 goal)")
    if args.no_scratch:
        return

    # 3. the scratch child, with the same total FLOPs as parent + grown child
    total = parent_flops + args.steps * child_step_flops
    scratch_steps = round(total / child_step_flops)
    _, scratch, t_scratch = train(cfg, params, scratch_steps, tp.warmup_steps, train_tokens, val_tokens,
                                  eval_every=args.eval_every, ema_decay=ema)
    print(f"\nscratch: {scratch_steps} steps (= {parent_steps} parent + {args.steps} grown steps in FLOPs), "
          f"{t_scratch:.0f} s, final val loss {scratch.history[-1]['val_loss']:.4f}, best {scratch.best_val:.4f}")
    print("| step | scratch val loss |\n|---:|---:|")
    for r in scratch.history:
        print(f"| {r['step']} | {r['val_loss']:.4f} |")
    target = scratch.history[-1]["val_loss"]
    g = reach_step([{"step": 0, "val_loss": parent_val}] + grown.history, target)
    print(f"\ntotal compute of either: {total:.3e} FLOPs (parent {parent_flops:.3e})")
    if g is None:
        print(f"grown child never reached the scratch child's {target:.4f} within its {args.steps} steps "
              f"(it ends at {grown.history[-1]['val_loss']:.4f}): no saving at this budget")
        return
    print(f"at equal total compute: grown {grown.history[-1]['val_loss']:.4f}, scratch {target:.4f} "
          f"({grown.history[-1]['val_loss'] - target:+.4f} nats)")
    need = parent_flops + g * child_step_flops
    if g == 0:
        print("the parent alone already beats the scratch child: at this budget the saving is just the grown child's "
              "share of the compute; longer budgets give a figure closer to convergence")
    print(f"grown child reaches the scratch child's final val loss {target:.4f} at step {g:.0f}: "
          f"{need:.3e} FLOPs with the parent, {need / total:.0%} of the scratch child's -> saving {1 - need / total:.0%} "
          f"(without the parent: {1 - g * child_step_flops / total:.0%})")


if __name__ == "__main__":
    main()
