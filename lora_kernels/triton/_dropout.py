"""Dropout-mask pieces shared by the Triton kernels: the Philox keep mask (bit-identical to
``reference.dropout.dropout_keep_mask``) and the 1-bit-per-element packed form a step keeps between the kernel that
draws the mask and the kernels that read it (layout: ``reference.dropout.pack_keep_bits``)."""

from __future__ import annotations

import triton
import triton.language as tl

from ..reference.dropout import KEEP_BITS_PER_WORD, RAND_BITS, WORDS_PER_COUNTER

# Philox draws 32 bits; the mask keeps the top RAND_BITS (see reference/dropout.py), so shift away the rest.
_RAND_SHIFT = tl.constexpr(32 - RAND_BITS)
_WORD = tl.constexpr(KEEP_BITS_PER_WORD)
_PER_CTR = tl.constexpr(WORDS_PER_COUNTER)


@triton.jit
def keep_mask(seed, offs_m, k_start, K, threshold, BLOCK_K: tl.constexpr):
    """Dropout keep mask of the [len(offs_m), BLOCK_K] tile at columns k_start + arange(BLOCK_K) of an [M, K] input:
    identical to reference.dropout. k_start and BLOCK_K must be multiples of 4 (a tile holds whole Philox groups).

    One randint4x call per group of 4 columns, its words interleaved back to column order: a quarter of the Philox
    arithmetic of one call per element (57 SASS instructions per call on sm_90)."""
    groups = tl.cdiv(K, _PER_CTR)
    g = k_start // _PER_CTR + tl.arange(0, BLOCK_K // _PER_CTR)
    ctr = offs_m.to(tl.int64)[:, None] * groups + g.to(tl.int64)[None, :]  # [BM, BLOCK_K // 4]
    w0, w1, w2, w3 = tl.randint4x(seed, ctr)
    # join(join(w0, w2), join(w1, w3))[.., i, j] is word 2·i + j: row-major reshape puts it at column 4·g + 2·i + j.
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (offs_m.shape[0], BLOCK_K))
    bits = (words >> _RAND_SHIFT).to(tl.int32)  # uint32 >> 8 < 2^24: fits int32
    return bits >= threshold


@triton.jit
def keep_words(seed, offs_m, k_start, K, threshold, BLOCK_K: tl.constexpr):
    """The keep mask of the same tile as keep_mask, drawn straight into packed form: [len(offs_m), BLOCK_K // 32]
    int32 words (pack_bits' layout; columns >= K are 0). k_start must be a multiple of 32.

    Each Philox group's four words are compared and shifted to their bit positions in the [BM, BLOCK_K // 4] group
    layout, then eight groups are OR-ed into a word: the tile is never built as [BM, BLOCK_K] booleans, which the
    compiler otherwise materialised (with the whole Philox chain) once per layout that consumed it."""
    groups = tl.cdiv(K, _PER_CTR)
    gi = tl.arange(0, BLOCK_K // _PER_CTR)
    g = k_start // _PER_CTR + gi
    ctr = offs_m.to(tl.int64)[:, None] * groups + g.to(tl.int64)[None, :]  # [BM, BLOCK_K // 4]
    w0, w1, w2, w3 = tl.randint4x(seed, ctr)
    col = (4 * g)[None, :]
    pos = (4 * (gi % (_WORD // _PER_CTR)))[None, :]
    b = tl.where(((w0 >> _RAND_SHIFT).to(tl.int32) >= threshold) & (col < K), 1, 0) << pos
    b |= tl.where(((w1 >> _RAND_SHIFT).to(tl.int32) >= threshold) & (col + 1 < K), 1, 0) << (pos + 1)
    b |= tl.where(((w2 >> _RAND_SHIFT).to(tl.int32) >= threshold) & (col + 2 < K), 1, 0) << (pos + 2)
    b |= tl.where(((w3 >> _RAND_SHIFT).to(tl.int32) >= threshold) & (col + 3 < K), 1, 0) << (pos + 3)
    return tl.reduce(tl.reshape(b, (offs_m.shape[0], BLOCK_K // _WORD, _WORD // _PER_CTR)), 2, _bit_or)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def pack_bits(keep, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_K] bool → [BLOCK_M, BLOCK_K // 32] int32 words (bit j = column 32·w + j of the tile).

    BLOCK_K must be a multiple of 32 and the tile must start at a multiple of 32 columns, so that a tile's words are
    whole words of the packed mask. Masked-off columns must already be False (their bits are stored as 0)."""
    shifts = tl.arange(0, _WORD)
    bits = tl.reshape(keep.to(tl.int32), (BLOCK_M, BLOCK_K // _WORD, _WORD)) << shifts[None, None, :]
    return tl.reduce(bits, 2, _bit_or)


@triton.jit
def unpack_bits(words, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Inverse of pack_bits: [BLOCK_M, BLOCK_K // 32] int32 words → [BLOCK_M, BLOCK_K] bool."""
    shifts = tl.arange(0, _WORD)
    bits = (words[:, :, None] >> shifts[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, BLOCK_K)) != 0


@triton.jit
def load_keep(bits_ptr, offs_m, offs_k, stride_bm, mask):
    """Keep mask of elements (offs_m, offs_k) read from a packed [M, ceil(K/32)] int32 mask (row stride stride_bm);
    False where ``mask`` is False. The 32 columns of a word load the same address (one transaction per word)."""
    word_ptrs = bits_ptr + offs_m.to(tl.int64)[:, None] * stride_bm + (offs_k // _WORD).to(tl.int64)[None, :]
    words = tl.load(word_ptrs, mask=mask, other=0)
    return ((words >> (offs_k % _WORD)[None, :]) & 1) != 0
