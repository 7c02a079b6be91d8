"""Batched multi-adapter LoRA: AdapterPool, LoRABatch, lora_shrink / lora_expand / multi_lora_linear, the Triton
kernels (CPU interpreter here) against the float64 reference, MultiLoRALinear and the model helpers.

Shapes are small (K, N <= 64) because the interpreter is slow; they are odd on purpose (K = 40, slices 24|8|8).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn as nn
from _aot import run_child
from _oracle import multi_lora_in_dtype, naive_multi_lora
from _replay import warm_up
from _tolerances import assert_close_to_oracle, close, close_small_k

import lora_kernels as lk
from lora_kernels.ops import multi_lora as ops
from lora_kernels.pool import AdapterPool, LoRABatch
from lora_kernels.reference import multi_lora as ref

from conftest import DEVICE, HAS_CUDA, INTERPRET

TRITON_OK = (HAS_CUDA or INTERPRET) and importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs triton, and CUDA or TRITON_INTERPRET=1")

K = 40
SLICES = [24, 8, 8]  # q|k|v of unequal widths (GQA-like)
MIXED_RANKS = [1, 8, 16, 64, 8, 1]


# ------------------------------------------------------------------------------------------------------- helpers
def _adapter(rank, K, slices, gen, dtype=torch.float32, device="cpu"):
    """Per-slice (A_s [r, K], B_s [N_s, r]) scaled so that the LoRA term is O(1)."""
    a = [torch.randn(rank, K, generator=gen, dtype=torch.float64) / math.sqrt(K) for _ in slices]
    b = [torch.randn(n, rank, generator=gen, dtype=torch.float64) for n in slices]
    return [t.to(device=device, dtype=dtype) for t in a], [t.to(device=device, dtype=dtype) for t in b]


def _make_pool(L, R, ranks, slices=SLICES, dtype=torch.float32, device=DEVICE, seed=0, use_rslora=False):
    gen = torch.Generator().manual_seed(seed)
    pool = AdapterPool(L, R, K, slices if len(slices) > 1 else slices[0], dtype=dtype, device=device)
    adapters = {}
    for i, r in enumerate(ranks):
        a, b = _adapter(r, K, slices, gen, dtype, device)
        alpha = [2.0 * r + s for s in range(len(slices))]  # a different scale per slice
        slot = pool.load(
            f"ad{i}", a if len(slices) > 1 else a[0], b if len(slices) > 1 else b[0], alpha=alpha, use_rslora=use_rslora
        )
        adapters[slot] = (a, b, [al / (math.sqrt(r) if use_rslora else r) for al in alpha])
    return pool, adapters


_naive = naive_multi_lora  # the independent float64 oracle (also used by test_cuda_ext)


def _ids(pattern, T, slots, gen):
    if pattern == "repeats":
        choice = torch.tensor(slots + [-1])
        return choice[torch.randint(len(choice), (T,), generator=gen)].tolist()
    if pattern == "distinct":
        assert len(slots) >= T
        perm = torch.randperm(len(slots), generator=gen)[:T]
        return [slots[i] for i in perm.tolist()]
    if pattern == "none":
        return [-1] * T
    if pattern == "one":
        return [slots[len(slots) // 2]] * T
    raise AssertionError(pattern)


# ----------------------------------------------------------------------------------------------- batch structure
def test_batch_tiles_cover_each_adapter_token_once():
    gen = torch.Generator().manual_seed(1)
    for trial in range(30):
        T = int(torch.randint(1, 70, (1,), generator=gen))
        L = int(torch.randint(1, 12, (1,), generator=gen))
        tile_m = (16, 32)[trial % 2]
        ids = torch.randint(-2, L + 2, (T,), generator=gen).tolist()  # includes -2 and ids >= L
        batch = LoRABatch.prepare(ids, max_tokens=T + 5, tile_m=tile_m)
        starts = batch.tile_starts.tolist()
        sorted_tokens = batch.sorted_tokens.tolist()
        sorted_slots = batch.sorted_slots.tolist()
        n_tiles = sum(1 for s in starts if s >= 0)
        assert starts[n_tiles:] == [-1] * (len(starts) - n_tiles), "tiles must be packed at the front"
        assert len({sorted_slots[starts[t]] for t in range(n_tiles)}) == len({i for i in ids if i >= 0})
        covered = []
        for t in range(n_tiles):
            st = starts[t]
            slot = sorted_slots[st]
            rows = [p for p in range(st, min(st + tile_m, batch.capacity)) if sorted_slots[p] == slot]
            assert rows == list(range(st, st + len(rows)))
            covered += [(sorted_tokens[p], slot) for p in rows]
        assert sorted(covered) == sorted((m, i) for m, i in enumerate(ids) if i >= 0)
        # the tiles of slots < L come first and fit in the launch grid's bound
        n_valid = sum(1 for t in range(n_tiles) if sorted_slots[starts[t]] < L)
        assert all(sorted_slots[starts[t]] < L for t in range(n_valid))
        assert n_valid <= batch.max_tiles(T, L) == batch.meta.max_tiles(T, L, tile_m)


def test_batch_prepare_in_place_keeps_buffers():
    batch = LoRABatch.prepare([0, 1, -1], max_tokens=8)
    ptrs = [t.data_ptr() for t in (batch.token_slots, batch.sorted_tokens, batch.sorted_slots, batch.tile_starts)]
    batch.prepare_([2, 2, 2, 2, 0])
    assert [
        t.data_ptr() for t in (batch.token_slots, batch.sorted_tokens, batch.sorted_slots, batch.tile_starts)
    ] == ptrs
    assert batch.token_slots.tolist() == [2, 2, 2, 2, 0, -1, -1, -1]
    assert batch.num_tokens == 5 and batch.has_adapter is True
    with pytest.raises(ValueError, match="capacity"):
        batch.prepare_([0] * 9)
    with pytest.raises(TypeError):
        LoRABatch.prepare([0.5])
    batch.prepare_(torch.tensor([-1, -1]))
    assert batch.has_adapter is False and batch.tile_starts.tolist() == [-1] * 9
    seq = LoRABatch.prepare_sequences([3, -1, 0], 2)
    assert seq.token_slots.tolist() == [3, 3, -1, -1, 0, 0]
    assert LoRABatch.prepare_sequences([1, 2], [1, 3]).token_slots.tolist() == [1, 2, 2, 2]
    with pytest.raises(ValueError, match="tokens_per_sequence"):
        LoRABatch.prepare_sequences([1, 2], [1])


# ------------------------------------------------------------------------------------------------ the reference
def test_reference_matches_independent_oracle():
    gen = torch.Generator().manual_seed(2)
    pool, adapters = _make_pool(8, 64, MIXED_RANKS, device="cpu")
    weight = torch.randn(sum(SLICES), K, generator=gen) / math.sqrt(K)
    bias = torch.randn(sum(SLICES), generator=gen)
    x = torch.randn(2, 17, K, generator=gen)
    ids = _ids("repeats", 34, sorted(adapters), gen) + []
    ids[3] = 7  # an empty slot in range: no adapter
    got = ref.multi_lora_linear(
        x.double(), weight, bias, pool.A_stack, pool.B_stack, pool.ranks, pool.scales, torch.tensor(ids), SLICES
    )
    # float64 data, but the pool holds its scales in fp32: the fp32 bound
    torch.testing.assert_close(got, _naive(x, weight, bias, adapters, ids, SLICES), **close_small_k())


# ------------------------------------------------------------------------------------- kernels vs the reference
CASES = [
    # (T, pattern, slices, fused, lead)
    (1, "repeats", SLICES, None, ()),
    (5, "distinct", SLICES, True, ()),
    (5, "repeats", [40], False, ()),
    (33, "repeats", SLICES, False, (3,)),
    (33, "distinct", [40], None, ()),
    (33, "none", SLICES, False, ()),
    (33, "one", SLICES, True, ()),
    (130, "repeats", SLICES, None, (2, 5)),
    (130, "one", [40], False, ()),
]


@needs_triton
@pytest.mark.parametrize("T,pattern,slices,fused,lead", CASES)
def test_multi_lora_linear_triton_matches_reference(T, pattern, slices, fused, lead):
    gen = torch.Generator().manual_seed(T * 7 + len(pattern))
    ranks = MIXED_RANKS * 6 if pattern == "distinct" else MIXED_RANKS  # ranks 1, 8, 16, 64 in one pool
    L = len(ranks) + 2
    pool, adapters = _make_pool(L, 64, ranks, slices=slices, seed=T)
    N = sum(slices)
    weight = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(DEVICE)
    bias = torch.randn(N, generator=gen).to(DEVICE)
    ids = _ids(pattern, T, sorted(adapters), gen)
    rows = math.prod(lead) if lead else 1
    M = T * rows
    ids = (ids * rows)[:M]
    x = torch.randn(*lead, T, K, generator=gen).to(DEVICE) if lead else torch.randn(T, K, generator=gen).to(DEVICE)
    batch = LoRABatch.prepare(ids, device=DEVICE)
    got = lk.multi_lora_linear(x, weight, bias, pool, batch, backend="triton", fused=fused)
    want = _naive(
        x.cpu(),
        weight.cpu(),
        bias.cpu(),
        {s: ([t.cpu() for t in a], [t.cpu() for t in b], sc) for s, (a, b, sc) in adapters.items()},
        ids,
        slices,
    )
    assert got.shape == (*lead, T, N)
    torch.testing.assert_close(got.cpu().double(), want, **close(torch.float32))
    # the torch backend gives the same
    got_ref = lk.multi_lora_linear(x, weight, bias, pool, batch, backend="torch")
    torch.testing.assert_close(got_ref.cpu().double(), want, **close(torch.float32))


@needs_triton
def test_shrink_has_no_split_k_atomics_in_deterministic_mode(monkeypatch):
    """Under torch.use_deterministic_algorithms the shrink runs without split-K (no fp32 atomics), and is right."""
    from lora_kernels.triton import multi_lora as ML

    grids = []
    real = ML._batched_shrink_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(ML, "_batched_shrink_kernel", Spy())
    g = torch.Generator().manual_seed(12)
    x, A = torch.randn(5, 100, generator=g).to(DEVICE), torch.randn(2, 16, 100, generator=g).to(DEVICE)
    ranks = torch.tensor([16, 5], dtype=torch.int32, device=DEVICE)
    batch = LoRABatch.prepare([1, 0, 1, -1, 0], device=DEVICE)
    meta = batch.meta
    outs = []
    was = torch.are_deterministic_algorithms_enabled()
    for det in (False, True):
        torch.use_deterministic_algorithms(det)
        try:
            out = torch.empty(5, 16, device=DEVICE)
            outs.append(ML.shrink(x, A, ranks, meta, out, 1, batch.tile_m).cpu())
        finally:
            torch.use_deterministic_algorithms(was)
    assert grids[1][2] == 1
    if not HAS_CUDA:
        assert grids[0][2] > 1  # the interpreter splits K otherwise, so both paths are covered
    torch.testing.assert_close(outs[1], outs[0], **close_small_k())
    want = torch.zeros(5, 16)
    for m, l in enumerate([1, 0, 1, -1, 0]):
        if l >= 0:
            r = int(ranks[l])
            want[m, :r] = x[m].cpu() @ A[l, :r].cpu().t()
    torch.testing.assert_close(outs[1], want, **close_small_k())


def test_k_pipeline_fits_shared_memory():
    """The shrink/fused launchers size BLOCK_K and num_stages to the device's shared memory: the common decode case
    keeps BLOCK_K = 256 at 3 stages; big tiles / ranks / fp32 shrink the pipeline until the estimate fits."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    from lora_kernels.triton import _utils as U

    h100, a100, ada = 227 * 1024, 163 * 1024, 99 * 1024
    assert U.k_pipeline(16, 256, 64, 2, 2, 16 * 64 * 4, h100) == (256, 3)
    for smem in (h100, a100, ada):
        for bm in (16, 32, 64, 128):
            for br in (16, 64, 128):
                for xb, ab in ((2, 2), (4, 4), (2, 4)):
                    reserve = bm * br * 4 + br * 256 * ab
                    bk, st = U.k_pipeline(bm, 256, br, xb, ab, reserve, smem)
                    assert 32 <= bk <= 256 and 2 <= st <= 3
                    need = st * (bm * bk * xb + bk * br * ab) + reserve
                    assert need <= smem or (bk, st) == (32, 2), (smem, bm, br, xb, ab, bk, st, need)


