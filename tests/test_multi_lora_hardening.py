"""Hardening of the multi-adapter ops: a token never gets another adapter's output when the batch is refilled in place
and a recorded launch sequence is replayed (what a CUDA graph does), ``torch.library.opcheck`` of every registered op
on every path, layout and backend, and the same result inside and outside ``torch.autocast``. Against the float64
reference; Triton in the CPU interpreter here."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from _oracle import multi_lora_f64
from _replay import ReplayLog
from _tolerances import close

import lora_kernels as lk
from lora_kernels.ops import multi_lora as ops
from lora_kernels.pool import AdapterPool, LoRABatch

from conftest import DEVICE, HAS_CUDA, INTERPRET

TRITON_OK = (HAS_CUDA or INTERPRET) and importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs triton, and CUDA or TRITON_INTERPRET=1")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]

K = 37
SLICES = [24, 9]
LOADED = (0, 1, 3)  # slots with an adapter; 2 was unloaded (rank 0), 4 never loaded


def _pool(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pool = AdapterPool(5, 8, K, SLICES, dtype=dtype, device=DEVICE)
    for name, r in (("a", 8), ("b", 3), ("gone", 2), ("c", 1)):
        a = [torch.randn(r, K, generator=gen) / math.sqrt(K) for _ in SLICES]
        b = [torch.randn(n, r, generator=gen) for n in SLICES]
        pool.load(name, [t.to(dtype) for t in a], [t.to(dtype) for t in b], alpha=[2.0 * r, 3.0 * r])
    pool.unload("gone")
    return pool


def _want(x, w, bias, pool, ids):
    ids = [i if i in LOADED else -1 for i in ids]
    return multi_lora_f64(x, w, bias, pool, ids)


def _weights(dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    N = sum(SLICES)
    w = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(DEVICE, dtype)
    return w, torch.randn(N, generator=gen).to(DEVICE, dtype)


# ---------------------------------------------------------------------------------- replay after refilling in place
# (ids at capture, then the refills): the number of tokens with an adapter changes (all, some, none, one), adapters
# appear that were absent at capture (slot 3), tokens move between adapters, and unloaded / never-loaded slots and ids
# past the pool (which the kernels must ignore) come and go.
REFILLS = (
    [0, 1, 0, 1, 1, 0, 0, 1, -1, -1, 0, 1, 1, 0, -1, 1, 0, 0, 1, 1],
    [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3],
    [-1] * 20,
    [1, 0, 3, 2, 4, 9, -1, 0, 1, 3, 3, 3, 0, 1, 2, 2, 4, 1, 0, -1],
    [-1] * 19 + [1],
    [0, 1, 3] * 6 + [3, 0],
)


@needs_triton
@pytest.mark.parametrize("path", ["fused", "split", "gemm"])
@pytest.mark.parametrize("capacity", [20, 40])
def test_replay_after_prepare_in_place_gives_each_token_its_adapter(monkeypatch, path, capacity):
    """The launches of one call, recorded as a CUDA graph captures them (host checks and the no-adapter shortcut off,
    as while capturing), replayed after ``batch.prepare_`` with other ids and ``x`` refilled: every replay is the
    reference for the new ids. The grids are host ints of M only, so one recording serves every id pattern."""
    from lora_kernels.triton import multi_lora as ML

    log = []
    for name in ("_batched_shrink_kernel", "_expand_kernel", "_fused_kernel", "_gemm_expand_kernel"):
        monkeypatch.setattr(ML, name, ReplayLog(getattr(ML, name), log))
    monkeypatch.setattr(ops, "_in_graph_or_compile", lambda t: True)
    pool = _pool()
    w, bias = _weights()
    T = len(REFILLS[0])
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(T, K, generator=gen).to(DEVICE)
    batch = LoRABatch.prepare(REFILLS[0], max_tokens=capacity, device=DEVICE)
    y = lk.multi_lora_linear(x, w, bias, pool, batch, backend="triton", path=path)
    torch.testing.assert_close(y.cpu().double(), _want(x, w, bias, pool, REFILLS[0]), **close(torch.float32))
    captured = list(log)
    assert captured and len(captured) == {"fused": 1, "split": 2, "gemm": 2}[path]
    for ids in REFILLS[1:]:
        batch.prepare_(ids)
        x.copy_(torch.randn(T, K, generator=gen))
        if path != "gemm":  # the base GEMM is the graph's first node on these paths
            y.copy_(F.linear(x, w, bias))
        for real, grid, args, kwargs in captured:
            real[grid](*args, **kwargs)
        torch.testing.assert_close(y.cpu().double(), _want(x, w, bias, pool, ids), **close(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["fused", "split", "gemm"])
def test_prepare_in_place_with_another_token_count(backend, path):
    """One batch refilled in place with fewer, then more tokens (up to its capacity), called eagerly each time: the
    host copies of the ids follow the refill, every token gets its own adapter's term."""
    pool = _pool()
    w, bias = _weights()
    gen = torch.Generator().manual_seed(3)
    batch = LoRABatch.prepare([0, 1, 3], max_tokens=33, device=DEVICE)
    for T in (3, 1, 33, 7, 0, 20):
        ids = torch.tensor([0, 1, 3, -1, 2, 4])[torch.randint(6, (T,), generator=gen)].tolist()
        batch.prepare_(ids)
        x = torch.randn(T, K, generator=gen).to(DEVICE)
        got = lk.multi_lora_linear(x, w, bias, pool, batch, backend=backend, path=path, check=False)
        assert got.shape == (T, sum(SLICES))
        torch.testing.assert_close(got.cpu().double(), _want(x, w, bias, pool, ids), **close(torch.float32))


