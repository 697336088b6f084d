"""Pictures people would rather look at than read: loss and learning-rate curves, and the report's two (the
ladder's losses with its growth points, test bits per byte beside the baselines)."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


def trailing_mean(values: list[float], window: int) -> np.ndarray:
    """The mean of each value and the window - 1 before it (fewer at the start): no look-ahead."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def loss_curves(train: list[tuple[int, float]], val: list[tuple[int, float]], lr: list[tuple[int, float]],
                path: str | Path, title: str = "") -> None:
    """Train loss at every step (faint) and its trailing mean, val loss at each evaluation, the learning rate on a
    second axis."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    steps, losses = [s for s, _ in train], [v for _, v in train]
    window = max(1, len(train) // 50)  # a step's loss is one batch: noisy
    ax.plot(steps, losses, color="tab:blue", linewidth=0.6, alpha=0.3, label="train loss (every step)")
    if train:
        ax.plot(steps, trailing_mean(losses, window), color="tab:blue", linewidth=1.4,
                label=f"train loss (mean of {window} steps)")
    ax.plot([s for s, _ in val], [v for _, v in val], label="val loss (each evaluation)", marker="o", linewidth=1.8,
            color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    if lr:
        lr_ax = ax.twinx()
        lr_ax.plot([s for s, _ in lr], [v for _, v in lr], color="grey", linestyle=":", label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=len(handles), fontsize="small",
              frameon=False)  # below the axes: never over a curve
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: the same curves give the same bytes
    plt.close(fig)


def overlay(curves: dict[str, list[tuple[int, float]]], path: str | Path, ylabel: str = "val loss") -> None:
    """One line per run: what a user looks at after a sweep."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for label, points in curves.items():
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], label=label, marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def ladder_curves(rungs: list[dict], path: str | Path) -> None:
    """Every rung's losses on one axis of tokens trained, a grown rung starting where its parent's best checkpoint
    left off, with the growth point marked. Each rung: name, offset (tokens before its first step), tokens_per_step,
    train and val [(step, loss)], parent (None for a rung trained from scratch)."""
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(rungs):
        color = colors[i % len(colors)]
        x = lambda points: [(r["offset"] + s * r["tokens_per_step"]) / 1e6 for s, _ in points]  # noqa: E731
        ax.plot(x(r["train"]), [v for _, v in r["train"]], color=color, linewidth=0.6, alpha=0.35)
        ax.plot(x(r["val"]), [v for _, v in r["val"]], color=color, marker="o", markersize=3, linewidth=1.8,
                label=f"{r['name']} val (train faint)")
        if r["parent"]:
            ax.axvline(r["offset"] / 1e6, color=color, linestyle="--", linewidth=1)
            ax.annotate(f"{r['parent']} → {r['name']}", (r["offset"] / 1e6, 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize="small", color=color)
    ax.set_xlabel("tokens trained, the parent's included (millions)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("Every rung of the ladder; dashed: a rung grown from its parent's best checkpoint", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def bpb_bars(bars: list[tuple[str, float, bool]], path: str | Path) -> None:
    """Test bits per byte as horizontal bars, lower is better: (label, value, is_baseline), in the order given."""
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(bars) + 1.2), dpi=110)
    labels, values = [b[0] for b in bars], [b[1] for b in bars]
    colors = ["#b0b0b0" if baseline else "#1f77b4" for _, _, baseline in bars]
    ax.barh(range(len(bars)), values, color=colors)
    for i, v in enumerate(values):
        ax.annotate(f"{v:.4f}", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize="small")
    ax.set_yticks(range(len(bars)), labels)
    ax.invert_yaxis()  # the first bar on top
    ax.set_xlim(0, max(values) * 1.15)
    ax.set_xlabel("bits per test byte (lower is better); grey: baselines")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
