"""Pictures people would rather look at than read: loss and learning-rate curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


def loss_curves(train: list[tuple[int, float]], val: list[tuple[int, float]], lr: list[tuple[int, float]],
                path: str | Path, title: str = "") -> None:
    """Train loss at every step, val loss at each evaluation, the learning rate on a second axis."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot([s for s, _ in train], [v for _, v in train], label="train loss (every step)", linewidth=0.8, alpha=0.8)
    ax.plot([s for s, _ in val], [v for _, v in val], label="val loss (each evaluation)", marker="o", linewidth=1.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    if lr:
        lr_ax = ax.twinx()
        lr_ax.plot([s for s, _ in lr], [v for _, v in lr], color="grey", linestyle=":", label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.legend(loc="upper right")
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