# ------------------------------------------------------------------------------------------------------- opcheck
def _layouts(T, gen):
    """x [T, K] as the public functions may pass it on: contiguous, rows of a wider tensor (row stride 2K), and
    column-major (a transposed view)."""
    base = torch.randn(T, K, generator=gen)
    wide = torch.randn(T, 2 * K, generator=gen)
    wide[:, K:] = base
    col = base.t().contiguous().t()
    return {"contiguous": base.to(DEVICE), "row-strided": wide.to(DEVICE)[:, K:], "column-major": col.to(DEVICE)}


def _autocast(on: bool):
    import contextlib

    if not on:
        return contextlib.nullcontext()
    dev = torch.device(DEVICE).type
    return torch.autocast(dev, dtype=torch.bfloat16 if dev == "cpu" else torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "row-strided", "column-major"])
@pytest.mark.parametrize("autocast", [False, True])
def test_opcheck_every_op_path_and_layout(backend, layout, autocast):
    """``torch.library.opcheck`` (schema, fake tensor, autograd registration, AOT dispatch) of the five registered ops
    with q|k|v-like slices, ids of every kind, and x contiguous, row-strided or column-major; inside torch.autocast
    too (the ops run with autocast off: their dtypes are their inputs')."""
    pool = _pool()
    w, bias = _weights()
    gen = torch.Generator().manual_seed(4)
    T = 7
    x = _layouts(T, gen)[layout]
    ids = [0, -1, 1, 3, 2, 4, 0]
    batch = LoRABatch.prepare(ids, max_tokens=T, device=DEVICE)
    meta = batch.meta
    S, R = len(SLICES), pool.max_rank
    tile_m = ops.step_tile_m(batch.tile_m, T)
    A, B, ranks, scales = pool.A_stack, pool.B_stack, pool.ranks, pool.scales
    xa = torch.zeros(T, S * R, device=DEVICE)
    y = torch.randn(T, sum(SLICES), device=DEVICE)
    with _autocast(autocast):
        torch.library.opcheck(ops._shrink_op, (x, A, ranks, *meta, xa, S, tile_m, backend))
        torch.library.opcheck(ops._expand_op, (xa, B, ranks, scales, *meta, y, SLICES, tile_m, backend))
        torch.library.opcheck(ops._fused_op, (x, A, B, ranks, scales, *meta, y, SLICES, tile_m, backend))
        torch.library.opcheck(ops._split_op, (x, A, B, ranks, scales, *meta, y, SLICES, tile_m, backend))
        for b in (bias, None):
            torch.library.opcheck(ops._gemm_op, (x, w, b, A, B, ranks, scales, *meta, SLICES, tile_m, backend))


# ------------------------------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["fused", "split", "gemm"])
def test_autocast_changes_neither_dtype_nor_result(backend, path):
    """Inside torch.autocast every path gives what it gives outside (x's dtype, the reference's values), as the gemm
    path always did: the fused and split paths' F.linear ran in the autocast dtype (a bf16 result) and the torch
    backend's fp32 matmuls came back in bf16 (an error writing them into the fp32 shrink buffer). The low-level
    shrink and expand likewise."""
    pool = _pool()
    w, bias = _weights()
    gen = torch.Generator().manual_seed(5)
    ids = [0, -1, 1, 3, 1, 0, 3, 0, -1, 1, 1]
    x = torch.randn(len(ids), K, generator=gen).to(DEVICE)
    batch = LoRABatch.prepare(ids, device=DEVICE)
    with _autocast(True):
        got = lk.multi_lora_linear(x, w, bias, pool, batch, backend=backend, path=path)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got.cpu().double(), _want(x, w, bias, pool, ids), **close(torch.float32))
    xa = torch.empty(len(ids), len(SLICES) * pool.max_rank, device=DEVICE)
    y = torch.zeros(len(ids), sum(SLICES), device=DEVICE)
    with _autocast(True):
        lk.lora_shrink(x, pool.A_stack, batch, xa, ranks=pool.ranks, num_slices=len(SLICES), backend=backend)
        lk.lora_expand(xa, pool.B_stack, batch, y, pool.scales, slices=SLICES, ranks=pool.ranks, backend=backend)
    want = _want(x, torch.zeros_like(w), None, pool, ids)
    torch.testing.assert_close(y.cpu().double(), want, **close(torch.float32))
