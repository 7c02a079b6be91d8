"""The forward of the Triton lora_linear at decode-sized batches without dropout: the shrink S = x·Aᵀ runs inside
the base GEMM's main loop (one launch), and S, which backward needs, is still written exactly."""

import pytest
import torch
from _tolerances import TOL, assert_close_scaled

from lora_kernels.reference import lora_linear as ref

from conftest import DEVICE, HAS_CUDA, INTERPRET

pytestmark = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def tri(monkeypatch):
    from lora_kernels.triton import lora_linear as tri

    monkeypatch.setenv(tri.AUTOTUNE_ENV_VAR, "0")
    calls = []
    real = tri._shrink
    monkeypatch.setattr(tri, "_shrink", lambda *a, **k: calls.append(1) or real(*a, **k))
    tri.shrink_calls = calls
    yield tri
    del tri.shrink_calls


def _inputs(M, K, N, r, dtype, lora_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    a = torch.randn(r, K, generator=g) / K**0.5
    b = torch.randn(N, r, generator=g)
    bias = torch.randn(N, generator=g)
    a = a.t().contiguous().t()  # strided A: the fused loads honour its strides
    return [t.to(DEVICE, dt) for t, dt in ((x, dtype), (w, dtype), (a, lora_dtype), (b, lora_dtype), (bias, dtype))]


@pytest.mark.parametrize(
    "M, K, N, r, dtype, lora_dtype, fused",
    [
        (7, 50, 45, 8, torch.float32, torch.float32, True),
        (33, 70, 40, 16, torch.float16, torch.float32, True),  # A fp32 with half x: the fused dot upcasts
        (5, 40, 33, 64, torch.float16, torch.float16, True),  # the largest fused rank
        (5, 40, 33, 65, torch.float32, torch.float32, False),  # past it: the separate shrink
    ],
)
def test_fused_forward_matches_reference(tri, M, K, N, r, dtype, lora_dtype, fused):
    x, w, a, b, bias = _inputs(M, K, N, r, dtype, lora_dtype, seed=M + r)
    y, s = tri.lora_linear_forward(x, w, a, b, 0.8, bias, 0.0, 0)
    y_r, s_r = ref.lora_linear_forward(x, w, a, b, 0.8, bias, 0.0, 0, acc_dtype=torch.float64, out_dtype=torch.float64)
    # S is fp32 but, for 16-bit x, its GPU MMA may take TF32 operands: the 16-bit bound covers it.
    tol = TOL[dtype]
    assert (not tri.shrink_calls) == fused
    assert s.dtype == torch.float32 and s.shape == (M, r)
    assert_close_scaled(s, s_r, tol, "S")
    assert_close_scaled(y, y_r, tol, "y")


def test_dropout_and_large_batches_keep_the_separate_shrink(tri, monkeypatch):
    x, w, a, b, bias = _inputs(6, 24, 20, 4, torch.float32, torch.float32, seed=1)
    tri.lora_linear_forward(x, w, a, b, 1.0, bias, 0.25, 7)
    assert tri.shrink_calls == [1]
    monkeypatch.setattr(tri, "_FUSED_SHRINK_MAX_M", 5)
    tri.lora_linear_forward(x, w, a, b, 1.0, bias, 0.0, 0)
    assert tri.shrink_calls == [1, 1]
