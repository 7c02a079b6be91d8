"""Triton kernels of ``lora_linear`` and their launchers: ``y = x·W0ᵀ + scale·xa·Bᵀ + bias``, ``xa = dropout(x)·Aᵀ``.

Forward: ``_dropout_shrink_kernel`` + ``_fwd_kernel`` (the LoRA term in the GEMM's accumulator; one launch at decode
sizes without dropout), or cuBLAS + ``_shrink_expand_kernel``; backward: ``_dxa_kernel``, ``_grad_ab_kernel`` (dA and
dB), ``_dx_kernel``. fp32 accumulators, no atomics, no zero-fills, a device-side dropout seed and a dropout mask drawn
once, kept as bits. ``BASE_GEMM`` picks cuBLAS or the Triton GEMM for the base product.
Kernels, launches, tiles, precision and CUDA graphs: docs/lora_linear.md; what is still unmeasured: BENCHMARKS.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from ..reference import lora_linear as _ref
from ..reference.dropout import dropout_threshold, keep_bits_shape
from . import _gemm, _utils
from . import lora_linear_tma as _tma
from ._compat import patch_interpreter
from ._dropout import keep_mask, keep_words, load_keep, unpack_bits
from ._gemm import (
    AUTOTUNE_ENV_VAR,  # noqa: F401  (the switch is read from this module by users and benchmarks)
    autotune_off,
)
from ._gemm import autotune_bench as _autotune_bench
from ._gemm import dot as _dot
from ._gemm import tile_of as _tile_of

# "triton": y and dX come from the fused Triton GEMMs. "cublas": cuBLAS computes the base product, the Triton kernels
# add the LoRA term in place. "auto": see _TRITON_BASE_MAX_M. Module-level so benchmarks can flip it; read on every
# call.
BASE_GEMM = "auto"
BASE_GEMMS = ("auto", "triton", "cublas")
# The one place where "auto" chooses the base GEMM. A batch of more than this many rows takes the cuBLAS base:
# the fused Triton GEMM here is the plain (cp.async + wgmma, non-TMA, non-persistent) kind, which measured 25-45%
# slower than cuBLAS on an H100 (bf16, 2026-11-25), so at training sizes it would make the layer slower than PEFT's
# unfused LoRA (1.26x / 1.32x the base); the cuBLAS path costs one extra read and write of y / dX instead (~6-12%
# predicted by benchmarks/static_report.py). Decode-sized batches of ≤ 64 rows keep the fused kernel (one launch, the
# shrink inside it): there W0's read dominates and one launch fewer matters; the report predicts 1.004-1.008x the
# base at M = 1, 16, 64. At 256 rows the Triton GEMM's compute (8.6 GFLOP at K = N = 4096, at 1.35x cuBLAS's time)
# no longer hides under W0's read: predicted 1.45-1.53x fused against 1.09-1.17x for cuBLAS + the shrink+expand
# kernel, so those take the cuBLAS base. Raise the limit only when a GPU measurement shows the Triton path within 2%
# of cuBLAS at that shape class.
_TRITON_BASE_MAX_M = 64

# The LoRA prologues of the two GEMMs walk r in chunks of at most 32: an fp32 xa tile (BLOCK_M×32) and B tile
# (32×BLOCK_N) stay small next to the main loop's buffers, and r = 16 or 32 (the common ranks) is one step.
_PROLOGUE_MAX_R = 32
# Forward without dropout at decode-sized batches (≤ this many rows): the shrink runs inside the base GEMM's main
# loop (FUSE_SHRINK), so the forward is one launch instead of a memset, a split-K shrink and the GEMM (two extra
# graph nodes, ~2 µs each against a ~10 µs base at K = N = 4096). Each column of output tiles recomputes its rows of
# xa, N/BLOCK_N times the shrink's FLOPs, which only memory-bound (small-M) products absorb.
_FUSED_SHRINK_MAX_M = 256
# ... and ranks up to 64: the fused xa accumulator (BLOCK_M × r fp32) stays small next to the output tile's.
_FUSED_SHRINK_MAX_R = 64
# ... and output tiles of at most 64×128: the 128×256 tile with the xa accumulator spilled 2.6 KB per thread on sm_90,
# and at these batch sizes the product is memory-bound: smaller tiles give more programs to pull W0 from HBM (a
# 256-row batch at N = 4096 has 16 tiles of 128×256 for 132 SMs, 128 of 64×128).
_FUSED_SHRINK_MAX_TILE = 64 * 128
# The skinny kernels hold all of r (up to 128) in one tile so dY / x are read once; larger r adds a grid axis.
_SKINNY_MAX_R = 128

# The dropout seed: a 0-dim int64 tensor on the device (graph-safe, no host sync) or a Python int.
Seed = torch.Tensor | int

_INTERPRET_AT_IMPORT = _backend.interpreter_enabled()
# triton 3.6's interpreter + numpy >= 2.4 cannot run loops with runtime bounds (see _compat.py); no-op otherwise.
patch_interpreter()


# ------------------------------------------------------------------------------------------------------ configs
# Shared memory one program may use for its pipelined operand tiles. An H100 block can have 227 KiB; the rest is
# left for the LoRA prologue's tiles and the epilogue.
_SMEM_BUDGET = 192 * 1024

# (BLOCK_out_rows, BLOCK_out_cols, BLOCK_reduction, GROUP_M, num_warps, num_stages). Starting points from the Triton
# matmul tutorial's fp16 list, plus short tiles for decode-sized batches. UNMEASURED; see the module docstring.
_CUDA_TILES = [
    (128, 256, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 4),
    (128, 128, 64, 8, 4, 4),
    # First for 33-64-row batches: 64 programs at N = 4096 against 32 for 64×128, so that more SMs pull W0 (predicted
    # 1.008x the base at M = 64 against 1.58x).
    (64, 64, 128, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
    (32, 128, 128, 8, 4, 4),
    (16, 64, 256, 8, 4, 4),
]
# fp32 operands: 32-deep reduction steps. Same shared memory per stage as the half-precision list; and the IEEE fp32
# tl.dot (the default unless TF32 is allowed) compiles in ~1-2 s per config with these tiles on triton 3.9 for sm_90,
# against 5-30 s with the 64-deep half-precision tiles (measured by compiling without a GPU; run time unmeasured).
_CUDA_TILES_FP32 = [
    (128, 128, 32, 8, 8, 3),
    (128, 64, 32, 8, 4, 3),
    (64, 128, 32, 8, 4, 3),
    (64, 64, 32, 8, 4, 3),
    (16, 64, 64, 8, 4, 3),
]
# 32 keeps the interpreter fast on test shapes (≤ 100) while still giving several tiles with ragged edges;
# GROUP_M = 2 exercises the grouped program order.
_INTERPRETER_TILE = (32, 32, 32, 2, 4, 1)


# The dX kernel draws the dropout mask of its whole output tile at once when it has no bits to read (Philox: ~57 SASS
# instructions per call, many live registers). Compiled for sm_90 with triton 3.9 (benchmarks/static_report.py
# --all-configs), bf16, with one Philox call per element (now one per 4 elements): a 128×256 tile at 8 warps (128
# elements per thread) took 255 registers and spilled ~22 KB per thread; 64 elements per thread still spilled (128×128
# at 8 warps: 2.4 KB; 64×128 and 128×64 at 4 warps: 2.4-2.7 KB). With dropout the dX kernel gets its own list, 32
# elements per thread at most, so no config, including the one used with $LORA_KERNELS_AUTOTUNE=0, spills.
_DROPOUT_MAX_PER_THREAD = 32
_CUDA_TILES_DROPOUT = [
    (128, 64, 64, 8, 8, 4),
    (64, 128, 64, 8, 8, 4),
    (32, 128, 128, 8, 4, 4),
    (16, 64, 256, 8, 4, 4),
]
# Before Hopper (compute capability < 9) there is no wgmma: tl.dot lowers to mma.sync, which keeps the accumulator AND
# the operand fragments in registers, so the tiles sized for sm_90 run out of them. Compiled for sm_80 with triton 3.9
# (benchmarks/static_report.py --archs 80 --all-configs), bf16, at 128 output elements per thread: 128×256 at 8 warps
# spills 48 bytes (forward) / 108 bytes (dX) at 3 stages, and at the 2 stages an A100's shared memory leaves it still
# takes 254-255 of the 255 registers a thread can have (no headroom); 128×128 at 4 warps spills 116 bytes. Every
# 64-per-thread tile compiles without spills in 158-194 registers, with 4 stages on an A100. So on those GPUs the
# pruner drops tiles over 64 (128×128 at 8 warps comes first there). The fp32 list's first configs (IEEE dot, 64 per
# thread at most) compile without spills on sm_80 as well (152-255 registers).
_MMA_SYNC_MAX_PER_THREAD = 64
# BASE=False (the cuBLAS path: the kernels only add the LoRA term) has no reduction loop, so the reduction tile is
# unused; the 128-deep decode tile (32×128, 4 warps) still spilled 8 bytes there on sm_90. Deeper ones are not offered
# (the pruner's fallback tile serves decode-sized batches).
_LORA_ONLY_MAX_RED = 64


def _gemm_configs(col_key: str, red_key: str, tiles=None):
    """Autotune list of a big GEMM whose output tile is BLOCK_M × ``col_key`` and whose reduction step is ``red_key``
    (forward: BLOCK_N × BLOCK_K; dX: BLOCK_K × BLOCK_N)."""
    if tiles is None:
        tiles = [_INTERPRETER_TILE] if _INTERPRET_AT_IMPORT else _CUDA_TILES
    return _gemm.configs(col_key, red_key, tiles)


def _gemm_device(device: torch.device) -> tuple[tuple[int, int], int] | None:
    """(compute capability, opt-in shared memory per block) of the GPU a GEMM launches on, asked on the first launch
    (cached per device by _utils); None off CUDA (the interpreter: nothing depends on the architecture there). The
    static report replaces this function to pick tiles as on a given card."""
    if device.type != "cuda":
        return None
    return _utils.capability_of(device), _utils.smem_of(device)


def _smem_budget(device: torch.device) -> int:
    """_SMEM_BUDGET on an H100 (and in the interpreter); on a GPU with less shared memory the same 35 KiB are left
    for the LoRA prologue and the epilogue, so that the first config (used without benchmarking when autotuning is
    off) still launches instead of failing with OutOfResources."""
    gpu = _gemm_device(device)
    if gpu is None:
        return _SMEM_BUDGET
    return min(_SMEM_BUDGET, gpu[1] - (227 * 1024 - _SMEM_BUDGET))


def _max_per_thread(device: torch.device) -> int | None:
    """Output elements per thread a GEMM tile may have on this GPU: _MMA_SYNC_MAX_PER_THREAD before Hopper, no limit
    on Hopper and later (wgmma) or off CUDA."""
    gpu = _gemm_device(device)
    if gpu is None or gpu[0] >= (9, 0):
        return None
    return _MMA_SYNC_MAX_PER_THREAD


def _gemm_pruner(operand: str, col_key: str, red_key: str):
    """Pre-benchmark pruning: drop tiles more than twice as tall as the batch (decode-sized M keeps the short tiles),
    with dropout tiles over _DROPOUT_MAX_PER_THREAD output elements per thread, and before Hopper tiles over
    _MMA_SYNC_MAX_PER_THREAD; cut num_stages until the operand buffers fit the device's budget (_smem_budget). fp32
    operands take the _CUDA_TILES_FP32 list instead. With $LORA_KERNELS_AUTOTUNE=0 the first surviving config is used
    without benchmarking. Always returns at least one config."""

    def prune(configs, named_args, **kwargs):
        elem = named_args[operand].element_size()
        dropout = bool(kwargs.get("HAS_DROPOUT", named_args.get("HAS_DROPOUT", False)))
        base = bool(kwargs.get("BASE", named_args.get("BASE", True)))
        fused = bool(kwargs.get("FUSE_SHRINK", named_args.get("FUSE_SHRINK", False)))
        bucket = named_args["M_BUCKET"]
        device = named_args[operand].device
        budget = _smem_budget(device)
        per_thread = _max_per_thread(device)
        if elem >= 4:
            configs = _gemm_configs(col_key, red_key, _CUDA_TILES_FP32)
        elif dropout and not _INTERPRET_AT_IMPORT:
            configs = _gemm_configs(col_key, red_key, _CUDA_TILES_DROPOUT)
        kept = []
        for c in configs:
            kw = c.kwargs
            stage_bytes = (kw["BLOCK_M"] + kw[col_key]) * kw[red_key] * elem
            stages = min(c.num_stages, budget // stage_bytes)
            if stages < 2 or kw["BLOCK_M"] > max(_utils.MIN_DOT, 2 * bucket):
                continue
            if dropout and kw["BLOCK_M"] * kw[col_key] > _DROPOUT_MAX_PER_THREAD * 32 * c.num_warps:
                continue
            if per_thread is not None and kw["BLOCK_M"] * kw[col_key] > per_thread * 32 * c.num_warps:
                continue
            if not base and kw[red_key] > _LORA_ONLY_MAX_RED:
                continue
            if fused and kw["BLOCK_M"] * kw[col_key] > _FUSED_SHRINK_MAX_TILE:
                continue
            warps = c.num_warps
            if per_thread is not None and warps == 4 and (kw["BLOCK_M"], kw[col_key], kw[red_key]) == (64, 64, 128):
                # sm_80 (mma.sync), half precision: at 4 warps this tile spilled 60 bytes per thread with 4 stages
                # (36 with 3) at 128 registers; at 8 warps it takes 96 registers and no spill.
                warps = 8
            kept.append(triton.Config(dict(kw), num_warps=warps, num_stages=stages))
        if not kept:  # a small safe tile: 64×64 outputs, 32-deep steps, 2 stages (≤ 32 KiB even in fp32)
            kept = [triton.Config({"BLOCK_M": 64, col_key: 64, red_key: 32, "GROUP_M": 8}, num_warps=4, num_stages=2)]
        if autotune_off():
            kept = kept[:1]
        return kept

    return prune


# Tiles of the skinny (memory-bound) kernels: fixed, not autotuned, because their split factors depend on the tiles.
# 64×64 half tiles plus fp32 r-tiles fit comfortably in registers at 4 warps. Unmeasured.
_SKINNY_BLOCK = 32 if _INTERPRET_AT_IMPORT else 64
_SKINNY_WARPS = 4


# ---------------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program with GROUP_M row-tiles walked together, so their column tiles share L2."""
    return _tile_of(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)


