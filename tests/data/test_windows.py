import numpy as np
import torch

from mmrec.data.windows import fixed_starts, random_batch, tiling_starts, window


def test_targets_are_inputs_shifted_by_exactly_one():
    tokens = np.array([10, 11, 12, 13], dtype=np.uint16)
    x, y = window(tokens, 0, 3)
    assert x.tolist() == [10, 11, 12]
    assert y.tolist() == [11, 12, 13]


def test_random_batch_is_reproducible_from_the_generator():
    tokens = np.arange(1000, dtype=np.uint16)
    a = random_batch(tokens, 4, 8, torch.Generator().manual_seed(3))
    b = random_batch(tokens, 4, 8, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[1][:, :-1], a[0][:, 1:])
    assert a[0].dtype == torch.int64


def test_fixed_starts_stay_inside_the_split():
    starts = fixed_starts(100, 10, 5)
    assert starts[0] == 0 and starts[-1] == 100 - 10 - 1
    assert len(starts) == 5
    assert fixed_starts(12, 10, 50) == [0, 1]


def test_tiling_scores_every_token_once():
    windows = tiling_starts(23, 5)
    covered = [t for s, n in windows for t in range(s + 1, s + n + 1)]
    assert covered == list(range(1, 23))


def test_windows_read_uint32_tokens_of_a_large_vocabulary():
    tokens = np.array([70_000, 65_536, 3, 99_999], dtype=np.uint32)  # ids over 65535 (header dtype uint32)
    x, y = window(tokens, 0, 3)
    assert x.tolist() == [70_000, 65_536, 3] and y.tolist() == [65_536, 3, 99_999]
    assert x.dtype == torch.int64
