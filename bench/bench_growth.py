"""How much training does growth save? A `mini` grown from the promoted `tiny` against one from scratch.

    dvc repro promote@tiny                # the parent: models/tiny/best.pt
    python bench/bench_growth.py --steps 300 --eval-every 25

Both minis train with the pipeline's own loop, params and data for the same number of steps (the grown one
re-warms for train.rewarmup_steps, the scratch one warms for train.warmup_steps). Reported: the first
evaluation step at which the grown mini reaches the validation loss the scratch mini ends with, as a fraction
of the budget. Never run by the tests.
"""
from __future__ import annotations

import argparse

import torch

from common import ROOT, setup, train
from mmrec import checkpoint
from mmrec.growth import grow_state_dict
from mmrec.model import ModelConfig, build_model, count_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="budget of each mini run")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--parent", default="tiny")
    ap.add_argument("--child", default="mini")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    params, header, train_tokens, val_tokens = setup()
    parent_ckpt = checkpoint.load(ROOT / "models" / args.parent / "best.pt")
    parent_cfg = ModelConfig.from_dict(parent_ckpt["config"])
    cfg = ModelConfig.from_params(params.model, params.rung(args.child), header["vocab_size"])
    grown_state = grow_state_dict(parent_ckpt["model"], parent_cfg, cfg, noise=params.promote.growth_noise,
                                  generator=torch.Generator().manual_seed(params.seed))
    tp = params.train
    print(f"{args.parent} ({count_params(build_model(parent_cfg)):,} params, trained {parent_ckpt['progress']['step']} "
          f"steps) -> {args.child} ({count_params(build_model(cfg)):,} params); {args.steps} steps of "
          f"{tp.batch_size}x{tp.seq_len} tokens each, lr {tp.lr}, {torch.get_num_threads()} threads\n")

    _, scratch, t_scratch = train(cfg, params, args.steps, tp.warmup_steps, train_tokens, val_tokens,
                                  eval_every=args.eval_every)
    _, grown, t_grown = train(cfg, params, args.steps, tp.rewarmup_steps, train_tokens, val_tokens,
                              state=grown_state, eval_every=args.eval_every)

    target = scratch.best_val
    reached = next((r["step"] for r in grown.history if r["val_loss"] <= target), None)
    print("| step | scratch val loss | grown val loss |")
    print("|---:|---:|---:|")
    for s, g in zip(scratch.history, grown.history):
        print(f"| {s['step']} | {s['val_loss']:.4f} | {g['val_loss']:.4f} |")
    print(f"\nscratch: best val loss {target:.4f} after {args.steps} steps ({t_scratch:.0f} s)")
    print(f"grown:   best val loss {grown.best_val:.4f} after {args.steps} steps ({t_grown:.0f} s)")
    # Compute per token scales with the parameter count (the tied head included): the parent's own
    # training, in child-step equivalents, is what growth spends before the child's first step.
    parent_steps = parent_ckpt["progress"]["step"] * count_params(build_model(parent_cfg)) / count_params(build_model(cfg))
    if reached is None:
        print("grown never reached the scratch run's final val loss within the budget")
    else:
        print(f"grown reaches {target:.4f} at step {reached}: {reached / args.steps:.0%} of the budget, "
              f"a saving of {1 - reached / args.steps:.0%}; counting the parent's own training "
              f"(~{parent_steps:.0f} {args.child}-step equivalents): {(reached + parent_steps) / args.steps:.0%}")


if __name__ == "__main__":
    main()
