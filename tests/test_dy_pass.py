"""The one-pass backward over dY (``_dy_pass_kernel``: dxa's and dB's partial sums from one read of dY; the dX kernels
add the dxa partials and store their sum for the gradient kernel; the gradient kernel adds the dB partials) against the
float64 reference at odd sizes, on every dX kernel, with and without dropout; the partial buffers are NaN-filled so an
element left unwritten shows; and the byte rule that chooses the path."""

import pytest
import torch
from _tolerances import TOL, assert_close_scaled

from lora_kernels.reference import lora_linear as ref

from conftest import DEVICE, HAS_CUDA, INTERPRET

pytestmark = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
F64 = dict(acc_dtype=torch.float64, out_dtype=torch.float64)


@pytest.fixture
def tri(monkeypatch):
    from lora_kernels.triton import lora_linear as tri

    monkeypatch.setenv(tri.AUTOTUNE_ENV_VAR, "0")
    return tri


def _inputs(M, K, N, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(M, K), (N, K), (r, K), (N, r), (N,), (M, N)]
    x, w, a, b, bias, dy = (torch.randn(*s, generator=g) for s in shapes)
    w, a, b = w / K**0.5, a / K**0.5, b / r**0.5
    return [t.to(DEVICE, dtype) for t in (x, w, a, b, bias, dy)]


def _spy_plans(tri, monkeypatch, force):
    """Force the path and record the plans taken; during the backward every floating torch.empty buffer (the
    partials, the summed dxa) comes NaN-filled."""
    monkeypatch.setattr(tri, "FUSED_DY_PASS", force)
    plans = []
    real_plan, real_bwd = tri._dy_pass_plan, tri.lora_linear_backward
    monkeypatch.setattr(tri, "_dy_pass_plan", lambda *a: plans.append(real_plan(*a)) or plans[-1])

    def nan_backward(*args, **kwargs):
        real_empty = torch.empty

        def nan_empty(*a, **k):
            t = real_empty(*a, **k)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "empty", nan_empty)
            return real_bwd(*args, **kwargs)

    monkeypatch.setattr(tri, "lora_linear_backward", nan_backward)
    return plans


SIZES = [(1, 50, 45, 1), (7, 33, 40, 7), (33, 70, 100, 16), (100, 40, 33, 7), (33, 36, 100, 16), (70, 36, 96, 64)]


