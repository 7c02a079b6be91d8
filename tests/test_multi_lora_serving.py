"""Serving-path properties of the multi-adapter ops: fp32 intermediates (a shrink result beyond the fp16 range with a
finite output), decode-sized tiles chosen from the tokens of the step, and the base GEMM with the expand in its
epilogue, all against the float64 reference (Triton in the CPU interpreter here).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import lora_kernels as lk
from lora_kernels.ops import multi_lora as ops
from lora_kernels.pool import AdapterPool, LoRABatch
from lora_kernels.reference import multi_lora as ref

from conftest import DEVICE, HAS_CUDA, INTERPRET

TRITON_OK = (HAS_CUDA or INTERPRET) and importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs triton, and CUDA or TRITON_INTERPRET=1")


# ------------------------------------------------------------------------------------- fp32 shrink intermediates
def overflow_case(device=DEVICE, dtype=torch.float16):
    """fp16 data whose shrink x·Aᵀ = 102400 is past fp16's 65504 while the output is ~512: x = 16 (K = 40), A = 160,
    B = 0.005, scale 1. Rank 2 with a second A row of the opposite sign, so that s = (102400, -102400) and the two
    terms of the expand partly cancel (B's columns differ): an fp16 s is ±inf there and the output inf or NaN."""
    K, N, R = 40, 24, 16
    pool = AdapterPool(3, R, K, N, dtype=dtype, device=device)
    a = torch.stack([torch.full((K,), 160.0), torch.full((K,), -160.0)])
    b = torch.stack([torch.full((N,), 0.0075), torch.full((N,), 0.0025)], dim=1)
    b[::3, 1] = 0.001  # some columns of a different value
    pool.load("big", a, b, alpha=2)  # scale alpha / r = 1
    weight = torch.zeros(N, K, dtype=dtype, device=device)
    weight[:, 0] = 1.0 / 64
    x = torch.full((5, K), 16.0, dtype=dtype, device=device)
    ids = [0, -1, 0, 0, -1]
    return pool, weight, x, ids


def overflow_want(pool, weight, x, ids):
    want = ref.multi_lora_linear(x.double().cpu(), weight.double().cpu(), None, pool.A_stack.cpu(),
                                 pool.B_stack.cpu(), pool.ranks.cpu(), pool.scales.cpu(), torch.tensor(ids),
                                 list(pool.slices))
    s_max = (x[0].double().cpu() @ pool.A_stack[0, 0].double().cpu())
    assert s_max > 65504 and want.abs().max() < 1000 and want[0].abs().min() > 100  # the case tests what it says
    return want


@pytest.mark.parametrize("backend,path", [
    ("torch", "fused"), ("torch", "split"),
    pytest.param("triton", "fused", marks=needs_triton), pytest.param("triton", "split", marks=needs_triton),
])
def test_fp16_shrink_beyond_fp16_range_gives_finite_output(backend, path):
    pool, weight, x, ids = overflow_case()
    want = overflow_want(pool, weight, x, ids)
    got = lk.multi_lora_linear(x, weight, None, pool, LoRABatch.prepare(ids, device=DEVICE), backend=backend,
                               fused=path == "fused")
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(got.cpu().double(), want, rtol=2e-3, atol=2e-3)
    # the low-level ops: the shrink output is fp32 and the expand reads it as such
    batch = LoRABatch.prepare(ids, device=DEVICE)
    s = torch.empty(5, pool.max_rank, dtype=torch.float32, device=DEVICE)
    ops.lora_shrink(x, pool.A_stack, batch, s, ranks=pool.ranks, backend=backend)
    assert s[0, 0].item() == 102400.0
    y = torch.zeros(5, pool.out_features, dtype=torch.float16, device=DEVICE)
    ops.lora_expand(s, pool.B_stack, batch, y, pool.scales, ranks=pool.ranks, backend=backend)
    assert torch.isfinite(y).all()


# ------------------------------------------------------------------------------------------- decode-sized tiles
def test_step_tile_m_follows_the_tokens():
    assert [ops.step_tile_m(64, M) for M in (0, 1, 16, 17, 32, 33, 64, 65, 4096)] == [16, 16, 16, 32, 32, 64, 64,
                                                                                       64, 64]
    assert [ops.step_tile_m(16, M) for M in (1, 100)] == [16, 16]
    assert [ops.step_tile_m(128, M) for M in (40, 100, 129)] == [64, 128, 128]


class _BlockSpy:
    """Records BLOCK_M of every launch of a Triton kernel, then launches it."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(kwargs["BLOCK_M"])
            return self.kernel[grid](*args, **kwargs)
        return launch


@needs_triton
@pytest.mark.parametrize("M,path", [(3, "fused"), (20, "split"), (40, "split"), (40, "fused")])
def test_decode_step_in_a_large_batch_uses_small_tiles(monkeypatch, M, path):
    """A batch built for 4096 tokens (tile_m 64; 128 forced for M = 40) used for a step of M tokens: the kernels run
    tiles of next_pow2(M) >= 16 rows and the result matches the reference (mixed ranks, slices, an unloaded slot,
    -1 rows, several tiles of one slot)."""
    from lora_kernels.triton import multi_lora as ML

    seen = []
    for name in ("_shrink_kernel", "_expand_kernel", "_fused_kernel"):
        monkeypatch.setattr(ML, name, _BlockSpy(getattr(ML, name), seen))
    gen = torch.Generator().manual_seed(M)
    K, slices = 40, [24, 8, 8]
    pool = AdapterPool(5, 16, K, slices, dtype=torch.float32, device=DEVICE)
    for name, r in (("a", 16), ("b", 3), ("c", 8)):
        pool.load(name, [torch.randn(r, K, generator=gen) / math.sqrt(K) for _ in slices],
                  [torch.randn(n, r, generator=gen) for n in slices], alpha=2.0 * r)
    pool.unload("c")  # slot 2: unloaded
    weight = (torch.randn(sum(slices), K, generator=gen) / math.sqrt(K)).to(DEVICE)
    ids = torch.tensor([0, 1, -1, 2, 0])[torch.randint(5, (M,), generator=gen)].tolist()
    x = torch.randn(M, K, generator=gen).to(DEVICE)
    batch = LoRABatch.prepare(ids, max_tokens=4096, device=DEVICE, tile_m=128 if M == 40 else None)
    got = lk.multi_lora_linear(x, weight, None, pool, batch, backend="triton", fused=path == "fused", check=False)
    want = ref.multi_lora_linear(x.double().cpu(), weight.double().cpu(), None, pool.A_stack.cpu(),
                                 pool.B_stack.cpu(), pool.ranks.cpu(), pool.scales.cpu(), torch.tensor(ids), slices)
    torch.testing.assert_close(got.cpu().double(), want, rtol=2e-4, atol=2e-4)
    assert seen and set(seen) == {ops.step_tile_m(batch.tile_m, M)} and seen[0] < batch.tile_m, seen