@needs_triton
@pytest.mark.parametrize("fused", [False, True])
def test_triton_launchers_honour_strides_of_out_s_and_scales(fused):
    """The Triton launchers read every stride of out / s / scales (no hidden contiguity assumption): out and s
    column-major, scales a transposed view, against a float64 loop over the tokens."""
    from lora_kernels.triton import multi_lora as ML

    g = torch.Generator().manual_seed(11)
    M, K, L, R, slices = 7, 40, 3, 8, [20, 13]
    S, N = len(slices), sum(slices)
    x = torch.randn(M, K, generator=g)
    A = torch.randn(L, S * R, K, generator=g)
    B = torch.randn(L, N, R, generator=g)
    ranks = torch.tensor([8, 3, 0], dtype=torch.int32)
    scales = torch.randn(S, L, generator=g).t()  # [L, S], strides (1, L)
    ids = [0, 1, -1, 2, 1, 0, 0]
    y0 = torch.randn(M, N, generator=g)
    s_want = torch.zeros(M, S * R, dtype=torch.float64)
    y_want = y0.double().clone()
    offs = [0, slices[0]]
    for m, l in enumerate(ids):
        if l < 0 or ranks[l] == 0:
            continue
        r = int(ranks[l])
        for i in range(S):
            sv = x[m].double() @ A[l, i * R : i * R + r].double().t()
            s_want[m, i * R : i * R + r] = sv
            y_want[m, offs[i] : offs[i] + slices[i]] += scales[l, i].double() * (
                B[l, offs[i] : offs[i] + slices[i], :r].double() @ sv
            )
    dev = DEVICE
    x, A, B, ranks, scales, y0 = (t.to(dev) for t in (x, A, B, ranks, scales, y0))
    assert not scales.is_contiguous()
    batch = LoRABatch.prepare(ids, device=dev)
    meta = batch.meta
    y = y0.t().contiguous().t()  # column-major y as well
    if fused:
        ML.fused(x, A, B, ranks, scales, meta, y, slices, batch.tile_m)
    else:
        out = torch.full((S * R, M), float("nan"), device=dev).t()  # [M, S·R], strides (1, M)
        ML.shrink(x, A, ranks, meta, out, S, batch.tile_m)
        torch.testing.assert_close(out.cpu().double(), s_want, **close_small_k())
        s_cm = s_want.float().t().contiguous().t().to(dev)  # column-major s
        ML.expand(s_cm, B, ranks, scales, meta, y, slices, batch.tile_m)
    torch.testing.assert_close(y.cpu().double(), y_want, **close_small_k())


