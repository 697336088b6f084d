"""The loss picture: its smoothed train curve looks only backwards, and the same curves give the same bytes."""
from __future__ import annotations

import numpy as np

from mmrec.tracking.plots import loss_curves, trailing_mean


def test_trailing_mean_averages_the_window_before_each_step():
    values = [4.0, 2.0, 6.0, 0.0, 8.0]
    assert np.allclose(trailing_mean(values, 2), [4.0, 3.0, 4.0, 3.0, 4.0])
    assert np.allclose(trailing_mean(values, 1), values)
    assert np.allclose(trailing_mean(values, 10), np.cumsum(values) / np.arange(1, 6))  # fewer at the start


def test_the_same_curves_give_the_same_png(tmp_path):
    train = [(s, 5.0 - s / 100 + 0.1 * np.sin(s)) for s in range(1, 201)]
    val = [(s, 5.0 - s / 120) for s in range(50, 201, 50)]
    lr = [(s, 1e-3) for s in range(1, 201)]
    for name in ("a.png", "b.png"):
        loss_curves(train, val, lr, tmp_path / name, title="tiny")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    loss_curves([], [], [], tmp_path / "empty.png")  # a run killed before its first logged step still draws
    assert (tmp_path / "empty.png").stat().st_size > 0
