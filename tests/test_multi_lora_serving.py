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