@needs_triton
@pytest.mark.parametrize("tile_m,fused", [(32, False), (128, True)])
def test_tile_sizes(tile_m, fused):
    gen = torch.Generator().manual_seed(tile_m)
    pool, adapters = _make_pool(6, 16, [16, 2, 9], slices=SLICES)
    N = sum(SLICES)
    weight = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(DEVICE)
    x = torch.randn(70, K, generator=gen).to(DEVICE)
    ids = _ids("repeats", 70, sorted(adapters), gen)
    batch = LoRABatch.prepare(ids, max_tokens=80, device=DEVICE, tile_m=tile_m)
    assert batch.tile_m == tile_m
    got = lk.multi_lora_linear(x, weight, None, pool, batch, backend="triton", fused=fused)
    want = _naive(
        x.cpu(),
        weight.cpu(),
        None,
        {s: ([t.cpu() for t in a], [t.cpu() for t in b], sc) for s, (a, b, sc) in adapters.items()},
        ids,
        SLICES,
    )
    torch.testing.assert_close(got.cpu().double(), want, **close(torch.float32))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_half_precision(dtype, fused):
    gen = torch.Generator().manual_seed(5)
    pool, adapters = _make_pool(6, 16, [16, 8, 1], dtype=dtype)
    N = sum(SLICES)
    weight = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(DEVICE, dtype)
    x = torch.randn(21, K, generator=gen).to(DEVICE, dtype)
    ids = _ids("repeats", 21, sorted(adapters), gen)
    got = lk.multi_lora_linear(
        x, weight, None, pool, LoRABatch.prepare(ids, device=DEVICE), backend="triton", fused=fused
    )
    assert got.dtype == dtype
    want = _naive(
        x.cpu(),
        weight.cpu(),
        None,
        {s: ([t.cpu() for t in a], [t.cpu() for t in b], sc) for s, (a, b, sc) in adapters.items()},
        ids,
        SLICES,
    )
    torch.testing.assert_close(got.cpu().double(), want, **close(dtype))


@needs_triton
def test_fp32_pool_with_half_activations():
    gen = torch.Generator().manual_seed(6)
    pool, adapters = _make_pool(4, 8, [8, 3], slices=[40], dtype=torch.float32)
    weight = (torch.randn(40, K, generator=gen) / math.sqrt(K)).to(DEVICE, torch.float16)
    x = torch.randn(9, K, generator=gen).to(DEVICE, torch.float16)
    ids = [0, 1, -1, 1, 0, 0, 1, -1, 1]
    got = lk.multi_lora_linear(x, weight, None, pool, LoRABatch.prepare(ids, device=DEVICE), backend="triton")
    want = _naive(
        x.cpu(),
        weight.cpu(),
        None,
        {s: ([t.cpu() for t in a], [t.cpu() for t in b], sc) for s, (a, b, sc) in adapters.items()},
        ids,
        [40],
    )
    torch.testing.assert_close(got.cpu().double(), want, **close(torch.float16))


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_low_level_shrink_expand(backend):
    gen = torch.Generator().manual_seed(7)
    pool, _ = _make_pool(5, 16, [16, 4, 9], slices=SLICES, use_rslora=True)
    T = 19
    ids = _ids("repeats", T, [0, 1, 2], gen)
    batch = LoRABatch.prepare(ids, device=DEVICE)
    x = torch.randn(T, K, generator=gen).to(DEVICE)
    S, R = len(SLICES), 16
    out = torch.full((T, S * R), float("nan"), device=DEVICE)  # every element must be written
    lk.lora_shrink(x, pool.A_stack, batch, out, ranks=pool.ranks, num_slices=S, backend=backend)
    want_s = ref.lora_shrink(x.cpu().double(), pool.A_stack.cpu(), torch.tensor(ids), pool.ranks.cpu(), S)
    torch.testing.assert_close(out.cpu().double(), want_s, **close_small_k())
    y0 = torch.randn(T, sum(SLICES), generator=gen).to(DEVICE)
    y = y0.clone()
    ret = lk.lora_expand(out, pool.B_stack, batch, y, pool.scales, slices=SLICES, ranks=pool.ranks, backend=backend)
    assert ret is y
    want_y = ref.lora_expand(
        want_s, pool.B_stack.cpu(), torch.tensor(ids), pool.ranks.cpu(), pool.scales.cpu(), y0.cpu().double(), SLICES
    )
    torch.testing.assert_close(y.cpu().double(), want_y, **close_small_k())
    # per-slice stack lists (vLLM style) give the same
    out_l = torch.zeros_like(out)
    lk.lora_shrink(x, list(pool.A_stack.split(R, dim=1)), batch, out_l, ranks=pool.ranks, backend=backend)
    torch.testing.assert_close(out_l, out, rtol=0, atol=0)
    y_l = y0.clone()
    lk.lora_expand(out, pool.B_slices, batch, y_l, pool.scales, ranks=pool.ranks, backend=backend)
    torch.testing.assert_close(y_l, y, rtol=0, atol=0)
    # a float scale and no ranks (every slot at full rank R: padding is zero, so same products)
    y2 = y0.clone()
    lk.lora_expand(out, pool.B_stack, batch, y2, 0.5, slices=SLICES, backend=backend)
    want2 = ref.lora_expand(
        want_s,
        pool.B_stack.cpu(),
        torch.tensor(ids),
        torch.full((5,), 16, dtype=torch.int32),
        torch.full((5, S), 0.5),
        y0.cpu().double(),
        SLICES,
    )
    torch.testing.assert_close(y2.cpu().double(), want2, **close_small_k())


