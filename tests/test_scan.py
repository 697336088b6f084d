import pytest
import torch

from mmrec.scan import linear_scan, sequential_scan


def make(B, T, D, lo, hi, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    gamma = lo + (hi - lo) * torch.rand(B, T, D, generator=g, dtype=dtype)
    b = torch.randn(B, T, D, generator=g, dtype=dtype)
    h0 = torch.randn(B, D, generator=g, dtype=dtype)
    return gamma, b, h0


@pytest.mark.parametrize("T,C,lo,hi", [
    (4000, 32, 0.5, 0.55),     # at the min floor: the largest |log A| a chunk sees
    (3999, 64, 0.999, 1.0),    # near 1: long memory, T not a multiple of C
    (1001, 17, 0.5, 1.0),
    (257, 8, 0.01, 0.05),      # near 0: fine in float64 while C * |log gamma| stays < ~700
    (5, 32, 0.5, 1.0),         # shorter than one chunk
    (1, 32, 0.5, 1.0),
])
@pytest.mark.parametrize("with_h0", [False, True])
def test_chunked_equals_sequential(T, C, lo, hi, with_h0):
    gamma, b, h0 = make(2, T, 6, lo, hi, seed=T + C)
    h0 = h0 if with_h0 else None
    h, last = linear_scan(gamma, b, h0, chunk_size=C)
    ref, ref_last = sequential_scan(gamma, b, h0)
    assert h.shape == b.shape and last.shape == (2, 6)
    torch.testing.assert_close(h, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, ref_last, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_random_chunk_sizes_and_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(2, 400, (1,), generator=g))
    C = int(torch.randint(1, 80, (1,), generator=g))
    gamma, b, h0 = make(3, T, 5, 0.5, 1.0, seed)
    w = torch.randn(3, T, 5, dtype=torch.float64, generator=g)  # a loss that weighs every output differently
    grads = []
    for scan in (lambda *a: linear_scan(*a, chunk_size=C), sequential_scan):
        leaves = [t.clone().requires_grad_() for t in (gamma, b, h0)]
        h, last = scan(*leaves)
        ((h * w).sum() + last.pow(2).sum()).backward()
        grads.append([t.grad for t in leaves])
    for chunked, ref in zip(*grads):
        torch.testing.assert_close(chunked, ref, rtol=1e-9, atol=1e-9)


def test_float32_at_min_floor_stays_accurate():
    gamma, b, h0 = make(2, 1024, 8, 0.5, 0.5001, seed=7)
    ref, _ = sequential_scan(gamma, b, h0)
    h, _ = linear_scan(gamma.float(), b.float(), h0.float(), chunk_size=32)
    assert h.dtype == torch.float32 and torch.isfinite(h).all()
    torch.testing.assert_close(h.double(), ref, rtol=1e-4, atol=1e-5)


def test_half_precision_is_computed_in_float32():
    gamma, b, _ = make(1, 300, 4, 0.5, 1.0, seed=3)
    h, last = linear_scan(gamma.bfloat16(), b.bfloat16(), chunk_size=32)
    ref, _ = sequential_scan(gamma, b)
    assert h.dtype == last.dtype == torch.bfloat16
    torch.testing.assert_close(h.double(), ref, rtol=2e-2, atol=2e-2)


def test_carried_state_continues_the_sequence():
    gamma, b, h0 = make(2, 300, 4, 0.5, 1.0, seed=11)
    whole, _ = linear_scan(gamma, b, h0, chunk_size=32)
    first, carry = linear_scan(gamma[:, :123], b[:, :123], h0, chunk_size=32)
    second, _ = linear_scan(gamma[:, 123:], b[:, 123:], carry, chunk_size=32)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-12, atol=1e-12)