# ---------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _shrink_rows(
    x_ptr,
    a_ptr,
    bits_ptr,
    rm,
    rr,
    M,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_bm,
    t_begin,
    t_end,
    seed,
    threshold,
    bits_rows,  # rows below this store their mask bits (0: this program stores none)
    HAS_DROPOUT: tl.constexpr,
    STORE_BITS: tl.constexpr,
    F32: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Σ over K-tiles [t_begin, t_end) of dropout(x)[rm, tile]·A[rr, tile]ᵀ, fp32 [BLOCK_M, BLOCK_R], without the
    1/(1-p). With STORE_BITS the keep mask drawn here is stored packed (32 columns per int32 word): the only place
    a training step draws it."""
    m_ok = rm < M
    r_ok = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for t in range(t_begin, t_end):
        rk = t * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x_ok = m_ok[:, None] & k_ok[None, :]
        if HAS_DROPOUT:
            # Dropped elements become 0 in x's own dtype after an unmasked (vectorised, cp.async) load: exact; 1/(1-p)
            # is applied to the fp32 sum by the caller. Using the mask as the load's mask instead split the load into
            # one 2-byte load per element (16 LDG per thread and K step at 32×64, 4 warps).
            if STORE_BITS:
                # Drawn straight into packed words, and the tile's mask read back from them: with a [BLOCK_M,
                # BLOCK_K] boolean mask used both on x and for the packing, the compiler drew the Philox words twice,
                # once per layout. sm_90, 32×64 tile, 4 warps, SASS instructions per K step: 1130 with one Philox
                # call per element, 829 with one per 4 elements, 489 drawn once into words (this code).
                rw = t * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
                words = keep_words(seed, rm, t * BLOCK_K, K, threshold, BLOCK_K)
                tl.store(
                    bits_ptr + rm.to(tl.int64)[:, None] * stride_bm + rw[None, :],
                    words,
                    mask=(rm[:, None] < bits_rows) & (rw[None, :] < tl.cdiv(K, 32)),
                )
                keep = unpack_bits(words, BLOCK_M, BLOCK_K)
            else:
                keep = keep_mask(seed, rm, t * BLOCK_K, K, threshold, BLOCK_K)
        xt = tl.load(
            x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk.to(tl.int64)[None, :] * stride_xk, mask=x_ok, other=0.0
        )
        if HAS_DROPOUT:
            xt = tl.where(keep, xt, tl.zeros_like(xt))
        at = tl.load(  # [BLOCK_K, BLOCK_R] view of A: Aᵀ tile
            a_ptr + rr.to(tl.int64)[None, :] * stride_ar + rk.to(tl.int64)[:, None] * stride_ak,
            mask=r_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        acc = _dot(xt, at, acc, F32, PREC)
    return acc


@triton.jit
def _dropout_shrink_kernel(
    x_ptr,  # [M, K] fp16/bf16/fp32, any strides
    a_ptr,  # [R, K] lora_A, x's dtype or fp32, any strides
    xa_ptr,  # fp32 out, contiguous: [M, R], or [SPLIT_K, M, R] partial sums (the consumer adds them up)
    bits_ptr,  # [M, ceil(K/32)] int32 out: the packed keep mask (written only when STORE_BITS)
    M,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_bm,
    seed_ptr,  # [] int64 dropout seed, on the device (read only when HAS_DROPOUT)
    threshold,
    inv_keep,
    HAS_DROPOUT: tl.constexpr,
    STORE_BITS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    F32: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """xa[split, m-tile, r-tile] = dropout(x)·Aᵀ over this program's share of K (grid: m-tiles, K splits, r-tiles).
    Each split stores its own partial sum (plain stores into a torch.empty buffer: no zero-fill, no atomics, and
    the sum's order is fixed, so the result is reproducible)."""
    pid_m = tl.program_id(0)
    pid_split = tl.program_id(1)
    pid_r = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_end = tl.minimum((pid_split + 1) * per_split, k_tiles)
    seed = 0
    if HAS_DROPOUT:
        # Read on the device, not passed by value: a CUDA-graph replay sees the seed drawn in that replay.
        seed = tl.load(seed_ptr)
    # The splits cover disjoint K ranges (whole 32-column words: BLOCK_K is a multiple of 32), so each bit is stored
    # once; of several r-tiles only the first stores them.
    acc = _shrink_rows(
        x_ptr,
        a_ptr,
        bits_ptr,
        rm,
        rr,
        M,
        K,
        R,
        stride_xm,
        stride_xk,
        stride_ar,
        stride_ak,
        stride_bm,
        pid_split * per_split,
        t_end,
        seed,
        threshold,
        tl.where(pid_r == 0, M, 0),
        HAS_DROPOUT,
        STORE_BITS,
        F32,
        PREC,
        BLOCK_M,
        BLOCK_K,
        BLOCK_R,
    )
    if HAS_DROPOUT:
        acc = acc * inv_keep
    xa_ptrs = xa_ptr + pid_split.to(tl.int64) * M * R + rm.to(tl.int64)[:, None] * R + rr[None, :]
    tl.store(xa_ptrs, acc, mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _shrink_expand_kernel(
    x_ptr,  # [M, K] fp16/bf16/fp32, any strides
    a_ptr,  # [R, K] lora_A, x's dtype or fp32, any strides
    b_ptr,  # [N, R] lora_B, x's dtype or fp32, any strides
    y_ptr,  # [M, N] x's dtype, any strides: holds the base product (cuBLAS), gets the LoRA term added in place
    xa_ptr,  # [M, R] fp32 out, contiguous (saved for backward)
    bits_ptr,  # [M, ceil(K/32)] int32 out: the packed keep mask (written only when STORE_BITS)
    M,
    N,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    stride_bm,
    seed_ptr,  # [] int64 dropout seed, on the device (read only when HAS_DROPOUT)
    threshold,
    inv_keep,
    scale,
    HAS_DROPOUT: tl.constexpr,
    STORE_BITS: tl.constexpr,
    F32: tl.constexpr,
    PREC: tl.constexpr,
    LORA_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """The LoRA term of the cuBLAS-base forward in one launch (grid: m-tiles): xa = dropout(x)·Aᵀ for this
    program's rows over all of K (kept in fp32 registers, stored for backward), then y[rows, :] += scale·xa·Bᵀ walking
    N. All of r is one tile (the launcher guarantees R <= BLOCK_R)."""
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    xa = _shrink_rows(
        x_ptr,
        a_ptr,
        bits_ptr,
        rm,
        rr,
        M,
        K,
        R,
        stride_xm,
        stride_xk,
        stride_ar,
        stride_ak,
        stride_bm,
        0,
        tl.cdiv(K, BLOCK_K),
        seed,
        threshold,
        M,
        HAS_DROPOUT,
        STORE_BITS,
        F32,
        PREC,
        BLOCK_M,
        BLOCK_K,
        BLOCK_R,
    )
    if HAS_DROPOUT:
        xa = xa * inv_keep
    tl.store(xa_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], xa, mask=m_ok[:, None] & (rr[None, :] < R))
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        rn = n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        bt = tl.load(  # [BLOCK_R, BLOCK_N]: Bᵀ tile
            b_ptr + rn.to(tl.int64)[None, :] * stride_bn + rr[:, None] * stride_br,
            mask=n_ok[None, :] & (rr[:, None] < R),
            other=0.0,
        )
        lora = _dot(xa, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), True, LORA_PREC)
        y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn.to(tl.int64)[None, :] * stride_yn
        y_mask = m_ok[:, None] & n_ok[None, :]
        yt = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (yt + lora * scale).to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.autotune(
    configs=_gemm_configs("BLOCK_N", "BLOCK_K"),
    key=["M_BUCKET", "N", "K", "R", "BASE", "FUSE_SHRINK"],
    prune_configs_by={"early_config_prune": _gemm_pruner("x_ptr", "BLOCK_N", "BLOCK_K")},
    restore_value=["y_ptr"],  # BASE=False adds into y: benchmarking must not compound
    do_bench=_autotune_bench,
)
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _fwd_kernel(
    x_ptr,  # [M, K] fp16/bf16/fp32, any strides
    w_ptr,  # [N, K] x's dtype, any strides
    xa_ptr,  # [M, R] fp32 (xa = dropout(x)·Aᵀ), any strides; written, not read, when FUSE_SHRINK; with XA_PARTIAL
    # [xa_splits, M, R] contiguous partial sums of the split shrink, added up here
    xa_out_ptr,  # [M, R] fp32 out, contiguous: the summed xa, written by the first column of tiles (XA_PARTIAL only)
    b_ptr,  # [N, R] lora_B, x's dtype or fp32, any strides
    a_ptr,  # [R, K] lora_A, x's dtype or fp32, any strides (read only when FUSE_SHRINK)
    bias_ptr,  # [N] x's dtype, contiguous (read only when HAS_BIAS)
    y_ptr,  # [M, N] x's dtype out (read too when not BASE), any strides
    M,
    N,
    K,
    R,
    M_BUCKET,
    xa_splits,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_xam,
    stride_xar,
    stride_bn,
    stride_br,
    stride_ar,
    stride_ak,
    stride_ym,
    stride_yn,
    scale,
    HAS_BIAS: tl.constexpr,
    BASE: tl.constexpr,  # True: y = base + LoRA (+ bias). False: y += LoRA (cuBLAS already wrote the base + bias)
    # True (BASE only, no dropout): xa = x·Aᵀ is accumulated in the main loop from the x tiles already loaded (A's
    # tiles are small and come from L2), xa·Bᵀ is added after it, and the programs of the first column of tiles write
    # xa: the whole forward is this one launch. Each column of tiles recomputes its rows of xa, N/BLOCK_N times the
    # shrink's FLOPs: cheap where the product is memory-bound (decode-sized batches), not at training sizes.
    FUSE_SHRINK: tl.constexpr,
    XA_PARTIAL: tl.constexpr,  # xa_ptr holds xa_splits partial sums (a shrink split over K at small M)
    SHRINK_F32: tl.constexpr,  # the fused shrink's operands taken to fp32 first (A fp32, or bf16 in the interpreter)
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    LORA_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/columns wrap onto valid ones, so operand loads need no M/N mask; those results are not stored.
    rm_in = (rm % M).to(tl.int64)
    rn_in = (rn % N).to(tl.int64)

    # LoRA prologue: acc = scale·xa_tile·B_tileᵀ, a K = r product (r walked in BLOCK_R chunks).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not FUSE_SHRINK:
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            xat = tl.load(
                xa_ptr + rm_in[:, None] * stride_xam + rr[None, :] * stride_xar, mask=rr[None, :] < R, other=0.0
            )
            if XA_PARTIAL:
                for sp in range(1, xa_splits):
                    xat += tl.load(
                        xa_ptr + sp * M * R + rm_in[:, None] * stride_xam + rr[None, :] * stride_xar,
                        mask=rr[None, :] < R,
                        other=0.0,
                    )
                if pid_n == 0:  # one writer per row of the summed xa that backward reads
                    tl.store(
                        xa_out_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :],
                        xat,
                        mask=(rm[:, None] < M) & (rr[None, :] < R),
                    )
            bt = tl.load(b_ptr + rn_in[None, :] * stride_bn + rr[:, None] * stride_br, mask=rr[:, None] < R, other=0.0)
            acc = _dot(xat, bt, acc, True, LORA_PREC)
        acc = acc * scale

    y_mask = (rm[:, None] < M) & (rn[None, :] < N)
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn.to(tl.int64)[None, :] * stride_yn
    if BASE:
        rk = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rm_in[:, None] * stride_xm + rk[None, :] * stride_xk
        w_ptrs = w_ptr + rn_in[None, :] * stride_wn + rk[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]: W0ᵀ tile
        if FUSE_SHRINK:
            rr = tl.arange(0, BLOCK_R)  # all of r in one tile (the launcher guarantees R <= BLOCK_R)
            xa_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            a_ptrs = a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak  # [BLOCK_K, BLOCK_R]: Aᵀ tile
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            if EVEN_K:
                xt = tl.load(x_ptrs)
                wt = tl.load(w_ptrs)
            else:
                xt = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
                wt = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
            acc = _dot(xt, wt, acc, UPCAST, PREC)
            if FUSE_SHRINK:
                if EVEN_K:
                    at = tl.load(a_ptrs, mask=rr[None, :] < R, other=0.0)
                else:
                    at = tl.load(a_ptrs, mask=(rr[None, :] < R) & (rk[:, None] < k_left), other=0.0)
                xa_acc = _dot(xt, at, xa_acc, SHRINK_F32, LORA_PREC)
                a_ptrs += BLOCK_K * stride_ak
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        if FUSE_SHRINK:
            if pid_n == 0:  # one writer per row of xa: the first column of tiles
                tl.store(
                    xa_ptr + rm.to(tl.int64)[:, None] * stride_xam + rr[None, :] * stride_xar,
                    xa_acc,
                    mask=(rm[:, None] < M) & (rr[None, :] < R),
                )
            bt = tl.load(b_ptr + rn_in[None, :] * stride_bn + rr[:, None] * stride_br, mask=rr[:, None] < R, other=0.0)
            acc += _dot(xa_acc, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), True, LORA_PREC) * scale
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn_in).to(tl.float32)[None, :]
    else:
        acc += tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _sum_splits(parts_ptr, out_ptr, rm, rr, M, R, SPLITS, store_mask):
    """Σ over SPLITS of parts[s, rm, rr] ([SPLITS, M, R] fp32, contiguous), in split order (the same sum on every
    run); with SPLITS > 1 it is also stored to out[rm, rr] ([M, R]) where store_mask holds. rm must be < M."""
    r_ok = rr[None, :] < R
    rows = rm.to(tl.int64)[:, None] * R + rr[None, :]
    total = tl.load(parts_ptr + rows, mask=r_ok, other=0.0)
    for s in range(1, SPLITS):
        total += tl.load(parts_ptr + (s * M).to(tl.int64) * R + rows, mask=r_ok, other=0.0)
    if SPLITS > 1:
        tl.store(out_ptr + rows, total, mask=r_ok & store_mask)
    return total