# ---------------------------------------------------------------------------------------- pool state and errors
@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_load_unload_reload(backend):
    gen = torch.Generator().manual_seed(8)
    pool = AdapterPool(3, 16, K, 40, device=DEVICE)
    weight = (torch.randn(40, K, generator=gen) / math.sqrt(K)).to(DEVICE)
    x = torch.randn(6, K, generator=gen).to(DEVICE)
    a1, b1 = _adapter(16, K, [40], gen, device=DEVICE)
    a2, b2 = _adapter(4, K, [40], gen, device=DEVICE)
    s1 = pool.load("first", a1[0], b1[0], alpha=32)
    pool.load("other", a2[0], b2[0])
    ids = [s1, -1, s1, 1, s1, -1]
    batch = LoRABatch.prepare(ids, device=DEVICE)
    y1 = lk.multi_lora_linear(x, weight, None, pool, batch, backend=backend)
    want1 = _naive(
        x.cpu(),
        weight.cpu(),
        None,
        {s1: ([a1[0].cpu()], [b1[0].cpu()], [2.0]), 1: ([a2[0].cpu()], [b2[0].cpu()], [1.0])},
        ids,
        [40],
    )
    torch.testing.assert_close(y1.cpu().double(), want1, **close(torch.float32))
    assert pool.unload("first") == s1
    assert "first" not in pool and pool.free_slots() == [0, 2]
    with pytest.raises(ValueError, match="empty"):
        lk.multi_lora_linear(x, weight, None, pool, batch, backend=backend)
    # unchecked, the freed slot is "no adapter": the base output
    y_free = lk.multi_lora_linear(x, weight, None, pool, batch, backend=backend, check=False)
    want_free = _naive(x.cpu(), weight.cpu(), None, {1: ([a2[0].cpu()], [b2[0].cpu()], [1.0])}, ids, [40])
    torch.testing.assert_close(y_free.cpu().double(), want_free, **close(torch.float32))
    a3, b3 = _adapter(8, K, [40], gen, device=DEVICE)
    assert pool.load("second", a3[0], b3[0], alpha=4, use_rslora=True) == s1  # the freed slot is reused
    y3 = lk.multi_lora_linear(x, weight, None, pool, batch, backend=backend)
    want3 = _naive(
        x.cpu(),
        weight.cpu(),
        None,
        {s1: ([a3[0].cpu()], [b3[0].cpu()], [4 / math.sqrt(8)]), 1: ([a2[0].cpu()], [b2[0].cpu()], [1.0])},
        ids,
        [40],
    )
    torch.testing.assert_close(y3.cpu().double(), want3, **close(torch.float32))


def _snapshot(pool):
    return (
        pool.names,
        pool.host_ranks,
        pool.A_stack.clone(),
        pool.B_stack.clone(),
        pool.ranks.clone(),
        pool.scales.clone(),
    )


def _assert_same(pool, snap):
    names, host_ranks, a, b, r, s = snap
    assert pool.names == names and pool.host_ranks == host_ranks
    for t, u in zip((pool.A_stack, pool.B_stack, pool.ranks, pool.scales), (a, b, r, s)):
        assert torch.equal(t, u)


def test_bad_loads_raise_and_leave_pool_unchanged():
    pool = AdapterPool(2, 8, K, SLICES, device="cpu")
    good_a = [torch.randn(4, K) for _ in SLICES]
    good_b = [torch.randn(n, 4) for n in SLICES]
    pool.load("a", good_a, good_b)
    snap = _snapshot(pool)
    bad = [
        (ValueError, "rank 9", dict(lora_A=[torch.randn(9, K)] * 3, lora_B=[torch.randn(n, 9) for n in SLICES])),
        (ValueError, "rank 0", dict(lora_A=[torch.randn(0, K)] * 3, lora_B=[torch.randn(n, 0) for n in SLICES])),
        (ValueError, "in_features", dict(lora_A=[torch.randn(4, K + 1)] * 3, lora_B=good_b)),
        (ValueError, "out_features=8", dict(lora_A=good_a, lora_B=[good_b[0], torch.randn(9, 4), good_b[2]])),
        (ValueError, "3 output slices", dict(lora_A=good_a[:2], lora_B=good_b[:2])),
        (ValueError, "inf or NaN", dict(lora_A=[torch.full((4, K), float("nan"))] * 3, lora_B=good_b)),
        (TypeError, "dtype", dict(lora_A=[torch.ones(4, K, dtype=torch.int64)] * 3, lora_B=good_b)),
    ]
    for exc, msg, kw in bad:
        with pytest.raises(exc, match=msg):
            pool.load("b", **kw)
        _assert_same(pool, snap)
    half = AdapterPool(2, 8, K, 8, dtype=torch.float16, device="cpu")
    with pytest.raises(ValueError, match="overflows"):
        half.load("big", torch.full((4, K), 1e6), torch.randn(8, 4))
    assert len(half) == 0 and half.host_ranks == [0, 0] and not half.A_stack.any()
    with pytest.raises(ValueError, match="already loaded"):
        pool.load("a", good_a, good_b)
    _assert_same(pool, snap)
    with pytest.raises(ValueError, match="already holds"):
        pool.load("b", good_a, good_b, slot=0)
    _assert_same(pool, snap)
    pool.load("b", good_a, good_b)
    snap = _snapshot(pool)
    with pytest.raises(RuntimeError, match="full"):
        pool.load("c", good_a, good_b)
    _assert_same(pool, snap)
    with pytest.raises(KeyError, match="not loaded"):
        pool.unload("zzz")
    with pytest.raises(ValueError, match="max_rank"):
        AdapterPool(2, 0, K, 8)
    with pytest.raises(ValueError, match="slices"):
        AdapterPool(2, 4, K, [8, 8, 8, 8, 8])


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_ids_raise_or_count_as_none(backend):
    gen = torch.Generator().manual_seed(9)
    pool, adapters = _make_pool(4, 16, [16, 8], slices=[40])  # slots 0, 1 loaded; 2, 3 empty
    weight = (torch.randn(40, K, generator=gen) / math.sqrt(K)).to(DEVICE)
    x = torch.randn(7, K, generator=gen).to(DEVICE)
    ids = [0, 4, 1, -7, 1000, 3, 0]
    batch = LoRABatch.prepare(ids, device=DEVICE)
    with pytest.raises(ValueError) as err:
        lk.multi_lora_linear(x, weight, None, pool, batch, backend=backend)
    for piece in ("token 1: 4", "token 3: -7", "token 4: 1000", "token 5: 3", "outside -1..3", "empty"):
        assert piece in str(err.value)
    # device-side ids take the same check (read back)
    with pytest.raises(ValueError, match="token 4: 1000"):
        lk.multi_lora_linear(
            x, weight, None, pool, LoRABatch.prepare(torch.tensor(ids, device=DEVICE)), backend=backend
        )
    for fused in (False, True):
        got = lk.multi_lora_linear(x, weight, None, pool, batch, backend=backend, check=False, fused=fused)
        want = _naive(
            x.cpu(),
            weight.cpu(),
            None,
            {s: ([t.cpu() for t in a], [t.cpu() for t in b], sc) for s, (a, b, sc) in adapters.items()},
            ids,
            [40],
        )
        torch.testing.assert_close(got.cpu().double(), want, **close(torch.float32))
    # ids beyond int32 saturate (never wrap onto a loaded slot: 2^32 + 1 must not become slot 1)
    big = [0, 2**32 + 1, -(2**32) + 1, 1]
    big_batch = LoRABatch.prepare(big, device=DEVICE)
    with pytest.raises(ValueError, match="token 1: 4294967297"):
        lk.multi_lora_linear(x[:4], weight, None, pool, big_batch, backend=backend)
    got = lk.multi_lora_linear(x[:4], weight, None, pool, big_batch, backend=backend, check=False)
    want = _naive(
        x[:4].cpu(),
        weight.cpu(),
        None,
        {s: ([t.cpu() for t in a], [t.cpu() for t in b], sc) for s, (a, b, sc) in adapters.items()},
        [0, -1, -1, 1],
        [40],
    )
    torch.testing.assert_close(got.cpu().double(), want, **close(torch.float32))
    with pytest.raises(ValueError, match="prepared for 7 tokens"):
        lk.multi_lora_linear(x[:5], weight, None, pool, batch, backend=backend)


