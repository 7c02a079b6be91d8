"""The Triton lora_linear's launch structure at odd sizes, against the float64 reference: the cuBLAS-base forward's
one shrink+expand kernel, the split shrink's partial sums (summed by the GEMM, no zero-fill), dA/dB written in the
adapter's dtype by the kernel (no cast), and the dropout mask drawn once and read back as bits (bit-identical
gradients to regenerating it from the seed; an empty mask falls back to the seed)."""

import pytest
import torch
from _tolerances import TOL, assert_close_scaled

from lora_kernels.reference import lora_linear as ref
from lora_kernels.reference.dropout import dropout_keep_mask, keep_bits_shape, pack_keep_bits

from conftest import DEVICE, HAS_CUDA, INTERPRET

pytestmark = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
F64 = dict(acc_dtype=torch.float64, out_dtype=torch.float64)


@pytest.fixture
def tri(monkeypatch):
    from lora_kernels.triton import lora_linear as tri

    monkeypatch.setenv(tri.AUTOTUNE_ENV_VAR, "0")
    return tri


def _inputs(M, K, N, r, dtype, lora_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    a = torch.randn(r, K, generator=g) / K**0.5
    b = torch.randn(N, r, generator=g) / r**0.5
    bias = torch.randn(N, generator=g)
    dy = torch.randn(M, N, generator=g)
    cast = [(x, dtype), (w, dtype), (a, lora_dtype), (b, lora_dtype), (bias, dtype), (dy, dtype)]
    return [t.to(DEVICE, dt) for t, dt in cast]


def _check(tri, M, K, N, r, dtype, lora_dtype, p, seed=7, bits_arg="forward"):
    """Forward + backward of the backend functions against the float64 reference; returns the outputs."""
    x, w, a, b, bias, dy = _inputs(M, K, N, r, dtype, lora_dtype, seed=M * 31 + K + r)
    y, xa, bits = tri.lora_linear_forward(x, w, a, b, 0.6, bias, p, seed, return_keep_bits=True)
    y_r, xa_r = ref.lora_linear_forward(x, w, a, b, 0.6, bias, p, seed, **F64)
    tol = TOL[dtype]
    assert y.dtype == dtype and xa.dtype == torch.float32 and xa.shape == (M, r)
    assert_close_scaled(y, y_r, tol, "y")
    assert_close_scaled(xa, xa_r, tol, "xa")
    if p > 0:
        assert bits.dtype == torch.int32 and tuple(bits.shape) == keep_bits_shape(M, K)
        assert torch.equal(bits.cpu(), pack_keep_bits(dropout_keep_mask(seed, M, K, p)))
    else:
        assert bits.numel() == 0
    keep = {"forward": bits, "none": None, "empty": bits.new_empty(0)}[bits_arg]
    out = tri.lora_linear_backward(dy, x, w, a, b, xa, 0.6, p, seed, True, False, False, keep)
    want = ref.lora_linear_backward(dy, x, w, a, b, xa_r, 0.6, p, seed, True, False, False, **F64)
    for name, got, exp, like in zip(("dx", "dA", "dB"), out[:3], want[:3], (x, a, b)):
        assert got.dtype == like.dtype and got.shape == like.shape and got.is_contiguous(), name
        assert_close_scaled(got, exp, max(tol, TOL[lora_dtype]), name)
    return y, xa, bits, out


SIZES = [(1, 50, 45, 1), (7, 33, 40, 7), (33, 70, 37, 16), (100, 40, 33, 7)]


@pytest.mark.parametrize("M, K, N, r", SIZES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cublas_base_fused_shrink_expand(tri, monkeypatch, M, K, N, r, p):
    """cuBLAS base: torch.mm, then one kernel (xa over all of K, then y += s·xa·Bᵀ walking N)."""
    monkeypatch.setattr(tri, "BASE_GEMM", "cublas")
    launched = []
    real = tri._shrink
    monkeypatch.setattr(tri, "_shrink", lambda *a, **k: launched.append(1) or real(*a, **k))
    _check(tri, M, K, N, r, torch.float32, torch.float32, p)
    assert not launched, "the cuBLAS-base forward launched the separate shrink"


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cublas_base_rank_over_one_tile(tri, monkeypatch, p):
    """r over the skinny kernels' rank tile (128): the cuBLAS base takes the separate shrink (two r-tiles, the first
    one storing the mask bits) and the LoRA-only GEMM kernel instead of the shrink+expand kernel."""
    monkeypatch.setattr(tri, "BASE_GEMM", "cublas")
    launched = []
    real = tri._shrink
    monkeypatch.setattr(tri, "_shrink", lambda *a, **k: launched.append(1) or real(*a, **k))
    _check(tri, 7, 40, 20, 130, torch.float32, torch.float32, p)
    assert launched == [1]


@pytest.mark.parametrize("M, K, N, r", [(1, 50, 45, 1), (7, 100, 40, 7), (33, 130, 37, 16)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_split_shrink_partial_sums(tri, monkeypatch, M, K, N, r, p):
    """A shrink split over K writes per-split partial sums into torch.empty (NaN-filled here: any element left
    unwritten shows); the GEMM adds them up and writes the summed xa."""
    monkeypatch.setattr(tri, "BASE_GEMM", "triton")
    monkeypatch.setattr(tri, "_FUSED_SHRINK_MAX_M", 0)
    monkeypatch.setattr(tri, "_target_programs", lambda t: 64)  # few rows, many programs wanted: split over K
    splits = []
    real_shrink = tri._shrink

    def shrink(*args, **kwargs):
        xa, s = real_shrink(*args, **kwargs)
        splits.append(s)
        return xa, s

    monkeypatch.setattr(tri, "_shrink", shrink)
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    _check(tri, M, K, N, r, torch.float32, torch.float32, p)
    assert splits and splits[0] > 1, splits


@pytest.mark.parametrize("lora_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("base", ["triton", "cublas"])
def test_adapter_gradients_in_the_adapter_dtype(tri, monkeypatch, lora_dtype, base):
    """dA/dB come out of the kernel in lora_A's / lora_B's dtype (no cast launch: the launch count is checked by
    tests/test_static_report.py): fp16 adapters with fp16 x, fp32 adapters with fp16 x."""
    monkeypatch.setattr(tri, "BASE_GEMM", base)
    _, _, _, (_, d_a, d_b, _, _) = _check(tri, 33, 70, 37, 7, torch.float16, lora_dtype, 0.25)
    assert d_a.dtype == d_b.dtype == lora_dtype


@pytest.mark.parametrize("base", ["triton", "cublas"])
@pytest.mark.parametrize("M, K, N, r", [(7, 33, 40, 7), (100, 70, 33, 16)])
def test_bits_give_the_same_gradients_as_the_seed(tri, monkeypatch, base, M, K, N, r):
    """Reading the forward's packed mask, regenerating it from the seed (None), and the empty-bits fallback give
    bit-identical gradients."""
    monkeypatch.setattr(tri, "BASE_GEMM", base)
    *_, with_bits = _check(tri, M, K, N, r, torch.float32, torch.float32, 0.3, bits_arg="forward")
    *_, from_seed = _check(tri, M, K, N, r, torch.float32, torch.float32, 0.3, bits_arg="none")
    *_, empty = _check(tri, M, K, N, r, torch.float32, torch.float32, 0.3, bits_arg="empty")
    for name, a, b, c in zip(("dx", "dA", "dB"), with_bits, from_seed, empty):
        assert torch.equal(a, b) and torch.equal(a, c), name


def test_bits_are_what_the_backward_reads(tri, monkeypatch):
    """A different mask in keep_bits changes dA and dX (the bits are read, not the seed), and a wrong shape is
    refused before anything runs."""
    monkeypatch.setattr(tri, "BASE_GEMM", "cublas")
    x, w, a, b, bias, dy = _inputs(7, 40, 20, 3, torch.float32, torch.float32, seed=3)
    _, xa, bits = tri.lora_linear_forward(x, w, a, b, 0.6, bias, 0.3, 5, return_keep_bits=True)
    other = pack_keep_bits(dropout_keep_mask(6, 7, 40, 0.3)).to(DEVICE)
    got = tri.lora_linear_backward(dy, x, w, a, b, xa, 0.6, 0.3, 5, True, False, False, other)
    want = ref.lora_linear_backward(dy, x, w, a, b, xa, 0.6, 0.3, 6, True, False, False, **F64)
    assert_close_scaled(got[0], want[0], TOL[torch.float32], "dx with the other mask")
    assert_close_scaled(got[1], want[1], TOL[torch.float32], "dA with the other mask")
    with pytest.raises(ValueError, match="keep_bits"):
        tri.lora_linear_backward(dy, x, w, a, b, xa, 0.6, 0.3, 5, True, False, False, bits[:, :1].contiguous())


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_op_saves_the_bits_for_backward(p):
    """Through the public op and autograd: the Triton forward's packed mask reaches the backward; the torch backend
    returns an empty one and regenerates it."""
    import lora_kernels
    from lora_kernels.triton import lora_linear as tri

    x, w, a, b, bias, dy = _inputs(33, 70, 37, 7, torch.float32, torch.float32, seed=11)
    seen = []
    real = tri.lora_linear_backward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tri, "lora_linear_backward", lambda *args: seen.append(len(args)) or real(*args))
        grads = []
        for backend in ("triton", "torch"):
            torch.manual_seed(5)
            leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]
            y = lora_kernels.lora_linear(leaves[0], w, leaves[1], leaves[2], 0.6, bias, p, backend=backend)
            y.backward(dy)
            grads.append([y.detach()] + [t.grad for t in leaves])
    assert seen == [13 if p > 0 else 12]
    for name, got, want in zip(("y", "dx", "dA", "dB"), *grads):
        assert_close_scaled(got, want, TOL[torch.float32], name)


def test_opcheck_fwd_bwd_with_bits():
    if DEVICE == "cpu" and not INTERPRET:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    x, w, a, b, bias, dy = _inputs(7, 40, 9, 3, torch.float32, torch.float32, seed=2)
    seed = torch.tensor(1234, dtype=torch.int64, device=DEVICE)
    args = [x, w, a, b, bias, 0.5, 0.3, seed, "triton"]
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_fwd.default, args)
    _, xa, bits = torch.ops.lora_kernels.lora_linear_fwd(*args)
    assert tuple(bits.shape) == keep_bits_shape(7, 40)
    bargs = [dy, x, w, a, b, xa, 0.5, 0.3, seed, "triton", True, False, False, bits]
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_bwd.default, bargs)
