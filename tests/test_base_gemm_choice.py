"""Which GEMM computes the base product of the Triton lora_linear (``BASE_GEMM``), and that "auto" takes the cuBLAS
base beyond decode-sized batches (the Triton base GEMM has not been measured within 2% of cuBLAS)."""

import pytest
import torch
from _tolerances import close

from lora_kernels.reference import lora_linear as ref

from conftest import DEVICE, HAS_CUDA, INTERPRET

needs_triton = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def tri():
    from lora_kernels.triton import lora_linear as tri

    return tri


def test_auto_is_the_default_and_picks_by_batch_rows(tri, monkeypatch):
    assert tri.BASE_GEMM == "auto"
    limit = tri._TRITON_BASE_MAX_M
    assert limit >= 64  # decode batches up to 64 rows keep the one-launch fused kernel
    assert tri._triton_base(1) and tri._triton_base(limit)
    assert not tri._triton_base(limit + 1) and not tri._triton_base(8192)
    monkeypatch.setattr(tri, "BASE_GEMM", "triton")
    assert tri._triton_base(8192)
    monkeypatch.setattr(tri, "BASE_GEMM", "cublas")
    assert not tri._triton_base(1)


def test_bad_base_gemm_is_refused(tri, monkeypatch):
    monkeypatch.setattr(tri, "BASE_GEMM", "cutlass")
    with pytest.raises(ValueError, match="BASE_GEMM must be one of auto, triton, cublas, got 'cutlass'"):
        tri._triton_base(4)


@needs_triton
@pytest.mark.parametrize("M, expect_mm", [(7, False), (300, True)])
def test_auto_routes_large_batches_through_torch_mm(tri, monkeypatch, M, expect_mm):
    # Small K, N, r keep the interpreter quick; M = 300 is past the limit, so the base comes from torch.mm / addmm.
    monkeypatch.setenv("LORA_KERNELS_AUTOTUNE", "0")
    monkeypatch.setattr(tri, "_TRITON_BASE_MAX_M", 256)
    calls = []
    real_addmm = torch.addmm

    def spy_addmm(*args, **kwargs):
        calls.append("addmm")
        return real_addmm(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", spy_addmm)
    g = torch.Generator().manual_seed(5)
    K, N, r = 24, 20, 4
    x = torch.randn(M, K, generator=g).to(DEVICE)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE)
    a = (torch.randn(r, K, generator=g) / K**0.5).to(DEVICE)
    b = torch.randn(N, r, generator=g).to(DEVICE)
    bias = torch.randn(N, generator=g).to(DEVICE)
    y, s = tri.lora_linear_forward(x, w, a, b, 0.7, bias, 0.0, 0)
    y_r, _ = ref.lora_linear_forward(x, w, a, b, 0.7, bias, 0.0, 0, acc_dtype=torch.float64, out_dtype=torch.float64)
    assert (calls == ["addmm"]) == expect_mm
    torch.testing.assert_close(y.double(), y_r, **close(torch.float32))
