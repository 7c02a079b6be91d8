"""Dropout-mask pieces shared by the Triton kernels: the Philox keep mask (bit-identical to
``reference.dropout.dropout_keep_mask``) and the 1-bit-per-element packed form a step keeps between the kernel that
draws the mask and the kernels that read it (layout: ``reference.dropout.pack_keep_bits``)."""

from __future__ import annotations

import triton
import triton.language as tl

from ..reference.dropout import KEEP_BITS_PER_WORD, RAND_BITS

# Philox draws 32 bits; the mask keeps the top RAND_BITS (see reference/dropout.py), so shift away the rest.
_RAND_SHIFT = tl.constexpr(32 - RAND_BITS)
_WORD = tl.constexpr(KEEP_BITS_PER_WORD)


@triton.jit
def keep_mask(seed, offs_m, offs_k, K, threshold):
    """Dropout keep mask of elements (offs_m, offs_k) of an [M, K] input: identical to reference.dropout."""
    flat = offs_m.to(tl.int64)[:, None] * K + offs_k.to(tl.int64)[None, :]
    bits = (tl.randint(seed, flat) >> _RAND_SHIFT).to(tl.int32)  # uint32 >> 8 < 2^24: fits int32
    return bits >= threshold


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
def load_keep(bits_ptr, offs_m, offs_k, stride_bm, mask):
    """Keep mask of elements (offs_m, offs_k) read from a packed [M, ceil(K/32)] int32 mask (row stride stride_bm);
    False where ``mask`` is False. The 32 columns of a word load the same address (one transaction per word)."""
    word_ptrs = bits_ptr + offs_m.to(tl.int64)[:, None] * stride_bm + (offs_k // _WORD).to(tl.int64)[None, :]
    words = tl.load(word_ptrs, mask=mask, other=0)
    return ((words >> (offs_k % _WORD)[None, :]) & 1) != 0
