"""Triton kernels of the multi-adapter ops: shrink (``xa = x·Aᵀ`` per token's adapter), expand
(``y += scale·xa·Bᵀ``), fused shrink+expand for decode sizes, and the base GEMM with the expand in its epilogue
(:func:`linear_gemm`).

One program per tile of same-adapter tokens (``BatchMeta.tile_starts``) × output block; grids depend on host ints
only; bad ids read and write nothing; xa stays fp32. Work list, tiles, precision: docs/multi_lora.md.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from .. import _backend
from ..ops._batch import BatchMeta, max_tiles
from ..ops._validate import MAX_SLICES
from . import _utils
from ._compat import patch_interpreter

# triton 3.6's interpreter + numpy >= 2.4 cannot run loops with runtime bounds (see _compat.py); no-op otherwise.
patch_interpreter()

# Programmatic dependent launch (sm_90+; the griddepcontrol wrappers of triton >= 3.4): the gemm path's base GEMM is
# launched while its shrink still runs and waits for the shrink's results only before its LoRA epilogue, so the
# memory-bound shrink overlaps the GEMM's K loop instead of running before it. Why, by the static launch model
# (benchmarks/static_serving.py, H100, K = N = 4096, r = 16, the TMA GEMM): at 128 adapters uniform over 1024 tokens
# the shrink reads x again plus 128 adapters' A (25 MB, 8.5 us) before a compute-bound GEMM: 1.53x the floor in
# sequence, 1.40x overlapped; at 4096 tokens of the `mix` distribution 1.07x → 1.02x, at 16 adapters uniform over
# 1024 tokens 1.17x → 1.11x. Unmeasured. No-op where PDL is unsupported (the kernels then run one after the other).
_HAS_GDC = hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")
PDL = True  # False: launch the gemm path's two kernels one after the other (the plain stream order)

if _HAS_GDC:

    @triton.jit
    def _pdl_wait():
        tl.extra.cuda.gdc_wait()

    @triton.jit
    def _pdl_launch_dependents():
        tl.extra.cuda.gdc_launch_dependents()

else:  # pragma: no cover - older triton: never called (PDL is off there)

    @triton.jit
    def _pdl_wait():
        pass

    @triton.jit
    def _pdl_launch_dependents():
        pass


def pdl_ok(device: torch.device) -> bool:
    """Whether the gemm path launches its GEMM as a programmatic dependent of its shrink on ``device``: a CUDA
    device of compute capability >= 9, a triton with the griddepcontrol wrappers, ``PDL`` on."""
    if not (PDL and _HAS_GDC and device.type == "cuda") or _backend.interpreter_enabled():
        return False
    return _capability(_utils.device_index(device)) >= 9


@functools.cache
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


# ----------------------------------------------------------------------------------------------------------- configs
# Shrink reads the K-long rows of x and A: with small tiles (<= 32 rows) BLOCK_K = 256 halves the loop trips of a
# latency-bound loop (vLLM also uses 256 below 128 tokens); 64-row tiles use 128 to keep shared memory per stage
# moderate. Split-K spreads the K loop over more programs when there are too few tiles to fill the GPU (decode).
_SHRINK_BLOCK_K_SMALL_TILE = 256
_SHRINK_BLOCK_K = 128
# ... except beside a wide GEMM (``narrow``): with PDL the gemm path's GEMM overlaps its shrink only where a program of
# each fits on one SM, and an 8-warp 128×256 TMA GEMM program takes 205-224 registers × 256 threads (up to 57,344 of
# an SM's 65,536). A 32-row shrink program at BLOCK_K 256 compiled to 64-72 registers × 128 threads on sm_90 (8,192-
# 9,216: no room beside a 224-register GEMM), at 128 to 48 (6,144; the 64-row tiles at 128: 56-60).
_MAX_SPLIT_K = 32  # vLLM uses 64 for M < 128 at K = 4096; 32 keeps ≥ 1 BLOCK_K per split there
# Expand writes N-long rows of y: 64 columns per program gives 64 programs per tile at N = 4096.
_EXPAND_BLOCK_N = 64
# Fused decode kernel: each program recomputes its tile's shrink over the full K (A is re-read from L2 per output
# block), so it only pays for very few tokens; wider output blocks mean fewer re-reads.
_FUSED_BLOCK_N = 256
_FUSED_BLOCK_K = 256
# The interpreter is slow and serial: small blocks so that the tests' small shapes still cover several K blocks,
# split-K with atomics, several output blocks and blocks at slice boundaries.
_INTERP_BLOCK_K = 32
_INTERP_BLOCK_N = 32
_INTERP_SPLIT_K = 2


# --------------------------------------------------------------------------------------------------------- helpers
@triton.jit
def _tile(
    tile_starts_ptr,  # [cap + 1] int32: start of each tile in the sorted token list, -1 past the end
    sorted_tokens_ptr,  # [cap] int32: token indices sorted by slot
    sorted_slots_ptr,  # [cap] int32: slot of each sorted token (2^31-1 = none)
    ranks_ptr,  # [L] int32: rank of each slot, 0 = empty
    pid_t,
    M,
    L,
    cap,
    R,
    BLOCK_M: tl.constexpr,
):
    """Tile ``pid_t``: (rank, 0 when there is nothing to do; slot; token rows [BLOCK_M] int64; row mask)."""
    start = tl.load(tile_starts_ptr + pid_t)
    start_c = tl.maximum(start, 0)
    slot = tl.load(sorted_slots_ptr + start_c)
    usable = (start >= 0) & (slot >= 0) & (slot < L)
    slot_c = tl.minimum(tl.maximum(slot, 0), L - 1)  # clamped so the rank load stays inside ranks[]
    rank = tl.load(ranks_ptr + slot_c)
    rank = tl.where(usable, tl.minimum(tl.maximum(rank, 0), R), 0)
    rows = start_c + tl.arange(0, BLOCK_M)
    in_list = rows < cap
    row_slot = tl.load(sorted_slots_ptr + rows, mask=in_list, other=-1)
    tok = tl.load(sorted_tokens_ptr + rows, mask=in_list, other=0)
    row_ok = in_list & (row_slot == slot) & (tok >= 0) & (tok < M)
    return rank, slot_c.to(tl.int64), tok.to(tl.int64), row_ok


@triton.jit
def _slice_span(slice_idx, N0, N1, N2, N3):
    """(first column, width) of output slice ``slice_idx``."""
    off = tl.where(slice_idx == 0, 0, tl.where(slice_idx == 1, N0, tl.where(slice_idx == 2, N0 + N1, N0 + N1 + N2)))
    width = tl.where(slice_idx == 0, N0, tl.where(slice_idx == 1, N1, tl.where(slice_idx == 2, N2, N3)))
    return off, width


@triton.jit
def _slice_of_block(pid_n, N0, N1, N2, N3, BLOCK_N: tl.constexpr):
    """Output block ``pid_n`` → (slice index, first column of the block, end column of its slice)."""
    c1 = tl.cdiv(N0, BLOCK_N)
    c2 = c1 + tl.cdiv(N1, BLOCK_N)
    c3 = c2 + tl.cdiv(N2, BLOCK_N)
    slice_idx = (pid_n >= c1).to(tl.int32) + (pid_n >= c2).to(tl.int32) + (pid_n >= c3).to(tl.int32)
    first_blk = tl.where(slice_idx == 0, 0, tl.where(slice_idx == 1, c1, tl.where(slice_idx == 2, c2, c3)))
    off, width = _slice_span(slice_idx, N0, N1, N2, N3)
    return slice_idx, off + (pid_n - first_blk) * BLOCK_N, off + width


@triton.jit
def _shrink_tile(
    x_ptr,  # [M, K]
    a_ptr,  # [L, S·R, K]
    slot,
    tok,
    row_ok,
    rank,
    slice_idx,
    k_lo,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_al,
    stride_ar,
    stride_ak,
    K_LEN,
    xs_ptr,  # [M, K] x's dtype, unit column stride: the sorted copy of x (written only with GATHER)
    pos,  # [BLOCK_M] int64: the rows' positions in the sorted token list (rows of xs)
    copy_x,  # scalar bool: this program writes its x rows to xs (GATHER)
    stride_xsm,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAST_FP32: tl.constexpr,
    GATHER: tl.constexpr = False,
):
    """fp32 [BLOCK_M, BLOCK_R] = x[tok, k_lo:k_lo+K_LEN] · A[slot, slice_idx·R + j, same k]ᵀ for j < rank. With
    GATHER (and ``copy_x``) the x tile it loads is also stored to xs[pos, same k]: the sorted copy of x that the
    gemm path's sorted TMA GEMM reads, for no second read of x."""
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    x_rows = x_ptr + tok[:, None] * stride_xm
    xs_rows = xs_ptr + pos[:, None] * stride_xsm
    copy_rows = tl.where(copy_x, row_ok, False)  # (a block & a scalar bool: an int8 mask in the interpreter)
    a_cols = a_ptr + slot * stride_al + (slice_idx * R + offs_r)[None, :].to(tl.int64) * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K_LEN, BLOCK_K):
        offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        offs_k64 = offs_k.to(tl.int64)  # k·stride of a column-major x / W / A passes 2^31 on large tensors
        xt = tl.load(x_rows + offs_k64[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if GATHER:
            tl.store(xs_rows + offs_k64[None, :], xt, mask=copy_rows[:, None] & k_ok[None, :])
        at = tl.load(a_cols + offs_k64[:, None] * stride_ak, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if CAST_FP32:
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, at.to(xt.dtype))
    return acc


@triton.jit
def _whole_k_xa(
    x_ptr,  # [M, K]
    a_ptr,  # [L, S·R, K]
    slot,
    tok,
    row_ok,
    rank,
    slice_idx,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_al,
    stride_ar,
    stride_ak,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAST_FP32: tl.constexpr,
):
    """(fp32 xa [BLOCK_M, BLOCK_R] of a tile over the whole K, its rank mask [BLOCK_R]): the shrink of the kernels that
    expand it themselves (fused, side)."""
    xa_tile = _shrink_tile(
        x_ptr,
        a_ptr,
        slot,
        tok,
        row_ok,
        rank,
        slice_idx,
        0,
        K,
        R,
        stride_xm,
        stride_xk,
        stride_al,
        stride_ar,
        stride_ak,
        K,
        x_ptr,
        tok,
        False,
        0,
        BLOCK_M,
        BLOCK_R,
        BLOCK_K,
        CAST_FP32,
    )
    return xa_tile, tl.arange(0, BLOCK_R) < rank


@triton.jit
def _add_expand(
    acc,  # [BLOCK_M, BLOCK_N] fp32 output tile
    key,  # [BLOCK_M] int32: each row's slot, NONE for rows that add nothing
    rows,  # [BLOCK_M] int64: the rows' token indices (rows of xa)
    offs_n,
    n_ok,
    slice_idx,
    xa_ptr,  # [SPLIT, M, S·R] fp32 partial sums of xa
    b_ptr,  # [L, N, R] pool dtype
    ranks_ptr,
    scales_ptr,
    R,
    NUM_SPLITS,
    stride_xa_split,
    stride_xam,
    stride_xan,
    stride_bl,
    stride_bn,
    stride_br,
    stride_scale_l,
    stride_scale_slice,
    NONE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    LORA_IEEE: tl.constexpr,
    XA_CG: tl.constexpr,  # read xa past L1 (".cg"): other programs of the same launch wrote it (L1 is not coherent)
):
    """acc + Σ over the distinct slots a of ``key`` (ascending): scale_a · xa[rows of a]·B_aᵀ, one small fp32 dot per
    slot with the other rows masked to 0, into the accumulator (no second output tile live). The epilogue of both
    gemm-path GEMMs."""
    offs_r = tl.arange(0, BLOCK_R)
    cur = tl.min(key, axis=0)
    while cur < NONE:
        rows_in = key == cur
        slot = cur.to(tl.int64)
        rank = tl.minimum(tl.maximum(tl.load(ranks_ptr + slot), 0), R)
        r_ok = offs_r < rank
        xa_mask = rows_in[:, None] & r_ok[None, :]
        xa_ptrs = xa_ptr + rows[:, None] * stride_xam + (slice_idx * R + offs_r).to(tl.int64)[None, :] * stride_xan
        xat = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for sp in range(0, NUM_SPLITS):
            if XA_CG:
                xat += tl.load(xa_ptrs + sp * stride_xa_split, mask=xa_mask, other=0.0, cache_modifier=".cg")
            else:
                xat += tl.load(xa_ptrs + sp * stride_xa_split, mask=xa_mask, other=0.0)
        bt = tl.load(
            b_ptr + slot * stride_bl + offs_n[None, :].to(tl.int64) * stride_bn + offs_r[:, None] * stride_br,
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        scale = tl.load(scales_ptr + slot * stride_scale_l + slice_idx * stride_scale_slice)
        # fp32 xa (tf32 MMA on the GPU; exact fp32 for an fp32 pool or data): never rounded to the 16-bit dtype.
        if LORA_IEEE:
            acc = tl.dot(xat * scale, bt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xat * scale, bt.to(tl.float32), acc)
        key = tl.where(rows_in, NONE, key)
        cur = tl.min(key, axis=0)
    return acc


# --------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _shrink_work(
    pid_t,
    slice_idx,
    pid_k,
    x_ptr,
    a_ptr,
    ranks_ptr,
    sorted_tokens_ptr,
    sorted_slots_ptr,
    tile_starts_ptr,
    out_ptr,
    M,
    K,
    L,
    cap,
    R,
    K_PER_SPLIT,
    stride_xm,
    stride_xk,
    stride_al,
    stride_ar,
    stride_ak,
    stride_om,
    stride_on,
    stride_o_split,
    xs_ptr,
    stride_xsm,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    CAST_FP32: tl.constexpr,
    ATOMIC: tl.constexpr,
    GATHER: tl.constexpr,
):
    """One work item of the shrink (see _batched_shrink_kernel): tile ``pid_t`` of the sorted list, output slice
    ``slice_idx``, K split ``pid_k``. Writes nothing for a tile with nothing to do."""
    rank, slot, tok, row_ok = _tile(
        tile_starts_ptr, sorted_tokens_ptr, sorted_slots_ptr, ranks_ptr, pid_t, M, L, cap, R, BLOCK_M
    )
    start = tl.load(tile_starts_ptr + pid_t)
    pos = (tl.maximum(start, 0) + tl.arange(0, BLOCK_M)).to(tl.int64)
    if GATHER:
        # slice 0 copies the rows of every tile of a slot in [0, L), rank 0 included (_tile's row_ok: that slot's
        # rows only); the GEMM gathers the other rows (no adapter, slots outside the pool) from x itself
        copy_x = (slice_idx == 0) & (start >= 0)
        if (rank == 0) & (copy_x == 0):
            return
    else:
        copy_x = start < 0  # unused: GATHER off
        if rank == 0:
            return
    acc = _shrink_tile(
        x_ptr,
        a_ptr,
        slot,
        tok,
        row_ok,
        rank,
        slice_idx,
        pid_k * K_PER_SPLIT,
        K,
        R,
        stride_xm,
        stride_xk,
        stride_al,
        stride_ar,
        stride_ak,
        K_PER_SPLIT,
        xs_ptr,
        pos,
        copy_x,
        stride_xsm,
        BLOCK_M,
        BLOCK_R,
        BLOCK_K,
        CAST_FP32,
        GATHER,
    )
    offs_r = tl.arange(0, BLOCK_R)
    out = out_ptr + tok[:, None] * stride_om + (slice_idx * R + offs_r).to(tl.int64)[None, :] * stride_on
    mask = row_ok[:, None] & (offs_r < rank)[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=mask)
    elif ATOMIC:
        tl.atomic_add(out, acc, mask=mask, sem="relaxed")
    else:  # one partial per split, summed by the consumer: no zero-fill, no atomics, deterministic
        tl.store(out + pid_k * stride_o_split, acc, mask=mask)


@triton.jit
def _batched_shrink_kernel(
    x_ptr,  # [M, K] fp16/bf16/fp32, token rows
    a_ptr,  # [L, S·R, K] pool dtype: slice i of slot l at rows i·R .. i·R+rank-1
    ranks_ptr,  # [L] int32
    sorted_tokens_ptr,  # [cap] int32
    sorted_slots_ptr,  # [cap] int32
    tile_starts_ptr,  # [cap + 1] int32
    out_ptr,  # [M, S·R] fp32, any strides; zeroed before the launch when SPLIT_K > 1 and ATOMIC
    M,
    K,
    L,
    cap,
    R,
    K_PER_SPLIT,
    stride_xm,
    stride_xk,
    stride_al,
    stride_ar,
    stride_ak,
    stride_om,
    stride_on,
    stride_o_split,  # split k's partial sum goes to out + k·stride_o_split when not ATOMIC
    xs_ptr,  # [M, K] x's dtype, unit column stride: x's rows in the sorted order, written with GATHER (else unused)
    stride_xsm,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    CAST_FP32: tl.constexpr,
    ATOMIC: tl.constexpr,
    PDL: tl.constexpr = False,  # a dependent GEMM may launch now (it waits for this grid before reading out)
    GATHER: tl.constexpr = False,  # also write xs[p] = x[sorted_tokens[p]] for the rows of every valid-slot tile
):
    if PDL:
        _pdl_launch_dependents()
    _shrink_work(
        tl.program_id(0),
        tl.program_id(1),
        tl.program_id(2),
        x_ptr,
        a_ptr,
        ranks_ptr,
        sorted_tokens_ptr,
        sorted_slots_ptr,
        tile_starts_ptr,
        out_ptr,
        M,
        K,
        L,
        cap,
        R,
        K_PER_SPLIT,
        stride_xm,
        stride_xk,
        stride_al,
        stride_ar,
        stride_ak,
        stride_om,
        stride_on,
        stride_o_split,
        xs_ptr,
        stride_xsm,
        BLOCK_M,
        BLOCK_R,
        BLOCK_K,
        SPLIT_K,
        CAST_FP32,
        ATOMIC,
        GATHER,
    )


@triton.jit
def _expand_kernel(
    xa_ptr,  # [NUM_SPLITS, M, S·R] fp32: shrink output xa (or its per-split partial sums), any strides
    b_ptr,  # [L, N, R] pool dtype: slice i of slot l at rows off_i .. off_i+N_i-1, columns 0..rank-1
    ranks_ptr,  # [L] int32
    scales_ptr,  # [L, S] fp32, any strides
    sorted_tokens_ptr,  # [cap] int32
    sorted_slots_ptr,  # [cap] int32
    tile_starts_ptr,  # [cap + 1] int32
    y_ptr,  # [M, N] fp16/bf16/fp32, updated in place
    M,
    L,
    cap,
    R,
    N0,
    N1,
    N2,
    N3,
    NUM_SPLITS,  # partials summed per row (1: xa itself); only this tile's rows of its slot's rank are read
    stride_xa_split,
    stride_xam,
    stride_xan,
    stride_scale_l,
    stride_scale_slice,
    stride_bl,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAST_FP32: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rank, slot, tok, row_ok = _tile(
        tile_starts_ptr, sorted_tokens_ptr, sorted_slots_ptr, ranks_ptr, pid_t, M, L, cap, R, BLOCK_M
    )
    if rank == 0:
        return
    slice_idx, n_lo, n_end = _slice_of_block(pid_n, N0, N1, N2, N3, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    # The shrink wrote exactly these elements (same tile, slot and rank mask) in every partial; nothing else of the
    # buffer is read (it may be uninitialised). Partials add in split order: the same bits on every run.
    xa_ptrs = xa_ptr + tok[:, None] * stride_xam + (slice_idx * R + offs_r).to(tl.int64)[None, :] * stride_xan
    xa_mask = row_ok[:, None] & r_ok[None, :]
    xa_tile = tl.load(xa_ptrs, mask=xa_mask, other=0.0)
    for sp in range(1, NUM_SPLITS):
        xa_tile += tl.load(xa_ptrs + sp * stride_xa_split, mask=xa_mask, other=0.0)
    _expand_store(
        xa_tile,
        b_ptr,
        scales_ptr,
        y_ptr,
        slot,
        tok,
        row_ok,
        r_ok,
        slice_idx,
        n_lo,
        n_end,
        stride_scale_l,
        stride_scale_slice,
        stride_bl,
        stride_bn,
        stride_br,
        stride_ym,
        stride_yn,
        BLOCK_R,
        BLOCK_N,
        CAST_FP32,
        True,
    )


@triton.jit
def _expand_store(
    xa_tile,  # [BLOCK_M, BLOCK_R] fp32
    b_ptr,  # [L, N, R]
    scales_ptr,  # [L, S] fp32, any strides
    y_ptr,  # [M, N]
    slot,
    tok,
    row_ok,
    r_ok,
    slice_idx,
    n_lo,
    n_end,
    stride_scale_l,
    stride_scale_slice,
    stride_bl,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAST_FP32: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # False: y is the fp32 side buffer of the side path, written (not read)
):
    """y[tok, n_lo:n_lo+BLOCK_N] += scale[slot, slice_idx] · xa_tile · B[slot, same columns, :rank]ᵀ (masked to
    n < n_end); without ACCUMULATE y[...] = that term, in fp32."""
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_end
    offs_r = tl.arange(0, BLOCK_R)
    bt = tl.load(
        b_ptr + slot * stride_bl + offs_n[None, :].to(tl.int64) * stride_bn + offs_r[:, None] * stride_br,
        mask=r_ok[:, None] & n_ok[None, :],
        other=0.0,
    )
    if CAST_FP32:
        acc = tl.dot(xa_tile, bt.to(tl.float32), input_precision="ieee")
    else:
        # xa stays fp32 (tf32 MMA): rounded to fp16 it overflows past 65504 (x·Aᵀ = 1e5 with a final delta of 512 is
        # a finite, valid input) and bf16 would keep 8 bits instead of tf32's 11. fp16/bf16 B converts to tf32
        # exactly, so the only rounding is xa to 11 bits, as fp16 would do, without its range limit.
        acc = tl.dot(xa_tile, bt.to(tl.float32))
    scale = tl.load(scales_ptr + slot * stride_scale_l + slice_idx * stride_scale_slice)
    # int64 column offsets: a column-major y (stride_yn = M) would overflow int32 past 2^31 elements.
    y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
    mask = row_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        y_old = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y_old.to(tl.float32) + scale * acc).to(y_old.dtype), mask=mask)
    else:
        tl.store(y_ptrs, scale * acc, mask=mask)


@triton.jit
def _fused_kernel(
    x_ptr,  # [M, K] fp16/bf16/fp32
    a_ptr,  # [L, S·R, K] pool dtype
    b_ptr,  # [L, N, R] pool dtype
    ranks_ptr,  # [L] int32
    scales_ptr,  # [L, S] fp32, any strides
    sorted_tokens_ptr,  # [cap] int32
    sorted_slots_ptr,  # [cap] int32
    tile_starts_ptr,  # [cap + 1] int32
    y_ptr,  # [M, N], updated in place
    M,
    K,
    L,
    cap,
    R,
    N0,
    N1,
    N2,
    N3,
    stride_xm,
    stride_xk,
    stride_al,
    stride_ar,
    stride_ak,
    stride_bl,
    stride_bn,
    stride_br,
    stride_scale_l,
    stride_scale_slice,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAST_FP32: tl.constexpr,
):
    """Shrink of this tile's slice over the full K, then expand into this program's output block: one launch, no
    intermediate buffer, no zeroing; the shrink is recomputed by every output block of the slice (L2 hits)."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rank, slot, tok, row_ok = _tile(
        tile_starts_ptr, sorted_tokens_ptr, sorted_slots_ptr, ranks_ptr, pid_t, M, L, cap, R, BLOCK_M
    )
    if rank == 0:
        return
    slice_idx, n_lo, n_end = _slice_of_block(pid_n, N0, N1, N2, N3, BLOCK_N)
    xa_tile, r_ok = _whole_k_xa(
        x_ptr,
        a_ptr,
        slot,
        tok,
        row_ok,
        rank,
        slice_idx,
        K,
        R,
        stride_xm,
        stride_xk,
        stride_al,
        stride_ar,
        stride_ak,
        BLOCK_M,
        BLOCK_R,
        BLOCK_K,
        CAST_FP32,
    )
    _expand_store(
        xa_tile,
        b_ptr,
        scales_ptr,
        y_ptr,
        slot,
        tok,
        row_ok,
        r_ok,
        slice_idx,
        n_lo,
        n_end,
        stride_scale_l,
        stride_scale_slice,
        stride_bl,
        stride_bn,
        stride_br,
        stride_ym,
        stride_yn,
        BLOCK_R,
        BLOCK_N,
        CAST_FP32,
        True,
    )


@triton.jit
def _lora_side_kernel(
    x_ptr,  # [M, K] fp16/bf16/fp32, token rows
    a_ptr,  # [L, S·R, K] pool dtype
    b_ptr,  # [L, N, R] pool dtype
    ranks_ptr,  # [L] int32
    scales_ptr,  # [L, S] fp32, any strides
    sorted_tokens_ptr,  # [cap] int32
    sorted_slots_ptr,  # [cap] int32
    tile_starts_ptr,  # [cap + 1] int32
    side_ptr,  # [M, >= N] fp32: the LoRA term of every row with an adapter (written, not read; other rows untouched)
    M,
    K,
    L,
    cap,
    R,
    N0,
    N1,
    N2,
    N3,
    NUM_SLICES,
    PARTS,  # column parts per (tile, slice): work items = tiles × NUM_SLICES × PARTS
    N_ITEMS,
    stride_xm,
    stride_xk,
    stride_al,
    stride_ar,
    stride_ak,
    stride_bl,
    stride_bn,
    stride_br,
    stride_scale_l,
    stride_scale_slice,
    stride_sm,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAST_FP32: tl.constexpr,
    PDL: tl.constexpr = False,  # the GEMM that adds side[] may launch now (it waits for this grid before its epilogue)
):
    """The side path's LoRA term, side[tok, slice columns] = scale · (x[tok]·A_sliceᵀ)·B_sliceᵀ in fp32, for the
    tokens of each tile of the sorted list: a persistent grid (at most one program per SM, so that the dependent
    GEMM's programs start beside them) looping over work items (tile, slice, column part); each item computes its
    tile's xa over the whole K (parts of one tile recompute it from L2) and expands it over its part's columns. xa is
    never rounded (TF32 / exact fp32 dots, as the expand kernel's)."""
    if PDL:
        _pdl_launch_dependents()
    for item in range(tl.program_id(0), N_ITEMS, tl.num_programs(0)):
        part = item % PARTS
        tile_slice = item // PARTS
        slice_idx = tile_slice % NUM_SLICES
        rank, slot, tok, row_ok = _tile(
            tile_starts_ptr,
            sorted_tokens_ptr,
            sorted_slots_ptr,
            ranks_ptr,
            tile_slice // NUM_SLICES,
            M,
            L,
            cap,
            R,
            BLOCK_M,
        )
        if rank > 0:
            xa_tile, r_ok = _whole_k_xa(
                x_ptr,
                a_ptr,
                slot,
                tok,
                row_ok,
                rank,
                slice_idx,
                K,
                R,
                stride_xm,
                stride_xk,
                stride_al,
                stride_ar,
                stride_ak,
                BLOCK_M,
                BLOCK_R,
                BLOCK_K,
                CAST_FP32,
            )
            off, width = _slice_span(slice_idx, N0, N1, N2, N3)
            blocks = tl.cdiv(width, BLOCK_N)
            for blk in range(part * blocks // PARTS, (part + 1) * blocks // PARTS):
                _expand_store(
                    xa_tile,
                    b_ptr,
                    scales_ptr,
                    side_ptr,
                    slot,
                    tok,
                    row_ok,
                    r_ok,
                    slice_idx,
                    off + blk * BLOCK_N,
                    off + width,
                    stride_scale_l,
                    stride_scale_slice,
                    stride_bl,
                    stride_bn,
                    stride_br,
                    stride_sm,
                    1,
                    BLOCK_R,
                    BLOCK_N,
                    CAST_FP32,
                    False,
                )


@triton.jit
def _row_keys(sorted_slots_ptr, pos, in_list, row_ok, L, NONE: tl.constexpr):
    """[BLOCK_M] int32: the slot of each row at sorted positions ``pos``, NONE for rows that add nothing (outside
    the list, a bad token, a slot outside [0, L))."""
    slot_row = tl.load(sorted_slots_ptr + pos, mask=in_list, other=NONE)
    return tl.where(row_ok & (slot_row >= 0) & (slot_row < L), slot_row, NONE)


@triton.jit
def _gathered_x_k_loop(
    x_ptr,  # [M, K] token rows
    w_ptr,  # [N, K] base weight
    tok,  # [BLOCK_M] int64: the tile's token rows
    row_ok,  # [BLOCK_M] bool
    offs_n,  # [BLOCK_N] output columns
    n_ok,
    n_lo,
    K,
    N,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAST_FP32: tl.constexpr,
    W_TMA: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_N] = x[tok]·W0[offs_n]ᵀ, x's rows gathered by row pointers; W0 by TMA with W_TMA (rows
    past the slice's end belong to the next slice and are not stored; past N and K the copy engine pads 0)."""
    x_rows = x_ptr + tok[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    if W_TMA:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        offs_k64 = offs_k.to(tl.int64)  # k·stride of a column-major x / W / A passes 2^31 on large tensors
        xt = tl.load(x_rows + offs_k64[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if W_TMA:
            wt = w_desc.load([n_lo, k0]).T
        else:
            wt = tl.load(w_cols + offs_k64[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if CAST_FP32:
            acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, wt)
    return acc


@triton.jit
def _sorted_x_k_loop(
    xs_ptr,  # [M, K] x's rows in the sorted order, unit column stride, 16-byte rows
    w_ptr,  # [N, K] base weight, TMA-readable
    off_m,  # the tile's first position in the sorted list
    n_lo,
    M,
    K,
    N,
    stride_xsm,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAST_FP32: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_N] = xs[off_m : off_m + BLOCK_M]·W0[n_lo : n_lo + BLOCK_N]ᵀ, both by TMA (rows past M,
    columns past K padded with zeros by the copy engine), as in _gemm_tma_expand_kernel."""
    xs_desc = tl.make_tensor_descriptor(xs_ptr, shape=[M, K], strides=[stride_xsm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        xt = xs_desc.load([off_m, kt * BLOCK_K])
        wt = w_desc.load([n_lo, kt * BLOCK_K])
        if CAST_FP32:
            acc = tl.dot(xt.to(tl.float32), wt.T.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt.T, acc)
    return acc


@triton.jit
def _gemm_expand_kernel(
    x_ptr,  # [M, K] fp16/bf16/fp32, token rows
    xs_ptr,  # [M, K] x's dtype: x's rows in the sorted order, the shrink's copy (read by TMA with X_SORTED; or unused)
    w_ptr,  # [N, K] base weight, x's dtype
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    xa_ptr,  # [SPLIT, M, S·R] fp32: the shrink's per-split partial sums of xa (only rows of loaded adapters are read)
    b_ptr,  # [L, N, R] pool dtype
    ranks_ptr,  # [L] int32
    scales_ptr,  # [L, S] fp32, any strides
    sorted_tokens_ptr,  # [cap] int32
    sorted_slots_ptr,  # [cap] int32
    y_ptr,  # [M, N] output, written once (not read)
    M,
    K,
    L,
    cap,
    R,
    N0,
    N1,
    N2,
    N3,
    NUM_SPLITS,
    stride_xm,
    stride_xk,
    stride_xsm,
    stride_wn,
    stride_wk,
    stride_xa_split,
    stride_xam,
    stride_xan,
    stride_bl,
    stride_bn,
    stride_br,
    stride_scale_l,
    stride_scale_slice,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CAST_FP32: tl.constexpr,  # base product on fp32 operands (see _utils.cast_to_fp32)
    LORA_IEEE: tl.constexpr,  # epilogue dot in exact fp32 (fp32 pool or data) instead of tf32
    PDL: tl.constexpr = False,  # launched as a programmatic dependent of the shrink: wait for it before reading xa
    W_TMA: tl.constexpr = False,  # W0 read by TMA (unit column stride, 16-byte rows: gemm_tma_ok); see SORTED_TMA_GEMM
    X_SORTED: tl.constexpr = False,  # (with W_TMA) x's rows by TMA from xs, the shrink's sorted copy; see SORTED_GATHER
):
    """y[rows, block] = x·W0ᵀ (+ bias) + Σ over the adapters a of the tile's rows: scale_a · xa_rows·B_aᵀ.

    Rows are BLOCK_M consecutive entries of the batch's sorted token list (gathered through sorted_tokens, so a tile
    holds few adapters: one segment each); the base K loop is a plain GEMM (W0 by TMA with W_TMA, x gathered by row
    pointers unless X_SORTED); the epilogue walks the tile's distinct valid slots in ascending order (one small fp32
    dot each, rows of other segments masked to 0), adds the bias and writes y once. -1 rows, ids outside [0, L) and
    slots of rank 0 add nothing.

    With X_SORTED the K loop reads x's rows by TMA from xs, the shrink's copy in the sorted order (GATHER: it holds
    the rows of every slot in [0, L)); a tile holding any other row (no adapter, a slot outside the pool: the end of
    the sorted list) gathers its rows from x instead."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slice_idx, n_lo, n_end = _slice_of_block(pid_n, N0, N1, N2, N3, BLOCK_N)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_list = (pos < M) & (pos < cap)
    tok = tl.load(sorted_tokens_ptr + pos, mask=in_list, other=0)
    row_ok = in_list & (tok >= 0) & (tok < M)
    tok = tok.to(tl.int64)
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_end
    # NONE (2^31-1) marks rows that are done or have no valid adapter.
    NONE: tl.constexpr = 2147483647
    if X_SORTED:
        key = _row_keys(sorted_slots_ptr, pos, in_list, row_ok, L, NONE)
        # xs is the shrink's output: with PDL wait for its grid before the K loop reads it
        if PDL:
            _pdl_wait()
        # every row of the tile in xs (its slot in [0, L): a shrink tile copied it), or gather them all from x
        from_xs = tl.max((in_list & (key == NONE)).to(tl.int32), axis=0) == 0
        if from_xs:
            acc = _sorted_x_k_loop(
                xs_ptr, w_ptr, pid_m * BLOCK_M, n_lo, M, K, N0 + N1 + N2 + N3, stride_xsm, stride_wn,
                BLOCK_M, BLOCK_N, BLOCK_K, CAST_FP32,
            )  # fmt: skip
        else:
            acc = _gathered_x_k_loop(
                x_ptr, w_ptr, tok, row_ok, offs_n, n_ok, n_lo, K, N0 + N1 + N2 + N3, stride_xm, stride_xk, stride_wn,
                stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, CAST_FP32, W_TMA,
            )  # fmt: skip
    else:
        acc = _gathered_x_k_loop(
            x_ptr, w_ptr, tok, row_ok, offs_n, n_ok, n_lo, K, N0 + N1 + N2 + N3, stride_xm, stride_xk, stride_wn,
            stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, CAST_FP32, W_TMA,
        )  # fmt: skip
        # LoRA epilogue. With PDL this grid started while the shrink still ran: the wait returns once the shrink's
        # grid has completed and its writes of xa are visible (x, W0 and y are not the shrink's outputs: read before).
        if PDL:
            _pdl_wait()
        key = _row_keys(sorted_slots_ptr, pos, in_list, row_ok, L, NONE)  # after the K loop: not live across it
    acc = _add_expand(
        acc,
        key,
        tok,
        offs_n,
        n_ok,
        slice_idx,
        xa_ptr,
        b_ptr,
        ranks_ptr,
        scales_ptr,
        R,
        NUM_SPLITS,
        stride_xa_split,
        stride_xam,
        stride_xan,
        stride_bl,
        stride_bn,
        stride_br,
        stride_scale_l,
        stride_scale_slice,
        NONE,
        BLOCK_M,
        BLOCK_R,
        LORA_IEEE,
        False,
    )

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemm_tma_mainloop(
    pid_m,
    pid_n,
    x_ptr,  # [M, K] 16-bit, TMA-readable
    w_ptr,  # [N, K] x's dtype, TMA-readable
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    M,
    K,
    N0,
    N1,
    N2,
    N3,
    stride_xm,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """The base part of a TMA-GEMM output tile: (fp32 x[rows]·W0[block]ᵀ (+ bias) [BLOCK_M, BLOCK_N], the block's
    slice index, first column, end column of its slice). x and W0 by TMA (ragged edges padded with zeros)."""
    slice_idx, n_lo, n_end = _slice_of_block(pid_n, N0, N1, N2, N3, BLOCK_N)
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(
        w_ptr, shape=[N0 + N1 + N2 + N3, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K]
    )
    off_m = pid_m * BLOCK_M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:  # into the accumulator first: no bias registers at the epilogue's peak (sm_90, 64×128: 130, not 156)
        offs_b = n_lo + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + offs_b, mask=offs_b < n_end, other=0.0).to(tl.float32)[None, :]
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        xt = x_desc.load([off_m, kt * BLOCK_K])
        wt = w_desc.load([n_lo, kt * BLOCK_K])  # rows past the slice's end belong to the next slice: not stored
        if UPCAST:
            acc = tl.dot(xt.to(tl.float32), wt.T.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt.T, acc)
    return acc, slice_idx, n_lo, n_end


@triton.jit
def _gemm_tma_epilogue(
    acc,  # [BLOCK_M, BLOCK_N] fp32: x·W0ᵀ (+ bias) of the tile
    pid_m,
    slice_idx,
    n_lo,
    n_end,
    xa_ptr,  # [SPLIT, M, S·R] fp32
    b_ptr,  # [L, N, R] pool dtype
    ranks_ptr,  # [L] int32
    scales_ptr,  # [L, S] fp32
    token_slots_ptr,  # [cap] int32
    y_ptr,  # [M, N]
    M,
    L,
    R,
    NUM_SPLITS,
    stride_xa_split,
    stride_xam,
    stride_xan,
    stride_bl,
    stride_bn,
    stride_br,
    stride_scale_l,
    stride_scale_slice,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    LORA_IEEE: tl.constexpr,
    XA_CG: tl.constexpr,
):
    """The LoRA epilogue of a TMA-GEMM output tile (rows in the batch's own order; see _add_expand) and its store."""
    NONE: tl.constexpr = 2147483647
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rows < M
    rows64 = rows.to(tl.int64)
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_end
    slot_row = tl.load(token_slots_ptr + rows, mask=m_ok, other=-1)
    key = tl.where(m_ok & (slot_row >= 0) & (slot_row < L), slot_row, NONE)
    acc = _add_expand(
        acc,
        key,
        rows64,
        offs_n,
        n_ok,
        slice_idx,
        xa_ptr,
        b_ptr,
        ranks_ptr,
        scales_ptr,
        R,
        NUM_SPLITS,
        stride_xa_split,
        stride_xam,
        stride_xan,
        stride_bl,
        stride_bn,
        stride_br,
        stride_scale_l,
        stride_scale_slice,
        NONE,
        BLOCK_M,
        BLOCK_R,
        LORA_IEEE,
        XA_CG,
    )
    y_ptrs = y_ptr + rows64[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemm_tma_side_epilogue(
    acc,  # [BLOCK_M, BLOCK_N] fp32: x·W0ᵀ (+ bias) of the tile
    pid_m,
    n_lo,
    n_end,
    side_ptr,  # [M, >= N] fp32: the LoRA term of the rows with an adapter (other rows uninitialised: never added)
    ranks_ptr,  # [L] int32
    token_slots_ptr,  # [cap] int32
    y_ptr,  # [M, N]
    M,
    L,
    R,
    N,
    stride_sm,  # side's row stride: a multiple of 4 elements (16 bytes, as TMA needs)
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The side path's epilogue: y = acc + side[rows, block] for the rows whose slot is in [0, L) with a rank > 0
    (exactly the rows _lora_side_kernel wrote), one TMA load of the fp32 tile (sm_90: 188 registers at 128×256 on
    8 warps, no spills, against 255 and 248-284 bytes of spills for the same load by pointers)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rows < M
    slot_row = tl.load(token_slots_ptr + rows, mask=m_ok, other=-1)
    in_pool = m_ok & (slot_row >= 0) & (slot_row < L)
    rank = tl.load(ranks_ptr + tl.minimum(tl.maximum(slot_row, 0), L - 1), mask=in_pool, other=0)
    has = in_pool & (tl.minimum(rank, R) > 0)
    side_desc = tl.make_tensor_descriptor(
        side_ptr, shape=[M, N], strides=[stride_sm, 1], block_shape=[BLOCK_M, BLOCK_N]
    )
    side = side_desc.load([pid_m * BLOCK_M, n_lo])
    acc += tl.where(has[:, None], side, 0.0)
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_n < n_end)[None, :])


@triton.jit
def _gemm_tma_expand_kernel(
    x_ptr,  # [M, K] fp16/bf16, token rows: 16-byte aligned base and row stride, unit column stride (TMA)
    w_ptr,  # [N, K] base weight, x's dtype, TMA-readable like x
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    xa_ptr,  # [SPLIT, M, S·R] fp32: the shrink's per-split partial sums of xa (only rows of loaded adapters are read)
    b_ptr,  # [L, N, R] pool dtype
    ranks_ptr,  # [L] int32
    scales_ptr,  # [L, S] fp32, any strides
    token_slots_ptr,  # [cap] int32: slot of each token (-1 = none; any value is checked)
    y_ptr,  # [M, N] output, written once (not read)
    M,
    K,
    L,
    R,
    N0,
    N1,
    N2,
    N3,
    NUM_SPLITS,
    stride_xm,
    stride_wn,
    stride_xa_split,
    stride_xam,
    stride_xan,
    stride_bl,
    stride_bn,
    stride_br,
    stride_scale_l,
    stride_scale_slice,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # bf16 in the interpreter: base operands to fp32 first (its bf16 dot is wrong)
    LORA_IEEE: tl.constexpr,  # epilogue dot in exact fp32 (fp32 pool) instead of tf32
    PDL: tl.constexpr = False,  # launched as a programmatic dependent of the shrink: wait for it before reading xa
    SIDE: tl.constexpr = False,  # xa_ptr is the side path's fp32 LoRA term [M, >= N] (row stride stride_xam): added
):
    """y[rows, block] = x·W0ᵀ (+ bias) + Σ over the adapters a of the tile's rows: scale_a · xa_rows·B_aᵀ, with x and
    W0 read by TMA (the copy engine pads ragged edges with zeros: no masks, no address arithmetic in the K loop).
    With SIDE the LoRA term comes whole from _lora_side_kernel's fp32 buffer (one TMA load of the tile, added to the
    rows that have an adapter: no dot per adapter, whatever the number of adapters in the tile).

    Rows are BLOCK_M consecutive tokens in the batch's own order (TMA cannot gather the sorted token list); the
    epilogue walks the distinct valid slots of those rows in ascending order (one small fp32 dot each, other rows
    masked to 0), as _gemm_expand_kernel does for its sorted rows: few per tile when the batch holds few adapters or
    requests keep their tokens together. -1 rows, ids outside [0, L) and slots of rank 0 add nothing."""
    acc, slice_idx, n_lo, n_end = _gemm_tma_mainloop(
        tl.program_id(0),
        tl.program_id(1),
        x_ptr,
        w_ptr,
        bias_ptr,
        M,
        K,
        N0,
        N1,
        N2,
        N3,
        stride_xm,
        stride_wn,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        HAS_BIAS,
        UPCAST,
    )
    # LoRA epilogue (see _gemm_expand_kernel): with PDL the shrink's xa is visible once the wait returns.
    if PDL:
        _pdl_wait()
    if SIDE:
        _gemm_tma_side_epilogue(
            acc,
            tl.program_id(0),
            n_lo,
            n_end,
            xa_ptr,
            ranks_ptr,
            token_slots_ptr,
            y_ptr,
            M,
            L,
            R,
            N0 + N1 + N2 + N3,
            stride_xam,
            stride_ym,
            stride_yn,
            BLOCK_M,
            BLOCK_N,
        )
        return
    _gemm_tma_epilogue(
        acc,
        tl.program_id(0),
        slice_idx,
        n_lo,
        n_end,
        xa_ptr,
        b_ptr,
        ranks_ptr,
        scales_ptr,
        token_slots_ptr,
        y_ptr,
        M,
        L,
        R,
        NUM_SPLITS,
        stride_xa_split,
        stride_xam,
        stride_xan,
        stride_bl,
        stride_bn,
        stride_br,
        stride_scale_l,
        stride_scale_slice,
        stride_ym,
        stride_yn,
        BLOCK_M,
        BLOCK_N,
        BLOCK_R,
        LORA_IEEE,
        False,
    )


@triton.jit
def _join_wait(sync_ptr, NUM_ITEMS, SPINS):
    """The count of item programs done (an acquire read of ``sync_ptr[0]``), polled until it reaches NUM_ITEMS or for
    SPINS more reads."""
    done = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (done < NUM_ITEMS) & (spins < SPINS):
        done = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    return done


@triton.jit
def _gemm_tma_joined_kernel(
    x_ptr,  # [M, K] fp16/bf16, TMA-readable (as _gemm_tma_expand_kernel's)
    w_ptr,  # [N, K] x's dtype, TMA-readable
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    a_ptr,  # [L, S·R, K] pool dtype
    xa_ptr,  # [M, S·R] fp32, uninitialised: the work items write the rows of their tiles, the epilogue reads them
    b_ptr,  # [L, N, R] pool dtype
    ranks_ptr,  # [L] int32
    scales_ptr,  # [L, S] fp32, any strides
    token_slots_ptr,  # [cap] int32
    sorted_tokens_ptr,  # [cap] int32
    sorted_slots_ptr,  # [cap] int32
    tile_starts_ptr,  # [cap + 1] int32
    y_ptr,  # [M, N] output, written once
    sync_ptr,  # [2] int32: item programs done, programs done; zero before the launch, reset by its last program
    M,
    K,
    L,
    cap,
    R,
    N0,
    N1,
    N2,
    N3,
    NUM_WORK,  # the shrink's work items: tiles of the sorted list × slices, each over the whole K
    NUM_ITEMS,  # item programs: program i runs work items i, i + NUM_ITEMS, ...
    M_TILES,
    SPINS,  # polls of the items counter before a GEMM tile computes the shrink itself
    stride_xm,
    stride_wn,
    stride_al,
    stride_ar,
    stride_ak,
    stride_xam,
    stride_xan,
    stride_bl,
    stride_bn,
    stride_br,
    stride_scale_l,
    stride_scale_slice,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SHRINK_M: tl.constexpr,  # rows of a shrink item (the batch's tile_m for this step)
    SHRINK_K: tl.constexpr,
    NUM_SLICES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    CAST_FP32: tl.constexpr,
    LORA_IEEE: tl.constexpr,
    ITEMS_FIRST: tl.constexpr = True,  # False (tests): the item programs after the tiles, which then compute xa
):
    """The gemm path's TMA steps in ONE launch: the first NUM_ITEMS programs run the shrink's work items (as
    _batched_shrink_kernel's, one K split), the others are the output tiles of _gemm_tma_expand_kernel, which wait
    for every item program before their LoRA epilogue. Blocks start in launch order, so the item programs run first,
    beside the first GEMM tiles, and finish long before any tile's K loop; an item program signals with a release add
    to ``sync_ptr[0]`` after its stores, a tile reads the count with acquire. A tile that polls SPINS times in vain
    (item programs not yet scheduled: SMs held by other work) computes every work item itself, the same stores bit
    for bit, and goes on: never a deadlock, never a stale xa. The last program to finish puts both counters back to
    zero, so a slot serves the next launch of its stream (``_SyncSlots``)."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    if ITEMS_FIRST:
        item = pid
        tile = pid - NUM_ITEMS
    else:
        item = pid - (n_prog - NUM_ITEMS)
        tile = pid
    is_tile = (item < 0) | (item >= NUM_ITEMS)
    pid_m = tile % M_TILES
    # an item program runs work items item, item + NUM_ITEMS, ...; a tile runs its K loop, then, if its polls of the
    # items' counter stay short, every work item itself (the same stores, bit for bit)
    lo = item
    hi = NUM_WORK + pid * 0
    step = NUM_ITEMS + pid * 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    slice_idx = pid * 0
    n_lo = pid * 0
    n_end = pid * 0
    if is_tile:
        acc, slice_idx, n_lo, n_end = _gemm_tma_mainloop(
            pid_m,
            tile // M_TILES,
            x_ptr,
            w_ptr,
            bias_ptr,
            M,
            K,
            N0,
            N1,
            N2,
            N3,
            stride_xm,
            stride_wn,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            HAS_BIAS,
            UPCAST,
        )
        lo = pid * 0
        hi = tl.where(_join_wait(sync_ptr, NUM_ITEMS, SPINS) < NUM_ITEMS, NUM_WORK, 0)
        step = pid * 0 + 1
    for it in range(lo, hi, step):
        _shrink_work(
            it // NUM_SLICES,
            it % NUM_SLICES,
            0,
            x_ptr,
            a_ptr,
            ranks_ptr,
            sorted_tokens_ptr,
            sorted_slots_ptr,
            tile_starts_ptr,
            xa_ptr,
            M,
            K,
            L,
            cap,
            R,
            K,
            stride_xm,
            1,
            stride_al,
            stride_ar,
            stride_ak,
            stride_xam,
            stride_xan,
            0,
            x_ptr,
            0,
            SHRINK_M,
            BLOCK_R,
            SHRINK_K,
            1,
            CAST_FP32,
            False,
            False,
        )
    tl.debug_barrier()  # every thread's xa stores before the release (an item) or the epilogue's reads (a tile)
    if is_tile:
        _gemm_tma_epilogue(
            acc,
            pid_m,
            slice_idx,
            n_lo,
            n_end,
            xa_ptr,
            b_ptr,
            ranks_ptr,
            scales_ptr,
            token_slots_ptr,
            y_ptr,
            M,
            L,
            R,
            1,
            0,
            stride_xam,
            stride_xan,
            stride_bl,
            stride_bn,
            stride_br,
            stride_scale_l,
            stride_scale_slice,
            stride_ym,
            stride_yn,
            BLOCK_M,
            BLOCK_N,
            BLOCK_R,
            LORA_IEEE,
            True,
        )
    else:
        tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
    if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu") == n_prog - 1:  # the last program out
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")


@triton.jit
def _lane_slots(key, lo, LANES: tl.constexpr, NONE: tl.constexpr):
    """The first LANES distinct values >= ``lo`` of ``key`` ([BLOCK_M] int32, NONE = no adapter), ascending, as a
    [LANES] int32 vector (NONE in lanes left empty), and the least value of ``key`` past them (NONE when none)."""
    lane_ids = tl.arange(0, LANES)
    lanes = tl.full((LANES,), NONE, tl.int32)
    rest = tl.where(key >= lo, key, NONE)
    for j in tl.static_range(LANES):
        cur = tl.min(rest, axis=0)
        lanes = tl.where(lane_ids == j, cur, lanes)
        rest = tl.where(rest == cur, NONE, rest)
    return lanes, tl.min(rest, axis=0)


@triton.jit
def _lane_columns(lanes, ranks_ptr, R, LANES: tl.constexpr, BLOCK_R: tl.constexpr, NONE: tl.constexpr):
    """Column c of the lanes' stacked rank dimension [LANES·BLOCK_R]: (slot of its lane, int64; its rank index
    r = c mod BLOCK_R; whether it holds a rank of a loaded adapter: r < the slot's rank)."""
    cols = tl.arange(0, LANES * BLOCK_R)
    lane = cols // BLOCK_R
    r = cols % BLOCK_R
    # a [LANES·BLOCK_R, LANES] one-hot pick of each column's lane slot (one non-zero term per row of the sum)
    slot = tl.sum(tl.where(lane[:, None] == tl.arange(0, LANES)[None, :], lanes[None, :], 0), axis=1)
    used = slot < NONE
    slot64 = tl.where(used, slot, 0).to(tl.int64)
    rank = tl.load(ranks_ptr + slot64, mask=used, other=0)
    ok = used & (r < tl.minimum(tl.maximum(rank, 0), R))
    return slot64, r, ok


@triton.jit
def _add_lanes(
    acc,  # [BLOCK_M, BLOCK_N] fp32 output tile
    xa,  # [BLOCK_M, LANES·BLOCK_R] fp32: x·Aᵀ of every row against every lane's adapter
    key,  # [BLOCK_M] int32: each row's slot, NONE for rows that add nothing
    lanes,  # [LANES] int32: the lanes' slots
    col_slot,
    col_r,
    col_ok,
    offs_n,
    n_ok,
    slice_idx,
    b_ptr,  # [L, N, R] pool dtype
    scales_ptr,
    stride_bl,
    stride_bn,
    stride_br,
    stride_scale_l,
    stride_scale_slice,
    LANES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    LORA_IEEE: tl.constexpr,
):
    """acc + one fp32 dot [BLOCK_M, LANES·BLOCK_R] × [LANES·BLOCK_R, BLOCK_N]: each row keeps only the columns of
    its own adapter's lane (scaled by that adapter's scale), the B tile stacks the lanes' Bᵀ."""
    lane_ids = tl.arange(0, LANES)
    # each row's lane (-1: its slot is in no lane of this group)
    row_lane = tl.sum(tl.where(key[:, None] == lanes[None, :], lane_ids[None, :] + 1, 0), axis=1) - 1
    col_lane = tl.arange(0, LANES * BLOCK_R) // BLOCK_R
    scale = tl.load(scales_ptr + col_slot * stride_scale_l + slice_idx * stride_scale_slice, mask=col_ok, other=0.0)
    xa = tl.where(row_lane[:, None] == col_lane[None, :], xa * scale[None, :], 0.0)
    bt = tl.load(
        b_ptr + col_slot[:, None] * stride_bl + offs_n[None, :].to(tl.int64) * stride_bn + col_r[:, None] * stride_br,
        mask=col_ok[:, None] & n_ok[None, :],
        other=0.0,
    )
    # fp32 xa (tf32 MMA on the GPU; exact fp32 for an fp32 pool or data): never rounded to the 16-bit dtype.
    if LORA_IEEE:
        return tl.dot(xa, bt.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(xa, bt.to(tl.float32), acc)


@triton.jit
def _gemm_lanes_kernel(
    x_ptr,  # [M, K] fp16/bf16/fp32, token rows
    w_ptr,  # [N, K] base weight, x's dtype
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    a_ptr,  # [L, S·R, K] pool dtype
    b_ptr,  # [L, N, R] pool dtype
    ranks_ptr,  # [L] int32
    scales_ptr,  # [L, S] fp32, any strides
    token_slots_ptr,  # [cap] int32: slot of each token (-1 = none; any value is checked)
    y_ptr,  # [M, N] output, written once (not read)
    M,
    K,
    L,
    R,
    N0,
    N1,
    N2,
    N3,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_al,
    stride_ar,
    stride_ak,
    stride_bl,
    stride_bn,
    stride_br,
    stride_scale_l,
    stride_scale_slice,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    LANES: tl.constexpr,  # adapters whose shrink rides along the base K loop (a power of two)
    HAS_BIAS: tl.constexpr,
    CAST_FP32: tl.constexpr,  # base product on fp32 operands (see _utils.cast_to_fp32)
    LANE_FP32: tl.constexpr,  # shrink on fp32 operands (fp32 data or pool, bf16 in the interpreter)
    LORA_IEEE: tl.constexpr,  # epilogue dot in exact fp32 (fp32 pool or data) instead of tf32
):
    """y[rows, block] = x·W0ᵀ (+ bias) + Σ over the adapters a of the rows: scale_a · (x_rows·A_aᵀ)·B_aᵀ, in ONE
    launch: the shrink rides along the base GEMM's K loop.

    Rows are BLOCK_M consecutive tokens in the batch's own order. The tile's first LANES distinct valid slots are its
    lanes: their A rows (this block's slice) are stacked into one [LANES·BLOCK_R, BLOCK_K] operand, so each K step
    is the base dot plus one dot of the same x tile against the stacked A; the epilogue is one dot against the
    stacked B with each row masked to its own lane's columns. A tile with more distinct slots takes them LANES at a
    time after the main loop, each group one more K loop over x and A only (W0 is read once in every case). -1 rows,
    ids outside [0, L) and slots of rank 0 add nothing."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slice_idx, n_lo, n_end = _slice_of_block(pid_n, N0, N1, N2, N3, BLOCK_N)
    NONE: tl.constexpr = 2147483647
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rows < M
    rows64 = rows.to(tl.int64)
    slot_row = tl.load(token_slots_ptr + rows, mask=m_ok, other=-1)
    key = tl.where(m_ok & (slot_row >= 0) & (slot_row < L), slot_row, NONE)
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_end
    x_rows = x_ptr + rows64[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn

    lanes, lo = _lane_slots(key, 0, LANES, NONE)
    col_slot, col_r, col_ok = _lane_columns(lanes, ranks_ptr, R, LANES, BLOCK_R, NONE)
    a_cols = a_ptr + col_slot * stride_al + (slice_idx * R + col_r).to(tl.int64) * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, LANES * BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        offs_k64 = offs_k.to(tl.int64)  # k·stride of a column-major x / W / A passes 2^31 on large tensors
        xt = tl.load(x_rows + offs_k64[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_cols + offs_k64[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        at = tl.load(a_cols[None, :] + offs_k64[:, None] * stride_ak, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if CAST_FP32:
            acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, wt)
        if LANE_FP32:
            xa += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            xa += tl.dot(xt, at.to(xt.dtype))
    # The epilogue of each lane group; while the tile holds more distinct adapters than lanes, the next LANES of them
    # need one more K loop over x and A (never W0 again). `go` is a scalar tensor: the loop runs at least once.
    go = lo >= 0
    while go:
        acc = _add_lanes(
            acc,
            xa,
            key,
            lanes,
            col_slot,
            col_r,
            col_ok,
            offs_n,
            n_ok,
            slice_idx,
            b_ptr,
            scales_ptr,
            stride_bl,
            stride_bn,
            stride_br,
            stride_scale_l,
            stride_scale_slice,
            LANES,
            BLOCK_R,
            LORA_IEEE,
        )
        go = lo < NONE
        if go:
            lanes, lo = _lane_slots(key, lo, LANES, NONE)
            col_slot, col_r, col_ok = _lane_columns(lanes, ranks_ptr, R, LANES, BLOCK_R, NONE)
            a_cols = a_ptr + col_slot * stride_al + (slice_idx * R + col_r).to(tl.int64) * stride_ar
            xa = tl.zeros((BLOCK_M, LANES * BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                offs_k64 = offs_k.to(tl.int64)
                xt = tl.load(x_rows + offs_k64[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                at = tl.load(
                    a_cols[None, :] + offs_k64[:, None] * stride_ak, mask=k_ok[:, None] & col_ok[None, :], other=0.0
                )
                if LANE_FP32:
                    xa += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
                else:
                    xa += tl.dot(xt, at.to(xt.dtype))

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows64[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# -------------------------------------------------------------------------------------------------------- launchers
def _widths(slices: Sequence[int]) -> tuple[int, int, int, int]:
    """The kernels' N0..N3 arguments: the slice widths, 0 for absent slices."""
    w = [int(n) for n in slices]
    if not 1 <= len(w) <= MAX_SLICES:
        raise ValueError(f"1 to {MAX_SLICES} output slices are supported, got {len(w)}")
    return tuple(w + [0] * (MAX_SLICES - len(w)))  # type: ignore[return-value]


def _out_blocks(slices: Sequence[int], block_n: int) -> int:
    return sum(triton.cdiv(int(n), block_n) for n in slices)


def shrink_config(
    M: int,
    K: int,
    L: int,
    R: int,
    num_slices: int,
    tile_m: int,
    cap: int,
    x_bytes: int,
    a_bytes: int,
    interp: bool,
    smem: _utils.IntThunk,
    sm_count: _utils.IntThunk,
    narrow: bool = False,
) -> tuple[int, int, int, int]:
    """(grid tiles, BLOCK_K, num_stages, split-K) of the shrink launch; ``smem`` and ``sm_count`` are callables (only
    asked on a GPU); ``narrow``: the launch shares SMs with a wide GEMM (see _SHRINK_BLOCK_K). A function of host ints
    only, shared by the launchers and the static launch model (benchmarks/static_serving.py)."""
    n_tiles = max_tiles(M, L, tile_m, cap)
    if interp:
        return n_tiles, _INTERP_BLOCK_K, 3, min(_INTERP_SPLIT_K, triton.cdiv(K, _INTERP_BLOCK_K))
    block_k = _SHRINK_BLOCK_K_SMALL_TILE if tile_m <= 32 and not narrow else _SHRINK_BLOCK_K
    block_r = _utils.block_r(R)
    block_k, stages = _utils.k_pipeline(tile_m, block_k, block_r, x_bytes, a_bytes, tile_m * block_r * 4, smem())
    k_blocks = triton.cdiv(K, block_k)
    want = max(1, (2 * sm_count()) // (n_tiles * num_slices))
    split = 1
    while split * 2 <= min(want, k_blocks, _MAX_SPLIT_K):
        split *= 2
    return n_tiles, block_k, stages, split


def _shrink_config_of(
    x: torch.Tensor, A_stack: torch.Tensor, meta: BatchMeta, num_slices: int, tile_m: int, interp: bool, narrow: bool
) -> tuple[int, int, int, int]:
    """:func:`shrink_config` for x [M, K] and A_stack [L, S·R, K] on x's device."""
    M, K = x.shape
    L, SR, _ = A_stack.shape
    return shrink_config(
        M,
        K,
        L,
        SR // num_slices,
        num_slices,
        tile_m,
        meta.capacity,
        x.element_size(),
        A_stack.element_size(),
        interp,
        lambda: _utils.smem_of(x.device),
        lambda: _utils.sm_count_of(x.device),
        narrow,
    )


def _launch_shrink(
    x: torch.Tensor,
    A_stack: torch.Tensor,
    ranks: torch.Tensor,
    meta: BatchMeta,
    out: torch.Tensor,
    out_split_stride: int,
    num_slices: int,
    tile_m: int,
    atomic: bool,
    interp: bool,
    pdl: bool = False,
    x_sorted: torch.Tensor | None = None,
    narrow: bool = False,
) -> int:
    """One launch of the batched shrink into ``out`` ([M, S·R] fp32 rows, any strides). With ``atomic`` the K splits
    add into ``out`` (zero it first); without, split k writes ``out + k·out_split_stride`` (a partial sum per split).
    Returns the split count (decided here; ``out`` must already hold that many partials when not ``atomic``: see
    :func:`shrink_config`). ``pdl``: let the next launch start early (it must wait for this grid: see PDL).
    ``x_sorted`` ([M, K], x's dtype, unit column stride): also copy the rows of every slot in [0, L) there, at their
    positions in the sorted token list (GATHER: see :func:`sorted_x_buffer`). ``narrow``: see :func:`shrink_config`."""
    M, K = x.shape
    L, SR, _ = A_stack.shape
    R = SR // num_slices
    n_tiles, block_k, stages, split = _shrink_config_of(x, A_stack, meta, num_slices, tile_m, interp, narrow)
    if atomic and torch.are_deterministic_algorithms_enabled():
        split = 1  # fp32 atomics add in a run-dependent order: no split-K (bitwise reproducible, as lora_linear)
    k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    with _utils.device_ctx(x):
        _batched_shrink_kernel[(n_tiles, num_slices, split)](
            x,
            A_stack,
            ranks,
            meta.sorted_tokens,
            meta.sorted_slots,
            meta.tile_starts,
            out,
            M,
            K,
            L,
            meta.capacity,
            R,
            k_per_split,
            x.stride(0),
            x.stride(1),
            A_stack.stride(0),
            A_stack.stride(1),
            A_stack.stride(2),
            out.stride(0),
            out.stride(1),
            out_split_stride,
            x_sorted if x_sorted is not None else x,
            x_sorted.stride(0) if x_sorted is not None else 0,
            BLOCK_M=tile_m,
            BLOCK_R=_utils.block_r(R),
            BLOCK_K=block_k,
            SPLIT_K=split,
            CAST_FP32=_utils.cast_to_fp32(x.dtype, A_stack.dtype),
            ATOMIC=atomic,
            PDL=pdl,
            GATHER=x_sorted is not None,
            num_warps=4,
            num_stages=stages,
        )
    return split


def shrink(
    x: torch.Tensor,
    A_stack: torch.Tensor,
    ranks: torch.Tensor,
    meta: BatchMeta,
    out: torch.Tensor,
    num_slices: int,
    tile_m: int,
) -> torch.Tensor:
    """``out[M, S·R]`` (fp32) ← per-token ``xa = x·Aᵀ`` (zeros where no adapter applies). x ``[M, K]``; ``meta``:
    the batch (:attr:`lora_kernels.LoRABatch.meta`). Zeroes ``out`` first, then one launch (split-K by atomics when
    the tiles alone would not fill the GPU)."""
    out.zero_()
    if x.shape[0] == 0:
        return out
    _launch_shrink(x, A_stack, ranks, meta, out, 0, num_slices, tile_m, True, _backend.interpreter_enabled())
    return out


def expand_block_n(interp: bool) -> int:
    return _INTERP_BLOCK_N if interp else _EXPAND_BLOCK_N


def expand(
    xa: torch.Tensor,
    B_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: BatchMeta,
    y: torch.Tensor,
    slices: Sequence[int],
    tile_m: int,
) -> torch.Tensor:
    """``y[M, N] += scale · xa·Bᵀ`` per token's adapter and output slice, in place. xa ``[M, S·R]`` fp32."""
    return _launch_expand(xa, 1, 0, B_stack, ranks, scales, meta, y, slices, tile_m)


def _launch_expand(
    xa: torch.Tensor,
    num_splits: int,
    split_stride: int,
    B_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: BatchMeta,
    y: torch.Tensor,
    slices: Sequence[int],
    tile_m: int,
) -> torch.Tensor:
    """One launch of the expand; xa ``[M, S·R]`` fp32 is the first of ``num_splits`` partials ``split_stride``
    elements apart, summed per row before the product."""
    M = y.shape[0]
    L, N, R = B_stack.shape
    if M == 0:
        return y
    block_n = expand_block_n(_backend.interpreter_enabled())
    grid = (meta.max_tiles(M, L, tile_m), _out_blocks(slices, block_n))
    with _utils.device_ctx(y):
        _expand_kernel[grid](
            xa,
            B_stack,
            ranks,
            scales,
            meta.sorted_tokens,
            meta.sorted_slots,
            meta.tile_starts,
            y,
            M,
            L,
            meta.capacity,
            R,
            *_widths(slices),
            num_splits,
            split_stride,
            xa.stride(0),
            xa.stride(1),
            scales.stride(0),
            scales.stride(1),
            B_stack.stride(0),
            B_stack.stride(1),
            B_stack.stride(2),
            y.stride(0),
            y.stride(1),
            BLOCK_M=tile_m,
            BLOCK_R=_utils.block_r(R),
            BLOCK_N=block_n,
            CAST_FP32=_utils.cast_to_fp32(B_stack.dtype) or y.dtype == torch.float32,
            num_warps=4,
        )
    return y


def partials(split: int, M: int, SR: int, device: torch.device) -> torch.Tensor:
    """The uninitialised ``[split, M, S·R]`` fp32 buffer of the shrink's per-split partial sums (split and gemm
    paths). Never zeroed: each consumer reads only the elements the shrink wrote (rows of its tiles' slots, columns
    below their ranks). One function so that tests can hand the launchers a poisoned buffer."""
    return torch.empty(split, M, SR, dtype=torch.float32, device=device)


def _shrink_partials(
    x: torch.Tensor,
    A_stack: torch.Tensor,
    ranks: torch.Tensor,
    meta: BatchMeta,
    S: int,
    tile_m: int,
    pdl: bool,
    x_sorted: torch.Tensor | None = None,
    narrow: bool = False,
) -> tuple[torch.Tensor, int]:
    """The shrink into per-split partials (one launch, no zero-fill, no atomics): (partials, split count). With
    ``x_sorted`` it also writes the sorted copy of x; ``narrow``: see :func:`shrink_config`."""
    M = x.shape[0]
    SR = A_stack.shape[1]
    interp = _backend.interpreter_enabled()
    split = _shrink_config_of(x, A_stack, meta, S, tile_m, interp, narrow)[3]
    parts = partials(split, M, SR, x.device)
    _launch_shrink(x, A_stack, ranks, meta, parts[0], parts.stride(0), S, tile_m, False, interp, pdl, x_sorted, narrow)
    return parts, split


def sorted_x_buffer(x: torch.Tensor) -> torch.Tensor:
    """The uninitialised [M, K] buffer, in x's dtype, for x's rows in the sorted token order (the shrink writes it
    under GATHER, the sorted TMA GEMM reads it): unit column stride and 16-byte rows (padded), as TMA needs. One
    function so that tests can hand the launchers a poisoned buffer."""
    M, K = x.shape
    per_16 = max(1, 16 // x.element_size())
    return torch.empty(M, triton.cdiv(K, per_16) * per_16, dtype=x.dtype, device=x.device)[:, :K]


def shrink_expand(
    x: torch.Tensor,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: BatchMeta,
    y: torch.Tensor,
    slices: Sequence[int],
    tile_m: int,
) -> torch.Tensor:
    """``y += scale · (x·Aᵀ)·Bᵀ`` per token in two launches (the "split" path after the base GEMM): the shrink
    into per-split fp32 partials, then the expand, which sums its rows' partials before the product. No zero-fill
    launch and no atomics: the same bits on every run (the split count is a host function of the shapes)."""
    if x.shape[0] == 0:
        return y
    parts, n = _shrink_partials(x, A_stack, ranks, meta, len(slices), tile_m, False)
    return _launch_expand(parts[0], n, parts.stride(0), B_stack, ranks, scales, meta, y, slices, tile_m)


def fused_config(
    tile_m: int, R: int, x_bytes: int, a_bytes: int, b_bytes: int, interp: bool, smem: _utils.IntThunk
) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_stages) of the fused kernel; host ints only (shared with the static launch model)."""
    if interp:
        return _INTERP_BLOCK_N, _INTERP_BLOCK_K, 3
    # The expand accumulator is [tile_m, BLOCK_N] fp32 in registers: 256 columns are 32 values per thread at 16
    # rows and 4 warps, but 128-256 at 64-128 rows (spills, and minutes of ptxas for fp32 operands). Keep
    # tile_m · BLOCK_N constant instead (≥ 32 columns).
    block_n = max(32, _FUSED_BLOCK_N * 16 // tile_m)
    # Reserve: the fp32 xa tile and the B tile of the expand step, which also pass through shared memory.
    block_r = _utils.block_r(R)
    reserve = tile_m * block_r * 4 + block_r * block_n * b_bytes
    block_k, stages = _utils.k_pipeline(tile_m, _FUSED_BLOCK_K, block_r, x_bytes, a_bytes, reserve, smem())
    return block_n, block_k, stages


def fused(
    x: torch.Tensor,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: BatchMeta,
    y: torch.Tensor,
    slices: Sequence[int],
    tile_m: int,
) -> torch.Tensor:
    """``y += scale · (x·Aᵀ)·Bᵀ`` per token in one launch (decode sizes: see ``ops.multi_lora.FUSED_MAX_TOKENS``)."""
    M, K = x.shape
    L, N, R = B_stack.shape
    if M == 0:
        return y
    block_n, block_k, stages = fused_config(
        tile_m,
        R,
        x.element_size(),
        A_stack.element_size(),
        B_stack.element_size(),
        _backend.interpreter_enabled(),
        lambda: _utils.smem_of(x.device),
    )
    grid = (meta.max_tiles(M, L, tile_m), _out_blocks(slices, block_n))
    with _utils.device_ctx(y):
        _fused_kernel[grid](
            x,
            A_stack,
            B_stack,
            ranks,
            scales,
            meta.sorted_tokens,
            meta.sorted_slots,
            meta.tile_starts,
            y,
            M,
            K,
            L,
            meta.capacity,
            R,
            *_widths(slices),
            x.stride(0),
            x.stride(1),
            A_stack.stride(0),
            A_stack.stride(1),
            A_stack.stride(2),
            B_stack.stride(0),
            B_stack.stride(1),
            B_stack.stride(2),
            scales.stride(0),
            scales.stride(1),
            y.stride(0),
            y.stride(1),
            BLOCK_M=tile_m,
            BLOCK_R=_utils.block_r(R),
            BLOCK_K=block_k,
            BLOCK_N=block_n,
            CAST_FP32=_utils.cast_to_fp32(x.dtype, A_stack.dtype, B_stack.dtype) or y.dtype == torch.float32,
            num_warps=4,
            num_stages=stages,
        )
    return y


# Base GEMM tiles of the expand-in-GEMM path, by the tokens of the step: (max tokens, BLOCK_M, BLOCK_N, BLOCK_K,
# num_warps, num_stages). Decode (<= 16 rows) is a GEMV in disguise, bound by reading W0 once: 32-column blocks give
# 128 programs at N = 4096 (132 SMs on an H100), a 256-deep K step halves the loop trips. Up to 256 tokens the layer
# is still bound by reading W0, so the tiles stay small enough to give >= 128 programs at N = 4096 (64×64: 256
# programs at 256 tokens, where 128×128 would leave half the SMs idle); past that, 128×128×64 at 8 warps (the fp32
# accumulator is 64 registers per thread) for the compute-bound steps. First guesses from the byte and register
# counts, NOT yet measured on a GPU; the sm_90 compile test checks shared memory and spills.
_GEMM_TILES = (
    (16, 16, 32, 256, 4, 4),
    (32, 32, 64, 128, 4, 4),
    (256, 64, 64, 128, 4, 4),
    (1 << 62, 128, 128, 64, 8, 3),
)
_INTERP_GEMM_BLOCK_N = 16


def gemm_config(
    M: int, x_bytes: int, w_bytes: int, R: int, interp: bool, smem: _utils.IntThunk
) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the expand-in-GEMM kernel for M tokens; ``smem`` a
    callable (asked on a GPU only). Host ints only: shared with the static launch model."""
    _, block_m, block_n, block_k, warps, stages = next(t for t in _GEMM_TILES if M <= t[0])
    if interp:  # at most 32 rows: the tests' small batches still span several row tiles and segments
        return min(block_m, 32), _INTERP_GEMM_BLOCK_N, _INTERP_BLOCK_K, warps, 1
    # Reserve for the epilogue's fp32 xa tile and B tile, which pass through shared memory for the dot.
    block_r = _utils.block_r(R)
    if block_m <= 16 and block_r > 32:
        # the 16-row tile above rank 32: triton 3.6 spilled 12 bytes at BLOCK_K 256 (sm_90, rank 64), 128 compiles
        # to 80 registers and no spills (triton 3.9 spills at neither)
        block_k = min(block_k, 128)
    reserve = block_m * block_r * 4 + block_r * block_n * 4
    block_k, stages = _utils.k_pipeline(block_m, block_k, block_n, x_bytes, w_bytes, reserve, smem(), stages)
    return block_m, block_n, block_k, warps, stages


# The TMA version of the gemm path's GEMM (_gemm_tma_expand_kernel; Hopper and newer): (BLOCK_M, BLOCK_N, BLOCK_K,
# num_warps, num_stages), largest first. The first of them whose tile count keeps _TMA_MIN_BUSY of the SMs busy runs
# (at N = 4096 on 132 SMs: 128 rows → 64×64, 256 → 64×128, 1024 and more → 128×256), else the last (most tiles).
# 128×256×64 at 8 warps is the Triton tutorials' Hopper tile for fp16/bf16 (3 stages: 144 KiB of operand buffers).
# From the static report's tile and byte counts, unmeasured.
_GEMM_TMA_TILES = (
    (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (64, 256, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 128, 4, 4),
)
_TMA_MIN_BUSY = 7 / 8
_TMA_WIDE_MAX_R = 32
# The sorted-copy GEMM (X_SORTED) above rank 32 on the 128×128 tile: triton 3.6 (sm_90) allocated 255 registers and
# spilled 4-8 bytes (rank 64, q|k|v, with or without a bias); 128×64 at 8 warps compiles to 210-238 registers and no
# spills (triton 3.9: 128-173, against 206-243 at 128×128), two programs per SM by registers and shared memory
# (96 KiB). The epilogue's cost per adapter is the same share of the tile's MMA at either width. Unmeasured.
_SORTED_WIDE_R_BLOCK_N = 64
# None: gemm_tma_config picks the tile. One of _GEMM_TMA_TILES' (BLOCK_M, BLOCK_N) pairs, e.g. (128, 128): every TMA
# GEMM of the gemm path on a GPU runs that tile (its K depth and stages as listed, fitted to shared memory; above
# rank 32 only the tiles of at most 128×128 outputs, as without it, and the sorted-copy GEMM's 128×128 there is
# 128×64: _SORTED_WIDE_R_BLOCK_N; the interpreter keeps its small tiles), for
# measuring the choice: fewer, larger tiles re-read less of x and W0 from L2 ((BM + BN)·K per tile: at 256 tokens ×
# 4096² the 64×128 tiles request 201 MB, 128×128 134 MB, 128×256 101 MB) but keep fewer SMs busy
# (benchmarks/bench_multi_lora.py's lk_gemm_t* providers).
GEMM_TMA_TILE: tuple[int, int] | None = None
# False: the gemm path never takes the TMA GEMM (for comparisons: benchmarks/bench_multi_lora.py's lk_gemm_plain).
TMA_GEMM = True
# Above this many tokens the gemm path takes the TMA GEMM where it applies (gemm_tma_ok). Up to 64 tokens the plain
# GEMM's 16- and 32-row tiles stay (predicted 1.14-1.18x the floor there; a TMA tile is at least 64 rows).
GEMM_TMA_MIN_TOKENS = 64
# Tiles under the interpreter: a few row tiles and several output blocks on the tests' sizes.
_INTERP_GEMM_TMA = (32, 16, 32, 4, 1)
# True: where the gemm path's GEMM would be the TMA kernel, _gemm_expand_kernel runs instead with W0 by TMA (W_TMA) and
# the TMA kernel's tiles: rows in the sorted token order, x gathered by row pointers (Hopper's TMA cannot gather), so a
# row tile holds few adapters whatever the order of the ids (~5 per 128 rows for 128 adapters uniform over 4096
# tokens, against ~82 in the batch's own order, whose TF32 epilogue dots cost 64 % of the base GEMM). Off: its rate is
# unmeasured. The static model charges it as a GEMM without TMA (1.35x cuBLAS's time): 1.60x / 1.42x the floor for
# 128 adapters uniform over 1024 / 4096 tokens, behind the split path (1.50x / 1.25x); at cuBLAS's rate 1.21x / 1.06x,
# and ahead of the split path up to ~1.2x / ~1.15x cuBLAS's time. Where the order of the ids keeps the tiles' adapters
# few, the TMA kernel stays ahead at any rate. Its 246-247 registers at 128×256 leave no room for a shrink program on
# its SMs, so PDL would hide only the launch (the model, uncompiled, still charges the overlap; the sorted GEMM of
# SORTED_GATHER beats those figures at the TMA rate). benchmarks/bench_multi_lora.py's lk_gemm_sorted times it. While
# on, the heavy-epilogue rule (tma_epilogue_split) keeps such steps on the gemm path.
SORTED_TMA_GEMM = False
# True: a step the heavy-epilogue rule flags (tma_epilogue_split) where the side path does not apply (SIDE_TERM off, or
# its buffer past SIDE_MAX_BYTES) runs the gemm path with sorted row tiles (linear_gemm's sort_rows, see
# heavy_variant) instead of the split path: the shrink, which reads x's rows in the sorted order anyway,
# also writes them to a sorted copy of x (one more write of x); the GEMM waits for the shrink (no PDL overlap: its
# K loop reads that copy) and then runs _gemm_expand_kernel with x and W0 by TMA on the TMA kernel's tiles
# (X_SORTED), a tile holding few adapters whatever the ids' order (~17 per 128 rows for 128 adapters uniform over 1024
# tokens, ~5 over 4096). Tiles holding rows without an adapter (the end of the sorted list) gather those from x.
# sm_90: 228 / 251 registers at 128×256×64 (without / with bias), 8 warps, no spills; the shrink writing the copy
# 92-96 registers and 44-48 KiB of shared memory (56-72 and 48-60 KiB without).
# Static serving model (H100, charged at the TMA GEMM's rate, as every TMA GEMM here; unmeasured): 128 adapters
# uniform over 1024 / 4096 tokens 1.40x / 1.19x the floor, against 1.50x / 1.25x on the split path and 1.72x / 1.66x
# on the TMA GEMM in the ids' own order. When to take it: SORTED_MIN_TOKENS, SORTED_MAX_COST.
# False: such steps take the split path (EPILOGUE_SPLIT_MIN_TOKENS, EPILOGUE_SPLIT_MAX_COST).
SORTED_GATHER = True


def gemm_tma_config(
    M: int,
    slices: Sequence[int],
    x_bytes: int,
    R: int,
    interp: bool,
    smem: _utils.IntThunk,
    sms: _utils.IntThunk,
    x_sorted: bool = False,
) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of _gemm_tma_expand_kernel for M tokens; ``smem`` and
    ``sms`` callables (asked on a GPU only). ``x_sorted``: the tiles of the sorted-copy GEMM (_gemm_expand_kernel with
    X_SORTED), the same except above rank 32 (_SORTED_WIDE_R_BLOCK_N). Host ints only: shared with the static launch
    model."""
    if interp:
        return _INTERP_GEMM_TMA
    n_sms = sms()
    block_r = _utils.block_r(R)
    # Ranks above 32: the epilogue's fp32 xa [BLOCK_M, BLOCK_R] and B [BLOCK_R, BLOCK_N] tiles next to a 128×256
    # accumulator spilled on sm_90 (rank 64: 80 bytes at 8 warps, 255 registers); at most 128×128 outputs there.
    tiles = [t for t in _GEMM_TMA_TILES if block_r <= _TMA_WIDE_MAX_R or t[0] * t[1] <= 128 * 128]
    if GEMM_TMA_TILE is not None:
        tile = next((t for t in tiles if tuple(t[:2]) == tuple(GEMM_TMA_TILE)), None)
        if tile is None:
            raise ValueError(
                f"GEMM_TMA_TILE = {GEMM_TMA_TILE!r} is not a tile of the TMA GEMM at rank {R}; choose one of "
                + ", ".join(f"({t[0]}, {t[1]})" for t in tiles)
                + " or None"
            )
    else:
        tile = next(
            (t for t in tiles if triton.cdiv(M, t[0]) * _out_blocks(slices, t[1]) >= _TMA_MIN_BUSY * n_sms),
            tiles[-1],
        )
    block_m, block_n, block_k, warps, stages = tile
    if x_sorted and block_r > _TMA_WIDE_MAX_R and block_m * block_n > 128 * _SORTED_WIDE_R_BLOCK_N:
        block_n = _SORTED_WIDE_R_BLOCK_N
    reserve = block_m * block_r * 4 + block_r * block_n * 4  # the epilogue's fp32 xa and B tiles
    block_k, stages = _utils.k_pipeline(block_m, block_k, block_n, x_bytes, x_bytes, reserve, smem(), stages)
    return block_m, block_n, block_k, warps, stages


def gemm_tma_ok(x: torch.Tensor, weight: torch.Tensor, check_addresses: bool = True) -> bool:
    """True when the gemm path's GEMM for this x [M, K] and weight [N, K] is _gemm_tma_expand_kernel: TMA_GEMM on,
    more than GEMM_TMA_MIN_TOKENS rows, fp16/bf16 x and weight of one dtype, and what TMA can read on this device
    (``lora_linear_tma.tma_supported``: Hopper or newer, or the interpreter; 16-byte aligned base addresses and row
    strides). ``check_addresses=False`` judges the strides only (tensors being traced have no addresses; the launcher
    checks again and falls back to _gemm_expand_kernel)."""
    from . import lora_linear_tma as _tma

    if not TMA_GEMM or x.dim() != 2 or x.shape[0] <= GEMM_TMA_MIN_TOKENS:
        return False
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False
    return _tma.tma_supported(x, weight, addresses=check_addresses)


# The TMA GEMM's epilogue adds one masked [BLOCK_M, BLOCK_R] × [BLOCK_R, BLOCK_N] dot per distinct adapter of a row
# tile, on fp32 operands (xa is never rounded: TF32 MMA, `HGMMA.*.TF32` in the sm_90 SASS, half the 16-bit rate), so
# d adapters per tile cost 2·d·BLOCK_R / K of the base GEMM's MMA time. With SORTED_GATHER off, from
# EPILOGUE_SPLIT_MIN_TOKENS tokens (the step is compute-bound: the epilogue no longer hides under W0's read) a step
# whose tiles average more than EPILOGUE_SPLIT_MAX_COST of that takes the split path by default (cuBLAS, the shrink
# and the expand: y read and written again, one more launch), when its ids are known on the host
# (:func:`tma_epilogue_split`; with SORTED_GATHER on, the sorted-row GEMM's thresholds below apply). Static serving
# model (H100, K = N = 4096, r = 16, ids uniform over 16-512 adapters, 288-8192 tokens; unmeasured): 128 adapters
# uniform over 1024 / 4096 tokens (~82 per 128-row tile: 0.64) 1.72x / 1.66x the floor on the gemm path against
# 1.50x / 1.25x on the split path; 64 adapters (0.44) 1.49x / 1.45x against 1.38x / 1.23x; 32 adapters (0.25) within
# 5 % either way, so they stay; below 1024 tokens the gemm path wins or ties at every adapter count (at 512 tokens
# 256 adapters: 1.38x against 1.51x).
EPILOGUE_SPLIT_MIN_TOKENS = 1024
EPILOGUE_SPLIT_MAX_COST = 0.4


# With SORTED_GATHER the alternative to a heavy epilogue is the sorted-row GEMM, not the split path: it pays a
# write of x and its shrink no longer overlaps the GEMM, so it wins earlier, but only where sorting gathers each
# adapter's tokens into fewer tiles, i.e. where adapters have several tokens each. Static serving model (H100, K = N =
# 4096, r = 16, ids uniform over 16-1024 adapters and 256-8192 tokens; unmeasured): from 512 tokens, a cost above 0.15
# of the base GEMM (~20 adapters per 128-row tile), and at least 2 tokens per adapter present, picks the faster of
# the two gemm GEMMs within 1.3 % at every point (the split path's thresholds above: up to 19 % off); 128 adapters
# uniform over 1024 / 4096 tokens 1.40x / 1.19x the floor against the split path's 1.50x / 1.25x; 1024 adapters over
# 1024 tokens (one token each, ~80 adapters per sorted tile as well) stay on the TMA GEMM (1.41x against 1.53x).
SORTED_MIN_TOKENS = 512
SORTED_MAX_COST = 0.15
SORTED_MIN_TOKENS_PER_ADAPTER = 2

# True: a heavy-epilogue step takes the side path where it applies (side_for), before the sorted-row GEMM: the LoRA
# term whole, in fp32, from _lora_side_kernel (shrink and expand per tile of the sorted list, a persistent grid of at
# most one program per SM), into a buffer that the TMA GEMM (rows in the ids' own order) adds in its epilogue with
# one TMA load per tile, launched as its programmatic dependent: the side kernel's reads (x, the adapters' A and B)
# and its fp32 writes run while the GEMM computes, which waits for it only before its epilogue; no dot per adapter in
# the epilogue, whatever the adapters per tile, and no copy of x. It costs the fp32 buffer's write and read (4 bytes
# per output element each way), which a compute-bound step hides. Static serving model (H100, K = N = 4096, r = 16,
# the GEMM charged at the TMA GEMM's rate, the side kernel's dots at the skinny kernels' rate and beside it; the pair
# fits on one SM by its compiled registers and shared memory; unmeasured): 128 adapters uniform over 1024 / 4096
# tokens 1.13x / 1.06x the floor (sorted-row GEMM 1.40x / 1.19x), 16 adapters 1.09x / 1.04x (the TMA GEMM with its
# epilogue dots 1.17x / 1.14x). Below 512 tokens the step is not compute-bound enough to hide the buffer (256 tokens:
# 1.17-1.43x against 1.08-1.22x). Rule (epilogue_side): from 512 tokens and an epilogue cost above 0.05 (~6 adapters per
# 128-row tile at K = 4096, r = 16); over ids uniform on 2-1024 adapters and 256-8192 tokens it picks the faster of the
# side path and the TMA GEMM in the ids' order within 2 % at every point but one: 1024 adapters over 512 tokens (~400
# adapters of ~1.3 tokens: 1.18x against 1.09x).
SIDE_TERM = True
SIDE_MIN_TOKENS = 512
SIDE_MAX_COST = 0.05
# The fp32 buffer is M·N·4 bytes (64 MiB at 4096 tokens × 4096 outputs): above this, the step takes the sorted-row GEMM
# (or the split path) instead, whose extra buffers are 2 bytes per input element.
SIDE_MAX_BYTES = 1 << 28


def epilogue_cost(K: int, R: int, adapters_per_tile: float) -> float:
    """The TF32 epilogue dots of a TMA-GEMM row tile averaging ``adapters_per_tile`` adapters of rank <= R, as a
    fraction of the base GEMM's MMA time: 2·d·BLOCK_R / K."""
    return 2 * adapters_per_tile * _utils.block_r(R) / K


def epilogue_split(M: int, K: int, R: int, adapters_per_tile: float) -> bool:
    """True when a TMA-GEMM step of M tokens whose row tiles average ``adapters_per_tile`` adapters of rank <= R
    costs more in its TF32 epilogue than the split path's round trip of y (EPILOGUE_SPLIT_MIN_TOKENS,
    EPILOGUE_SPLIT_MAX_COST)."""
    return M >= EPILOGUE_SPLIT_MIN_TOKENS and epilogue_cost(K, R, adapters_per_tile) > EPILOGUE_SPLIT_MAX_COST


def epilogue_sorted(M: int, K: int, R: int, adapters_per_tile: float, adapters: int) -> bool:
    """True when a TMA-GEMM step of M tokens on ``adapters`` distinct adapters, whose row tiles average
    ``adapters_per_tile`` of them, should take the sorted-row GEMM instead (SORTED_MIN_TOKENS, SORTED_MAX_COST,
    SORTED_MIN_TOKENS_PER_ADAPTER)."""
    return (
        M >= SORTED_MIN_TOKENS
        and M >= SORTED_MIN_TOKENS_PER_ADAPTER * adapters
        and epilogue_cost(K, R, adapters_per_tile) > SORTED_MAX_COST
    )


def side_cols(N: int) -> int:
    """Columns of a row of the side path's fp32 buffer for N outputs: padded to 4 (16 bytes) for TMA."""
    return -(-N // 4) * 4


def side_for(M: int, N: int) -> bool:
    """Whether a heavy-epilogue step of M tokens and N outputs takes the side path (SIDE_TERM, SIDE_MAX_BYTES)."""
    return SIDE_TERM and not SORTED_TMA_GEMM and M * side_cols(N) * 4 <= SIDE_MAX_BYTES


def epilogue_side(M: int, K: int, R: int, adapters_per_tile: float) -> bool:
    """True when a TMA-GEMM step of M tokens whose row tiles average ``adapters_per_tile`` adapters of rank <= R
    should take the side path (SIDE_MIN_TOKENS, SIDE_MAX_COST on :func:`epilogue_cost`)."""
    return M >= SIDE_MIN_TOKENS and epilogue_cost(K, R, adapters_per_tile) > SIDE_MAX_COST


def heavy_variant(M: int, N: int) -> str:
    """What a heavy-epilogue step of M tokens and N outputs runs: "side" (:func:`side_for`), "sorted" (the sorted-row
    GEMM, SORTED_GATHER) or "split"."""
    return "side" if side_for(M, N) else "sorted" if SORTED_GATHER else "split"


def heavy_epilogue(
    M: int,
    K: int,
    R: int,
    slices: Sequence[int],
    elt: int,
    tile_adapters: Callable[[int], float | None],
    interp: bool,
    smem: _utils.IntThunk,
    sms: _utils.IntThunk,
    adapters: int | None = None,
) -> bool:
    """Whether a step of M tokens of ``elt``-byte data on ``adapters`` distinct adapters of rank <= R leaves the TMA
    GEMM in the ids' own order: :func:`epilogue_sorted` with SORTED_GATHER (for the sorted-row GEMM; ``adapters``
    None: unknown, no), else :func:`epilogue_split` (for the split path), with the row tile :func:`gemm_tma_config`
    picks (``smem`` and ``sms`` asked only past the token bound); ``tile_adapters(rows)`` gives the mean distinct
    adapters per row tile of that height (``LoRABatch.tile_adapters``; None: unknown, no). False with
    SORTED_TMA_GEMM: that GEMM's sorted row tiles hold few adapters whatever the ids' order. Host ints only: shared
    with the static launch model."""
    variant = heavy_variant(M, sum(slices))
    least = {"side": SIDE_MIN_TOKENS, "sorted": SORTED_MIN_TOKENS, "split": EPILOGUE_SPLIT_MIN_TOKENS}[variant]
    if SORTED_TMA_GEMM or M < least:
        return False
    if variant == "sorted" and adapters is None:
        return False
    block_m = gemm_tma_config(M, slices, elt, R, interp, smem, sms)[0]
    per_tile = tile_adapters(block_m)
    if per_tile is None:
        return False
    if variant == "side":
        return epilogue_side(M, K, R, per_tile)
    return epilogue_sorted(M, K, R, per_tile, adapters) if variant == "sorted" else epilogue_split(M, K, R, per_tile)


def tma_epilogue_split(
    x: torch.Tensor,
    tile_adapters: Callable[[int], float | None],
    R: int,
    slices: Sequence[int],
    interp: bool | None = None,
    adapters: int | None = None,
) -> bool:
    """:func:`heavy_epilogue` for x [M, K] on x's device."""
    interp = _backend.interpreter_enabled() if interp is None else interp
    return heavy_epilogue(
        *x.shape,
        R,
        slices,
        x.element_size(),
        tile_adapters,
        interp,
        lambda: _utils.smem_of(x.device),
        lambda: _utils.sm_count_of(x.device),
        adapters,
    )


# The side path's kernel (_lora_side_kernel) runs beside the TMA GEMM's programs (one 8-warp 128×256 GEMM program with
# SIDE per SM takes 164-180 registers × 256 threads and 144 KiB on sm_90): 4 warps, a 128-deep K step in 2 stages
# (the shrink's x and A tiles: 14-40 KiB at 32-64 rows, rank 16) and an expand block of 2048 / tile_m columns
# ([tile_m, BLOCK_N] fp32: 16 values per thread); 80-88 registers. So its program fits in what the GEMM leaves
# (checked by compiling: the sm_90 compile test and the static serving report's co_resident). Unmeasured.
_SIDE_BLOCK_K = 128
_SIDE_STAGES = 2
_SIDE_ACC = 2048  # tile_m × BLOCK_N of the expand step
_INTERP_SIDE_PROGRAMS = 3  # fewer than the tests' work items: programs loop


def side_config(
    M: int, L: int, slices: Sequence[int], tile_m: int, cap: int, interp: bool, sms: _utils.IntThunk
) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_K, BLOCK_N, num_stages, column parts, work items, programs) of _lora_side_kernel for M tokens of a batch
    of capacity ``cap`` cut into ``tile_m``-row tiles: a persistent grid of at most one program per SM, over items
    (tile, slice, column part) with as many parts as bring the items to the SM count (each slice keeps at least one
    block per part). Host ints only: shared with the static launch model."""
    if interp:
        block_k, block_n, stages, programs = _INTERP_BLOCK_K, _INTERP_BLOCK_N, 1, _INTERP_SIDE_PROGRAMS
    else:
        block_k, block_n, stages, programs = _SIDE_BLOCK_K, max(16, _SIDE_ACC // tile_m), _SIDE_STAGES, sms()
    tiles = max_tiles(M, L, tile_m, cap) * len(slices)
    min_blocks = min(triton.cdiv(n, block_n) for n in slices)
    parts = max(1, min(min_blocks, triton.cdiv(programs, tiles)))
    items = tiles * parts
    return block_k, block_n, stages, parts, items, min(items, programs)


def side_buffer(M: int, N: int, device: torch.device) -> torch.Tensor:
    """The side path's fp32 LoRA term [M, N] (uninitialised: the side kernel writes the rows with an adapter, the
    GEMM adds only those), rows padded to 4 elements (16 bytes) for TMA."""
    return torch.empty(M, side_cols(N), dtype=torch.float32, device=device)[:, :N]


def _launch_side(x, A_stack, B_stack, ranks, scales, meta, slices, tile_m, side, pdl, interp) -> None:
    """_lora_side_kernel into ``side`` (:func:`side_buffer`)."""
    M, K = x.shape
    L, N, R = B_stack.shape
    block_k, block_n, stages, parts, items, programs = side_config(
        M, L, slices, tile_m, meta.capacity, interp, lambda: _utils.sm_count_of(x.device)
    )
    with _utils.device_ctx(x):
        _lora_side_kernel[(programs,)](
            x,
            A_stack,
            B_stack,
            ranks,
            scales,
            meta.sorted_tokens,
            meta.sorted_slots,
            meta.tile_starts,
            side,
            M,
            K,
            L,
            meta.capacity,
            R,
            *_widths(slices),
            len(slices),
            parts,
            items,
            x.stride(0),
            x.stride(1),
            A_stack.stride(0),
            A_stack.stride(1),
            A_stack.stride(2),
            B_stack.stride(0),
            B_stack.stride(1),
            B_stack.stride(2),
            scales.stride(0),
            scales.stride(1),
            side.stride(0),
            BLOCK_M=tile_m,
            BLOCK_R=_utils.block_r(R),
            BLOCK_K=block_k,
            BLOCK_N=block_n,
            CAST_FP32=_utils.cast_to_fp32(x.dtype, A_stack.dtype, B_stack.dtype),
            PDL=pdl,
            num_warps=4,
            num_stages=stages,
        )


def _tma_tiles(
    x: torch.Tensor, slices: Sequence[int], R: int, interp: bool, x_sorted: bool = False
) -> tuple[int, int, int, int, int]:
    """:func:`gemm_tma_config` for x [M, K] on x's device."""
    return gemm_tma_config(
        x.shape[0],
        slices,
        x.element_size(),
        R,
        interp,
        lambda: _utils.smem_of(x.device),
        lambda: _utils.sm_count_of(x.device),
        x_sorted,
    )


def linear_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: BatchMeta,
    slices: Sequence[int],
    tile_m: int,
    lanes: int = 0,
    sort_rows: bool = False,
) -> torch.Tensor:
    """``y = x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ`` per token's adapter, y new ``[M, N]`` in x's dtype: two launches,
    the shrink into per-split fp32 partials (no zero-fill: rows without an adapter are never read) and the base GEMM
    with the expand in its epilogue (y written once, never read). Needs the batch prepared for exactly M tokens
    (the GEMM's row tiles walk positions 0..M-1 of the sorted list; the op checks it). ``lanes`` > 0: one launch
    instead, the shrink inside the GEMM (:func:`linear_lanes`; see :func:`lanes_for`). ``sort_rows`` (where the GEMM
    would be the TMA kernel: a heavy-epilogue step, see :func:`heavy_variant`): the side path (SIDE_TERM: the side
    kernel's fp32 LoRA term added by the TMA GEMM), else the GEMM's row tiles follow the sorted token list, x read by
    TMA from a sorted copy that the shrink writes (see SORTED_GATHER)."""
    if lanes:
        return linear_lanes(x, weight, bias, A_stack, B_stack, ranks, scales, meta, slices, lanes)
    M, K = x.shape
    N = weight.shape[0]
    L, SR, _ = A_stack.shape
    S = len(slices)
    R = SR // S
    cap = meta.capacity
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    interp = _backend.interpreter_enabled()
    pdl = pdl_ok(x.device)
    w_tma = gemm_tma_ok(x, weight)
    side_term = sort_rows and w_tma and heavy_variant(M, N) == "side"
    x_sorted = sorted_x_buffer(x) if sort_rows and w_tma and not side_term else None
    tma_tiles = _tma_tiles(x, slices, R, interp) if w_tma else None
    grid = None
    if joined_for(M, w_tma, sort_rows):
        grid = joined_grid(
            M,
            L,
            slices,
            R,
            tile_m,
            cap,
            tma_tiles,
            x.element_size(),
            interp,
            lambda: _utils.smem_of(x.device),
            lambda: _utils.sm_count_of(x.device),
        )
    if grid is not None:
        sync = _SYNC.get(x.device)
        if sync is not None:
            _launch_joined(
                x, weight, bias, A_stack, B_stack, ranks, scales, meta, slices, tile_m, y, interp, tma_tiles, grid, sync
            )
            return y
    if side_term:  # the LoRA term whole into an fp32 buffer, beside the TMA GEMM, which adds it in its epilogue
        side = side_buffer(M, N, x.device)
        _launch_side(x, A_stack, B_stack, ranks, scales, meta, slices, tile_m, side, pdl, interp)
        _launch_gemm_tma(x, weight, bias, side, 1, B_stack, ranks, scales, meta, slices, y, pdl, interp, tma_tiles)
        return y
    # a shrink that overlaps an 8-warp TMA GEMM takes its narrower K blocks (its programs fit beside the GEMM's)
    narrow = pdl and w_tma and x_sorted is None and tma_tiles[3] == 8
    parts, n_splits = _shrink_partials(x, A_stack, ranks, meta, S, tile_m, pdl, x_sorted, narrow)
    if w_tma and not SORTED_TMA_GEMM and x_sorted is None:
        _launch_gemm_tma(
            x, weight, bias, parts, n_splits, B_stack, ranks, scales, meta, slices, y, pdl, interp, tma_tiles
        )
        return y
    if w_tma:  # sorted rows, W0 by TMA: the TMA GEMM's tiles
        from . import lora_linear_tma as _tma

        block_m, block_n, gk, warps, gstages = tma_tiles
        if x_sorted is not None:
            block_m, block_n, gk, warps, gstages = _tma_tiles(x, slices, R, interp, x_sorted=True)
        _tma.ensure_allocator(x.device)
    else:
        block_m, block_n, gk, warps, gstages = gemm_config(
            M, x.element_size(), weight.element_size(), R, interp, lambda: _utils.smem_of(x.device)
        )
    grid = (triton.cdiv(min(M, cap), block_m), _out_blocks(slices, block_n))
    with _utils.device_ctx(x):
        _gemm_expand_kernel[grid](
            x,
            x_sorted if x_sorted is not None else x,
            weight,
            bias if bias is not None else weight,
            parts,
            B_stack,
            ranks,
            scales,
            meta.sorted_tokens,
            meta.sorted_slots,
            y,
            M,
            K,
            L,
            cap,
            R,
            *_widths(slices),
            n_splits,
            x.stride(0),
            x.stride(1),
            x_sorted.stride(0) if x_sorted is not None else 0,
            weight.stride(0),
            weight.stride(1),
            parts.stride(0),
            parts.stride(1),
            parts.stride(2),
            B_stack.stride(0),
            B_stack.stride(1),
            B_stack.stride(2),
            scales.stride(0),
            scales.stride(1),
            y.stride(0),
            y.stride(1),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=gk,
            BLOCK_R=_utils.block_r(R),
            HAS_BIAS=bias is not None,
            CAST_FP32=_utils.cast_to_fp32(x.dtype, weight.dtype),
            LORA_IEEE=_utils.cast_to_fp32(B_stack.dtype) or x.dtype == torch.float32,
            PDL=pdl,
            W_TMA=w_tma,
            X_SORTED=x_sorted is not None,
            num_warps=warps,
            num_stages=gstages,
            **({"launch_pdl": True} if pdl else {}),
        )
    return y


def _launch_gemm_tma(
    x, weight, bias, parts, n_splits, B_stack, ranks, scales, meta, slices, y, pdl, interp, tiles
) -> None:
    """The TMA GEMM with the expand in its epilogue (see linear_gemm), rows in the batch's own order, on ``tiles``
    (:func:`gemm_tma_config`). ``parts`` [M, >= N] (2-D): the side path's fp32 LoRA term, added whole (SIDE)."""
    from . import lora_linear_tma as _tma

    M, K = x.shape
    L, _, R = B_stack.shape
    side = parts.dim() == 2
    if side:
        parts = parts[None]  # [1, M, N]: stride(1) is the row stride the epilogue's TMA load takes
    block_m, block_n, block_k, warps, stages = tiles
    grid = (triton.cdiv(M, block_m), _out_blocks(slices, block_n))
    _tma.ensure_allocator(x.device)
    with _utils.device_ctx(x):
        _gemm_tma_expand_kernel[grid](
            x,
            weight,
            bias if bias is not None else weight,
            parts,
            B_stack,
            ranks,
            scales,
            meta.token_slots,
            y,
            M,
            K,
            L,
            R,
            *_widths(slices),
            n_splits,
            x.stride(0),
            weight.stride(0),
            parts.stride(0),
            parts.stride(1),
            parts.stride(2),
            B_stack.stride(0),
            B_stack.stride(1),
            B_stack.stride(2),
            scales.stride(0),
            scales.stride(1),
            y.stride(0),
            y.stride(1),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_R=_utils.block_r(R),
            HAS_BIAS=bias is not None,
            UPCAST=_utils.interpreter_bf16(x.dtype),
            LORA_IEEE=_utils.cast_to_fp32(B_stack.dtype),
            PDL=pdl,
            SIDE=side,
            num_warps=warps,
            num_stages=stages,
            **({"launch_pdl": True} if pdl else {}),
        )


# The gemm path's TMA steps in one launch (_gemm_tma_joined_kernel, opt-in): the shrink's work items and the GEMM's
# output tiles in one grid, the tiles' epilogues waiting on a counter the items release. What it saves, by the static
# serving model (benchmarks/static_serving.py, H100, K = N = 4096, r = 16): the GEMM's own graph node (PDL_LAUNCH_US,
# 2.0 us assumed) and the second read of x (2 MB at 256 tokens): every 256-token point of the grid at 1.00x the floor
# (the `mix` ones from 1.21x, `uniform`/16 from 1.20x). Off until a GPU run has checked it (tests-serving) and timed it
# (provider lk_joined of bench_multi_lora.py) against the PDL pair, whose launch may cost less than assumed.
JOINED = False
# Up to this many tokens (a step whose GEMM streams W0 about as fast as it computes: at K = N = 4096 up to ~290 tokens
# on an H100), and only where all the programs fit on the SMs at once (joined_grid); beyond, the PDL pair overlaps the
# shrink's reads with the GEMM's compute, where the items would run before the GEMM's single wave of tiles.
JOINED_MAX_TOKENS = 512
# Polls of the items counter (an L2 round trip each, ~0.5 us on an H100) before a tile computes the shrink itself:
# ~8 ms, only reached when the item programs could not start (SMs held by other work).
JOINED_SPINS = 1 << 14
_INTERP_JOINED_SPINS = 2
_INTERP_JOINED_ITEM_PROGRAMS = 3  # fewer than the tests' work items: item programs loop
_JOINED_ITEMS_FIRST = True  # tests: False puts the items after the tiles (the interpreter then runs every fallback)
# Item programs of the joined kernel, each looping over the shrink's work items (tiles × slices): the grid stays the
# GEMM's tiles plus at most these. At 256 tokens the TMA GEMM's 128 tiles of 64×128 run two per SM (264 places on
# an H100), so 32 item programs start beside all of them; a 256-token step has 16 + (adapters present) real work
# items at 16-row tiles (the grid's bound, cdiv(M, tile_m) + min(M, L), counts one per pool slot: 144 at 128 slots).
JOINED_ITEM_PROGRAMS = 32
_SYNC_SLOTS = 4096


class _SyncSlots:
    """Zeroed int32 pairs, the joined kernel's counters, which every launch leaves at zero. An eager call takes its
    stream's pair (launches on one stream run one after another; the CPU interpreter: its thread's), so two request
    threads on two streams never share one; a call captured into a CUDA graph takes a pair of its own for good (the
    graph may replay on any stream, beside another graph). None while capturing before any eager call made the
    buffer (zeroing it then would be a node of the graph), or once all are taken: the caller runs the two launches."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bufs: dict = {}
        self.taken: dict = {}
        self.by_stream: dict = {}
        self.warned = False

    def get(self, device: torch.device) -> torch.Tensor | None:
        dev = (device.type, device.index)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device).cuda_stream
        else:
            stream = threading.get_ident()
        with self.lock:
            buf = self.bufs.get(dev)
            if buf is None:
                if capturing:
                    return None
                buf = self.bufs[dev] = torch.zeros(_SYNC_SLOTS, 2, dtype=torch.int32, device=device)
                self.taken[dev] = 0
            if not capturing and (dev, stream) in self.by_stream:
                return buf[self.by_stream[(dev, stream)]]
            if self.taken[dev] >= _SYNC_SLOTS:
                if not self.warned:
                    self.warned = True
                    warnings.warn(
                        f"lora_kernels: all {_SYNC_SLOTS} counters of the one-launch gemm path are taken (one per "
                        "stream, one per call captured into a CUDA graph); further calls run two launches",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                return None
            idx = self.taken[dev]
            self.taken[dev] += 1
            if not capturing:
                self.by_stream[(dev, stream)] = idx
            return buf[idx]


_SYNC = _SyncSlots()


def joined_for(M: int, w_tma: bool, sort_rows: bool, forced: bool = False) -> bool:
    """Whether a gemm-path step of M tokens may run in one launch (_gemm_tma_joined_kernel): JOINED on (or
    ``forced``), the GEMM the TMA kernel on rows in the batch's own order, at most JOINED_MAX_TOKENS tokens; then
    :func:`joined_grid` must fit. Host ints only (the static model's rule too)."""
    return (JOINED or forced) and w_tma and not sort_rows and not SORTED_TMA_GEMM and M <= JOINED_MAX_TOKENS


def joined_grid(
    M: int,
    L: int,
    slices: Sequence[int],
    R: int,
    tile_m: int,
    cap: int,
    tiles: tuple[int, int, int, int, int],
    elt: int,
    interp: bool,
    smem: _utils.IntThunk,
    sms: _utils.IntThunk,
) -> tuple[int, int] | None:
    """(work items, item programs) of the joined kernel for M tokens on TMA tiles ``tiles`` (:func:`gemm_tma_config`),
    or None where its programs could not all be resident at once (by shared memory: the tiles' pipeline buffers and
    the epilogue's fp32 tiles at rank R, as gemm_tma_config counts them, an upper bound of what sm_90 compiles to,
    plus the 1 KiB the hardware reserves per block): the item programs must run beside the tiles, not hold SMs that
    tiles wait for. At K = N = 4096 on an H100 it fits at 193 to 384 tokens (64×128 tiles,
    two per SM) and not at 65 to 192 (64×64×128 tiles take 128 KiB: one per SM, which the tiles fill) nor from 385
    (128×128 on 8 warps). ``smem`` and ``sms`` callables (asked on a GPU only)."""
    n_work = max_tiles(M, L, tile_m, cap) * len(slices)
    n_items = min(n_work, _INTERP_JOINED_ITEM_PROGRAMS if interp else JOINED_ITEM_PROGRAMS)
    if interp:
        return n_work, n_items
    per_sm = tma_programs_per_sm(tiles, R, elt, smem())
    n_tiles = triton.cdiv(M, tiles[0]) * _out_blocks(slices, tiles[1])
    return (n_work, n_items) if n_items + n_tiles <= per_sm * sms() else None


def tma_programs_per_sm(tiles: tuple[int, int, int, int, int], R: int, elt: int, smem: int) -> int:
    """Programs of a TMA GEMM on ``tiles`` (:func:`gemm_tma_config`) that ``smem`` bytes of shared memory hold, by its
    pipeline buffers and the epilogue's fp32 tiles at rank R, as gemm_tma_config counts them (an upper bound of what
    sm_90 compiles to), plus the 1 KiB the hardware reserves per block. Host ints only (the static model's too)."""
    bm, bn, bk, _, stages = tiles
    return smem // (stages * (bm + bn) * bk * elt + (bm + bn) * _utils.block_r(R) * 4 + 1024)


def _launch_joined(
    x, weight, bias, A_stack, B_stack, ranks, scales, meta, slices, tile_m, y, interp, tiles, grid, sync
) -> None:
    """The gemm path's TMA step in one launch (see JOINED): item programs running the shrink's work items (tiles of
    the sorted list × slices, the whole K each) first, then the TMA GEMM's tiles; xa in one fp32 partial. ``grid``:
    (work items, item programs) from :func:`joined_grid`."""
    from . import lora_linear_tma as _tma

    M, K = x.shape
    L, SR, _ = A_stack.shape
    S = len(slices)
    R = SR // S
    block_m, block_n, block_k, warps, stages = tiles
    n_work, n_items = grid
    shrink_k = _shrink_config_of(x, A_stack, meta, S, tile_m, interp, False)[1]
    m_tiles = triton.cdiv(M, block_m)
    xa = partials(1, M, SR, x.device)[0]
    _tma.ensure_allocator(x.device)
    with _utils.device_ctx(x):
        _gemm_tma_joined_kernel[(n_items + m_tiles * _out_blocks(slices, block_n),)](
            x,
            weight,
            bias if bias is not None else weight,
            A_stack,
            xa,
            B_stack,
            ranks,
            scales,
            meta.token_slots,
            meta.sorted_tokens,
            meta.sorted_slots,
            meta.tile_starts,
            y,
            sync,
            M,
            K,
            L,
            meta.capacity,
            R,
            *_widths(slices),
            n_work,
            n_items,
            m_tiles,
            _INTERP_JOINED_SPINS if interp else JOINED_SPINS,
            x.stride(0),
            weight.stride(0),
            A_stack.stride(0),
            A_stack.stride(1),
            A_stack.stride(2),
            xa.stride(0),
            xa.stride(1),
            B_stack.stride(0),
            B_stack.stride(1),
            B_stack.stride(2),
            scales.stride(0),
            scales.stride(1),
            y.stride(0),
            y.stride(1),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_R=_utils.block_r(R),
            SHRINK_M=tile_m,
            SHRINK_K=shrink_k,
            NUM_SLICES=S,
            HAS_BIAS=bias is not None,
            UPCAST=_utils.interpreter_bf16(x.dtype),
            CAST_FP32=_utils.cast_to_fp32(x.dtype, A_stack.dtype),
            LORA_IEEE=_utils.cast_to_fp32(B_stack.dtype),
            ITEMS_FIRST=_JOINED_ITEMS_FIRST,
            num_warps=warps,
            num_stages=stages,
        )


# The one-launch gemm path (_gemm_lanes_kernel): the shrink of up to LANE_COLS // BLOCK_R adapters rides along the base
# K loop as one extra dot of the x tile against their stacked A rows, so x·Aᵀ needs no launch and no buffer of its own.
# 64 stacked columns (4 adapters at rank 16): the extra MMA is 64 / BLOCK_N of the base's (free while the step is
# bound by reading W0, as decode steps are: predicted at 64 tokens, 2.1 GFLOP of base against 34 MB of W0), and the
# A rows re-read from L2 per output block stay at 2x the W0 strip a 32-column program streams.
LANE_COLS = 64
# Up to this many tokens the gemm path runs the one-launch kernel when the step's adapters are known to fit its lanes
# (LoRABatch: from host ids, or its max_adapters promise). Past 64 tokens its non-TMA tiles are predicted slower than
# the two-launch TMA GEMM once the extra MMA of the lanes counts (a 64-row tile is half compute-bound at 256 tokens).
LANES_MAX_TOKENS = 64
# False: the gemm path always takes two launches (for comparisons: benchmarks/bench_multi_lora.py's lk_gemm_2l).
LANES_GEMM = True
# (max tokens, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the single-adapter decode kernel's output tiles
# (lora_decode.DECODE_TILES, the same one pass over W0 with a shrink beside it): 16 × 32 up to 16 tokens (128
# programs at N = 4096), one 64-row tile (wgmma) × 64 columns up to 64, then 64 × 128. The 64 stacked A columns
# change the rest (sm_90 compiles, 4 lanes of rank 16, bf16): at 16 rows BLOCK_K = 128 takes 138 registers and
# 4 stages in 84 KiB, 256 takes 182 and only 3 stages fit 112 KiB; at 64 rows 4 warps took 250 registers, 8 warps
# (two warpgroups sharing the columns) 169. Unmeasured; the sm_90 compile test checks shared memory and spills.
_LANES_TILES = ((16, 16, 32, 128, 4, 4), (64, 64, 64, 128, 8, 4), (1 << 62, 64, 128, 64, 8, 4))
_INTERP_LANES = (16, 16, 32)  # BLOCK_M, BLOCK_N, BLOCK_K under the interpreter: several blocks at the tests' sizes


def max_lanes(R: int) -> int:
    """The most adapters one lane group of _gemm_lanes_kernel holds at rank R: LANE_COLS // BLOCK_R (0 above rank
    64: no one-launch path there)."""
    return LANE_COLS // _utils.block_r(R)


def lanes_for(M: int, R: int, adapters: int | None) -> int:
    """The LANES of the one-launch gemm path for a step of M tokens known to hold at most ``adapters`` distinct
    adapters (None: unknown), or 0 when the step should take the two-launch path: too many tokens, too many or
    unknown adapters. A power of two: the next one >= the adapters (1 for none)."""
    if not LANES_GEMM or adapters is None or M > LANES_MAX_TOKENS or adapters > max_lanes(R):
        return 0  # (also above rank 64, where max_lanes is 0)
    return triton.next_power_of_2(max(1, adapters))


def lanes_config(
    M: int, R: int, lanes: int, x_bytes: int, w_bytes: int, interp: bool, smem: _utils.IntThunk
) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of _gemm_lanes_kernel for M tokens and ``lanes`` lanes of
    rank R; ``smem`` a callable (asked on a GPU only). Host ints only: shared with the static launch model."""
    _, block_m, block_n, block_k, warps, stages = next(t for t in _LANES_TILES if M <= t[0])
    if interp:
        return (*_INTERP_LANES, 4, 1)
    cols = lanes * _utils.block_r(R)
    # per stage: x [BM, BK], W0 [BK, BN] and the stacked A [BK, cols]; the epilogue's fp32 xa and B tiles beside them
    reserve = block_m * cols * 4 + cols * block_n * 4
    block_k, stages = _utils.k_pipeline(block_m, block_k, block_n + cols, x_bytes, w_bytes, reserve, smem(), stages)
    return block_m, block_n, block_k, warps, stages


def linear_lanes(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: BatchMeta,
    slices: Sequence[int],
    lanes: int,
) -> torch.Tensor:
    """The gemm path in one launch (_gemm_lanes_kernel): y new ``[M, N]`` in x's dtype. ``lanes`` (a power of two,
    at most :func:`max_lanes`) adapters per lane group; a row tile holding more distinct adapters is still exact
    (one more K loop over x and A per further group). Rows in the batch's own order (``meta.token_slots``)."""
    M, K = x.shape
    N = weight.shape[0]
    L, SR, _ = A_stack.shape
    S = len(slices)
    R = SR // S
    if max_lanes(R) == 0:
        raise ValueError(f"the one-launch gemm path takes ranks up to {LANE_COLS}, the pool's is {R}")
    if lanes < 1 or lanes & (lanes - 1) or lanes > max_lanes(R):
        raise ValueError(f"lanes must be a power of two in [1, {max_lanes(R)}] at rank {R}, got {lanes}")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    interp = _backend.interpreter_enabled()
    block_m, block_n, block_k, warps, stages = lanes_config(
        M, R, lanes, x.element_size(), weight.element_size(), interp, lambda: _utils.smem_of(x.device)
    )
    grid = (triton.cdiv(M, block_m), _out_blocks(slices, block_n))
    with _utils.device_ctx(x):
        _gemm_lanes_kernel[grid](
            x,
            weight,
            bias if bias is not None else weight,
            A_stack,
            B_stack,
            ranks,
            scales,
            meta.token_slots,
            y,
            M,
            K,
            L,
            R,
            *_widths(slices),
            x.stride(0),
            x.stride(1),
            weight.stride(0),
            weight.stride(1),
            A_stack.stride(0),
            A_stack.stride(1),
            A_stack.stride(2),
            B_stack.stride(0),
            B_stack.stride(1),
            B_stack.stride(2),
            scales.stride(0),
            scales.stride(1),
            y.stride(0),
            y.stride(1),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_R=_utils.block_r(R),
            LANES=lanes,
            HAS_BIAS=bias is not None,
            CAST_FP32=_utils.cast_to_fp32(x.dtype, weight.dtype),
            LANE_FP32=_utils.cast_to_fp32(x.dtype, A_stack.dtype),
            LORA_IEEE=_utils.cast_to_fp32(B_stack.dtype) or x.dtype == torch.float32,
            num_warps=warps,
            num_stages=stages,
        )
    return y
