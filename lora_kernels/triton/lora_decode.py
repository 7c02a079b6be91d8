"""One-launch single-adapter forward for decode-sized batches: ``y = x·W0ᵀ + bias + scale·(x·Aᵀ)·Bᵀ``.

One pass over W0: the K loop feeds both the base product and the shrink from the same x tile, the epilogue adds the
LoRA term with xa in fp32 and writes y once. Inference only (:func:`lora_decode_linear`; the training kernels are in
:mod:`lora_kernels.triton.lora_linear`). Past ``lora_linear_tma.FUSED_MIN_ROWS`` rows on Hopper the same single
launch is the persistent TMA forward of :mod:`lora_kernels.triton.lora_linear_tma` with the shrink inside. See
docs/lora_linear.md ("The decode kernel").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from . import _utils
from ._compat import patch_interpreter

patch_interpreter()

# (max tokens, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Up to 16 tokens: 32 output columns per program
# give 128 programs at N = 4096 (132 SMs on an H100), each streaming a 32 × K strip of W0 with 256-deep K steps.
# Up to 64: one 64-row tile (wgmma needs 64 rows), 64 columns. Up to 256: 64 × 128 tiles (4 row tiles × 32 column
# blocks at N = 4096), where TMA is missing (before Hopper, unaligned operands, fp32; see use_tma). First
# guesses from the byte counts, NOT yet measured on a GPU; the sm_90 compile test checks that they fit shared memory
# and do not spill.
DECODE_TILES = ((16, 16, 32, 256, 4, 4), (64, 64, 64, 128, 4, 4), (256, 64, 128, 64, 4, 4))
MAX_TOKENS = DECODE_TILES[-1][0]
_INTERP = (16, 16, 32)  # BLOCK_M, BLOCK_N, BLOCK_K under the interpreter: several blocks even at the tests' sizes


def decode_config(
    M: int, R: int, x_bytes: int, interp: bool, smem: _utils.IntThunk
) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, num_warps, num_stages) for M tokens of rank R; ``smem`` a callable
    (asked on a GPU only). Host ints only: the static report can call it."""
    br = _utils.block_r(R)
    tile = next((t for t in DECODE_TILES if M <= t[0]), DECODE_TILES[-1])
    _, bm, bn, bk, warps, stages = tile
    if interp:
        return _INTERP[0], _INTERP[1], _INTERP[2], br, 4, 1
    # The K loop streams x [BM, BK], W0 [BK, BN] and A [BK, BR] per stage; the epilogue's fp32 xa and B tiles also
    # pass through shared memory.
    reserve = bm * br * 4 + br * bn * 4
    bk, stages = _utils.k_pipeline(bm, bk, bn + br, x_bytes, x_bytes, reserve, smem(), stages)
    return bm, bn, bk, br, warps, stages


