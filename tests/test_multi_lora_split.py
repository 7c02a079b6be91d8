"""The "split" path of ``multi_lora_linear`` (F.linear, then the shrink into per-split fp32 partials and the expand
that sums them): no zero-fill launch and no atomics, the same bits on every run, and rows without a loaded adapter
never read the uninitialised partials. Against the float64 reference (Triton in the CPU interpreter here)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from _oracle import multi_lora_f64
from _tolerances import close

import lora_kernels as lk
from lora_kernels.pool import AdapterPool, LoRABatch

from conftest import DEVICE, HAS_CUDA, INTERPRET

TRITON_OK = (HAS_CUDA or INTERPRET) and importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs triton, and CUDA or TRITON_INTERPRET=1")

K = 37  # odd, and more than one interpreter BLOCK_K (32): two K splits
SLICES = [24, 9]  # two output slices of unequal widths


def _pool(dtype=torch.float32, L=5, R=8, seed=0):
    """Slots 0, 1, 3 loaded at ranks 8, 3, 1 (below the pool's 8: the partials' columns past a slot's rank are never
    written); slot 2 reserved-then-unloaded (rank 0); slot 4 never loaded."""
    gen = torch.Generator().manual_seed(seed)
    pool = AdapterPool(L, R, K, SLICES, dtype=dtype, device=DEVICE)
    for name, r in (("a", 8), ("b", 3), ("gone", 2), ("c", 1)):
        a = [torch.randn(r, K, generator=gen) / math.sqrt(K) for _ in SLICES]
        b = [torch.randn(n, r, generator=gen) for n in SLICES]
        pool.load(name, [t.to(dtype) for t in a], [t.to(dtype) for t in b], alpha=[2.0 * r, 3.0 * r])
    pool.unload("gone")
    assert pool.ranks.tolist() == [8, 3, 0, 1, 0]
    return pool


def _want(x, w, bias, pool, ids):
    return multi_lora_f64(x, w, bias, pool, ids)


def _ids(T, gen, bad=True):
    """Loaded slots 0, 1, 3 and -1; with ``bad``, also the unloaded slots 2 and 4 and ids past the pool (5, 9)."""
    choice = torch.tensor([0, 1, 3, -1] + ([2, 4, 5, 9] if bad else []))
    return choice[torch.randint(len(choice), (T,), generator=gen)].tolist()


def _data(T, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    N = sum(SLICES)
    x = torch.randn(T, K, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(DEVICE, dtype)
    bias = torch.randn(N, generator=gen).to(DEVICE, dtype)
    return x, w, bias, gen


@needs_triton
@pytest.mark.parametrize("T", [1, 7, 33, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_path_matches_reference_at_odd_sizes(T, dtype):
    pool = _pool(dtype)
    x, w, bias, gen = _data(T, dtype, T)
    ids = _ids(T, gen, bad=False)
    got = lk.multi_lora_linear(x, w, bias, pool, LoRABatch.prepare(ids, device=DEVICE), backend="triton", path="split")
    torch.testing.assert_close(got.cpu().double(), _want(x, w, bias, pool, ids), **close(dtype))


def _poison(monkeypatch, seen):
    """Hand the launchers partial buffers full of NaN (an uninitialised buffer may hold anything): a consumer that
    reads an element the shrink did not write puts NaN into y."""
    from lora_kernels.triton import multi_lora as ML

    def poisoned(split, M, SR, device):
        seen.append((split, M, SR))
        return torch.full((split, M, SR), float("nan"), dtype=torch.float32, device=device)

    monkeypatch.setattr(ML, "partials", poisoned)


@needs_triton
@pytest.mark.parametrize("path", ["split", "gemm"])
@pytest.mark.parametrize("T", [7, 40])
def test_unwritten_partials_are_never_read(monkeypatch, path, T):
    """Partial buffers poisoned with NaN; ids -1, of an unloaded slot (rank 0), of a never-loaded slot and past the
    pool (check=False: the kernels must ignore them), and loaded slots of ranks below the pool's: the output is the
    reference's, and the rows without an adapter are F.linear's exactly (nothing added)."""
    seen = []
    _poison(monkeypatch, seen)
    pool = _pool()
    x, w, bias, gen = _data(T, torch.float32, 100 + T)
    ids = _ids(T, gen)
    ids[:5] = [2, 1, 3, 4, 9]  # unloaded, rank 3, rank 1, never loaded, past the pool
    got = lk.multi_lora_linear(
        x, w, bias, pool, LoRABatch.prepare(ids, device=DEVICE), backend="triton", path=path, check=False
    )
    assert seen and seen[0][0] > 1 or HAS_CUDA, "the interpreter splits K: the partials are summed"
    assert torch.isfinite(got).all()
    want = _want(x, w, bias, pool, [i if i in (0, 1, 3) else -1 for i in ids])
    torch.testing.assert_close(got.cpu().double(), want, **close(torch.float32))
    if path == "split":
        none = torch.tensor([i not in (0, 1, 3) for i in ids], device=DEVICE)
        assert torch.equal(got[none], F.linear(x, w, bias)[none])


@needs_triton
def test_split_path_runs_no_atomics_no_zero_fill_and_repeats_bit_for_bit(monkeypatch):
    """The shrink of the split path writes one partial per K split (ATOMIC off, split-K > 1 under the interpreter) and
    nothing zero-fills a buffer; three runs, and a run under torch.use_deterministic_algorithms, give the same bits
    (fp32 atomics would add in a run-dependent order on a GPU, and the deterministic mode used to drop split-K)."""
    from lora_kernels.triton import multi_lora as ML

    launches = []
    real = ML._batched_shrink_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*a, **kw):
                launches.append((tuple(grid), kw["ATOMIC"], kw["SPLIT_K"]))
                return real[grid](*a, **kw)

            return run

    monkeypatch.setattr(ML, "_batched_shrink_kernel", Spy())
    zeroed = []
    real_zero = torch.Tensor.zero_

    def spy_zero(t):
        zeroed.append(tuple(t.shape))
        return real_zero(t)

    T = 33
    pool = _pool(torch.float16)
    x, w, bias, gen = _data(T, torch.float16, 7)
    ids = _ids(T, gen, bad=False)
    batch = LoRABatch.prepare(ids, device=DEVICE)
    monkeypatch.setattr(torch.Tensor, "zero_", spy_zero)
    outs = [lk.multi_lora_linear(x, w, bias, pool, batch, backend="triton", path="split") for _ in range(3)]
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        outs.append(lk.multi_lora_linear(x, w, bias, pool, batch, backend="triton", path="split"))
    finally:
        torch.use_deterministic_algorithms(was)
    monkeypatch.setattr(torch.Tensor, "zero_", real_zero)
    assert zeroed == []
    assert len(launches) == 4 and all(not atomic for _, atomic, _ in launches)
    assert len({s for _, _, s in launches}) == 1, "the split count does not depend on the deterministic mode"
    if not HAS_CUDA:
        assert launches[0][2] > 1
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    torch.testing.assert_close(outs[0].cpu().double(), _want(x, w, bias, pool, ids), **close(torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_path_torch_backend(dtype):
    """The torch backend's split path (float64 intermediates for float64 data) against the reference."""
    pool = _pool(torch.float32 if dtype == torch.float32 else torch.float64)
    x, w, bias, gen = _data(33, dtype, 5)
    ids = _ids(33, gen, bad=False)
    got = lk.multi_lora_linear(x, w, bias, pool, LoRABatch.prepare(ids, device=DEVICE), backend="torch", path="split")
    torch.testing.assert_close(got.cpu().double(), _want(x, w, bias, pool, ids), **close(dtype))
