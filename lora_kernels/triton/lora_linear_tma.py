"""Persistent TMA GEMMs of ``lora_linear`` (Hopper and newer): the base product with the LoRA term added to its
accumulator after the main loop.

- ``_fwd_tma_kernel``: ``y = x·W0ᵀ + scale·xa·Bᵀ + bias`` (xa = dropout(x)·Aᵀ, fp32 [M, r], from the shrink).
- ``_dx_tma_kernel``: ``dX = dY·W0 + keep ⊙ (dxa·A)·inv_keep`` (dxa = scale·dY·B, fp32 [M, r]; keep read from the
  packed 1-bit-per-element dropout mask).

Both kernels are persistent (one program per SM, each walking output tiles in the grouped order) and read their big
operands with TMA tensor descriptors made on the device (``tl.make_tensor_descriptor``): the copy engine moves the
tiles and pads the ragged edges with zeros, so the main loop has no masks and no address arithmetic. The LoRA term is
a K = r product done in the epilogue, after the main loop, so the loop's first prefetches do not wait for it (the
kernels of ``lora_linear.py`` run it as a prologue); only dX with dropout keeps it before the loop (see
``_dx_tma_kernel``). Warp specialisation (``tl.range(..., warp_specialize=True)``) is
not used: triton documents it for Blackwell only, and these kernels target sm_90.

``tma_supported`` says when the path applies (tensor descriptors in the installed triton, a CUDA device of compute
capability >= 9 or the interpreter, TMA's 16-byte alignment); the callers fall back to the other kernels otherwise.
See docs/lora_linear.md ("TMA base GEMM").
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _backend
from . import _gemm, _utils
from ._compat import patch_interpreter
from ._dropout import load_keep
from ._gemm import autotune_bench, autotune_off
from ._gemm import dot as _dot
from ._gemm import tile_of as _tile_of

_INTERPRET_AT_IMPORT = _backend.interpreter_enabled()
# triton 3.6's interpreter + numpy >= 2.4 cannot run loops with runtime bounds (see _compat.py); no-op otherwise.
patch_interpreter()

# TMA moves boxes whose global base address and every stride except the last must be multiples of 16 bytes (CUDA's
# cuTensorMapEncodeTiled contract), with a unit last stride.
_TMA_ALIGN = 16
# Tensor descriptors made inside a kernel need compute capability 9.0 (Hopper's TMA unit).
_TMA_MIN_CAPABILITY = 9
# The LoRA epilogue walks r in chunks of at most 32: the fp32 xa / dxa tile (BLOCK_M × 32) and B / A tile
# (32 × BLOCK_N) stay small next to the accumulator, and r = 16 or 32 (the common ranks) is one step.
_EPILOGUE_MAX_R = 32
# Shared memory of an H100 block (227 KiB) is the budget when the device cannot be asked (the static report).
_SMEM_H100 = 227 * 1024
# Programs of a persistent grid in the interpreter: 2, so that test shapes give each program several tiles.
_INTERPRETER_PROGRAMS = 2

# (BLOCK_out_rows, BLOCK_out_cols, BLOCK_reduction, GROUP_M, num_warps, num_stages). The first is the Triton
# tutorials' Hopper tile for the persistent TMA matmul (fp16/bf16: 128×256×64, 8 warps, 3 stages: 144 KiB of
# operand buffers); the others are smaller tiles for grids that would leave SMs idle. Unmeasured.
_TILES = [
    (128, 256, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 4),
    (128, 128, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
]
# fp32 operands: 32-deep reduction steps, the same bytes per stage as the 16-bit list.
_TILES_FP32 = [
    (128, 128, 32, 8, 8, 3),
    (128, 64, 32, 8, 4, 3),
    (64, 64, 32, 8, 4, 3),
]
# With dropout the dX kernel holds the LoRA product and the mask's words (one int32 per element, from load_keep)
# for its whole tile at once: at most 64 output elements per thread (128×128 at 8 warps: 243 registers, no spills on
# sm_90 with triton 3.9), as lora_linear.py bounds its dropout tiles.
_DROPOUT_MAX_PER_THREAD = 64
# The forward with the shrink in its main loop (FUSE_SHRINK: decode-sized batches, one launch): x·Aᵀ accumulates
# next to the output tile from the same x boxes, each column of tiles recomputing its rows' xa (BLOCK_R/BLOCK_N more
# MMA work: 6.25 % at 64×256, 12.5 % at 64×128, r = 16). These batches are bound by W0's read (or close to it), so
# the tiles are one warpgroup's wgmma height (64 rows) and the widest of 256 / 128 / 64 columns that still gives at
# least 7/8 of the SMs a tile (_FUSED_MIN_BUSY): 256 rows at N = 4096 → 64×128 (128 tiles on 132 SMs), at N = 8192
# → 64×256 (128 tiles); 128 rows at N = 4096 → 64×64. Ranks up to FUSED_MAX_R: the fp32 xa tile (64 × 64 at most)
# stays small next to the output tile. Chosen from the static report's byte, FLOP and tile counts, unmeasured.
FUSED_MAX_R = 64
# ... and more than FUSED_MIN_ROWS rows (lora_linear's one-launch decode forward and lora_decode_linear take this kernel
# from there): up to 64 rows a 64-row tile leaves a single row of tiles, half the SMs without one at N = 4096, where
# the plain one-launch kernels' 16×32 tiles give 128 programs pulling W0.
FUSED_MIN_ROWS = 64
_FUSED_TILES = [(64, 256, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (64, 64, 128, 8, 4, 4)]
_FUSED_TILES_FP32 = [(64, 64, 32, 8, 4, 3)]
_FUSED_MIN_BUSY = 7 / 8
# SMs assumed where the device cannot be asked (the static report's meta tensors): an H100 SXM.
_SMS_H100 = 132
# 32 keeps the interpreter fast on test shapes (<= 100) while giving several ragged tiles; GROUP_M = 2 exercises the
# grouped order.
_INTERPRETER_TILE = (32, 32, 32, 2, 4, 1)


def _smem(device: torch.device) -> int:
    return _utils.smem_of(device) if device.type == "cuda" else _SMEM_H100


def _pruner(operand: str, out: str, col_key: str, red_key: str):
    """Pre-benchmark pruning: the fp32 list for fp32 operands; tiles more than twice as tall as the batch dropped;
    with dropout (dX) at most _DROPOUT_MAX_PER_THREAD accumulator elements per thread; num_stages cut until the
    operand buffers plus the output tile staged for its TMA store fit the block's shared memory (the first tile at 3
    stages: 208 KiB of an H100's 227, compiled for sm_90). $LORA_KERNELS_AUTOTUNE=0 keeps the first survivor. Always
    returns at least one config."""

    def prune(configs, named_args, **kwargs):
        if _INTERPRET_AT_IMPORT:
            return configs[:1]
        elem = named_args[operand].element_size()
        out_elem = named_args[out].element_size()
        dropout = bool(kwargs.get("HAS_DROPOUT", named_args.get("HAS_DROPOUT", False)))
        fused = bool(kwargs.get("FUSE_SHRINK", named_args.get("FUSE_SHRINK", False)))
        smem = _smem(named_args[operand].device)
        if fused:
            dev = named_args[operand].device
            tiles = fused_tiles(named_args["M_BUCKET"], named_args["N"], elem, _sms(dev))
            configs = _gemm.configs(col_key, red_key, tiles)
        elif elem >= 4:
            configs = _gemm.configs(col_key, red_key, _TILES_FP32)
        # FUSE_SHRINK streams A's [BLOCK_R, BLOCK_K] box with x's and W0's in every stage.
        extra_rows = kwargs.get("BLOCK_R", named_args.get("BLOCK_R", 0)) if fused else 0
        kept = []
        for c in configs:
            kw = c.kwargs
            bm, bc, br = kw["BLOCK_M"], kw[col_key], kw[red_key]
            epilogue = bm * bc * out_elem + 1024  # the output tile staged for its TMA store; barriers
            stages = min(c.num_stages, (smem - epilogue) // ((bm + bc + extra_rows) * br * elem))
            if stages < 2 or bm > max(_utils.MIN_DOT, 2 * named_args["M_BUCKET"]):
                continue
            if dropout and bm * bc > _DROPOUT_MAX_PER_THREAD * 32 * c.num_warps:
                continue
            kept.append(triton.Config(dict(kw), num_warps=c.num_warps, num_stages=stages))
        if not kept:  # a small safe tile: 64×64 outputs, 32-deep steps, 2 stages (<= 48 KiB even in fp32)
            kept = [triton.Config({"BLOCK_M": 64, col_key: 64, red_key: 32, "GROUP_M": 8}, num_warps=4, num_stages=2)]
        if autotune_off():
            kept = kept[:1]
        return kept

    return prune


def fused_tiles(
    m_bucket: int, n: int, elem: int, sms: int, interp: bool | None = None
) -> list[tuple[int, int, int, int, int, int]]:
    """FUSE_SHRINK forward tiles for an M bucket, N, operand size and SM count, in the order the pruner tries them:
    the widest tile whose count (rows from the M bucket) keeps _FUSED_MIN_BUSY of the SMs busy first, then the
    narrower ones, then the wider ones. ``interp`` (default: the interpreter was on at import) gives the
    interpreter's one small tile. Host ints only: the static report's launch model calls it."""
    if _INTERPRET_AT_IMPORT if interp is None else interp:
        return [_INTERPRETER_TILE]
    if elem >= 4:
        return list(_FUSED_TILES_FP32)
    fills = [t for t in _FUSED_TILES if triton.cdiv(m_bucket, t[0]) * triton.cdiv(n, t[1]) >= _FUSED_MIN_BUSY * sms]
    return fills + [t for t in reversed(_FUSED_TILES) if t not in fills]


def _sms(device: torch.device) -> int:
    return _utils.sm_count_of(device) if device.type == "cuda" else _SMS_H100


def _tiles(col_key: str, red_key: str):
    return _gemm.configs(col_key, red_key, [_INTERPRETER_TILE] if _INTERPRET_AT_IMPORT else _TILES)


# ---------------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _lora_term(
    acc,
    left_ptr,  # [M, R] fp32: xa (forward) or dxa (dX)
    right_ptr,  # [R, C] view: Bᵀ (forward, C = N) or A (dX, C = K)
    rm,
    rc,
    M,
    C,
    R,
    stride_lm,
    stride_lr,
    stride_rr,
    stride_rc,
    scale,
    LORA_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLITS=1,  # left is [SPLITS, M, R] partial sums, split stride stride_ls, added in split order
    stride_ls=0,
    sum_ptr=None,  # with SPLITS > 1: [M, R] fp32 contiguous, the summed left stored where store_rows holds
    store_rows=None,  # [BLOCK_M] bool: rows whose summed left this tile stores
):
    """acc + (scale·left[rm, :])·right[:, rc] (fp32), r walked in BLOCK_R chunks; rows / columns past M / C read
    zeros. The K = r product of both kernels' LoRA term."""
    m_ok = rm < M
    c_ok = rc < C
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        lt_ptrs = left_ptr + rm.to(tl.int64)[:, None] * stride_lm + rr[None, :] * stride_lr
        lt = tl.load(lt_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        for sp in range(1, SPLITS):
            lt += tl.load(lt_ptrs + tl.cast(stride_ls, tl.int64) * sp, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        if SPLITS > 1:
            tl.store(
                sum_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :],
                lt,
                mask=m_ok[:, None] & r_ok[None, :] & store_rows[:, None],
            )
        rt = tl.load(
            right_ptr + rr[:, None] * stride_rr + rc.to(tl.int64)[None, :] * stride_rc,
            mask=r_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        acc = _dot(lt * scale, rt, acc, True, LORA_PREC)
    return acc


# ---------------------------------------------------------------------------------------------------------- kernels
@triton.autotune(
    configs=_tiles("BLOCK_N", "BLOCK_K"),
    key=["M_BUCKET", "N", "K", "R", "HAS_BIAS", "FUSE_SHRINK"],
    prune_configs_by={"early_config_prune": _pruner("x_ptr", "y_ptr", "BLOCK_N", "BLOCK_K")},
    do_bench=autotune_bench,
)
@triton.jit
def _fwd_tma_kernel(
    x_ptr,  # [M, K] fp16/bf16/fp32, row stride stride_xm (16-byte multiple), unit column stride, 16-byte aligned
    w_ptr,  # [N, K] x's dtype, row stride stride_wn (16-byte multiple), unit column stride, 16-byte aligned
    xa_ptr,  # [M, R] fp32 (xa = dropout(x)·Aᵀ), any strides; with FUSE_SHRINK written (STORE_XA), not read
    b_ptr,  # [N, R] lora_B, x's dtype or fp32, any strides
    a_ptr,  # [R, K] lora_A, x's dtype, row stride stride_ar (16-byte multiple), unit column stride, 16-byte aligned
    bias_ptr,  # [N] x's dtype, contiguous (read only when HAS_BIAS)
    y_ptr,  # [M, N] x's dtype out, contiguous; a TMA store when OUT_TMA (N·elem a 16-byte multiple)
    M,
    N,
    K,
    R,
    M_BUCKET,
    stride_xm,
    stride_wn,
    stride_ar,
    stride_xam,
    stride_xar,
    stride_bn,
    stride_br,
    scale,
    NUM_PROGRAMS,  # the grid's size: program p takes tiles p, p + NUM_PROGRAMS, ...
    HAS_BIAS: tl.constexpr,
    OUT_TMA: tl.constexpr,
    UPCAST: tl.constexpr,  # bf16 in the interpreter: operands to fp32 first
    PREC: tl.constexpr,
    LORA_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    FUSE_SHRINK: tl.constexpr,  # xa = x·Aᵀ from the main loop's x boxes (R <= BLOCK_R), not read from xa_ptr
    STORE_XA: tl.constexpr,  # with FUSE_SHRINK: the first column of tiles stores its rows of xa to xa_ptr
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    if FUSE_SHRINK:  # rows R..BLOCK_R-1 of A's box read as zeros (the copy engine pads past the shape)
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[R, K], strides=[stride_ar, 1], block_shape=[BLOCK_R, BLOCK_K])
    if OUT_TMA:
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS):
        pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        # Main loop: TMA pads rows, columns and K past the ends with zeros, so no masks.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for kt in range(0, k_tiles):
            xt = x_desc.load([off_m, kt * BLOCK_K])
            wt = w_desc.load([off_n, kt * BLOCK_K])
            acc = _dot(xt, wt.T, acc, UPCAST, PREC)
            if FUSE_SHRINK:
                at = a_desc.load([0, kt * BLOCK_K])
                xa = _dot(xt, at.T, xa, UPCAST, PREC)
        # LoRA epilogue: acc += (scale·xa_tile)·B_tileᵀ, a K = r product into the same accumulator.
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        if FUSE_SHRINK:
            # xa stays fp32 (tf32 MMA for 16-bit data): a 16-bit copy would overflow past fp16's 65504.
            rr = tl.arange(0, BLOCK_R)
            r_ok = rr < R
            bt = tl.load(
                b_ptr + rr[:, None] * stride_br + rn.to(tl.int64)[None, :] * stride_bn,
                mask=r_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            acc = _dot(xa * scale, bt, acc, True, LORA_PREC)
            if STORE_XA:
                first_col = rm * 0 + pid_n == 0  # a tensor: the interpreter rejects a scalar bool in a mask
                tl.store(
                    xa_ptr + rm.to(tl.int64)[:, None] * stride_xam + rr[None, :] * stride_xar,
                    xa,
                    mask=(m_ok & first_col)[:, None] & r_ok[None, :],
                )
        else:
            acc = _lora_term(
                acc,
                xa_ptr,
                b_ptr,
                rm,
                rn,
                M,
                N,
                R,
                stride_xam,
                stride_xar,
                stride_br,
                stride_bn,
                scale,
                LORA_PREC,
                BLOCK_R,
            )
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = acc.to(y_ptr.dtype.element_ty)
        if OUT_TMA:
            y_desc.store([off_m, off_n], out)  # clipped to [M, N] by the copy engine
        else:
            tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], out, mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(
    configs=_tiles("BLOCK_K", "BLOCK_N"),
    key=["M_BUCKET", "N", "K", "R", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": _pruner("dy_ptr", "dx_ptr", "BLOCK_K", "BLOCK_N")},
    do_bench=autotune_bench,
)
@triton.jit
def _dx_tma_kernel(
    dy_ptr,  # [M, N] x's dtype, row stride stride_dym (16-byte multiple), unit column stride, 16-byte aligned
    w_ptr,  # [N, K] x's dtype, row stride stride_wn (16-byte multiple), unit column stride, 16-byte aligned
    dxa_ptr,  # [DS_SPLITS, M, R] fp32 (their sum is dxa = scale·dY·B), split stride stride_dxas, any strides
    a_ptr,  # [R, K] lora_A, x's dtype or fp32, any strides
    bits_ptr,  # [M, ceil(K/32)] int32 packed keep mask, row stride stride_bm (read only when HAS_DROPOUT)
    dx_ptr,  # [M, K] x's dtype out, contiguous; a TMA store when OUT_TMA (K·elem a 16-byte multiple)
    ds_out_ptr,  # [M, R] fp32 out: the summed dxa, written by the first column of tiles (only when DS_SPLITS > 1)
    M,
    N,
    K,
    R,
    DS_SPLITS,
    M_BUCKET,
    stride_dym,
    stride_wn,
    stride_dxas,
    stride_dxam,
    stride_dxar,
    stride_ar,
    stride_ak,
    stride_bm,
    inv_keep,  # 1/(1-p)
    NUM_PROGRAMS,  # the grid's size: program p takes tiles p, p + NUM_PROGRAMS, ...
    HAS_DROPOUT: tl.constexpr,
    OUT_TMA: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    LORA_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Output tile is [BLOCK_M, BLOCK_K] of dX; the reduction runs over N in BLOCK_N steps (BLOCK_N is always the tile
    # along N). W0 [N, K] is read as [BLOCK_N, BLOCK_K] boxes: already the B operand of dY·W0, no transpose.
    dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[M, N], strides=[stride_dym, 1], block_shape=[BLOCK_M, BLOCK_N])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    if OUT_TMA:
        dx_desc = tl.make_tensor_descriptor(dx_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    n_tiles = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_m * num_k, NUM_PROGRAMS):
        pid_m, pid_k = _tile_of(tile, num_m, num_k, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_k = pid_k * BLOCK_K
        rm = off_m + tl.arange(0, BLOCK_M)
        rk = off_k + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if HAS_DROPOUT:
            # The masked LoRA term needs its own fp32 tile until the mask selects from it; after the main loop that
            # is a second tile next to the accumulator (128×128 at 8 warps: 255 registers and 72 bytes of spills on
            # sm_90). Before the main loop it is the accumulator's initial value: one tile live.
            acc = _lora_term(
                acc,
                dxa_ptr,
                a_ptr,
                rm,
                rk,
                M,
                K,
                R,
                stride_dxam,
                stride_dxar,
                stride_ar,
                stride_ak,
                1.0,
                LORA_PREC,
                BLOCK_R,
                DS_SPLITS,
                stride_dxas,
                ds_out_ptr,
                rm * 0 + pid_k == 0,  # a tensor: the interpreter rejects a scalar bool in a mask
            )
            keep = load_keep(bits_ptr, rm, rk, stride_bm, (rm < M)[:, None] & (rk < K)[None, :])
            acc = tl.where(keep, acc * inv_keep, 0.0)
        for nt in range(0, n_tiles):
            dyt = dy_desc.load([off_m, nt * BLOCK_N])
            wt = w_desc.load([nt * BLOCK_N, off_k])
            acc = _dot(dyt, wt, acc, UPCAST, PREC)
        # LoRA epilogue (no dropout): acc += dxa_tile·A_tile, a K = r product into the same accumulator.
        if not HAS_DROPOUT:
            acc = _lora_term(
                acc,
                dxa_ptr,
                a_ptr,
                rm,
                rk,
                M,
                K,
                R,
                stride_dxam,
                stride_dxar,
                stride_ar,
                stride_ak,
                1.0,
                LORA_PREC,
                BLOCK_R,
                DS_SPLITS,
                stride_dxas,
                ds_out_ptr,
                rm * 0 + pid_k == 0,  # a tensor: the interpreter rejects a scalar bool in a mask
            )
        out = acc.to(dx_ptr.dtype.element_ty)
        if OUT_TMA:
            dx_desc.store([off_m, off_k], out)  # clipped to [M, K] by the copy engine
        else:
            tl.store(
                dx_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], out, mask=(rm < M)[:, None] & (rk < K)[None, :]
            )


# -------------------------------------------------------------------------------------------------------- launchers
def has_tensor_descriptors() -> bool:
    """The installed triton makes TMA tensor descriptors inside kernels (and takes an allocator for their scratch)."""
    return hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


def _tma_aligned(t: torch.Tensor, addresses: bool = True) -> bool:
    """A 2-D tensor TMA can read: unit last stride, base address and row stride 16-byte multiples (the base address
    only when ``addresses``)."""
    e = t.element_size()
    if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * e) % _TMA_ALIGN:
        return False
    return not addresses or t.data_ptr() % _TMA_ALIGN == 0


@torch.compiler.assume_constant_result
def _has_tma(index: int) -> bool:
    """GPU ``index`` has TMA (compute capability >= 9). A constant for torch.compile: a path choice made in traced
    code (multi_lora's) asks it, and a device query there would break the graph."""
    return _utils.capability(index) >= (_TMA_MIN_CAPABILITY, 0)


def _dtype_ok(dtype: torch.dtype, on_gpu: bool) -> bool:
    """fp16 / bf16; fp32 only where its products run on tensor cores (TF32 allowed by
    ``torch.backends.cuda.matmul.allow_tf32``) or in the interpreter. Exact IEEE fp32 products are FMA loops: the fp32
    tiles (128×128×32, 8 warps) compiled for sm_90 spill 26-30 KB per thread (triton 3.9), so fp32 without TF32 keeps
    the other kernels."""
    if dtype in (torch.float16, torch.bfloat16):
        return True
    return dtype == torch.float32 and (not on_gpu or torch.backends.cuda.matmul.allow_tf32)


def tma_supported(*tensors: torch.Tensor, addresses: bool = True) -> bool:
    """True when the TMA kernels can read these big operands (x and W0 for :func:`fwd_gemm`, dY and W0 for
    :func:`dx_gemm`): tensor descriptors in the installed triton, every tensor non-empty, 2-D and on one CUDA device
    of compute capability >= 9 (or on the CPU with the interpreter on), one dtype (:func:`_dtype_ok`), and TMA's
    alignment (16-byte base addresses and row strides, unit column strides). False means: use the other kernels. The
    output, allocated by the launchers, is stored through TMA when its rows are 16-byte multiples and with plain
    stores otherwise. ``addresses=False`` judges the strides but not the base addresses (tensors being traced have
    none; the launcher asks again with them). Never raises."""
    if not tensors or not has_tensor_descriptors():
        return False
    if any(t.dim() != 2 or t.numel() == 0 for t in tensors):
        return False
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        return False
    if dev.type == "cuda":
        if _backend.interpreter_enabled():
            return False
        if not _has_tma(_utils.device_index(dev)):
            return False
    elif not (dev.type == "cpu" and _backend.interpreter_enabled()):
        return False
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or not _dtype_ok(dtypes.pop(), dev.type == "cuda"):
        return False
    return all(_tma_aligned(t, addresses) for t in tensors)


@functools.cache
def _scratch_allocator(device: torch.device):
    """triton allocator of global scratch on ``device`` (torch's caching allocator); one per device."""

    def alloc(size: int, alignment: int, stream) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=device)

    alloc.lora_kernels_scratch = True
    return alloc


def ensure_allocator(device: torch.device) -> None:
    """Kernels that make tensor descriptors on the device need a global scratch buffer (128 bytes per program for
    the descriptors), which triton asks an allocator for at launch. Set one that allocates on ``device`` unless the
    user set their own. Called on every launch, not at import: triton keeps the allocator in a context variable,
    which a new thread (autograd's backward) does not inherit."""
    try:
        from triton.runtime import _allocation

        current = _allocation._allocator
        current = current.get() if hasattr(current, "get") else current  # a context variable in triton 3.6-3.9
        if not getattr(current, "lora_kernels_scratch", False) and not isinstance(current, _allocation.NullAllocator):
            return  # the user's allocator
    except (ImportError, AttributeError):  # pragma: no cover - layout of other triton versions
        pass
    triton.set_allocator(_scratch_allocator(device))


def _grid_stride(device: torch.device, max_programs: int | None) -> int:
    """Programs of a persistent launch: one per SM (``max_programs`` when given), fewer when there are fewer tiles.
    Program p takes tiles p, p + stride, ... with the stride this many even when the grid is smaller (then each
    program has one tile)."""
    if max_programs is not None:
        return max(1, int(max_programs))
    return _utils.sm_count_of(device) if device.type == "cuda" else _INTERPRETER_PROGRAMS


def fwd_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    xa: torch.Tensor | None,
    lora_B: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    *,
    lora_A: torch.Tensor | None = None,
    xa_out: torch.Tensor | None = None,
    max_programs: int | None = None,
) -> torch.Tensor:
    """``y = x·W0ᵀ + scale·xa·Bᵀ + bias`` in x's dtype, [M, N] contiguous. x [M, K], weight [N, K] (both accepted by
    :func:`tma_supported`), xa [M, r] fp32, lora_B [N, r], bias [N] or None. ``max_programs`` caps the persistent
    grid (default: the SM count; 2 in the interpreter).

    With ``lora_A`` [r, K] (r <= FUSED_MAX_R, accepted by :func:`tma_supported` with x and weight) instead of ``xa``
    (None), the kernel computes xa = x·Aᵀ in its main loop (one launch: the decode-sized forward) and, when
    ``xa_out`` (fp32 [M, r], any strides) is given, stores it there for the backward."""
    M, K = x.shape
    N = weight.shape[0]
    fuse = lora_A is not None
    if fuse:
        R = lora_A.shape[0]
        if xa is not None or not 1 <= R <= FUSED_MAX_R or lora_A.shape[1] != K:
            raise ValueError(
                f"fwd_gemm with lora_A needs xa=None and lora_A [r, {K}] with 1 <= r <= {FUSED_MAX_R}, got "
                f"lora_A {tuple(lora_A.shape)}" + ("" if xa is None else " and an xa")
            )
        if xa_out is not None and (xa_out.shape != (M, R) or xa_out.dtype != torch.float32):
            raise ValueError(f"xa_out must be fp32 [{M}, {R}], got {xa_out.dtype} {tuple(xa_out.shape)}")
    else:
        if xa is None:
            raise ValueError("fwd_gemm needs xa, or lora_A to compute it")
        R = xa.shape[1]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if bias is not None:
        bias = bias.contiguous()
    upcast, prec, lora_prec = _utils.tf32_precisions(x.dtype)
    stride = _grid_stride(x.device, max_programs)
    grid = lambda meta: (min(stride, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)  # noqa: E731
    xa_arg = xa_out if fuse and xa_out is not None else (xa if xa is not None else y)
    ensure_allocator(x.device)
    with _utils.device_ctx(x):
        _fwd_tma_kernel[grid](
            x,
            weight,
            xa_arg,
            lora_B,
            lora_A if fuse else x,
            bias if bias is not None else y,
            y,
            M,
            N,
            K,
            R,
            _gemm.m_bucket(M),
            x.stride(0),
            weight.stride(0),
            lora_A.stride(0) if fuse else 0,
            xa_arg.stride(0),
            xa_arg.stride(1),
            lora_B.stride(0),
            lora_B.stride(1),
            float(scale),
            stride,
            HAS_BIAS=bias is not None,
            OUT_TMA=(N * y.element_size()) % _TMA_ALIGN == 0,
            UPCAST=upcast,
            PREC=prec,
            LORA_PREC=lora_prec,
            BLOCK_R=_utils.block_r(R, FUSED_MAX_R if fuse else _EPILOGUE_MAX_R),
            FUSE_SHRINK=fuse,
            STORE_XA=fuse and xa_out is not None,
        )
    return y


def dx_gemm(
    dy: torch.Tensor,
    weight: torch.Tensor,
    dxa: torch.Tensor,
    lora_A: torch.Tensor,
    keep_bits: torch.Tensor | None = None,
    inv_keep: float = 1.0,
    *,
    max_programs: int | None = None,
    dxa_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dX = dY·W0 + keep ⊙ (dxa·A)·inv_keep`` in dY's dtype, [M, K] contiguous. dy [M, N], weight [N, K] (both
    accepted by :func:`tma_supported`), dxa [M, r] fp32, lora_A [r, K], keep_bits the packed keep mask
    [M, ceil(K/32)] int32 (``reference.dropout.pack_keep_bits``) or None without dropout, inv_keep = 1/(1-p).
    ``max_programs`` caps the persistent grid (default: the SM count; 2 in the interpreter). ``dxa`` may also be
    [splits, M, r] partial sums (:func:`lora_linear._dy_pass`); their sum is then written to ``dxa_sum`` [M, r]
    fp32 contiguous."""
    splits = dxa.shape[0] if dxa.dim() == 3 else 1
    if splits > 1 and (dxa_sum is None or dxa_sum.shape != dxa.shape[1:] or not dxa_sum.is_contiguous()):
        raise ValueError("split dxa partials need dxa_sum, a contiguous [M, r] fp32 tensor")
    dxa_s = dxa.reshape(-1, *dxa.shape[-2:])
    M, N = dy.shape
    K, R = weight.shape[1], lora_A.shape[0]
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    if M == 0 or K == 0:
        return dx
    has_drop = keep_bits is not None
    if has_drop and (keep_bits.dtype != torch.int32 or tuple(keep_bits.shape) != (M, triton.cdiv(K, 32))):
        raise ValueError(
            f"keep_bits must be an int32 [{M}, {triton.cdiv(K, 32)}] packed mask, got {keep_bits.dtype} "
            f"{tuple(keep_bits.shape)}"
        )
    upcast, prec, lora_prec = _utils.tf32_precisions(dy.dtype)
    stride = _grid_stride(dy.device, max_programs)
    grid = lambda meta: (min(stride, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"])),)  # noqa: E731
    ensure_allocator(dy.device)
    with _utils.device_ctx(dy):
        _dx_tma_kernel[grid](
            dy,
            weight,
            dxa_s,
            lora_A,
            keep_bits if has_drop else dx,
            dx,
            dxa_sum if splits > 1 else dx,
            M,
            N,
            K,
            R,
            splits,
            _gemm.m_bucket(M),
            dy.stride(0),
            weight.stride(0),
            dxa_s.stride(0),
            dxa_s.stride(1),
            dxa_s.stride(2),
            lora_A.stride(0),
            lora_A.stride(1),
            keep_bits.stride(0) if has_drop else 0,
            float(inv_keep),
            stride,
            HAS_DROPOUT=has_drop,
            OUT_TMA=(K * dx.element_size()) % _TMA_ALIGN == 0,
            UPCAST=upcast,
            PREC=prec,
            LORA_PREC=lora_prec,
            BLOCK_R=_utils.block_r(R, _EPILOGUE_MAX_R),
        )
    return dx