@triton.jit
def _decode_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    a_ptr,  # [r, K]
    b_ptr,  # [N, r]
    y_ptr,  # [M, N], written once
    scale,  # fp32
    M,
    N,
    K,
    r,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CAST_FP32: tl.constexpr,  # base product on exact fp32 operands (fp32 data, or bf16 in the interpreter)
    LORA_FP32: tl.constexpr,  # LoRA products on exact fp32 operands (an fp32 adapter with 16-bit x and W0)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    n_ok = offs_n < N
    r_ok = offs_r < r
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    a_cols = a_ptr + offs_r[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        offs_k64 = offs_k.to(tl.int64)  # k·stride of a column-major x / W / A passes 2^31 on large tensors
        xt = tl.load(x_rows + offs_k64[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_cols + offs_k64[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        at = tl.load(a_cols + offs_k64[:, None] * stride_ak, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if CAST_FP32:
            acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, wt)
        if LORA_FP32:
            xa += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            xa += tl.dot(xt, at)
    bt = tl.load(
        b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_r[:, None] * stride_br,
        mask=r_ok[:, None] & n_ok[None, :],
        other=0.0,
    )
    # xa stays fp32 (tf32 MMA for 16-bit data): an fp16 copy would overflow past 65504.
    if LORA_FP32:
        acc += scale * tl.dot(xa, bt.to(tl.float32), input_precision="ieee")
    else:
        acc += scale * tl.dot(xa, bt.to(tl.float32))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Batches of more than lora_linear_tma.FUSED_MIN_ROWS rows take the persistent TMA forward of lora_linear with the
# shrink in its main loop (lora_linear_tma.fwd_gemm with lora_A; Hopper and newer, TMA-readable 16-bit x, W0 and A of
# one dtype): the same one pass over W0, with wgmma fed by the copy engine, where the 64×128 wgmma tiles of
# _decode_kernel are charged 1.35x cuBLAS's compute time by the static report (predicted 1.40x the base at 256 rows,
# K = N = 4096).


def use_tma(x2: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """True when :func:`lora_decode_linear` runs the TMA kernel for this 2-D x (more than
    ``lora_linear_tma.FUSED_MIN_ROWS`` rows). fp32 data keeps _decode_kernel, whose fp32 products are exact IEEE ones
    (the TMA kernels run fp32 as TF32)."""
    from . import lora_linear_tma as _tma

    if x2.shape[0] <= _tma.FUSED_MIN_ROWS or x2.dtype == torch.float32 or lora_B.dtype != x2.dtype:
        return False
    return lora_A.shape[0] <= _tma.FUSED_MAX_R and _tma.tma_supported(x2, weight, lora_A)


def lora_decode_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ`` in one launch. x ``[..., K]``, weight ``[N, K]``, bias ``[N]`` or None,
    lora_A ``[r, K]``, lora_B ``[N, r]``; x, weight and bias of one dtype (fp16, bf16, fp32), lora_A and lora_B of
    that dtype or fp32 (as :func:`lora_kernels.lora_linear` accepts), on one device that Triton can use; any
    strides. Returns ``[..., N]`` in x's dtype. Meant for at most ``MAX_TOKENS`` rows (decode); larger inputs work
    but re-read A per row tile and lose to a GEMM. From ``lora_linear_tma.FUSED_MIN_ROWS + 1`` rows on Hopper the
    launch is the persistent TMA kernel of :mod:`lora_kernels.triton.lora_linear_tma` (see :func:`use_tma`), still
    one launch."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.dim() < 1 or weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(
            f"expected x [..., K], weight [N, K], lora_A [r, K], lora_B [N, r]; got x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
        )
    N, K = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != K or lora_A.shape[1] != K or lora_B.shape != (N, r) or (bias is not None and bias.shape != (N,)):
        raise ValueError(
            f"shapes disagree: x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_A "
            f"{tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}, bias "
            f"{None if bias is None else tuple(bias.shape)}; expected x [..., K], weight [N, K], "
            "lora_A [r, K], lora_B [N, r], bias [N]"
        )
    if r == 0:
        raise ValueError("lora_A has rank 0")
    tensors = [x, weight, lora_A, lora_B] + ([bias] if bias is not None else [])
    base = [x, weight] + ([bias] if bias is not None else [])
    if x.dtype not in _DTYPES or any(t.dtype != x.dtype for t in base):
        raise TypeError(f"x, weight and bias must share one dtype of {_DTYPES}, got {[t.dtype for t in base]}")
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"lora_A and lora_B must share x's dtype ({x.dtype}) or float32, got {lora_A.dtype} and {lora_B.dtype}"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a real number, got {scale!r}")
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    why = _backend.triton_device_reason(*tensors)
    if why:
        raise ValueError(f"lora_decode_linear needs tensors the Triton kernels can use: {why}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if use_tma(x2, weight, lora_A, lora_B):
        from . import lora_linear_tma as _tma

        return _tma.fwd_gemm(x2, weight, None, lora_B, scale, bias, lora_A=lora_A).reshape(*lead, N)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.reshape(*lead, N)
    bm, bn, bk, br, warps, stages = decode_config(
        M, r, x.element_size(), _backend.interpreter_enabled(), lambda: _utils.smem_of(x.device)
    )
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    with _utils.device_ctx(x):
        _decode_kernel[grid](
            x2,
            weight,
            bias if bias is not None else weight,
            lora_A,
            lora_B,
            y,
            float(scale),
            M,
            N,
            K,
            r,
            x2.stride(0),
            x2.stride(1),
            weight.stride(0),
            weight.stride(1),
            lora_A.stride(0),
            lora_A.stride(1),
            lora_B.stride(0),
            lora_B.stride(1),
            y.stride(0),
            y.stride(1),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            BLOCK_R=br,
            HAS_BIAS=bias is not None,
            CAST_FP32=_utils.cast_to_fp32(x.dtype),
            LORA_FP32=_utils.cast_to_fp32(x.dtype, lora_A.dtype),
            num_warps=warps,
            num_stages=stages,
        )
    return y.reshape(*lead, N)
