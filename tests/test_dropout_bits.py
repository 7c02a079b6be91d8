"""The packed dropout mask: the reference packer/unpacker and the Triton helpers that store and read it
(lora_kernels.triton._dropout) agree bit for bit with the Philox mask, at ragged sizes."""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lora_kernels.reference.dropout import (  # noqa: E402
    dropout_keep_mask,
    dropout_threshold,
    dropout_words,
    keep_bits_shape,
    pack_keep_bits,
    philox_4x32,
    unpack_keep_bits,
)
from lora_kernels.triton._dropout import keep_mask, keep_words, load_keep, pack_bits, unpack_bits  # noqa: E402

from conftest import DEVICE, INTERPRET  # noqa: E402


@triton.jit
def _pack_k(seed_ptr, out_ptr, M, K, W, threshold, BM: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    ok = (rm[:, None] < M) & (rk[None, :] < K)
    keep = keep_mask(tl.load(seed_ptr), rm, tl.program_id(1) * BK, K, threshold, BK) & ok
    words = pack_bits(keep, BM, BK)
    rw = tl.program_id(1) * (BK // 32) + tl.arange(0, BK // 32)
    tl.store(out_ptr + rm[:, None] * W + rw[None, :], words, mask=(rm[:, None] < M) & (rw[None, :] < W))


@triton.jit
def _words_k(seed_ptr, out_ptr, back_ptr, M, K, W, threshold, BM: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    words = keep_words(tl.load(seed_ptr), rm, tl.program_id(1) * BK, K, threshold, BK)
    rw = tl.program_id(1) * (BK // 32) + tl.arange(0, BK // 32)
    tl.store(out_ptr + rm[:, None] * W + rw[None, :], words, mask=(rm[:, None] < M) & (rw[None, :] < W))
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    keep = unpack_bits(words, BM, BK)
    ok = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(back_ptr + rm[:, None] * K + rk[None, :], keep.to(tl.int8), mask=ok)


@triton.jit
def _unpack_k(bits_ptr, out_ptr, M, K, W, BM: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    ok = (rm[:, None] < M) & (rk[None, :] < K)
    keep = load_keep(bits_ptr, rm, rk, W, ok)
    tl.store(out_ptr + rm[:, None] * K + rk[None, :], keep.to(tl.int8), mask=ok)


@pytest.mark.parametrize("M,K", [(1, 1), (7, 33), (33, 100), (5, 64)])
def test_packed_mask_round_trip(M, K):
    if DEVICE == "cpu" and not INTERPRET:
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    p, seed = 0.3, 1234
    keep = dropout_keep_mask(seed, M, K, p, device=DEVICE)
    ref = pack_keep_bits(keep)
    assert ref.shape == keep_bits_shape(M, K)
    assert torch.equal(unpack_keep_bits(ref, K), keep)
    W = ref.shape[1]
    out = torch.full((M, W), 7, dtype=torch.int32, device=DEVICE)
    BM, BK = 16, 64
    _pack_k[(triton.cdiv(M, BM), triton.cdiv(K, BK))](
        torch.tensor(seed, device=DEVICE), out, M, K, W, dropout_threshold(p), BM=BM, BK=BK
    )
    assert torch.equal(out, ref)
    back = torch.zeros((M, K), dtype=torch.int8, device=DEVICE)
    _unpack_k[(triton.cdiv(M, BM), triton.cdiv(K, 32))](ref, back, M, K, W, BM=BM, BK=32)
    assert torch.equal(back.bool(), keep)
    assert 0 < int(keep.sum()) < M * K or M * K < 8  # the mask is not trivially all-kept or all-dropped


def test_philox_known_answer_and_word_layout():
    """Philox-4x32-10 at counter 0, key 0 gives Random123's published known answer; the mask layout hands the four
    words of counter m·ceil(K/4) + g to columns 4g..4g+3 of row m (a ragged last group loses its extra words)."""
    words = [int(w) for w in philox_4x32(0, torch.tensor([0]))]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    seed, M, K = 77, 3, 7
    got = dropout_words(seed, M, K)
    for m in range(M):
        for k in range(K):
            w = philox_4x32(seed, torch.tensor([m * 2 + k // 4]))[k % 4]
            assert int(got[m, k]) == int(w), (m, k)
    keep = dropout_keep_mask(seed, M, K, 0.5)
    assert torch.equal(keep, (got >> 8) >= dropout_threshold(0.5))


@pytest.mark.parametrize("M,K", [(1, 1), (7, 33), (33, 100), (5, 64), (3, 130)])
def test_words_drawn_packed_match_the_reference(M, K):
    """keep_words (the mask drawn straight into packed words, as the training shrink stores it) and unpack_bits
    (how that kernel reads its own words back) agree bit for bit with the reference, ragged last word included."""
    if DEVICE == "cpu" and not INTERPRET:
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    p, seed = 0.3, 4321
    keep = dropout_keep_mask(seed, M, K, p, device=DEVICE)
    ref = pack_keep_bits(keep)
    W = ref.shape[1]
    out = torch.full((M, W), 7, dtype=torch.int32, device=DEVICE)
    back = torch.full((M, K), 5, dtype=torch.int8, device=DEVICE)
    BM, BK = 16, 64
    _words_k[(triton.cdiv(M, BM), triton.cdiv(K, BK))](
        torch.tensor(seed, device=DEVICE), out, back, M, K, W, dropout_threshold(p), BM=BM, BK=BK
    )
    assert torch.equal(out, ref)
    assert torch.equal(back.bool(), keep)
