import pytest
import torch
from torch.overrides import TorchFunctionMode

from mmrec.model import scan as scan_module
from mmrec.errors import UserError
from mmrec.model.scan import FLA_AVAILABLE, choose_backend, hgrn_scan, linear_scan, scan_backend, sequential_scan


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_and_tiny_gammas_fall_back_to_the_stable_scan(dtype):
    """Past C * |log gamma_min| ~ 80 (fp32) the rescaled chunk overflowed into NaN; gamma = 0 did too."""
    gamma, b, h0 = make(2, 300, 6, 0.0, 1e-3, seed=5)
    gamma = gamma ** 12  # down to ~1e-36: |log gamma| ~ 80 at a single step
    gamma[:, ::7] = 0.0  # a memory wiped clean every 7 steps
    ref, ref_last = sequential_scan(gamma, b, h0)
    leaves = [t.to(dtype).clone().requires_grad_() for t in (gamma, b, h0)]
    h, last = linear_scan(*leaves, chunk_size=32)
    assert h.dtype == dtype and torch.isfinite(h).all() and torch.isfinite(last).all()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(h.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(last.double(), ref_last, rtol=tol, atol=tol)
    (h.sum() + last.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_a_chunk_too_long_for_its_gammas_in_float32_stays_finite():
    gamma, b, h0 = make(2, 512, 4, 0.01, 0.02, seed=9)  # 64 * |log 0.01| ~ 295 > 80
    ref, _ = sequential_scan(gamma, b, h0)
    h, _ = linear_scan(gamma.float(), b.float(), h0.float(), chunk_size=64)
    torch.testing.assert_close(h.double(), ref, rtol=1e-5, atol=1e-5)


class Reductions(TorchFunctionMode):
    """Records which tensor functions run: `min` is the check's reduction (and host sync)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", ""))
        return func(*args, **(kwargs or {}))


def test_a_promised_lower_bound_picks_the_path_without_reading_the_gammas(monkeypatch):
    """Gammas in [0.5, 1] are safe for chunks of 64 (64 ln 2 ~ 44 < 700 in float64), so the check keeps the
    chunked scan; a promise of 1e-6 (true, but 64 x 13.8 ~ 884 past the bound) takes the doubling scan over
    the whole sequence, and never reads the gammas to find out. Both are exact."""
    lengths = []  # what the doubling scan runs over: the 4 chunk ends, or all 200 steps
    doubling = scan_module._doubling_scan
    monkeypatch.setattr(scan_module, "_doubling_scan", lambda a, b, h0: lengths.append(b.shape[1]) or doubling(a, b, h0))
    gamma, b, h0 = make(1, 200, 4, 0.5, 1.0, seed=2)
    ref, _ = sequential_scan(gamma, b, h0)
    with Reductions() as checking:
        checked, _ = linear_scan(gamma, b, h0, chunk_size=64)
    assert lengths == [4] and "min" in checking.names
    lengths.clear()
    with Reductions() as trusting:
        promised, _ = linear_scan(gamma, b, h0, chunk_size=64, min_gamma=1e-6)
    assert lengths == [200] and "min" not in trusting.names
    torch.testing.assert_close(checked, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(promised, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device, requested, fla, expected", [
    ("cuda", "auto", True, "fla"), ("cuda", "auto", False, "torch"), ("cpu", "auto", True, "torch"),
    ("cuda", "torch", True, "torch"), ("cuda", "fla", True, "fla"), ("cpu", "torch", False, "torch"),
])
def test_the_fused_kernel_is_chosen_for_cuda_tensors_when_it_imports(device, requested, fla, expected):
    assert choose_backend(device, requested, fla) == expected


@pytest.mark.parametrize("device, requested, fla", [("cpu", "fla", True), ("cuda", "fla", False),
                                                    ("cuda", "triton", True)])
def test_an_impossible_scan_request_is_a_one_line_error(device, requested, fla):
    with pytest.raises(UserError) as err:
        choose_backend(device, requested, fla)
    assert "\n" not in str(err.value) and "MMREC_SCAN" in str(err.value)


def test_the_cpu_always_gets_our_scan():
    assert scan_backend("cpu") == "torch"


# On a GPU with requirements-gpu.txt installed (bench/gpu_check.sh runs these); skipped everywhere else.
needs_fla = pytest.mark.skipif(not FLA_AVAILABLE, reason="needs CUDA and fla (pip install -r requirements-gpu.txt)")


def check_log_space_scan(scan, device: str, T: int, h0_kind: str, lo: float, rtol: float = 1e-4) -> None:
    """`scan(log_gamma, b, h0)` in fp32 on `device` against the float64 sequential scan: h, h_last and the
    gradients of a loss weighing every output (and the last state) differently, h0's too when it is trained."""
    g = torch.Generator().manual_seed(T)
    log_gamma = torch.log(lo + (1 - lo) * torch.rand(2, T, 64, generator=g, dtype=torch.float64))
    b = torch.randn(2, T, 64, generator=g, dtype=torch.float64)
    h0 = None if h0_kind == "none" else torch.randn(2, 64, generator=g, dtype=torch.float64)
    w, v = torch.randn(2, T, 64, generator=g, dtype=torch.float64), torch.randn(2, 64, generator=g, dtype=torch.float64)

    def run(scan, device, dtype):
        leaves = [t.detach().to(device, dtype).clone().requires_grad_(i < 2 or h0_kind == "trained")
                  for i, t in enumerate((log_gamma, b) + (() if h0 is None else (h0,)))]
        h, last = scan(*leaves)
        ((h * w.to(device, dtype)).sum() + (last * v.to(device, dtype)).sum()).backward()
        return [h, last] + [t.grad for t in leaves if t.requires_grad]

    ref = run(lambda lg, bb, *s: sequential_scan(lg.exp(), bb, *s), "cpu", torch.float64)
    got = run(scan, device, torch.float32)
    assert got[0].dtype == torch.float32 and len(got) == len(ref) == 4 + (h0_kind == "trained")
    for name, a, r in zip(["h", "h_last", "d log_gamma", "d b", "d h0"], got, ref):
        r = r.detach()  # fp32 against float64: relative to each tensor's scale, as long sums cancel in places
        torch.testing.assert_close(a.double().cpu(), r, rtol=rtol, atol=1e-5 * float(r.abs().max()), msg=name)


@pytest.mark.parametrize("h0_kind", ["none", "fixed", "trained"])
def test_the_parity_check_itself_on_the_cpu(h0_kind):
    """The harness of the CUDA test below, with our scan standing in for the kernel: it runs everywhere."""
    check_log_space_scan(lambda lg, b, *h0: linear_scan(lg.exp(), b, *h0, chunk_size=32), "cpu", 300, h0_kind, 0.5)


@needs_fla
@pytest.mark.parametrize("T", [1, 100, 1000, 4096])
@pytest.mark.parametrize("h0_kind", ["none", "fixed", "trained"])  # trained: fused_recurrent_hgrn, else chunk_hgrn
@pytest.mark.parametrize("lo", [0.5, 1e-3])
def test_cuda_fused_scan_matches_the_float64_sequential_scan(T, h0_kind, lo):
    check_log_space_scan(hgrn_scan, "cuda", T, h0_kind, lo)


@needs_fla
def test_cuda_bf16_inputs_are_scanned_in_float32():
    g = torch.Generator().manual_seed(0)
    log_gamma = torch.log(0.5 + 0.5 * torch.rand(2, 300, 32, generator=g, dtype=torch.float64))
    b = torch.randn(2, 300, 32, generator=g, dtype=torch.float64)
    h, last = hgrn_scan(log_gamma.cuda().bfloat16(), b.cuda().bfloat16())
    ref, _ = sequential_scan(log_gamma.bfloat16().double().exp(), b.bfloat16().double())
    assert h.dtype == last.dtype == torch.bfloat16
    torch.testing.assert_close(h.double().cpu(), ref, rtol=2e-2, atol=2e-2)