@needs_triton
@pytest.mark.parametrize("path", ["split", "fused", "gemm", "lanes"])
def test_kernels_read_nothing_outside_the_pool_or_past_a_rank(path):
    """The pool's tensors are views into NaN-filled storage: slot -1 and slot L would read NaN, as would padding rows
    past an adapter's rank and the weights of an empty slot. The output must equal the oracle, NaN-free. "lanes": the
    one-launch gemm kernel with 2 lanes (the 6 named slots take 3 lane groups)."""
    gen = torch.Generator().manual_seed(10)
    L, R, S = 4, 16, len(SLICES)
    pool, adapters = _make_pool(L, R, [16, 3, 5, 8], slices=SLICES)
    pool.unload("ad2")  # slot 2 empty; slots 0 and L-1 loaded, so clamping a bad id instead of skipping it would leak
    del adapters[2]
    nan = float("nan")

    def poisoned(t, fill):
        big = torch.full((L + 2, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
        big[1 : L + 1] = t
        return big, big[1 : L + 1]

    big_a, pool.A_stack = poisoned(pool.A_stack, nan)
    big_b, pool.B_stack = poisoned(pool.B_stack, nan)
    big_r, pool.ranks = poisoned(pool.ranks, R)
    big_s, pool.scales = poisoned(pool.scales, nan)
    pool.A_stack[1, [s * R + j for s in range(S) for j in range(3, R)]] = nan  # padding past rank 3
    pool.B_stack[1, :, 3:] = nan
    pool.A_stack[2] = nan  # empty slot (rank 0)
    pool.B_stack[2] = nan
    weight = (torch.randn(40, K, generator=gen) / math.sqrt(K)).to(DEVICE)
    x = torch.randn(9, K, generator=gen).to(DEVICE)
    ids = [0, -1, 1, L, 2, 3, -2, 1, L + 1]
    batch = LoRABatch.prepare(ids, device=DEVICE)
    if path == "lanes":
        from lora_kernels.triton import multi_lora as ML

        A, B = pool.A_stack, pool.B_stack
        got = ML.linear_lanes(x, weight, None, A, B, pool.ranks, pool.scales, batch.meta, SLICES, 2)
    else:
        got = lk.multi_lora_linear(x, weight, None, pool, batch, backend="triton", check=False, path=path)
    want = _naive(
        x.cpu(),
        weight.cpu(),
        None,
        {s: ([t.cpu() for t in a], [t.cpu() for t in b], sc) for s, (a, b, sc) in adapters.items()},
        ids,
        SLICES,
    )
    torch.testing.assert_close(got.cpu().double(), want, **close(torch.float32))


def test_input_errors():
    pool, _ = _make_pool(3, 8, [8], slices=[40], device="cpu")
    batch = LoRABatch.prepare([0, -1])
    x = torch.randn(2, K)
    w = torch.randn(40, K)
    with pytest.raises(ValueError, match="weight"):
        lk.multi_lora_linear(x, torch.randn(41, K), None, pool, batch)
    with pytest.raises(ValueError, match="in_features"):
        lk.multi_lora_linear(torch.randn(2, K + 1), w, None, pool, batch)
    with pytest.raises(TypeError, match="LoRABatch"):
        lk.multi_lora_linear(x, w, None, pool, [0, -1])
    with pytest.raises(TypeError, match="dtype"):
        lk.multi_lora_linear(x.double(), w, None, pool, batch)
    out = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="num_slices"):
        lk.lora_shrink(x, pool.A_stack, batch, out, num_slices=3)
    with pytest.raises(ValueError, match="slices"):
        lk.lora_expand(out, pool.B_stack, batch, torch.zeros(2, 40), 1.0, slices=[20, 21])
    with pytest.raises(TypeError, match="out"):
        lk.lora_shrink(x, pool.A_stack, batch, out.half())


def test_no_adapter_launches_no_lora_kernel(monkeypatch):
    pool, _ = _make_pool(3, 8, [8], slices=[40], device="cpu")

    def boom(*a, **k):
        raise AssertionError("a LoRA kernel ran for a batch without adapters")

    monkeypatch.setattr(ops, "_shrink_op", boom)
    monkeypatch.setattr(ops, "_expand_op", boom)
    monkeypatch.setattr(ops, "_fused_op", boom)
    monkeypatch.setattr(ops, "_split_op", boom)
    x, w, b = torch.randn(20, K), torch.randn(40, K), torch.randn(40)
    got = lk.multi_lora_linear(x, w, b, pool, LoRABatch.prepare([-1] * 20), backend="torch")
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b))