@triton.jit
def _dy_pass_kernel(
    dy_ptr,  # [M, N] x's dtype, any strides
    b_ptr,  # [N, R] lora_B, x's dtype or fp32, any strides
    xa_ptr,  # [M, R] fp32 (forward's xa), any strides
    ds_ptr,  # [N_SPLITS, M, R] fp32 out: partial sums over each split's columns of scale·dY·B
    db_ptr,  # [cdiv(M, BLOCK_M), N, R] fp32 out: partial sums over each row tile of scale·dYᵀ·xa
    M,
    N,
    R,
    N_SPLITS,
    stride_dym,
    stride_dyn,
    stride_bn,
    stride_br,
    stride_xam,
    stride_xar,
    scale,
    F32: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One pass over dY for both of its products (grid: row tiles, column splits): a program reads its row tile of
    dY over its share of the columns once and forms dxa's partial sum over those columns and dB's partial sum over
    its rows. Plain stores into torch.empty buffers (every element written once: no zero-fill, no atomics); the
    consumers add the partials in a fixed order."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    r_ok = rr < R
    xat = tl.load(
        xa_ptr + rm.to(tl.int64)[:, None] * stride_xam + rr[None, :] * stride_xar,
        mask=m_ok[:, None] & r_ok[None, :],
        other=0.0,
    )
    n_tiles = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(n_tiles, N_SPLITS)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for t in range(pid_s * per_split, tl.minimum((pid_s + 1) * per_split, n_tiles)):
        rn = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        dyt = tl.load(
            dy_ptr + rm.to(tl.int64)[:, None] * stride_dym + rn.to(tl.int64)[None, :] * stride_dyn,
            mask=m_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        bt = tl.load(
            b_ptr + rn.to(tl.int64)[:, None] * stride_bn + rr[None, :] * stride_br,
            mask=n_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        ds = _dot(dyt, bt, ds, F32, PREC)
        dbt = _dot(tl.trans(dyt), xat, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), True, PREC)
        tl.store(
            db_ptr + (pid_m.to(tl.int64) * N + rn)[:, None] * R + rr[None, :],
            dbt * scale,
            mask=n_ok[:, None] & r_ok[None, :],
        )
    tl.store(
        ds_ptr + (pid_s.to(tl.int64) * M + rm)[:, None] * R + rr[None, :],
        ds * scale,
        mask=m_ok[:, None] & r_ok[None, :],
    )


@triton.jit
def _dxa_kernel(
    dy_ptr,  # [M, N] x's dtype, any strides
    b_ptr,  # [N, R] lora_B, x's dtype or fp32, any strides
    dxa_ptr,  # [M, R] fp32 out, contiguous
    M,
    N,
    R,
    stride_dym,
    stride_dyn,
    stride_bn,
    stride_br,
    scale,
    F32: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dxa = scale·dY·B for an m-tile over all of N (grid: m-tiles, r-tiles): plain stores, no split, no atomics."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_ok = rm < M
    r_ok = rr < R
    dxa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for t in range(0, tl.cdiv(N, BLOCK_N)):
        rn = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        dyt = tl.load(
            dy_ptr + rm.to(tl.int64)[:, None] * stride_dym + rn.to(tl.int64)[None, :] * stride_dyn,
            mask=m_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        bt = tl.load(
            b_ptr + rn.to(tl.int64)[:, None] * stride_bn + rr[None, :] * stride_br,
            mask=n_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        dxa = _dot(dyt, bt, dxa, F32, PREC)
    tl.store(dxa_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], dxa * scale, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _grad_ab_kernel(
    dxa_ptr,  # [M, R] fp32 (dxa = scale·dY·B), contiguous
    x_ptr,  # [M, K] fp16/bf16/fp32, any strides
    xa_ptr,  # [M, R] fp32 (forward's xa), any strides
    dy_ptr,  # [M, N] x's dtype, any strides
    bits_ptr,  # [M, ceil(K/32)] int32 packed keep mask (read only when BITS)
    da_ptr,  # [R, K] out in lora_A's dtype, contiguous
    db_ptr,  # [N, R] out in lora_B's dtype, contiguous
    db_parts_ptr,  # [DB_PARTS, N, R] fp32 partial sums of scale·dYᵀ·xa (read instead of dY and xa when DB_PARTS > 0)
    M,
    K,
    N,
    R,
    DB_PARTS,
    stride_xm,
    stride_xk,
    stride_xam,
    stride_xar,
    stride_dym,
    stride_dyn,
    stride_bm,
    seed_ptr,  # [] int64 dropout seed, on the device (read only when HAS_DROPOUT and not BITS)
    threshold,
    inv_keep,
    scale,
    HAS_DROPOUT: tl.constexpr,
    BITS: tl.constexpr,  # the forward's packed mask is read instead of drawing it again from the seed
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Both adapter gradients, reduced over all of M by the program that owns the output tile (grid: K-tiles +
    N-tiles, r-tiles): programs [0, cdiv(K, BLOCK_C)) form dA[r-tile, k-tile] = dxaᵀ·dropout(x), the others
    dB[n-tile, r-tile] = scale·dYᵀ·xa. No atomics, no zero-filled buffer, one rounding to the adapter's dtype, and
    the same sum order on every run (deterministic by construction)."""
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    k_tiles = tl.cdiv(K, BLOCK_C)
    m_tiles = tl.cdiv(M, BLOCK_M)
    if pid < k_tiles:
        rk = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        k_ok = rk < K
        acc_a = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        seed = 0
        if HAS_DROPOUT and not BITS:
            seed = tl.load(seed_ptr)  # the forward's seed tensor, saved for backward
        for t in range(0, m_tiles):
            rm_a = t * BLOCK_M + tl.arange(0, BLOCK_M)
            ma_ok = rm_a < M
            dxat = tl.load(
                dxa_ptr + rm_a.to(tl.int64)[:, None] * R + rr[None, :], mask=ma_ok[:, None] & r_ok[None, :], other=0.0
            )
            xt = tl.load(
                x_ptr + rm_a.to(tl.int64)[:, None] * stride_xm + rk.to(tl.int64)[None, :] * stride_xk,
                mask=ma_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            if HAS_DROPOUT:
                if BITS:
                    keep = load_keep(bits_ptr, rm_a, rk, stride_bm, ma_ok[:, None] & k_ok[None, :])
                else:
                    keep = keep_mask(seed, rm_a, pid * BLOCK_C, K, threshold, BLOCK_C)
                xt = tl.where(keep, xt, tl.zeros_like(xt))
            acc_a = _dot(tl.trans(dxat), xt, acc_a, True, PREC)
        if HAS_DROPOUT:
            acc_a = acc_a * inv_keep
        tl.store(
            da_ptr + rr.to(tl.int64)[:, None] * K + rk[None, :],
            acc_a.to(da_ptr.dtype.element_ty),
            mask=r_ok[:, None] & k_ok[None, :],
        )
    elif DB_PARTS > 0:  # dB = Σ of the dY pass's per-row-tile partials (already scaled), in row-tile order
        rn = (pid - k_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
        n_ok = rn < N
        ptrs = db_parts_ptr + rn.to(tl.int64)[:, None] * R + rr[None, :]
        acc_b = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
        for p in range(0, DB_PARTS):
            acc_b += tl.load(ptrs + (p * N).to(tl.int64) * R, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        tl.store(
            db_ptr + rn.to(tl.int64)[:, None] * R + rr[None, :],
            acc_b.to(db_ptr.dtype.element_ty),
            mask=n_ok[:, None] & r_ok[None, :],
        )
    else:
        rn = (pid - k_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
        n_ok = rn < N
        acc_b = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
        for t in range(0, m_tiles):
            rm_b = t * BLOCK_M + tl.arange(0, BLOCK_M)
            mb_ok = rm_b < M
            dyt = tl.load(
                dy_ptr + rm_b.to(tl.int64)[:, None] * stride_dym + rn.to(tl.int64)[None, :] * stride_dyn,
                mask=mb_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            xat = tl.load(
                xa_ptr + rm_b.to(tl.int64)[:, None] * stride_xam + rr[None, :] * stride_xar,
                mask=mb_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            acc_b = _dot(tl.trans(dyt), xat, acc_b, True, PREC)
        tl.store(
            db_ptr + rn.to(tl.int64)[:, None] * R + rr[None, :],
            (acc_b * scale).to(db_ptr.dtype.element_ty),
            mask=n_ok[:, None] & r_ok[None, :],
        )


@triton.autotune(
    configs=_gemm_configs("BLOCK_K", "BLOCK_N"),
    key=["M_BUCKET", "N", "K", "R", "BASE", "HAS_DROPOUT", "BITS"],
    prune_configs_by={"early_config_prune": _gemm_pruner("dy_ptr", "BLOCK_K", "BLOCK_N")},
    restore_value=["dx_ptr"],  # BASE=False adds into dx: benchmarking must not compound
    do_bench=_autotune_bench,
)
@triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})
@triton.jit
def _dx_kernel(
    dy_ptr,  # [M, N] x's dtype, any strides
    w_ptr,  # [N, K] x's dtype, any strides
    dxa_ptr,  # [DS_SPLITS, M, R] fp32 (their sum is dxa = scale·dY·B), contiguous
    a_ptr,  # [R, K] lora_A, x's dtype or fp32, any strides
    dx_ptr,  # [M, K] x's dtype out (read too when not BASE), contiguous
    ds_out_ptr,  # [M, R] fp32 out: the summed dxa, written by the first column of tiles (only when DS_SPLITS > 1)
    M,
    N,
    K,
    R,
    DS_SPLITS,
    M_BUCKET,
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    bits_ptr,  # [M, ceil(K/32)] int32 packed keep mask of the forward (read only when BITS)
    stride_bm,
    seed_ptr,  # [] int64 dropout seed, on the device (read only when HAS_DROPOUT and not BITS)
    threshold,
    inv_keep,
    HAS_DROPOUT: tl.constexpr,
    BITS: tl.constexpr,  # read the forward's mask instead of drawing it again (Philox: ~57 instructions per 4 elements)
    BASE: tl.constexpr,  # True: dX = dY·W0 + LoRA term. False: dX += LoRA term (cuBLAS already wrote dY·W0)
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    LORA_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    # Output tile is [BLOCK_M, BLOCK_K] of dX; the reduction runs over N in BLOCK_N steps (names keep their dimension:
    # BLOCK_N is always the tile along N).
    pid_m, pid_k = _grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm_in = (rm % M).to(tl.int64)
    rk_in = (rk % K).to(tl.int64)

    # LoRA prologue: acc = mask ⊙ (dxa_tile·A_tile) / (1-p).
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        # The first column of tiles stores the sum (a tensor comparison: the interpreter rejects a scalar bool mask).
        first = (rm < M) & (rm * 0 + pid_k == 0)
        dxat = _sum_splits(dxa_ptr, ds_out_ptr, rm_in, rr, M, R, DS_SPLITS, first[:, None])
        at = tl.load(a_ptr + rr[:, None] * stride_ar + rk_in[None, :] * stride_ak, mask=rr[:, None] < R, other=0.0)
        acc = _dot(dxat, at, acc, True, LORA_PREC)
    if HAS_DROPOUT:
        if BITS:
            keep = load_keep(bits_ptr, rm, rk, stride_bm, (rm[:, None] < M) & (rk[None, :] < K))
        else:
            keep = keep_mask(tl.load(seed_ptr), rm, pid_k * BLOCK_K, K, threshold, BLOCK_K)
        acc = tl.where(keep, acc * inv_keep, 0.0)

    dx_mask = (rm[:, None] < M) & (rk[None, :] < K)
    dx_ptrs = dx_ptr + rm.to(tl.int64)[:, None] * K + rk.to(tl.int64)[None, :]
    if BASE:
        rn = tl.arange(0, BLOCK_N)
        dy_ptrs = dy_ptr + rm_in[:, None] * stride_dym + rn[None, :] * stride_dyn
        w_ptrs = w_ptr + rn[:, None] * stride_wn + rk_in[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]
        for n in range(0, tl.cdiv(N, BLOCK_N)):
            if EVEN_N:
                dyt = tl.load(dy_ptrs)
                wt = tl.load(w_ptrs)
            else:
                n_left = N - n * BLOCK_N
                dyt = tl.load(dy_ptrs, mask=rn[None, :] < n_left, other=0.0)
                wt = tl.load(w_ptrs, mask=rn[:, None] < n_left, other=0.0)
            acc = _dot(dyt, wt, acc, UPCAST, PREC)
            dy_ptrs += BLOCK_N * stride_dyn
            w_ptrs += BLOCK_N * stride_wn
    else:
        acc += tl.load(dx_ptrs, mask=dx_mask, other=0.0).to(tl.float32)
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=dx_mask)


# -------------------------------------------------------------------------------------------------------- launchers
def _target_programs(t: torch.Tensor) -> int:
    """How many programs the split kernels aim for: two per SM on a GPU; in the interpreter 2, so splits happen."""
    if t.device.type != "cuda":
        return 2
    return 2 * _utils.sm_count_of(t.device)


def _fill_programs(t: torch.Tensor) -> int:
    """Programs that fill the GPU for a kernel whose programs each stream their own rows: one per SM (half of
    _target_programs). The row-tile kernels shrink their row tile until they reach it before splitting a reduction:
    at M = 8192 32-row tiles give 256 programs for 132 SMs, no split, no partial sums."""
    return max(1, _target_programs(t) // 2)


# Partial sums of a split shrink are re-read by every column of output tiles of the consumer (N/BLOCK_N times
# S·M·r·4 bytes from L2), so the split stays small: 16 splits of a 16-row tile already give 16·132 programs'
# worth of work at small M.
_MAX_SPLIT = 16


def _split(work_tiles: int, other_programs: int, target: int) -> int:
    """Split factor of a reduction over work_tiles tiles so that other_programs · split reaches the target.

    The splits write partial sums that their consumer adds in a fixed order (no atomics): the result does not depend
    on the run, also under ``torch.use_deterministic_algorithms(True)``."""
    return max(1, min(work_tiles, triton.cdiv(target, max(1, other_programs)), _MAX_SPLIT))


def _dropout_args(dropout_p: float, seed: Seed, like: torch.Tensor) -> tuple[bool, torch.Tensor, int, float]:
    """(HAS_DROPOUT, seed pointer, threshold, 1/(1-p)) for the kernels; p = 0 compiles the mask away.

    ``seed``: a 0-dim int64 tensor (what the op passes: drawn on x's device, so the kernels read it without a host
    sync and a CUDA-graph replay reads the seed drawn in that replay) or a Python int (copied to the device here,
    which is not graph-safe). Without dropout the kernels never read the pointer, so ``like`` stands in for it."""
    if dropout_p <= 0.0:
        return False, like, 0, 1.0
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1:
            raise ValueError(f"seed must be a single int64 value, got shape {tuple(seed.shape)}")
        seed_t = seed.reshape(()).to(device=like.device, dtype=torch.int64)  # no copy when already there
    else:
        seed_t = torch.tensor(int(seed), dtype=torch.int64, device=like.device)
    return True, seed_t, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _skinny_max_r(device: torch.device) -> int:
    """r-tile cap of the skinny kernels: their [64, 128] fp32 tiles take up to 160 KiB of shared memory (fp32
    adapters, sm_90), more than sm_86/sm_89 GPUs have (99 KiB); those get 64-wide r-tiles (one more grid axis
    step for r > 64, same results)."""
    if device.type != "cuda":
        return _SKINNY_MAX_R
    return _SKINNY_MAX_R if _utils.smem_of(device) >= 160 * 1024 else 64


def _skinny_block_m(M: int) -> int:
    """Row tile of the skinny kernels: M rounded up to a power of two (at least MIN_DOT), at most _SKINNY_BLOCK."""
    return min(_SKINNY_BLOCK, max(_utils.MIN_DOT, triton.next_power_of_2(M)))


def _rows_block(M: int, programs: int) -> int:
    """Row tile of a kernel whose programs own whole rows: the largest (≤ _skinny_block_m) that still gives
    ``programs`` programs, at least MIN_DOT rows."""
    block = _skinny_block_m(M)
    while block > _utils.MIN_DOT and triton.cdiv(M, block) < programs:
        block //= 2
    return block


def _cols_block(K: int, N: int, programs: int) -> int:
    """Column tile of the reduce-over-M kernel (K-tiles of dA plus N-tiles of dB): _SKINNY_BLOCK, or 32 (one
    packed-mask word) when that gives too few programs (K = N = 4096: 64-wide tiles make 128 programs for 132 SMs,
    32-wide ones 256)."""
    if _SKINNY_BLOCK > 32 and triton.cdiv(K, _SKINNY_BLOCK) + triton.cdiv(N, _SKINNY_BLOCK) < programs:
        return 32
    return _SKINNY_BLOCK


def _triton_base(M: int) -> bool:
    """True when the fused Triton GEMM computes the base product (BASE_GEMM, "auto": by _TRITON_BASE_MAX_M)."""
    if BASE_GEMM == "auto":
        return M <= _TRITON_BASE_MAX_M
    if BASE_GEMM not in BASE_GEMMS:
        raise ValueError(f"BASE_GEMM must be one of {', '.join(BASE_GEMMS)}, got {BASE_GEMM!r}")
    return BASE_GEMM == "triton"


def _no_bits(like: torch.Tensor) -> torch.Tensor:
    """The empty mask: no packed mask was drawn (p = 0, or a backend that regenerates it from the seed)."""
    return torch.empty((0,), dtype=torch.int32, device=like.device)


def _shrink(
    x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, seed: Seed, bits: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """(xa, splits): xa = dropout(x)·Aᵀ, fp32 [M, r] when splits == 1, else [splits, M, r] partial sums over K for
    the consumer (_fwd_kernel) to add up. x [M, K] (any strides), lora_A [r, K]; ``bits``: where the packed keep
    mask is stored (with dropout)."""
    M, K = x.shape
    R = lora_A.shape[0]
    has_drop, seed_t, threshold, inv_keep = _dropout_args(dropout_p, seed, x)
    upcast, _, lora_prec = _utils.tf32_precisions(x.dtype)
    block_r = _utils.block_r(R, _skinny_max_r(x.device))
    r_tiles = triton.cdiv(R, block_r)
    block_m = _rows_block(M, triton.cdiv(_fill_programs(x), r_tiles))
    m_tiles, k_tiles = triton.cdiv(M, block_m), triton.cdiv(K, _SKINNY_BLOCK)
    split_k = 1 if m_tiles * r_tiles >= _fill_programs(x) else _split(k_tiles, m_tiles * r_tiles, _target_programs(x))
    xa = torch.empty((split_k, M, R) if split_k > 1 else (M, R), dtype=torch.float32, device=x.device)
    same = lora_A.dtype == x.dtype and not upcast
    store_bits = has_drop and bits is not None
    with _utils.device_ctx(x):
        _dropout_shrink_kernel[(m_tiles, split_k, r_tiles)](
            x,
            lora_A,
            xa,
            bits if store_bits else xa,
            M,
            K,
            R,
            x.stride(0),
            x.stride(1),
            lora_A.stride(0),
            lora_A.stride(1),
            bits.stride(0) if store_bits else 0,
            seed_t,
            threshold,
            inv_keep,
            HAS_DROPOUT=has_drop,
            STORE_BITS=store_bits,
            SPLIT_K=split_k,
            F32=not same,
            PREC=lora_prec,
            BLOCK_M=block_m,
            BLOCK_K=_SKINNY_BLOCK,
            BLOCK_R=block_r,
            num_warps=_SKINNY_WARPS,
        )
    return xa, split_k


def _shrink_expand(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    y: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: Seed,
    bits: torch.Tensor | None,
) -> torch.Tensor:
    """y += scale·(dropout(x)·Aᵀ)·Bᵀ in place, one launch; returns xa [M, r] fp32. r <= _skinny_max_r."""
    M, K = x.shape
    N, R = lora_B.shape
    has_drop, seed_t, threshold, inv_keep = _dropout_args(dropout_p, seed, x)
    upcast, _, lora_prec = _utils.tf32_precisions(x.dtype)
    # Below 16·132 = 2112 rows this leaves SMs idle. Splitting N across programs too (each split recomputing its rows'
    # xa) was tried: the static report predicts it slower (M = 256, K = N = 4096: 1.17 → 1.33 of the base, the
    # recomputed shrink's instructions), but it models throughput, not one program's latency; a GPU measurement at
    # M = 512-2048 decides.
    block_m = _rows_block(M, _fill_programs(x))
    xa = torch.empty((M, R), dtype=torch.float32, device=x.device)
    store_bits = has_drop and bits is not None
    # Drawing and packing the mask of a 64×64 x tile holds 32 Philox words per thread at 4 warps: on sm_80 (mma.sync
    # fragments in registers too) that compiled to 255 registers and spilled 184 bytes (triton 3.9); 8 warps halve it.
    # sm_90 compiles the 4-warp kernel without spills.
    gpu = _gemm_device(x.device)
    warps = 2 * _SKINNY_WARPS if has_drop and gpu is not None and gpu[0] < (9, 0) else _SKINNY_WARPS
    with _utils.device_ctx(x):
        _shrink_expand_kernel[(triton.cdiv(M, block_m),)](
            x,
            lora_A,
            lora_B,
            y,
            xa,
            bits if store_bits else xa,
            M,
            N,
            K,
            R,
            x.stride(0),
            x.stride(1),
            lora_A.stride(0),
            lora_A.stride(1),
            lora_B.stride(0),
            lora_B.stride(1),
            y.stride(0),
            y.stride(1),
            bits.stride(0) if store_bits else 0,
            seed_t,
            threshold,
            inv_keep,
            float(scale),
            HAS_DROPOUT=has_drop,
            STORE_BITS=store_bits,
            F32=not (lora_A.dtype == x.dtype and not upcast),
            PREC=lora_prec,
            LORA_PREC=lora_prec,
            BLOCK_M=block_m,
            BLOCK_K=_SKINNY_BLOCK,
            BLOCK_N=_SKINNY_BLOCK,
            BLOCK_R=_utils.block_r(R),
            num_warps=warps,
        )
    return xa


def lora_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: Seed = 0,
    return_keep_bits: bool = False,
):
    """Same contract as ``reference.lora_linear.lora_linear_forward``: ``(y [M, N] in x.dtype, xa [M, r] fp32)``.

    ``seed``: a 0-dim int64 tensor (read by the kernels on the device: CUDA-graph safe, no host sync) or an int.
    ``return_keep_bits``: also return the dropout keep mask the forward drew, packed (int32 [M, ceil(K/32)], layout of
    ``reference.dropout.pack_keep_bits``; an empty tensor when p = 0), for ``lora_linear_backward``'s ``keep_bits``.
    Forward launches: ``_dropout_shrink_kernel`` + ``_fwd_kernel`` on the Triton base (one ``_fwd_kernel`` at decode
    sizes without dropout; ``_fwd_tma_kernel`` with the shrink inside from 65 to 256 rows on the TMA path),
    ``torch.mm`` + ``_shrink_expand_kernel`` on the cuBLAS base."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    has_drop = dropout_p > 0.0
    if M == 0 or N == 0 or K == 0:  # nothing to mask: the seed is not read (no sync)
        y, xa = _ref.lora_linear_forward(x, weight, lora_A, lora_B, scale, bias, dropout_p, 0)
        bits = torch.zeros(keep_bits_shape(M, K), dtype=torch.int32, device=x.device) if has_drop else _no_bits(x)
        return (y, xa, bits) if return_keep_bits else (y, xa)
    bits = torch.empty(keep_bits_shape(M, K), dtype=torch.int32, device=x.device) if has_drop else None
    if bias is not None:
        bias = bias.contiguous()  # the epilogue indexes bias[n] with unit stride; N elements, a no-op when contiguous
    upcast, prec, lora_prec = _utils.tf32_precisions(x.dtype)
    base = _triton_base(M)
    if not base:
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        if R <= _skinny_max_r(x.device):
            xa = _shrink_expand(x, lora_A, lora_B, y, scale, dropout_p, seed, bits)
            return (y, xa, bits if has_drop else _no_bits(x)) if return_keep_bits else (y, xa)
    fuse = base and not has_drop and M <= _FUSED_SHRINK_MAX_M and R <= _FUSED_SHRINK_MAX_R
    splits = 1
    if fuse and M > _tma.FUSED_MIN_ROWS and _tma.tma_supported(x, weight, lora_A):  # one persistent TMA launch
        xa = torch.empty((M, R), dtype=torch.float32, device=x.device)  # written by the first tile column
        y = _tma.fwd_gemm(x, weight, None, lora_B, scale, bias, lora_A=lora_A, xa_out=xa)
        return (y, xa, _no_bits(x)) if return_keep_bits else (y, xa)
    if fuse:
        xa = xa_src = torch.empty((M, R), dtype=torch.float32, device=x.device)  # written by the first tile column
    else:
        xa_src, splits = _shrink(x, lora_A, dropout_p, seed, bits)
        xa = xa_src if splits == 1 else torch.empty((M, R), dtype=torch.float32, device=x.device)
    if base and not fuse and _tma.tma_supported(x, weight):  # persistent TMA GEMM (Hopper+), LoRA in its epilogue
        if splits > 1:  # small M only: the TMA kernel reads a finished xa
            xa = xa_src.sum(0)
        y = _tma.fwd_gemm(x, weight, xa, lora_B, scale, bias)
        return (y, xa, bits if has_drop else _no_bits(x)) if return_keep_bits else (y, xa)
    if base:
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    with _utils.device_ctx(x):
        _fwd_kernel[grid](
            x,
            weight,
            xa_src,
            xa,
            lora_B,
            lora_A,
            bias if bias is not None else y,
            y,
            M,
            N,
            K,
            R,
            _gemm.m_bucket(M),
            splits,
            x.stride(0),
            x.stride(1),
            weight.stride(0),
            weight.stride(1),
            R if splits > 1 else xa.stride(0),
            1 if splits > 1 else xa.stride(1),
            lora_B.stride(0),
            lora_B.stride(1),
            lora_A.stride(0),
            lora_A.stride(1),
            y.stride(0),
            y.stride(1),
            float(scale),
            HAS_BIAS=bias is not None and base,
            BASE=base,
            FUSE_SHRINK=fuse,
            XA_PARTIAL=splits > 1,
            SHRINK_F32=lora_A.dtype != x.dtype or upcast,
            UPCAST=upcast,
            PREC=prec,
            LORA_PREC=lora_prec,
            BLOCK_R=_utils.block_r(R, _FUSED_SHRINK_MAX_R if fuse else _PROLOGUE_MAX_R),
        )
    return (y, xa, bits if has_drop else _no_bits(x)) if return_keep_bits else (y, xa)


def _dxa(dy: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """dxa = scale·dY·B, fp32 [M, r]: one pass over dY, each program owning its rows over all of N."""
    M, N = dy.shape
    R = lora_B.shape[1]
    upcast, _, lora_prec = _utils.tf32_precisions(dy.dtype)
    block_r = _utils.block_r(R, _skinny_max_r(dy.device))
    r_tiles = triton.cdiv(R, block_r)
    # No split over N: below one program per SM (M < 16·132 rows) the pass over dY is short anyway (M = 2048,
    # N = 4096 bf16: 16 MiB, ~5 µs at the copy bandwidth) and a split would need partial sums in both consumers.
    block_m = _rows_block(M, triton.cdiv(_fill_programs(dy), r_tiles))
    dxa = torch.empty((M, R), dtype=torch.float32, device=dy.device)
    with _utils.device_ctx(dy):
        _dxa_kernel[(triton.cdiv(M, block_m), r_tiles)](
            dy,
            lora_B,
            dxa,
            M,
            N,
            R,
            dy.stride(0),
            dy.stride(1),
            lora_B.stride(0),
            lora_B.stride(1),
            float(scale),
            F32=not (lora_B.dtype == dy.dtype and not upcast),
            PREC=lora_prec,
            BLOCK_M=block_m,
            BLOCK_N=_SKINNY_BLOCK,
            BLOCK_R=block_r,
            num_warps=_SKINNY_WARPS,
        )
    return dxa


# One pass over dY for both of its products (_dy_pass_kernel: dxa's and dB's partial sums) instead of two (the dxa
# kernel, then the dB half of the gradient kernel reading dY again), when the partial sums cost less than half of the
# second read: they are written once and read once, and the saved read is M·N elements. At M = 8192, r = 16, bf16,
# 256-row tiles and 8 column splits: 25 MB of partials for 67 MB of dY at N = 4096 (predicted 751 -> 737 µs for
# fwd+bwd on an H100, static model), 67 MB for 235 MB at N = 14336; at r = 64 the partials outgrow the saving and
# the two-pass path stays. Unmeasured on a GPU.
FUSED_DY_PASS: bool | None = None  # None: chosen by the byte count above; True / False force it (tests)
# Row tile of the one-pass kernel: the number of dB partials is M / _DY_PASS_BLOCK_M, so the tile is large; 256 rows
# of a 64-column dY tile and the [256, r] fp32 dxa partial fit 8 warps without spills up to r = 64 (sm_90, sm_80).
_DY_PASS_BLOCK_M = 256
_DY_PASS_BLOCK_N = 64
_DY_PASS_WARPS = 8
_DY_PASS_MAX_R = 64


def _dy_pass_plan(M: int, N: int, R: int, dy_elem: int, programs: int, interp: bool) -> tuple[int, int] | None:
    """(BLOCK_M, column splits) of the one-pass dY kernel, or None for the two-pass path. Host ints only: shared with
    the static report."""
    if R > _DY_PASS_MAX_R or FUSED_DY_PASS is False:
        return None
    block_m = min(32 if interp else _DY_PASS_BLOCK_M, max(_utils.MIN_DOT, triton.next_power_of_2(M)))
    m_tiles = triton.cdiv(M, block_m)
    block_n = _SKINNY_BLOCK if interp else _DY_PASS_BLOCK_N
    n_tiles = triton.cdiv(N, block_n)
    splits = max(1, min(n_tiles, triton.cdiv(programs, m_tiles), _MAX_SPLIT))
    splits = triton.cdiv(n_tiles, triton.cdiv(n_tiles, splits))  # no split left without column tiles
    parts = (splits * M + m_tiles * N) * R * 4
    if FUSED_DY_PASS is None and 2 * parts > M * N * dy_elem // 2:
        return None
    return block_m, splits


def _dy_pass(
    dy: torch.Tensor, xa: torch.Tensor, lora_B: torch.Tensor, scale: float, block_m: int, splits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dxa partials [splits, M, r], dB partials [cdiv(M, block_m), N, r]), fp32, scale applied: one pass over dY."""
    M, N = dy.shape
    R = lora_B.shape[1]
    upcast, _, lora_prec = _utils.tf32_precisions(dy.dtype)
    m_tiles = triton.cdiv(M, block_m)
    ds_parts = torch.empty((splits, M, R), dtype=torch.float32, device=dy.device)
    db_parts = torch.empty((m_tiles, N, R), dtype=torch.float32, device=dy.device)
    with _utils.device_ctx(dy):
        _dy_pass_kernel[(m_tiles, splits)](
            dy,
            lora_B,
            xa,
            ds_parts,
            db_parts,
            M,
            N,
            R,
            splits,
            dy.stride(0),
            dy.stride(1),
            lora_B.stride(0),
            lora_B.stride(1),
            xa.stride(0),
            xa.stride(1),
            float(scale),
            F32=not (lora_B.dtype == dy.dtype and not upcast),
            PREC=lora_prec,
            BLOCK_M=block_m,
            BLOCK_N=_SKINNY_BLOCK if _backend.interpreter_enabled() else _DY_PASS_BLOCK_N,
            BLOCK_R=_utils.block_r(R, _DY_PASS_MAX_R),
            num_warps=_DY_PASS_WARPS,
        )
    return ds_parts, db_parts


def _grad_ab(
    dxa: torch.Tensor,
    x: torch.Tensor,
    dy: torch.Tensor,
    xa: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: Seed,
    bits: torch.Tensor | None,
    db_parts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dA [r, K] in lora_A's dtype, dB [N, r] in lora_B's dtype), one launch: dA = dxaᵀ·dropout(x),
    dB = scale·dYᵀ·xa; ``bits``: the forward's packed mask (None: regenerated from the seed); ``db_parts``: dB's
    partial sums from the one-pass dY kernel (then dY and xa are not read)."""
    M, K = x.shape
    N, R = lora_B.shape
    has_drop, seed_t, threshold, inv_keep = _dropout_args(dropout_p, seed, x)
    _, _, lora_prec = _utils.tf32_precisions(x.dtype)
    block_r = _utils.block_r(R, _skinny_max_r(x.device))
    r_tiles = triton.cdiv(R, block_r)
    block_c = _cols_block(K, N, triton.cdiv(_fill_programs(x), r_tiles))
    d_a = torch.empty((R, K), dtype=lora_A.dtype, device=x.device)
    d_b = torch.empty((N, R), dtype=lora_B.dtype, device=x.device)
    use_bits = has_drop and bits is not None
    with _utils.device_ctx(x):
        _grad_ab_kernel[(triton.cdiv(K, block_c) + triton.cdiv(N, block_c), r_tiles)](
            dxa,
            x,
            xa,
            dy,
            bits if use_bits else dxa,
            d_a,
            d_b,
            db_parts if db_parts is not None else dxa,
            M,
            K,
            N,
            R,
            db_parts.shape[0] if db_parts is not None else 0,
            x.stride(0),
            x.stride(1),
            xa.stride(0),
            xa.stride(1),
            dy.stride(0),
            dy.stride(1),
            bits.stride(0) if use_bits else 0,
            seed_t,
            threshold,
            inv_keep,
            float(scale),
            HAS_DROPOUT=has_drop,
            BITS=use_bits,
            PREC=lora_prec,
            BLOCK_M=_skinny_block_m(M),
            BLOCK_C=block_c,
            BLOCK_R=block_r,
            num_warps=_SKINNY_WARPS,
        )
    return d_a, d_b


def _dx(
    dy: torch.Tensor,
    weight: torch.Tensor,
    dxa: torch.Tensor,
    lora_A: torch.Tensor,
    dropout_p: float,
    seed: Seed,
    bits: torch.Tensor | None = None,
    dxa_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """dX = dY·W0 + mask ⊙ (dxa·A)/(1-p), x's dtype, contiguous [M, K]; the mask read from ``bits`` when given.
    ``dxa`` may be [splits, M, r] partial sums (:func:`_dy_pass`): the kernels add them and the first column of tiles
    writes the sum to ``dxa_sum`` [M, r]."""
    splits = dxa.shape[0] if dxa.dim() == 3 else 1
    M, N = dy.shape
    K, R = weight.shape[1], lora_A.shape[0]
    has_drop, seed_t, threshold, inv_keep = _dropout_args(dropout_p, seed, dy)
    use_bits = has_drop and bits is not None
    upcast, prec, lora_prec = _utils.tf32_precisions(dy.dtype)
    base = _triton_base(M)
    # Persistent TMA GEMM (Hopper+); with dropout only when the forward kept the mask's bits (it reads them, it does
    # not draw the mask).
    if base and (use_bits or not has_drop) and _tma.tma_supported(dy, weight):
        return _tma.dx_gemm(dy, weight, dxa, lora_A, bits if use_bits else None, inv_keep, dxa_sum=dxa_sum)
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device) if base else torch.mm(dy, weight)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
    with _utils.device_ctx(dy):
        _dx_kernel[grid](
            dy,
            weight,
            dxa,
            lora_A,
            dx,
            dxa_sum if splits > 1 else dx,
            M,
            N,
            K,
            R,
            splits,
            _gemm.m_bucket(M),
            dy.stride(0),
            dy.stride(1),
            weight.stride(0),
            weight.stride(1),
            lora_A.stride(0),
            lora_A.stride(1),
            bits if use_bits else dxa,
            bits.stride(0) if use_bits else 0,
            seed_t,
            threshold,
            inv_keep,
            HAS_DROPOUT=has_drop,
            BITS=use_bits,
            BASE=base,
            UPCAST=upcast,
            PREC=prec,
            LORA_PREC=lora_prec,
            BLOCK_R=_utils.block_r(R, _PROLOGUE_MAX_R),
        )
    return dx


def _check_bits(keep_bits: torch.Tensor | None, M: int, K: int, dropout_p: float) -> torch.Tensor | None:
    """The packed mask to read, or None (regenerate from the seed): None / empty means the forward drew none."""
    if keep_bits is None or keep_bits.numel() == 0 or dropout_p <= 0.0:
        return None
    if keep_bits.dtype != torch.int32 or tuple(keep_bits.shape) != keep_bits_shape(M, K) or keep_bits.stride(1) != 1:
        raise ValueError(
            f"keep_bits must be the forward's packed mask, int32 {keep_bits_shape(M, K)} with unit column stride "
            f"(or empty), got {keep_bits.dtype} {tuple(keep_bits.shape)}"
        )
    return keep_bits


def lora_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: Seed = 0,
    needs_dx: bool = True,
    needs_dweight: bool = False,
    needs_dbias: bool = False,
    keep_bits: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Same contract as ``reference.lora_linear.lora_linear_backward``: ``(dx, dA, dB, dweight, dbias)``.

    Launches: ``_dxa_kernel`` (dxa = scale·dY·B), ``_grad_ab_kernel`` (dA and dB, stored in the adapter's dtype),
    ``_dx_kernel`` (after cuBLAS's dY·W0 on the cuBLAS base); or, where ``_dy_pass_plan`` takes it, one pass over dY
    (``_dy_pass_kernel``: partial sums of dxa and dB), then dX (which adds the dxa partials), then the gradient
    kernel. dW = dYᵀ·x (only when asked) and dbias = Σ_m dY are
    left to cuBLAS / torch. ``seed``: the forward's seed (tensor or int, see ``lora_linear_forward``).
    ``keep_bits``: the forward's packed mask (``return_keep_bits``); None or empty: the mask is regenerated from the
    seed (same mask, bit for bit).
    """
    M, K = x.shape
    N = weight.shape[0]
    if M == 0 or N == 0 or K == 0:  # nothing to mask: the seed is not read (no sync)
        return _ref.lora_linear_backward(
            dy, x, weight, lora_A, lora_B, xa, scale, dropout_p, 0, needs_dx, needs_dweight, needs_dbias
        )
    bits = _check_bits(keep_bits, M, K, dropout_p)
    R = lora_A.shape[0]
    plan = None
    if needs_dx:  # the dX kernel sums the one-pass kernel's dxa partials for the gradient kernel after it
        plan = _dy_pass_plan(M, N, R, dy.element_size(), _target_programs(dy), _backend.interpreter_enabled())
    if plan is not None:
        ds_parts, db_parts = _dy_pass(dy, xa, lora_B, scale, *plan)
        dxa = ds_parts[0] if plan[1] == 1 else torch.empty((M, R), dtype=torch.float32, device=dy.device)
        dx = _dx(dy, weight, ds_parts, lora_A, dropout_p, seed, bits, dxa_sum=dxa)
        d_a, d_b = _grad_ab(dxa, x, dy, xa, lora_A, lora_B, scale, dropout_p, seed, bits, db_parts=db_parts)
    else:
        dxa = _dxa(dy, lora_B, scale)
        d_a, d_b = _grad_ab(dxa, x, dy, xa, lora_A, lora_B, scale, dropout_p, seed, bits)
        dx = _dx(dy, weight, dxa, lora_A, dropout_p, seed, bits) if needs_dx else None
    dw = torch.mm(dy.t(), x) if needs_dweight else None
    dbias = dy.sum(0, dtype=torch.float32) if needs_dbias else None
    return dx, d_a, d_b, dw, dbias