@pytest.mark.parametrize("M, K, N, r", SIZES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("base", ["cublas", "triton", "tma"])
def test_one_pass_backward_matches_reference(tri, monkeypatch, M, K, N, r, p, base):
    """Every dX kernel (cuBLAS base + LoRA kernel, plain Triton GEMM, persistent TMA GEMM) with the dxa partials, and
    the gradient kernel with the dB partials, against float64; the one-pass path and the two-pass path agree."""
    from lora_kernels.triton import lora_linear_tma as tma

    if base == "tma" and not (INTERPRET or (HAS_CUDA and torch.cuda.get_device_capability() >= (9, 0))):
        pytest.skip("the TMA kernels need sm_90+ (or the interpreter)")
    monkeypatch.setattr(tri, "BASE_GEMM", "cublas" if base == "cublas" else "triton")
    if base == "triton":
        monkeypatch.setattr(tma, "tma_supported", lambda *ts: False)
    tma_calls = []
    real_dx_gemm = tma.dx_gemm
    monkeypatch.setattr(tma, "dx_gemm", lambda *a, **k: tma_calls.append(1) or real_dx_gemm(*a, **k))
    dtype = torch.float32
    x, w, a, b, bias, dy = _inputs(M, K, N, r, dtype, seed=M * 31 + K + r)
    if base == "tma" and not tma.tma_supported(dy, w):
        pytest.skip(f"dY [{M}, {N}] / W0 [{N}, {K}] fp32 are not TMA operands (rows not 16-byte multiples)")
    seed = 11
    y, xa, bits = tri.lora_linear_forward(x, w, a, b, 0.6, bias, p, seed, return_keep_bits=True)
    plans = _spy_plans(tri, monkeypatch, True)
    monkeypatch.setattr(tri, "_target_programs", lambda t: 8)  # several column splits at these sizes
    got = tri.lora_linear_backward(dy, x, w, a, b, xa, 0.6, p, seed, True, False, False, bits)
    assert plans and plans[-1] is not None and (plans[-1][1] > 1 or N <= 32), plans
    if base == "tma":
        assert tma_calls, "the TMA dX kernel did not run"
    want = ref.lora_linear_backward(dy, x, w, a, b, xa, 0.6, p, seed, True, False, False, **F64)
    for name, g, e in zip(("dx", "dA", "dB"), got[:3], want[:3]):
        assert not g.isnan().any(), f"{name}: an unwritten partial was read"
        assert_close_scaled(g, e, TOL[dtype], name)
    monkeypatch.setattr(tri, "FUSED_DY_PASS", False)
    two = tri.lora_linear_backward(dy, x, w, a, b, xa, 0.6, p, seed, True, False, False, bits)
    for name, g, e in zip(("dx", "dA", "dB"), got[:3], two[:3]):
        assert_close_scaled(g, e.double(), TOL[dtype], f"{name} one pass vs two")


def test_splits_happen_and_repeat_bit_for_bit(tri, monkeypatch):
    """Several column splits and row tiles (the interpreter's 32-row tiles); two runs give identical gradients (the
    partials are added in a fixed order, no atomics)."""
    monkeypatch.setattr(tri, "_target_programs", lambda t: 12)
    x, w, a, b, bias, dy = _inputs(70, 40, 130, 5, torch.float32, seed=3)
    _, xa = tri.lora_linear_forward(x, w, a, b, 0.6, bias, 0.0, 0)
    plans = _spy_plans(tri, monkeypatch, True)
    first = tri.lora_linear_backward(dy, x, w, a, b, xa, 0.6)
    second = tri.lora_linear_backward(dy, x, w, a, b, xa, 0.6)
    block_m, splits = plans[0]
    assert splits > 1 and -(-70 // block_m) > 1, plans[0]
    for g1, g2 in zip(first[:3], second[:3]):
        assert torch.equal(g1, g2)


def test_without_dx_the_two_pass_path_runs(tri, monkeypatch):
    """needs_dx=False: no dX kernel to add the dxa partials, so the two-pass path runs even when forced."""
    x, w, a, b, bias, dy = _inputs(7, 33, 40, 3, torch.float32, seed=4)
    _, xa = tri.lora_linear_forward(x, w, a, b, 0.6, bias, 0.0, 0)
    plans = _spy_plans(tri, monkeypatch, True)
    got = tri.lora_linear_backward(dy, x, w, a, b, xa, 0.6, 0.0, 0, False)
    assert plans == [] and got[0] is None
    want = ref.lora_linear_backward(dy, x, w, a, b, xa, 0.6, 0.0, 0, False, **F64)
    assert_close_scaled(got[2], want[2], TOL[torch.float32], "dB")


def test_byte_rule_at_the_training_shapes(tri, monkeypatch):
    """On an H100 (264 programs wanted, bf16): one pass at r = 16 for the three training shapes, two passes at
    r = 64, where the partial sums would cost more than the second read of dY saves; False forces two passes."""
    monkeypatch.setattr(tri, "FUSED_DY_PASS", None)
    for N in (4096, 14336):  # (K = 14336, N = 4096 is the first one for this rule: it does not read K)
        block_m, splits = tri._dy_pass_plan(8192, N, 16, 2, 264, False)
        per = -(-(N // 64) // splits)
        assert block_m == 256 and 8 <= splits <= 9 and (splits - 1) * per < N // 64  # every split has columns
        assert tri._dy_pass_plan(8192, N, 64, 2, 264, False) is None
    assert tri._dy_pass_plan(8192, 4096, 128, 2, 264, False) is None  # past the kernel's rank tile
    monkeypatch.setattr(tri, "FUSED_DY_PASS", False)
    assert tri._dy_pass_plan(8192, 4096, 16, 2, 264, False) is None


def test_dx_gemm_refuses_split_partials_without_a_sum_buffer():
    from lora_kernels.triton import lora_linear_tma as tma

    dy, w = torch.zeros(4, 8), torch.zeros(8, 8)
    with pytest.raises(ValueError, match="dxa_sum"):
        tma.dx_gemm(dy, w, torch.zeros(2, 4, 2), torch.zeros(2, 8))