# ------------------------------------------------------------------------------------------ custom ops, compile
def test_opcheck_custom_ops():
    pool, _ = _make_pool(4, 8, [8, 2], slices=SLICES, device="cpu")
    batch = LoRABatch.prepare([0, -1, 1, 1, 0], max_tokens=8)
    meta = batch.meta
    x = torch.randn(5, K)
    s = torch.zeros(5, 3 * 8)
    torch.library.opcheck(ops._shrink_op, (x, pool.A_stack, pool.ranks, *meta, s, 3, 16, "torch"))
    s = ref.lora_shrink(x, pool.A_stack, batch.token_slots, pool.ranks, 3)
    y = torch.randn(5, sum(SLICES))
    torch.library.opcheck(ops._expand_op, (s, pool.B_stack, pool.ranks, pool.scales, *meta, y, SLICES, 16, "torch"))
    torch.library.opcheck(
        ops._fused_op, (x, pool.A_stack, pool.B_stack, pool.ranks, pool.scales, *meta, y, SLICES, 16, "torch")
    )


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(11)
    pool, _ = _make_pool(5, 16, [16, 8, 1], slices=SLICES, device="cpu")
    weight = torch.randn(sum(SLICES), K, generator=gen) / math.sqrt(K)
    bias = torch.randn(sum(SLICES), generator=gen)
    batch = LoRABatch.prepare([0, 1, -1, 2, 2, 0, 1, 1, -1, 0, 2, 1, 0, 0, 1, 2, 2, 1], max_tokens=18)
    x = torch.randn(18, K, generator=gen)

    def step(x):
        return lk.multi_lora_linear(x, weight, bias, pool, batch, backend="torch", fused=False) * 2.0

    compiled = torch.compile(step, fullgraph=True)  # inductor: the mutating custom ops go through functionalization
    torch.testing.assert_close(compiled(x), step(x), rtol=1e-6, atol=1e-6)  # the same ops, traced: ~bitwise
    batch.prepare_([2, 2, 2, 1, 1, -1, 0, 0, 0, 0, 2, 1, -1, -1, 1, 2, 0, 1])  # new ids, same buffers
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(x), step(x), rtol=1e-6, atol=1e-6)

    fused = torch.compile(
        lambda x: lk.multi_lora_linear(x, weight, bias, pool, batch, backend="torch", fused=True),
        fullgraph=True,
        backend="aot_eager",
    )
    torch.testing.assert_close(fused(x), step(x) / 2.0, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- module and model
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(K, K)
        self.v_proj = nn.Linear(K, K, bias=False)
        self.out = nn.Linear(K, 8)

    def forward(self, x):
        return self.out(torch.relu(self.q_proj(x)) + self.v_proj(x))


@needs_triton
def test_module_and_model_helpers():
    torch.manual_seed(12)
    model = _Block().to(DEVICE)
    x = torch.randn(2, 6, K, device=DEVICE)
    base = model(x)
    names = lk.inject_multi_lora(model, ["q_proj", "v_proj"], max_adapters=4, max_rank=8)
    assert names == ["q_proj", "v_proj"]
    assert isinstance(model.q_proj, lk.MultiLoRALinear) and isinstance(model.out, nn.Linear)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        lk.inject_multi_lora(model, ["k_proj"], 4, 8)
    torch.testing.assert_close(model(x), base)  # no batch: base layers

    aq, bq = torch.randn(8, K, device=DEVICE) / 7, torch.randn(K, 8, device=DEVICE)
    av, bv = torch.randn(3, K, device=DEVICE) / 7, torch.randn(K, 3, device=DEVICE)
    s_a = lk.load_multi_adapter(model, "A", {"q_proj": (aq, bq), "v_proj": (av, bv)}, alpha=16)
    s_b = lk.load_multi_adapter(model, "B", {"v_proj": (av * 2, bv)})  # targets v_proj only: q_proj reserves
    assert (s_a, s_b) == (0, 1) and lk.multi_adapter_slot(model, "B") == 1
    with pytest.raises(KeyError):
        lk.load_multi_adapter(model, "C", {"nope": (av, bv)})
    assert "C" not in model.q_proj.pool and "C" not in model.v_proj.pool
    with pytest.raises(ValueError, match="rank 9"):  # all or nothing: q_proj loads, v_proj fails, q_proj rolls back
        lk.load_multi_adapter(model, "C", {"q_proj": (aq, bq), "v_proj": (torch.randn(9, K), torch.randn(K, 9))})
    assert "C" not in model.q_proj.pool

    ids = [s_a, s_b, -1, s_b, s_a, s_a] * 2
    batch = lk.LoRABatch.prepare(ids, device=DEVICE)
    with lk.use_batch(model, batch):
        got = model(x)
    assert model.q_proj.batch is None

    xf = x.reshape(-1, K)
    idt = torch.tensor(ids, device=DEVICE)[:, None]
    q = model.q_proj.weight
    yq = xf @ q.t() + model.q_proj.bias + torch.where(idt == s_a, 2.0 * (xf @ aq.t()) @ bq.t(), 0.0)
    yv = (
        xf @ model.v_proj.weight.t()
        + torch.where(idt == s_a, 16 / 3 * (xf @ av.t()) @ bv.t(), 0.0)
        + torch.where(idt == s_b, (xf @ (2 * av).t()) @ bv.t(), 0.0)
    )
    want = model.out(torch.relu(yq) + yv).reshape(2, 6, 8)
    torch.testing.assert_close(got, want, **close(torch.float32))

    # forward(x, batch) directly, and the module form from an nn.Linear
    torch.testing.assert_close(model.v_proj(xf, batch), yv, **close(torch.float32))
    assert lk.unload_multi_adapter(model, "B") == s_b
    with pytest.raises(KeyError):
        lk.multi_adapter_slot(model, "B")
    layer = lk.MultiLoRALinear.from_linear(nn.Linear(K, 40).to(DEVICE), max_adapters=2, max_rank=4, slices=[24, 16])
    assert layer.load_adapter("z", [torch.randn(4, K)] * 2, torch.randn(40, 4)) == 0
    assert layer.pool.slices == (24, 16) and layer.slot_of("z") == 0
    assert "max_rank=4" in repr(layer)


def test_compiled_model_with_use_batch():
    torch._dynamo.reset()
    torch.manual_seed(16)
    model = _Block()
    lk.inject_multi_lora(model, ["q_proj", "v_proj"], max_adapters=3, max_rank=4, backend="torch")
    for i in range(2):
        lk.load_multi_adapter(
            model,
            f"a{i}",
            {
                "q_proj": (torch.randn(4, K) / 7, torch.randn(K, 4)),
                "v_proj": (torch.randn(2, K) / 7, torch.randn(K, 2)),
            },
        )
    x = torch.randn(10, K)
    batch = LoRABatch.prepare([0, 1, -1, 1, 0, 0, 1, -1, 1, 1], max_tokens=10)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with lk.use_batch(model, batch):
        torch.testing.assert_close(compiled(x), model(x), **close_small_k())
        batch.prepare_([1, 1, 0, -1, 0, 0, 1, -1, -1, 0])
        torch.testing.assert_close(compiled(x), model(x), **close_small_k())


def test_module_to_moves_pool():
    layer = lk.MultiLoRALinear(K, 16, max_adapters=2, max_rank=4)
    layer.load_adapter("a", torch.randn(4, K), torch.randn(16, 4), alpha=8)
    layer = layer.to(torch.float64)
    assert layer.pool.A_stack.dtype == torch.float64 and layer.pool.scales.dtype == torch.float32
    assert layer.pool.A_stack is layer.lora_A_stack
    x = torch.randn(3, K, dtype=torch.float64)
    y = layer(x, LoRABatch.prepare([0, -1, 0]))
    assert y.dtype == torch.float64 and torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_module_under_autocast_computes_like_an_autocast_linear(dtype):
    # Inside torch.autocast(bf16) the layer computes in bf16 and returns bf16 with or without a batch, as an autocast
    # nn.Linear does (fp32 master weights and pool; a bf16 layer). A pool of another 16-bit dtype (fp16) cannot serve
    # bf16 activations: the layer then computes in x's dtype, as outside autocast.
    gen = torch.Generator().manual_seed(17)
    layer = lk.MultiLoRALinear(K, 16, max_adapters=2, max_rank=4, bias=True, dtype=dtype, backend="torch")
    w = torch.randn(16, K, generator=gen) / math.sqrt(K)
    bias = torch.randn(16, generator=gen)
    a, b = torch.randn(4, K, generator=gen) / math.sqrt(K), torch.randn(16, 4, generator=gen)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(bias)
    layer.load_adapter("a", a.to(dtype), b.to(dtype), alpha=8)
    x = torch.randn(5, K, generator=gen).to(dtype)
    batch = LoRABatch.prepare([0, -1, 0, 0, -1])
    lin = nn.Linear(K, 16, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(layer.weight)
        lin.bias.copy_(layer.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, batch)
        y_none = layer(x)
        y_lin = lin(x)
    assert y_none.dtype == y_lin.dtype == torch.bfloat16
    assert y.dtype == (dtype if dtype == torch.float16 else torch.bfloat16)
    f64 = lambda t: t.detach().double()  # noqa: E731
    want = f64(x) @ f64(layer.weight).t() + f64(layer.bias)
    want[[0, 2, 3]] += 2.0 * ((f64(x) @ f64(a.to(dtype)).t()) @ f64(b.to(dtype)).t())[[0, 2, 3]]
    torch.testing.assert_close(y.double(), want, atol=8e-2, rtol=2e-2)  # x and W0 rounded to bf16 before the op
    assert layer.weight.dtype == dtype and layer.pool.dtype == dtype  # stored tensors untouched


# ------------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_bf16_matches_reference(fused):
    gen = torch.Generator().manual_seed(13)
    pool, adapters = _make_pool(8, 64, MIXED_RANKS, dtype=torch.bfloat16, device="cuda")
    N = sum(SLICES)
    weight = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to("cuda", torch.bfloat16)
    for T in (1, 16, 77):
        x = torch.randn(T, K, generator=gen).to("cuda", torch.bfloat16)
        ids = _ids("repeats", T, sorted(adapters), gen)
        got = lk.multi_lora_linear(
            x, weight, None, pool, LoRABatch.prepare(ids, device="cuda"), backend="triton", fused=fused
        )
        want = _naive(
            x.cpu(),
            weight.cpu(),
            None,
            {s: ([t.cpu() for t in a], [t.cpu() for t in b], sc) for s, (a, b, sc) in adapters.items()},
            ids,
            SLICES,
        )
        assert_close_to_oracle(got, multi_lora_in_dtype(x, weight, None, pool, ids, SLICES), want)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [4, 64])
def test_gpu_cuda_graph_capture_and_replay_with_new_ids(T):
    gen = torch.Generator().manual_seed(14)
    pool, adapters = _make_pool(8, 64, MIXED_RANKS, dtype=torch.float16, device="cuda")
    N = sum(SLICES)
    weight = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to("cuda", torch.float16)
    bias = torch.randn(N, generator=gen).to("cuda", torch.float16)
    x = torch.randn(T, K, generator=gen).to("cuda", torch.float16)
    batch = LoRABatch.prepare(_ids("repeats", T, sorted(adapters), gen), max_tokens=T, device="cuda")
    warm_up(lambda: lk.multi_lora_linear(x, weight, bias, pool, batch, backend="triton"))  # compiles before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lk.multi_lora_linear(x, weight, bias, pool, batch, backend="triton")
    for pattern in ("repeats", "none", "one", "repeats"):
        ids = _ids(pattern, T, sorted(adapters), gen)
        batch.prepare_(ids)
        x.copy_(torch.randn(T, K, generator=gen).to("cuda", torch.float16))
        graph.replay()
        torch.cuda.synchronize()
        want = _naive(
            x.cpu(),
            weight.cpu(),
            bias.cpu(),
            {s: ([t.cpu() for t in a], [t.cpu() for t in b], sc) for s, (a, b, sc) in adapters.items()},
            ids,
            SLICES,
        )
        assert_close_to_oracle(y, multi_lora_in_dtype(x, weight, bias, pool, ids, SLICES), want)


@pytest.mark.gpu
@pytest.mark.parametrize("L,T", [(16, 1), (128, 16), (128, 17), (16, 300), (128, 1500)])
def test_gpu_serving_shapes_fp16(L, T):
    """Benchmark-like shapes (K = N = 1024, r = 16, q|k|v-style slices in a second pool): split-K, BLOCK_K = 256,
    64-row tiles and the fused path on the real compiler."""
    gen = torch.Generator().manual_seed(L + T)
    Kb, r = 1024, 16
    for slices in ([1024], [512, 256, 256]):
        pool = AdapterPool(L, r, Kb, slices if len(slices) > 1 else slices[0], dtype=torch.float16, device="cuda")
        adapters = {}
        for i in range(L):
            a = [(torch.randn(r, Kb, generator=gen) / Kb**0.5).half().cuda() for _ in slices]
            b = [(torch.randn(n, r, generator=gen) / r**0.5).half().cuda() for n in slices]
            slot = pool.load(f"a{i}", a, b, alpha=2 * r)
            adapters[slot] = (a, b, [2.0] * len(slices))
        W = (torch.randn(sum(slices), Kb, generator=gen) / Kb**0.5).half().cuda()
        x = torch.randn(T, Kb, generator=gen).half().cuda()
        ids = torch.randint(-1, L, (T,), generator=gen).tolist()
        batch = LoRABatch.prepare(ids, device="cuda")
        want = _naive(
            x.cpu(),
            W.cpu(),
            None,
            {s: ([t.cpu() for t in a], [t.cpu() for t in b], sc) for s, (a, b, sc) in adapters.items()},
            ids,
            slices,
        )
        want_fp16 = multi_lora_in_dtype(x, W, None, pool, ids, slices)
        for fused in (False, True):
            got = lk.multi_lora_linear(x, W, None, pool, batch, backend="triton", fused=fused)
            assert_close_to_oracle(got, want_fp16, want)


@pytest.mark.gpu
def test_gpu_no_host_sync_per_call():
    """With ids prepared on the host, an eager call (id check included) and a check-free call never sync."""
    pool, adapters = _make_pool(8, 16, [16, 8, 4], dtype=torch.float16, device="cuda")
    weight = torch.randn(sum(SLICES), K, device="cuda", dtype=torch.float16)
    batch = LoRABatch.prepare(_ids("repeats", 40, sorted(adapters), torch.Generator().manual_seed(0)), device="cuda")
    for T, fused in ((40, False), (40, True)):
        x = torch.randn(T, K, device="cuda", dtype=torch.float16)
        lk.multi_lora_linear(x, weight, None, pool, batch, backend="triton", fused=fused)  # compile outside
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            lk.multi_lora_linear(x, weight, None, pool, batch, backend="triton", fused=fused)
            lk.multi_lora_linear(x, weight, None, pool, batch, backend="triton", fused=fused, check=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_compile_fullgraph_triton():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(15)
    pool, _ = _make_pool(8, 16, [16, 8, 4], dtype=torch.float16, device="cuda")
    weight = (torch.randn(sum(SLICES), K, generator=gen) / math.sqrt(K)).to("cuda", torch.float16)
    x = torch.randn(40, K, generator=gen).to("cuda", torch.float16)
    batch = LoRABatch.prepare(_ids("repeats", 40, [0, 1, 2], gen), device="cuda")
    eager = lk.multi_lora_linear(x, weight, None, pool, batch, backend="triton")
    compiled = torch.compile(
        lambda x: lk.multi_lora_linear(x, weight, None, pool, batch, backend="triton"), fullgraph=True
    )
    torch.testing.assert_close(compiled(x), eager, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------------------- sm_90 ahead-of-time compile
# Compiles the three multi-adapter kernels for sm_90 with triton's bundled ptxas, in a child process without
# TRITON_INTERPRET (this process's kernels are interpreter objects), at serving sizes (K = N = 4096, r = 16 / 64,
# fp16 and bf16). The configurations are the ones the launchers pick: the child calls the real launchers with the
# kernels swapped for recorders (and 132 SMs, an H100 SXM), then compiles each recorded launch with the argument
# specialisation the JIT would use (ints equal to 1 become constants, multiples of 16 and tensors get 16-divisibility).
# Catches what the interpreter cannot: lowering errors in GPU-only code and shared memory over 227 KiB.
_AOT_SCRIPT = r"""
import time
import torch
from lora_kernels.pool import auto_tile_m
from lora_kernels.ops._batch import BatchMeta
from lora_kernels.triton import _utils as U
from lora_kernels.triton import multi_lora as ML
from _aot import Recorder, compile_for_sm90

calls = []
for name in ("_batched_shrink_kernel", "_expand_kernel", "_fused_kernel"):
    setattr(ML, name, Recorder(getattr(ML, name), calls))
U.sm_count = lambda index: 132
U.max_smem = lambda index: 227 * 1024  # H100's opt-in limit per block (what the launchers size pipelines for)

K, L = 4096, 8
jobs = []
for dtype in (torch.float16, torch.bfloat16):
    # (tokens, rank, output slices): decode (fused, and split-K shrink with atomics), prefill with q|k|v slices.
    # The last case: a decode step of a batch with capacity 4096 (tile_m = 64): fused with 64-row tiles and rank 64
    # needs 288 KiB at BLOCK_K = 256 and 3 stages; the launcher must shrink the pipeline to fit.
    for M, R, slices, path, cap in ((16, 16, [4096], "fused", 16), (16, 64, [4096], "fused", 16),
                                    (256, 16, [4096], "two-step", 256),
                                    (4096, 64, [4096, 1024, 1024], "two-step", 4096),
                                    (16, 64, [4096], "fused", 4096)):
        S, N, tile_m = len(slices), sum(slices), auto_tile_m(cap)
        x = torch.empty(M, K, dtype=dtype)
        A = torch.empty(L, S * R, K, dtype=dtype)
        B = torch.empty(L, N, R, dtype=dtype)
        ranks = torch.empty(L, dtype=torch.int32)
        scales = torch.empty(L, S, dtype=torch.float32)
        ids, st, ss, ts = (torch.empty(n, dtype=torch.int32) for n in (M, cap, cap, cap + 1))
        y = torch.empty(M, N, dtype=dtype)
        s = torch.empty(M, S * R, dtype=torch.float32)
        if path == "fused":
            ML.fused(x, A, B, ranks, scales, BatchMeta(ids, st, ss, ts), y, slices, tile_m)
        else:
            ML.shrink(x, A, ranks, BatchMeta(ids, st, ss, ts), s, S, tile_m)
            ML.expand(s, B, ranks, scales, BatchMeta(ids, st, ss, ts), y, slices, tile_m)
for kernel, _, args, kwargs in calls:
    t0 = time.perf_counter()
    compiled, consts = compile_for_sm90(kernel, args, kwargs)
    smem = compiled.metadata.shared
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16))
    shown = {k: v for k, v in consts.items() if k.isupper()}
    print(str(kernel).split(":")[-1], dtype, shown, "smem", smem, "compile %.1fs" % (time.perf_counter() - t0))
    assert smem <= 227 * 1024, (kernel, shown, smem)
assert len(calls) == 2 * (3 + 2 * 2), len(calls)
assert any(kw.get("SPLIT_K", 1) > 1 for k, g, a, kw in calls), "no split-K shrink was compiled"
print("OK")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels are compiled and run by the GPU tests above")
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    import pathlib
    import shutil

    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    import triton

    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and shutil.which("ptxas") is None:
        pytest.skip("no ptxas available to compile for sm_90")
    run_child(_AOT_SCRIPT, tmp_path, timeout=600)
