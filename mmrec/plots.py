"""Pictures people would rather look at than read: loss and learning-rate curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


def loss_curves(history: list[dict[str, float]], path: str | Path, title: str = "") -> None:
    """Train and validation loss against step, with the learning rate on a second axis."""
    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["train_loss"] for r in history], label="train loss", marker=".")
    ax.plot(steps, [r["val_loss"] for r in history], label="val loss", marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in history], color="grey", linestyle=":", label="lr")
    lr_ax.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
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
