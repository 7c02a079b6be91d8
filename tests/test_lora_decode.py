"""The single-adapter decode kernel (lora_kernels/triton/lora_decode.py): one launch, one pass over W0, the LoRA
term in the epilogue. Against the float64 reference under the CPU interpreter (bf16 only on a GPU), odd sizes, mixed
ranks, strided inputs, bias, an fp32 shrink beyond the fp16 range, bad arguments, and the sm_90 compile check."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from _aot import run_child
from _oracle import lora_linear_f64, lora_linear_in_dtype
from _tolerances import assert_close_to_oracle, close

from conftest import DEVICE, HAS_CUDA, INTERPRET

TRITON_OK = (HAS_CUDA or INTERPRET) and importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not TRITON_OK, reason="needs triton, and CUDA or TRITON_INTERPRET=1")


def _ref(x, W, bias, A, B, scale):
    return lora_linear_f64(x, W, A, B, scale, bias).cpu()


CASES = [
    # (M, K, N, r, dtype, bias)
    (1, 40, 24, 8, torch.float32, True),
    (7, 100, 33, 1, torch.float16, False),
    (16, 33, 100, 16, torch.float32, False),
    (33, 64, 40, 5, torch.float16, True),
    (100, 40, 7, 12, torch.float32, True),
    pytest.param(
        16,
        256,
        96,
        16,
        torch.bfloat16,
        True,
        marks=pytest.mark.skipif(not HAS_CUDA, reason="bf16 tl.dot is wrong in the CPU interpreter; run on a GPU"),
    ),
]


@pytest.mark.parametrize("M,K,N,r,dtype,bias", CASES)
def test_decode_matches_reference(M, K, N, r, dtype, bias):
    from lora_kernels.triton.lora_decode import lora_decode_linear

    gen = torch.Generator().manual_seed(M * 31 + K)
    x = torch.randn(M, K, generator=gen).to(DEVICE, dtype)
    W = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(DEVICE, dtype)
    A = (torch.randn(r, K, generator=gen) / math.sqrt(K)).to(DEVICE, dtype)
    B = torch.randn(N, r, generator=gen).to(DEVICE, dtype)
    b = torch.randn(N, generator=gen).to(DEVICE, dtype) if bias else None
    y = lora_decode_linear(x, W, b, A, B, 0.75)
    assert y.dtype == dtype and y.shape == (M, N)
    want = _ref(x, W, b, A, B, 0.75)
    if dtype == torch.bfloat16:  # GPU only: the 2x-the-PyTorch-error rule of half-precision GPU tests
        assert_close_to_oracle(y, lora_linear_in_dtype(x, W, A, B, 0.75, b), want)
    else:
        torch.testing.assert_close(y.cpu().double(), want, **close(dtype))


def test_decode_fp32_adapter_with_half_base():
    from lora_kernels.triton.lora_decode import lora_decode_linear

    gen = torch.Generator().manual_seed(4)
    K, N, r = 40, 20, 3
    x = torch.randn(5, K, generator=gen).to(DEVICE, torch.float16)
    W = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(DEVICE, torch.float16)
    A = (torch.randn(r, K, generator=gen) / math.sqrt(K)).to(DEVICE)
    B = torch.randn(N, r, generator=gen).to(DEVICE)
    y = lora_decode_linear(x, W, None, A, B, 1.5)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.cpu().double(), _ref(x, W, None, A, B, 1.5), **close(torch.float16))


def test_decode_strided_inputs_and_lead_dims():
    from lora_kernels.triton.lora_decode import lora_decode_linear

    gen = torch.Generator().manual_seed(2)
    K, N, r = 48, 30, 6
    x = torch.randn(2, 3, 2 * K, generator=gen).to(DEVICE)[..., ::2]  # column-strided x, [2, 3, K]
    W = torch.randn(K, N, generator=gen).to(DEVICE).t()  # [N, K], transposed view
    A = torch.randn(K, r, generator=gen).to(DEVICE).t() / math.sqrt(K)
    B = torch.randn(r, N, generator=gen).to(DEVICE).t()
    y = lora_decode_linear(x, W, None, A, B, 2.0)
    assert y.shape == (2, 3, N)
    torch.testing.assert_close(y.cpu().double(), _ref(x, W, None, A, B, 2.0), **close(torch.float32))


def test_decode_shrink_beyond_fp16_range():
    """x·Aᵀ = 102400 in fp16 data, output ~512: S stays fp32 up to the epilogue."""
    from lora_kernels.triton.lora_decode import lora_decode_linear

    K, N = 40, 24
    x = torch.full((3, K), 16.0, dtype=torch.float16, device=DEVICE)
    A = torch.stack([torch.full((K,), 160.0), torch.full((K,), -160.0)]).to(DEVICE, torch.float16)
    B = torch.stack([torch.full((N,), 0.0075), torch.full((N,), 0.0025)], dim=1).to(DEVICE, torch.float16)
    W = torch.zeros(N, K, dtype=torch.float16, device=DEVICE)
    y = lora_decode_linear(x, W, None, A, B, 1.0)
    want = _ref(x, W, None, A, B, 1.0)
    assert want.abs().max() < 1000 and (x[0].double() @ A[0].double()) > 65504
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.cpu().double(), want, **close(torch.float16))


@pytest.fixture
def tma_calls(monkeypatch):
    """Calls of the TMA forward by lora_decode_linear (a skip where the GPU has no TMA)."""
    from lora_kernels.triton import lora_linear_tma as T

    if HAS_CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA route needs compute capability >= 9")
    monkeypatch.setenv("LORA_KERNELS_AUTOTUNE", "0")
    calls = []
    real = T.fwd_gemm
    monkeypatch.setattr(T, "fwd_gemm", lambda *a, **k: calls.append(k.get("lora_A") is not None) or real(*a, **k))
    return calls


@pytest.mark.parametrize(
    "M, K, N, r, bias, tma",
    [
        (65, 48, 40, 5, True, True),  # one row past FUSED_MIN_ROWS
        (100, 64, 96, 16, False, True),
        (70, 32, 24, 64, True, True),  # the largest fused rank
        (100, 36, 40, 4, True, False),  # x's and A's rows of 72 bytes: not TMA operands, _decode_kernel runs
        (64, 48, 40, 5, False, False),  # FUSED_MIN_ROWS itself keeps _decode_kernel
    ],
)
def test_decode_larger_batches_take_the_tma_kernel(tma_calls, M, K, N, r, bias, tma):
    from lora_kernels.triton.lora_decode import lora_decode_linear
    from lora_kernels.triton.lora_linear_tma import FUSED_MIN_ROWS

    assert FUSED_MIN_ROWS == 64
    gen = torch.Generator().manual_seed(M + K + r)
    x = torch.randn(M, K, generator=gen).to(DEVICE, torch.float16)
    W = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(DEVICE, torch.float16)
    A = (torch.randn(r, K, generator=gen) / math.sqrt(K)).to(DEVICE, torch.float16)
    B = torch.randn(N, r, generator=gen).to(DEVICE, torch.float16)
    b = torch.randn(N, generator=gen).to(DEVICE, torch.float16) if bias else None
    y = lora_decode_linear(x.reshape(1, M, K), W, b, A, B, 0.75)
    assert y.shape == (1, M, N) and y.dtype == torch.float16
    assert tma_calls == ([True] if tma else [])
    torch.testing.assert_close(y[0].cpu().double(), _ref(x, W, b, A, B, 0.75), **close(torch.float16))


def test_decode_fp32_and_fp32_adapters_keep_the_exact_kernel(tma_calls):
    # fp32 data (exact IEEE products in _decode_kernel; the TMA kernels would take TF32) and an fp32 adapter with
    # half data (not one dtype for the copy engine) stay on _decode_kernel at any batch size.
    from lora_kernels.triton.lora_decode import lora_decode_linear

    gen = torch.Generator().manual_seed(11)
    K, N, r, M = 48, 40, 6, 80
    for dt, lora_dt in ((torch.float32, torch.float32), (torch.float16, torch.float32)):
        x = torch.randn(M, K, generator=gen).to(DEVICE, dt)
        W = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(DEVICE, dt)
        A = (torch.randn(r, K, generator=gen) / math.sqrt(K)).to(DEVICE, lora_dt)
        B = torch.randn(N, r, generator=gen).to(DEVICE, lora_dt)
        y = lora_decode_linear(x, W, None, A, B, 1.25)
        torch.testing.assert_close(y.cpu().double(), _ref(x, W, None, A, B, 1.25), **close(dt))
    assert tma_calls == []


def test_decode_bad_arguments():
    from lora_kernels.triton.lora_decode import lora_decode_linear

    x, W = torch.randn(2, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE)
    A, B = torch.randn(2, 8, device=DEVICE), torch.randn(4, 2, device=DEVICE)
    with pytest.raises(ValueError, match="shapes disagree"):
        lora_decode_linear(x, W, None, A, B.t(), 1.0)
    with pytest.raises(TypeError, match="one dtype"):
        lora_decode_linear(x.half(), W, None, A, B, 1.0)
    with pytest.raises(TypeError, match="or float32"):
        lora_decode_linear(x.half(), W.half(), None, A.half(), B, 1.0)
    with pytest.raises(TypeError, match="scale"):
        lora_decode_linear(x, W, None, A, B, "1")
    with pytest.raises(TypeError, match="bias"):
        lora_decode_linear(x, W, [0.0] * 4, A, B, 1.0)


# --------------------------------------------------------------------------------------- sm_90 ahead-of-time compile
_AOT_SCRIPT = r"""
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lora_kernels.triton import lora_decode as D
from _aot import no_spills, ptxas_report

TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
K = N = 4096
for dtype in (torch.float16, torch.bfloat16):
    for M in (1, 16, 64, 256):
        for R in (16, 64):
            bm, bn, bk, br, warps, stages = D.decode_config(M, R, 2, False, lambda: 227 * 1024)
            names = D._decode_kernel.arg_names
            consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_R": br, "HAS_BIAS": True,
                      "CAST_FP32": False, "LORA_FP32": False, "stride_xk": 1, "stride_wk": 1, "stride_ak": 1,
                      "stride_br": 1,
                      "stride_yn": 1}
            if M == 1:
                consts["M"] = 1
            sig, attrs = {}, {}
            for i, n in enumerate(names):
                if n in consts:
                    sig[n] = "constexpr"
                elif n.endswith("_ptr"):
                    sig[n] = "*" + TY[dtype]
                    attrs[(i,)] = [["tt.divisibility", 16]]
                elif n == "scale":
                    sig[n] = "fp32"
                else:
                    sig[n] = "i32"
                    if n != "r" and n != "M":
                        attrs[(i,)] = [["tt.divisibility", 16]]
            c = triton.compile(ASTSource(D._decode_kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps, "num_stages": stages})
            spill_stores, spill_loads, _ = ptxas_report(c)
            spills = spill_stores + spill_loads
            print(dtype, M, R, (bm, bn, bk, br, warps, stages), "smem", c.metadata.shared, "spills", spills,
                  flush=True)
            assert c.metadata.shared <= 227 * 1024, (M, R, c.metadata.shared)
            no_spills(spill_stores, spill_loads, (dtype, M, R))
print("OK")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernel is compiled and run by the tests above")
def test_decode_kernel_compiles_for_sm90_without_spills(tmp_path):
    run_child(_AOT_SCRIPT, tmp_path, timeout=900)
