"""Counter-based dropout mask, bit-identical to the one the Triton kernels draw.

The mask of an ``M × K`` input is a pure function of the seed and the element's position. Each row is cut into groups
of 4 consecutive columns; group ``g`` of row ``m`` is the Philox-4x32 counter ``m·ceil(K/4) + g`` (10 rounds, the
generator behind ``tl.randint4x``, keyed by the 64-bit seed, counter ``(offset_lo, offset_hi, 0, 0)``), and its four
32-bit output words go to the group's four columns in order. An element is kept when its word's top 24 bits are
``>= round(p · 2^24)``, so the keep-probability is ``1 - p`` to within 2^-24 and every backend (PyTorch, Triton)
draws the same mask from the same seed. One Philox call yields four elements' words: a Philox call costs ~57
instructions, so drawing one word per call (as a plain ``tl.randint`` per element does) spent 4x the arithmetic.
The seed alone regenerates the mask; the Triton kernels draw it once per step and keep it between forward and backward
as a bit mask (:func:`pack_keep_bits`, 1 bit per element: 4 MiB for an 8192 × 4096 input).

Here it is computed with int64 tensor arithmetic (32×32-bit products split into 16-bit halves so nothing overflows),
which is slow but exact; it is the spec and the CPU fallback.
"""

from __future__ import annotations

import torch

PHILOX_ROUNDS = 10
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_MASK32 = 0xFFFFFFFF
# 24 random bits per element: enough resolution for any dropout probability a user sets (2^-24 ≈ 6e-8), and the
# comparison stays inside int32 in every backend.
RAND_BITS = 24


def dropout_threshold(p: float) -> int:
    """Integer threshold: an element is kept when its 24-bit random word is >= this."""
    return int(round(float(p) * (1 << RAND_BITS)))


def _mul_hi_lo(a: torch.Tensor, b: int):
    """(high, low) 32-bit words of a·b for uint32 values held in int64, without overflowing int64."""
    a_lo = a & 0xFFFF
    a_hi = a >> 16
    t_lo = a_lo * b  # < 2^48
    t_hi = a_hi * b  # < 2^48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & _MASK32
    return hi & _MASK32, lo


def philox_4x32(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four words of Philox-4x32-10 at counter ``offsets`` (int64 tensor) for ``seed`` (``tl.randint4x``);
    uint32 values held in int64."""
    seed = int(seed) & ((1 << 64) - 1)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    offsets = offsets.to(torch.int64)
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """First word of Philox-4x32-10 at counter ``offsets`` (``tl.randint``); uint32 values in int64."""
    return philox_4x32(seed, offsets)[0]


# Columns per Philox counter: one call's four output words serve four consecutive elements of a row.
WORDS_PER_COUNTER = 4


def dropout_words(seed: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """The 32-bit random word of every element of a ``rows × cols`` input (uint32 values in int64), as laid out in
    the module docstring: element ``(m, k)`` takes word ``k % 4`` of counter ``m·ceil(cols/4) + k // 4``."""
    groups = -(-cols // WORDS_PER_COUNTER)
    counters = torch.arange(rows * groups, dtype=torch.int64, device=device).view(rows, groups)
    words = torch.stack(philox_4x32(seed, counters), dim=-1)  # [rows, groups, 4]
    return words.reshape(rows, groups * WORDS_PER_COUNTER)[:, :cols]


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep mask ``[rows, cols]`` (layout: :func:`dropout_words`)."""
    if p <= 0.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    bits = dropout_words(seed, rows, cols, device=device) >> (32 - RAND_BITS)
    return bits >= dropout_threshold(p)


def apply_dropout(x2d: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """PEFT's inverted dropout (kept elements scaled by 1/(1-p)) with the seeded mask; ``x2d`` is ``[M, K]``."""
    if p <= 0.0:
        return x2d
    keep = dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p, device=x2d.device)
    return torch.where(keep, x2d / (1.0 - p), torch.zeros((), dtype=x2d.dtype, device=x2d.device))


# Bit-mask layout shared by every kernel that stores or reads a drawn mask: 32 elements per int32 word along a row;
# bit j of word w of row m is element (m, 32·w + j); bits past the row's end are 0.
KEEP_BITS_PER_WORD = 32


def keep_bits_shape(rows: int, cols: int) -> tuple[int, int]:
    """Shape of the packed mask of a ``rows × cols`` input: ``(rows, ceil(cols / 32))`` int32 words."""
    return rows, -(-cols // KEEP_BITS_PER_WORD)


def pack_keep_bits(keep: torch.Tensor) -> torch.Tensor:
    """Bool ``[M, K]`` keep mask → int32 ``[M, ceil(K/32)]`` words in the layout above (the spec of the kernels')."""
    rows, cols = keep.shape
    words = keep_bits_shape(rows, cols)[1]
    padded = torch.zeros(rows, words * KEEP_BITS_PER_WORD, dtype=torch.int64, device=keep.device)
    padded[:, :cols] = keep.to(torch.int64)
    weights = torch.ones(KEEP_BITS_PER_WORD, dtype=torch.int64, device=keep.device) << torch.arange(
        KEEP_BITS_PER_WORD, device=keep.device
    )
    packed = (padded.view(rows, words, KEEP_BITS_PER_WORD) * weights).sum(-1)  # < 2^32: exact in int64
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def unpack_keep_bits(words: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_keep_bits`: int32 ``[M, ceil(K/32)]`` → bool ``[M, K]``."""
    k = torch.arange(cols, device=words.device)
    w = words.to(torch.int64)[:, k // KEEP_BITS_PER_WORD]
    return ((w >> (k % KEEP_BITS_PER_WORD)) & 1).bool()
