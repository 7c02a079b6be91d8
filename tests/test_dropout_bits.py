"""The packed dropout mask: the reference packer/unpacker and the Triton helpers that store and read it
(lora_kernels.triton._dropout) agree bit for bit with the Philox mask, at ragged sizes."""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lora_kernels.reference.dropout import (  # noqa: E402
    dropout_keep_mask,
    dropout_threshold,
    keep_bits_shape,
    pack_keep_bits,
    unpack_keep_bits,
)
from lora_kernels.triton._dropout import keep_mask, load_keep, pack_bits  # noqa: E402

from conftest import DEVICE, INTERPRET  # noqa: E402


@triton.jit
def _pack_k(seed_ptr, out_ptr, M, K, W, threshold, BM: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    ok = (rm[:, None] < M) & (rk[None, :] < K)
    keep = keep_mask(tl.load(seed_ptr), rm, rk, K, threshold) & ok
    words = pack_bits(keep, BM, BK)
    rw = tl.program_id(1) * (BK // 32) + tl.arange(0, BK // 32)
    tl.store(out_ptr + rm[:, None] * W + rw[None, :], words, mask=(rm[:, None] < M) & (rw[None, :] < W))


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
