"""Serving-path properties of the multi-adapter ops: fp32 intermediates (a shrink result beyond the fp16 range with a
finite output), decode-sized tiles chosen from the tokens of the step, and the base GEMM with the expand in its
epilogue, all against the float64 reference (Triton in the CPU interpreter here).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math

import pytest
import torch
from _aot import run_child
from _oracle import F64, multi_lora_f64, multi_lora_in_dtype
from _replay import ReplayLog, warm_up
from _tolerances import assert_close_to_oracle, close

import lora_kernels as lk
from lora_kernels.ops import multi_lora as ops
from lora_kernels.pool import AdapterPool, LoRABatch, mean_tile_adapters
from lora_kernels.reference import multi_lora as ref

from conftest import DEVICE, HAS_CUDA, INTERPRET

TRITON_OK = (HAS_CUDA or INTERPRET) and importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs triton, and CUDA or TRITON_INTERPRET=1")


# ------------------------------------------------------------------------------------- fp32 shrink intermediates
def overflow_case(device=DEVICE, dtype=torch.float16, tokens=5):
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
    x = torch.full((tokens, K), 16.0, dtype=dtype, device=device)
    ids = ([0, -1, 0, 0, -1] * tokens)[:tokens]
    return pool, weight, x, ids


def overflow_want(pool, weight, x, ids):
    want = ref.multi_lora_linear(
        x.cpu(),
        weight.cpu(),
        None,
        pool.A_stack.cpu(),
        pool.B_stack.cpu(),
        pool.ranks.cpu(),
        pool.scales.cpu(),
        torch.tensor(ids),
        list(pool.slices),
        **F64,
    )
    s_max = x[0].double().cpu() @ pool.A_stack[0, 0].double().cpu()
    assert s_max > 65504 and want.abs().max() < 1000 and want[0].abs().min() > 100  # the case tests what it says
    return want


@pytest.mark.parametrize(
    "backend,path",
    [
        ("torch", "fused"),
        ("torch", "split"),
        pytest.param("triton", "fused", marks=needs_triton),
        pytest.param("triton", "split", marks=needs_triton),
    ],
)
def test_fp16_shrink_beyond_fp16_range_gives_finite_output(backend, path):
    pool, weight, x, ids = overflow_case()
    want = overflow_want(pool, weight, x, ids)
    got = lk.multi_lora_linear(
        x, weight, None, pool, LoRABatch.prepare(ids, device=DEVICE), backend=backend, fused=path == "fused"
    )
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(got.cpu().double(), want, **close(torch.float16))
    # the low-level ops: the shrink output is fp32 and the expand reads it as such
    batch = LoRABatch.prepare(ids, device=DEVICE)
    s = torch.empty(5, pool.max_rank, dtype=torch.float32, device=DEVICE)
    ops.lora_shrink(x, pool.A_stack, batch, s, ranks=pool.ranks, backend=backend)
    assert s[0, 0].item() == 102400.0
    y = torch.zeros(5, pool.out_features, dtype=torch.float16, device=DEVICE)
    ops.lora_expand(s, pool.B_stack, batch, y, pool.scales, ranks=pool.ranks, backend=backend)
    assert torch.isfinite(y).all()


def _cuda_ext_reason():
    if not HAS_CUDA:
        return "needs CUDA"
    from lora_kernels import extension

    return extension.cuda_ops_unavailable_reason()


_EXT_WHY = "needs CUDA and the built CUDA extension" if not HAS_CUDA else _cuda_ext_reason()
needs_ext = pytest.mark.skipif(_EXT_WHY is not None, reason=f"the CUDA extension backend: {_EXT_WHY}")


@pytest.mark.parametrize(
    "backend,path",
    [
        ("torch", "fused"),
        ("torch", "split"),
        ("torch", "gemm"),
        pytest.param("triton", "fused", marks=needs_triton),
        pytest.param("triton", "split", marks=needs_triton),
        pytest.param("triton", "gemm", marks=needs_triton),
        pytest.param("cuda", "fused", marks=needs_ext),
        pytest.param("cuda", "split", marks=needs_ext),
    ],
)
def test_shrink_result_is_never_rounded_to_fp16_on_any_path(backend, path):
    """fp16 data with x·Aᵀ = ±70000 per element (past fp16's 65504) and s·xa·Bᵀ ≈ 512: every backend and path keeps
    the shrink result in fp32 up to the expand and gives the reference's finite output (an fp16 xa is ±inf there, and
    the output inf or NaN). K = 35 (odd), N = 33, slot 1 of a pool of 3 at rank 2 of 16, -1 rows between."""
    K, N, R = 35, 33, 16
    pool = AdapterPool(3, R, K, N, dtype=torch.float16, device=DEVICE)
    a = torch.stack([torch.full((K,), 100.0), torch.full((K,), -100.0)])  # x = 20: xa = ±20·100·35 = ±70000
    b = torch.stack([torch.full((N,), 0.0078125), torch.full((N,), 0.0005)], dim=1)
    b[::4, 0] = 0.0079  # columns of a different value: y ≈ 70000·(0.0078 - 0.0005) ≈ 512
    gen = torch.Generator().manual_seed(0)
    pool.load("other", torch.randn(3, K, generator=gen), torch.randn(N, 3, generator=gen), alpha=3)
    pool.load("big", a, b, alpha=2)  # scale alpha / r = 1
    weight = torch.zeros(N, K, dtype=torch.float16, device=DEVICE)
    weight[:, 1] = 0.125
    x = torch.full((7, K), 20.0, dtype=torch.float16, device=DEVICE)
    ids = [1, -1, 1, 1, -1, 1, 1]
    want = overflow_want_for(pool, weight, x, ids, 70000.0, 512.0)
    got = lk.multi_lora_linear(x, weight, None, pool, LoRABatch.prepare(ids, device=DEVICE), backend=backend, path=path)
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(got.cpu().double(), want, **close(torch.float16))


def overflow_want_for(pool, weight, x, ids, s_abs, y_mag):
    """The float64 reference of an overflow case, after checking that the case is what it claims: |x·Aᵀ| = s_abs
    (past fp16's range) and the adapter rows' outputs of magnitude about y_mag."""
    want = ref.multi_lora_linear(
        x.cpu(),
        weight.cpu(),
        None,
        pool.A_stack.cpu(),
        pool.B_stack.cpu(),
        pool.ranks.cpu(),
        pool.scales.cpu(),
        torch.tensor(ids),
        list(pool.slices),
        **F64,
    )
    slot = next(i for i in ids if i >= 0)
    s = x[0].double().cpu() @ pool.A_stack[slot, :2].double().cpu().t()
    assert s.abs().min() == s_abs > 65504
    rows = want[[i for i, v in enumerate(ids) if v == slot]]
    assert rows.abs().max() < 2 * y_mag and rows.abs().min() > y_mag / 2
    return want


# ------------------------------------------------------------------------------------------- decode-sized tiles
def test_step_tile_m_follows_the_tokens():
    assert [ops.step_tile_m(64, M) for M in (0, 1, 16, 17, 32, 33, 64, 65, 4096)] == [
        16,
        16,
        16,
        32,
        32,
        64,
        64,
        64,
        64,
    ]
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
@pytest.mark.parametrize(
    "M,path", [(3, "fused"), (20, "split"), (40, "split"), (40, "fused"), (1, "gemm"), (3, "gemm"), (20, "gemm")]
)
def test_decode_step_in_a_large_batch_uses_small_tiles(monkeypatch, M, path):
    """A batch built for 4096 tokens (tile_m 64; 128 forced for M = 40) used for a step of M tokens: the kernels run
    tiles of next_pow2(M) >= 16 rows (on the gemm path the base GEMM's row tile too, chosen from M) and the result
    matches the reference (mixed ranks, slices, an unloaded slot, -1 rows, several tiles of one slot)."""
    from lora_kernels.triton import multi_lora as ML

    seen = []
    monkeypatch.setattr(ML, "LANES_GEMM", False)  # the two-launch gemm path (one launch: test_lanes_* below)
    for name in ("_batched_shrink_kernel", "_expand_kernel", "_fused_kernel", "_gemm_expand_kernel"):
        monkeypatch.setattr(ML, name, _BlockSpy(getattr(ML, name), seen))
    gen = torch.Generator().manual_seed(M)
    K, slices = 40, [24, 8, 8]
    pool = AdapterPool(5, 16, K, slices, dtype=torch.float32, device=DEVICE)
    for name, r in (("a", 16), ("b", 3), ("c", 8)):
        pool.load(
            name,
            [torch.randn(r, K, generator=gen) / math.sqrt(K) for _ in slices],
            [torch.randn(n, r, generator=gen) for n in slices],
            alpha=2.0 * r,
        )
    pool.unload("c")  # slot 2: unloaded
    weight = (torch.randn(sum(slices), K, generator=gen) / math.sqrt(K)).to(DEVICE)
    ids = torch.tensor([0, 1, -1, 2, 0])[torch.randint(5, (M,), generator=gen)].tolist()
    x = torch.randn(M, K, generator=gen).to(DEVICE)
    batch = LoRABatch.prepare(ids, max_tokens=4096, device=DEVICE, tile_m=128 if M == 40 else None)
    got = lk.multi_lora_linear(x, weight, None, pool, batch, backend="triton", path=path, check=False)
    want = ref.multi_lora_linear(
        x.cpu(),
        weight.cpu(),
        None,
        pool.A_stack.cpu(),
        pool.B_stack.cpu(),
        pool.ranks.cpu(),
        pool.scales.cpu(),
        torch.tensor(ids),
        slices,
        **F64,
    )
    torch.testing.assert_close(got.cpu().double(), want, **close(torch.float32))
    assert seen and set(seen) == {ops.step_tile_m(batch.tile_m, M)} and seen[0] < batch.tile_m, seen


# ------------------------------------------------------------------------ docs: one CUDA graph per token bucket
def _docs_snippet(tag: str) -> str:
    """The python block right after ``<!-- test: TAG -->`` in docs/multi_lora.md."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "multi_lora.md").read_text()
    m = re.search(rf"<!-- test: {re.escape(tag)} -->\n```python\n(.*?)\n```", text, re.S)
    assert m, f"docs/multi_lora.md has no python block tagged {tag}"
    return m.group(1)


def _bucket_problem(device, dtype):
    gen = torch.Generator().manual_seed(11)
    K, slices = 40, [24, 8, 8]
    pool = AdapterPool(6, 16, K, slices, dtype=dtype, device=device)
    for name, r in (("a", 16), ("b", 3), ("c", 8), ("d", 5)):
        pool.load(
            name,
            [torch.randn(r, K, generator=gen) / math.sqrt(K) for _ in slices],
            [torch.randn(n, r, generator=gen) for n in slices],
            alpha=2.0 * r,
        )
    pool.unload("c")  # slot 2: unloaded
    weight = (torch.randn(sum(slices), K, generator=gen) / math.sqrt(K)).to(device, dtype)
    bias = torch.randn(sum(slices), generator=gen).to(device, dtype)
    ns = {"torch": torch, "lk": lk, "pool": pool, "weight": weight, "bias": bias, "K": K, "slot": 1}
    return ns, gen


def _bucket_steps(ns, gen, sizes, device, dtype):
    """Steps of ``sizes`` tokens through the snippet's run_step, each against the float64 reference."""
    for n in sizes:
        ids = torch.tensor([0, 1, -1, 3, 2, 0])[torch.randint(6, (n,), generator=gen)].tolist()
        ids = [i if i != 2 else -1 for i in ids]  # slot 2 is unloaded: the eager check would refuse it
        x = torch.randn(n, ns["K"], generator=gen).to(device, dtype)
        got = ns["run_step"](x, ids).clone()
        want = _want(ns["pool"], ns["weight"], ns["bias"], x, ids)
        if dtype == torch.bfloat16:
            lowp = multi_lora_in_dtype(x, ns["weight"], ns["bias"], ns["pool"], ids, list(ns["pool"].slices))
            assert_close_to_oracle(got, lowp, want)
        else:
            torch.testing.assert_close(got.cpu().double(), want, **close(dtype))


class _FakeGraph:
    """CPU stand-in of torch.cuda.CUDAGraph: the test sets ``replay`` to rerun the captured step eagerly."""

    def replay(self):
        raise AssertionError("replay not set by the test")


@needs_triton
def test_docs_bucketed_graph_example_logic_on_cpu(monkeypatch):
    """The docs' bucketed-capture example with the CUDA-graph calls stood in for (a replay reruns its bucket's step
    on the static buffers, eagerly): padding to the bucket, the in-place refill of one shared batch and the views of
    the static input give the reference's rows for steps of odd sizes, with the Triton backend in the interpreter."""
    if HAS_CUDA:
        pytest.skip("on a GPU the example runs with real CUDA graphs (test_docs_bucketed_graph_example_on_gpu)")
    import contextlib

    src = _docs_snippet("graph-buckets")
    head = 'device, dtype = "cuda", torch.bfloat16\nBUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)\n'
    assert src.startswith(head)
    src = 'device, dtype = "cpu", torch.float32\nBUCKETS = (1, 4, 16, 48)\n' + src[len(head) :]
    call = "lk.multi_lora_linear(x, weight, bias, pool, batch)"
    assert call in src
    src = src.replace(call, call[:-1] + ', backend="triton")')  # "auto" is the torch backend on the CPU
    ns, gen = _bucket_problem("cpu", torch.float32)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda: types_simple(wait_stream=lambda s: None))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types_simple(wait_stream=lambda s: None))
    exec(compile(src, "docs/multi_lora.md", "exec"), ns)
    monkeypatch.undo()
    assert sorted(ns["graphs"]) == [1, 4, 16, 48]
    for T, (graph, y_static) in ns["graphs"].items():

        def replay(T=T, y_static=y_static):
            assert ns["batch"].num_tokens == T  # the step refilled the batch for this bucket
            y_static.copy_(ns["step"](ns["x_static"][:T], ns["batch"]))

        graph.replay = replay
    _bucket_steps(ns, gen, (1, 3, 4, 7, 16, 33, 48), "cpu", torch.float32)


def types_simple(**kw):
    import types

    return types.SimpleNamespace(**kw)


@pytest.mark.gpu
def test_docs_bucketed_graph_example_on_gpu():
    """The docs' bucketed-capture example as written (bf16, CUDA graphs per bucket up to 512 tokens: fused and gemm
    paths), replayed for steps of odd sizes with new ids, against the float64 reference."""
    ns, gen = _bucket_problem("cuda", torch.bfloat16)
    exec(compile(_docs_snippet("graph-buckets"), "docs/multi_lora.md", "exec"), ns)
    _bucket_steps(ns, gen, (1, 3, 16, 17, 100, 257, 512, 5), "cuda", torch.bfloat16)


# -------------------------------------------------------------------------------- the expand inside the base GEMM
GEMM_SLICES = [24, 8, 8]
GEMM_CASES = [
    # (T, dtype, slices, pattern, bias)
    (1, torch.float32, GEMM_SLICES, "repeats", True),
    (7, torch.float16, [40], "distinct", False),
    (33, torch.float32, GEMM_SLICES, "repeats", True),
    (33, torch.float16, GEMM_SLICES, "one", True),
    (100, torch.float32, [40], "repeats", False),
    (100, torch.float16, GEMM_SLICES, "repeats", True),
    (20, torch.float32, GEMM_SLICES, "none", True),
    pytest.param(
        33,
        torch.bfloat16,
        GEMM_SLICES,
        "repeats",
        True,
        marks=pytest.mark.skipif(not HAS_CUDA, reason="bf16 tl.dot is wrong in the CPU interpreter; run on a GPU"),
    ),
]


def _gemm_problem(T, dtype, slices, pattern, bias, seed, pool_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    K = 40
    L, R = 8, 32
    pool = AdapterPool(L, R, K, slices if len(slices) > 1 else slices[0], dtype=pool_dtype or dtype, device=DEVICE)
    for i, r in enumerate((1, 8, 16, 32, 5)):  # mixed ranks below the pool's max
        pool.load(
            f"a{i}",
            [torch.randn(r, K, generator=gen) / math.sqrt(K) for _ in slices],
            [torch.randn(n, r, generator=gen) for n in slices],
            alpha=[2.0 * r + s for s in range(len(slices))],
        )
    pool.unload("a3")  # slot 3: unloaded (rank 0) ...
    pool.reserve("r")  # ... and then reserved without weights
    N = sum(slices)
    weight = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(DEVICE, dtype)
    b = torch.randn(N, generator=gen).to(DEVICE, dtype) if bias else None
    x = torch.randn(T, K, generator=gen).to(DEVICE, dtype)
    choice = {"repeats": [0, 1, 2, 3, 4, -1], "distinct": [0, 1, 2, 4, 3, -1, 1], "one": [2], "none": [-1]}[pattern]
    ids = torch.tensor(choice)[torch.randint(len(choice), (T,), generator=gen)].tolist()
    if pattern == "distinct":
        ids = choice[:T]
    return pool, weight, b, x, ids


def _want(pool, weight, bias, x, ids):
    return multi_lora_f64(x, weight, bias, pool, ids)


@needs_triton
@pytest.mark.parametrize("T,dtype,slices,pattern,bias", GEMM_CASES)
def test_gemm_path_matches_reference(monkeypatch, T, dtype, slices, pattern, bias):
    """The base GEMM with the expand in its epilogue against the float64 reference: odd sizes, mixed ranks, q|k|v
    slices, -1 rows, an unloaded and a reserved slot, bias or none; two launches (one for a single adapter), no
    F.linear, no zero-fill."""
    from lora_kernels.triton import multi_lora as ML

    pool, weight, b, x, ids = _gemm_problem(T, dtype, slices, pattern, bias, seed=T)
    launched = []
    for name in _GEMM_PATH_KERNELS:
        real = getattr(ML, name)
        monkeypatch.setattr(ML, name, _NameSpy(real, name, launched))
    batch = LoRABatch.prepare(ids, device=DEVICE)
    gemm_kernel = "_gemm_tma_expand_kernel" if ML.gemm_tma_ok(x, weight) else "_gemm_expand_kernel"
    monkeypatch.setattr(torch.Tensor, "zero_", _no_call("zero_"))
    got = lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton", path="gemm")
    monkeypatch.undo()
    assert got.dtype == dtype and got.shape == (T, sum(slices))
    want = _want(pool, weight, b, x, ids)
    lowp = multi_lora_in_dtype(x, weight, b, pool, ids, slices) if dtype == torch.bfloat16 else None
    if lowp is not None:  # GPU only: the 2x-the-PyTorch-error rule of half-precision GPU tests
        assert_close_to_oracle(got, lowp, want)
    else:
        torch.testing.assert_close(got.cpu().double(), want, **close(dtype))
    if pattern != "none":
        # one launch where the host ids name few enough adapters for the lanes (here: one), else two
        one = ML.lanes_for(T, pool.max_rank, len({i for i in ids if i >= 0}))
        assert launched == (["_gemm_lanes_kernel"] if one else ["_batched_shrink_kernel", gemm_kernel]), launched
    # the torch backend's gemm path is the reference itself
    got_t = lk.multi_lora_linear(x, weight, b, pool, batch, backend="torch", path="gemm")
    if lowp is not None:
        assert_close_to_oracle(got_t, lowp, want)
    else:
        torch.testing.assert_close(got_t.cpu().double(), want, **close(dtype))


_GEMM_PATH_KERNELS = (
    "_batched_shrink_kernel",
    "_gemm_expand_kernel",
    "_gemm_tma_expand_kernel",
    "_expand_kernel",
    "_fused_kernel",
    "_gemm_lanes_kernel",
    "_gemm_tma_joined_kernel",
    "_lora_side_kernel",
)
# The one-launch TMA step (JOINED): "joined" with the shrink items first (the interpreter runs them before every GEMM
# tile: each tile's wait succeeds), "joined-fallback" with the items last (every tile polls in vain and computes the
# shrink itself, as a tile does on a GPU whose SMs are held by other work).
JOINED_MODES = ("joined", "joined-fallback")


def _joined(monkeypatch, mode):
    """Turn the one-launch TMA step on for the JOINED_MODES; returns the GEMM kernel name the mode launches alone."""
    from lora_kernels.triton import multi_lora as ML

    monkeypatch.setattr(ML, "JOINED", True)
    monkeypatch.setattr(ML, "_JOINED_ITEMS_FIRST", mode == "joined")
    return "_gemm_tma_joined_kernel"


# (T, slices, pattern, bias, pool dtype): more than GEMM_TMA_MIN_TOKENS fp16 rows whose 80-byte rows TMA can read:
# the gemm path's GEMM is _gemm_tma_expand_kernel, rows in the batch's own order. Ragged row tiles, q|k|v slices
# whose blocks end inside a TMA box of W0 rows, many adapters per row tile, one adapter, none, an fp32 pool.
GEMM_TMA_CASES = [
    (65, GEMM_SLICES, "repeats", True, None),
    (100, [40], "repeats", False, None),
    (100, GEMM_SLICES, "one", True, None),
    (70, GEMM_SLICES, "none", False, None),
    (97, GEMM_SLICES, "repeats", True, torch.float32),
]


@pytest.fixture
def tma_or_skip():
    if HAS_CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA GEMM needs compute capability >= 9")


def _heavy_always(monkeypatch, T):
    """Make every step of T tokens with host ids a heavy-epilogue step for the sorted-row GEMM (SIDE_TERM off, the
    rule's thresholds at the test's size)."""
    from lora_kernels.triton import multi_lora as ML

    monkeypatch.setattr(ML, "SIDE_TERM", False)
    monkeypatch.setattr(ML, "SORTED_MIN_TOKENS", T)
    monkeypatch.setattr(ML, "SORTED_MAX_COST", 0.0)


def _side_always(monkeypatch, T, made=None):
    """Make every step of T tokens with host ids a heavy-epilogue step for the side path, its fp32 buffers
    NaN-filled (a row the GEMM adds that the side kernel did not write poisons y) and appended to ``made``."""
    from lora_kernels.triton import multi_lora as ML

    monkeypatch.setattr(ML, "SIDE_TERM", True)
    monkeypatch.setattr(ML, "SIDE_MIN_TOKENS", T)
    monkeypatch.setattr(ML, "SIDE_MAX_COST", -1.0)
    real = ML.side_buffer

    def poisoned(M, N, device):
        buf = real(M, N, device)
        buf.fill_(float("nan"))
        if made is not None:
            made.append(buf)
        return buf

    monkeypatch.setattr(ML, "side_buffer", poisoned)


def _poisoned_sorted_x(monkeypatch, made=None):
    """sorted_x_buffer returns NaN-filled buffers (any row the GEMM reads that the shrink did not write poisons y),
    appended to ``made``."""
    from lora_kernels.triton import multi_lora as ML

    real = ML.sorted_x_buffer

    def poisoned(x):
        buf = real(x)
        buf.fill_(float("nan"))
        if made is not None:
            made.append(buf)
        return buf

    monkeypatch.setattr(ML, "sorted_x_buffer", poisoned)


def _poisoned_partials(monkeypatch):
    """partials returns NaN-filled buffers: an xa element the epilogue reads before the shrink wrote it poisons y."""
    from lora_kernels.triton import multi_lora as ML

    real = ML.partials
    monkeypatch.setattr(ML, "partials", lambda *a: real(*a).fill_(float("nan")))


def _joined_counters_at_rest(device) -> bool:
    """Every counter pair of the one-launch TMA step on ``device`` is back at zero (each launch's last program resets
    its pair for the next launch on that stream)."""
    from lora_kernels.triton import multi_lora as ML

    if DEVICE == "cuda":
        torch.cuda.synchronize()
    buf = ML._SYNC.bufs[(device.type, device.index)]
    return ML._SYNC.taken[(device.type, device.index)] > 0 and not buf.any()


@needs_triton
@pytest.mark.parametrize("mode", ["own-order", "sorted-w-tma", "sorted-gather", "side", *JOINED_MODES])
@pytest.mark.parametrize("T,slices,pattern,bias,pool_dtype", GEMM_TMA_CASES)
def test_gemm_path_tma_gemm_matches_reference(monkeypatch, tma_or_skip, T, slices, pattern, bias, pool_dtype, mode):
    """The TMA GEMM (rows in the batch's own order); with SORTED_TMA_GEMM the sorted-row GEMM reading W0 by TMA; the
    sorted-row GEMM a heavy-epilogue step takes with SIDE_TERM off (SORTED_GATHER: x and W0 by TMA, x's rows from the
    shrink's sorted copy, poisoned with NaN beforehand; tiles with rows of no adapter gather those from x); and the
    side path it takes with SIDE_TERM (the LoRA term in an fp32 buffer poisoned with NaN beforehand, added by the TMA
    GEMM to the rows with an adapter): against the float64 reference."""
    from lora_kernels.triton import multi_lora as ML

    pool, weight, b, x, ids = _gemm_problem(T, torch.float16, slices, pattern, bias, seed=T + 5, pool_dtype=pool_dtype)
    assert ML.gemm_tma_ok(x, weight) and ML.gemm_tma_ok(x, weight, check_addresses=False)
    monkeypatch.setattr(ML, "SORTED_TMA_GEMM", mode == "sorted-w-tma")
    made = []
    if mode == "sorted-gather":
        _heavy_always(monkeypatch, T)
        _poisoned_sorted_x(monkeypatch, made)
    if mode == "side":
        _side_always(monkeypatch, T, made)
    if mode in JOINED_MODES:
        _joined(monkeypatch, mode)
        _poisoned_partials(monkeypatch)
    launched = []
    for name in _GEMM_PATH_KERNELS:
        monkeypatch.setattr(ML, name, _NameSpy(getattr(ML, name), name, launched))
    batch = LoRABatch.prepare(ids, device=DEVICE)
    got = lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton")  # the default path at this size
    monkeypatch.undo()
    if mode in JOINED_MODES and pattern != "none":  # one launch
        assert launched == ["_gemm_tma_joined_kernel"], launched
        assert _joined_counters_at_rest(x.device)
    elif mode == "side" and pattern != "none":
        assert launched == ["_lora_side_kernel", "_gemm_tma_expand_kernel"], launched
        (side,) = made  # rows with an adapter hold their LoRA term; the others are never written (still NaN)
        has = torch.tensor([0 <= i < pool.max_adapters and pool.ranks[i] > 0 for i in ids])
        assert torch.isfinite(side[has.to(side.device)]).all() and torch.isnan(side[~has.to(side.device)]).all()
    elif pattern != "none":
        gemm = "_gemm_tma_expand_kernel" if mode == "own-order" else "_gemm_expand_kernel"
        assert launched == ["_batched_shrink_kernel", gemm], launched
        if mode == "sorted-gather":  # the copy holds every row of an adapter, in the sorted order
            (xs,) = made
            order = batch.sorted_tokens[: sum(1 for i in ids if 0 <= i < pool.max_adapters)].long()
            torch.testing.assert_close(xs[: order.numel()], x[order], rtol=0, atol=0)
    assert got.dtype == torch.float16 and got.shape == (T, sum(slices))
    torch.testing.assert_close(got.cpu().double(), _want(pool, weight, b, x, ids), **close(torch.float16))


def _launches_of(monkeypatch, call):
    """(names of the gemm-path kernels ``call()`` launches, in order; its result): the kernels spied on for the call."""
    from lora_kernels.triton import multi_lora as ML

    launched = []
    for name in _GEMM_PATH_KERNELS:
        monkeypatch.setattr(ML, name, _NameSpy(getattr(ML, name), name, launched))
    try:
        return launched, call()
    finally:
        for name in _GEMM_PATH_KERNELS:
            monkeypatch.setattr(ML, name, getattr(ML, name).kernel)


@needs_triton
def test_heavy_epilogue_takes_the_sorted_gemm_or_the_split_path(monkeypatch, tma_or_skip):
    """Host ids whose TMA-GEMM row tiles hold many adapters leave that GEMM: for the sorted-row GEMM fed by the
    shrink's sorted copy of x (SORTED_GATHER: from SORTED_MIN_TOKENS tokens, at least SORTED_MIN_TOKENS_PER_ADAPTER
    tokens per adapter), else for the split path (EPILOGUE_SPLIT_MIN_TOKENS); the thresholds lowered to the test's
    size, the cost threshold just below / above the step's: the same exact result either way; a forced path, device
    ids and torch.compile keep the TMA GEMM."""
    from lora_kernels.triton import multi_lora as ML

    T, slices = 97, GEMM_SLICES
    pool, weight, b, x, ids = _gemm_problem(T, torch.float16, slices, "repeats", True, seed=11)
    want = _want(pool, weight, b, x, ids)
    monkeypatch.setattr(ML, "SIDE_TERM", False)  # the side path's rule: test_heavy_epilogue_takes_the_side_path
    monkeypatch.setattr(ML, "EPILOGUE_SPLIT_MIN_TOKENS", T)
    monkeypatch.setattr(ML, "SORTED_MIN_TOKENS", T)
    batch = LoRABatch.prepare(ids, device=DEVICE)
    ops._heavy_epilogue(x, pool, batch)
    # the adapters per row tile the op judged by (its TMA row tile on this device or the interpreter), cached
    ((key, per_tile),) = batch._tile_adapters.items()
    assert key[0] == pool.max_adapters and per_tile == mean_tile_adapters(torch.tensor(ids), *key)
    assert per_tile > 2  # the case has several adapters per row tile
    cost = 2 * per_tile * 32 / x.shape[1]  # rank 32: BLOCK_R 32
    assert cost == ML.epilogue_cost(x.shape[1], 32, per_tile)
    present = len({i for i in ids if 0 <= i < pool.max_adapters})
    sorted_gemm = ["_batched_shrink_kernel", "_gemm_expand_kernel"]
    own_order = ["_batched_shrink_kernel", "_gemm_tma_expand_kernel"]
    for max_cost, per_adapter, want_kernels, path, sorted_w_tma, gather in (
        # heavy: the sorted-row GEMM fed by the shrink's sorted copy of x (SORTED_GATHER), or the split path
        (cost * 0.9, 2, sorted_gemm, None, False, True),
        (cost * 0.9, 2, ["_batched_shrink_kernel", "_expand_kernel"], None, False, False),
        (cost * 1.1, 2, own_order, None, False, True),
        (cost * 1.1, 2, own_order, None, False, False),
        (cost * 0.9, 2, own_order, "gemm", False, True),
        # too few tokens per adapter present for sorting to gather them into fewer tiles
        (cost * 0.9, T // present + 1, own_order, None, False, True),
        # the sorted-row GEMM's tiles hold few adapters whatever the ids' order: no reason to leave it
        (cost * 0.9, 2, sorted_gemm, None, True, False),
    ):
        for name in ("EPILOGUE_SPLIT_MAX_COST", "SORTED_MAX_COST"):
            monkeypatch.setattr(ML, name, max_cost)
        monkeypatch.setattr(ML, "SORTED_MIN_TOKENS_PER_ADAPTER", per_adapter)
        monkeypatch.setattr(ML, "SORTED_TMA_GEMM", sorted_w_tma)
        monkeypatch.setattr(ML, "SORTED_GATHER", gather)
        batch = LoRABatch.prepare(ids, device=DEVICE)
        launched, got = _launches_of(
            monkeypatch, lambda: lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton", path=path)
        )
        assert launched == want_kernels, (max_cost, per_adapter, path, sorted_w_tma, gather, launched)
        torch.testing.assert_close(got.cpu().double(), want, **close(torch.float16))
    # ids not known on the host (device ids) or a step being compiled: nothing to judge from, the TMA GEMM
    monkeypatch.setattr(ML, "SORTED_MAX_COST", cost * 0.9)
    monkeypatch.setattr(ML, "SORTED_MIN_TOKENS_PER_ADAPTER", 2)
    monkeypatch.setattr(ML, "SORTED_TMA_GEMM", False)
    monkeypatch.setattr(ML, "SORTED_GATHER", True)
    batch = LoRABatch.prepare(ids, device=DEVICE)
    assert ops._heavy_epilogue(x, pool, batch)
    monkeypatch.setattr(batch, "host_slots", None)
    assert not ops._heavy_epilogue(x, pool, batch)
    batch = LoRABatch.prepare(ids, device=DEVICE)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not ops._heavy_epilogue(x, pool, batch)


@needs_triton
def test_heavy_epilogue_takes_the_side_path(monkeypatch, tma_or_skip):
    """With SIDE_TERM (the default) a heavy-epilogue step takes the side path: the side kernel, then the TMA GEMM in
    the ids' order adding its fp32 buffer; below the cost threshold, on a forced path, with device ids or past
    SIDE_MAX_BYTES (then the sorted-row GEMM) it does not: the same exact result every way."""
    from lora_kernels.triton import multi_lora as ML

    T, slices = 97, GEMM_SLICES
    pool, weight, b, x, ids = _gemm_problem(T, torch.float16, slices, "repeats", True, seed=12)
    want = _want(pool, weight, b, x, ids)
    monkeypatch.setattr(ML, "SIDE_MIN_TOKENS", T)
    monkeypatch.setattr(ML, "SORTED_MIN_TOKENS", T)
    monkeypatch.setattr(ML, "SORTED_MAX_COST", -1.0)
    batch = LoRABatch.prepare(ids, device=DEVICE)
    ops._heavy_epilogue(x, pool, batch)
    ((_, per_tile),) = batch._tile_adapters.items()
    cost = ML.epilogue_cost(x.shape[1], 32, per_tile)
    side = ["_lora_side_kernel", "_gemm_tma_expand_kernel"]
    own_order = ["_batched_shrink_kernel", "_gemm_tma_expand_kernel"]
    sorted_gemm = ["_batched_shrink_kernel", "_gemm_expand_kernel"]
    N = sum(slices)
    for max_cost, path, max_bytes, device_ids, want_kernels in (
        (cost * 0.9, None, 1 << 28, False, side),
        (cost * 1.1, None, 1 << 28, False, own_order),
        (cost * 0.9, "gemm", 1 << 28, False, own_order),
        (cost * 0.9, None, 1 << 28, True, own_order),
        (cost * 0.9, None, T * ML.side_cols(N) * 4 - 1, False, sorted_gemm),
    ):
        monkeypatch.setattr(ML, "SIDE_MAX_COST", max_cost)
        monkeypatch.setattr(ML, "SIDE_MAX_BYTES", max_bytes)
        batch = LoRABatch.prepare(ids, device=DEVICE)
        if device_ids:  # as after prepare_ with ids on the device: nothing to judge the tiles from on the host
            batch.host_slots = None
        launched, got = _launches_of(
            monkeypatch, lambda: lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton", path=path)
        )
        assert launched == want_kernels, (max_cost, path, max_bytes, device_ids, launched)
        torch.testing.assert_close(got.cpu().double(), want, **close(torch.float16))


def test_tile_adapters_and_the_epilogue_rule(monkeypatch):
    from lora_kernels.triton import multi_lora as ML

    # tiles of 4 in the ids' own order: {0, 1} (-1 adds none), {2} (5 is outside the 4 slots), {3}
    ids = torch.tensor([0, 0, 1, -1, 5, 2, 2, 2, 3])
    assert mean_tile_adapters(ids, 4, 4) == pytest.approx(4 / 3)
    assert mean_tile_adapters(ids, 6, 4) == pytest.approx(5 / 3)
    assert mean_tile_adapters(ids, 4, 16) == 4.0
    assert mean_tile_adapters(torch.empty(0, dtype=torch.int64), 4, 4) == 0.0
    assert mean_tile_adapters(torch.full((7,), -1), 4, 4) == 0.0
    # the batch computes it once per prepare_ (every layer of a step asks), None for ids given on a device
    batch = LoRABatch.prepare(ids.tolist(), device="cpu")
    assert batch.tile_adapters(4, 4) == pytest.approx(4 / 3) and batch._tile_adapters == {(4, 4): pytest.approx(4 / 3)}
    batch.prepare_([3] * 9)
    assert batch._tile_adapters == {} and batch.tile_adapters(4, 4) == 1.0
    batch.host_slots = None  # as after prepare_ with device ids
    batch._tile_adapters = {}
    assert batch.tile_adapters(4, 4) is None
    # the side path's rule (SIDE_TERM): 2·d·BLOCK_R / K above SIDE_MAX_COST (0.05) from SIDE_MIN_TOKENS (512) tokens,
    # whatever the adapters present; past SIDE_MAX_BYTES of fp32 buffer the sorted-row GEMM's rule instead
    assert ML.SIDE_TERM and ML.heavy_variant(4096, 64) == "side"
    assert ML.tma_epilogue_split(torch.empty(4096, 64), lambda rows: 4.0, 16, [64], interp=True)
    assert not ML.tma_epilogue_split(torch.empty(4096, 64), lambda rows: None, 16, [64], interp=True)
    assert not ML.tma_epilogue_split(torch.empty(511, 64), lambda rows: 4.0, 16, [64], interp=True)
    K, R = 4096, 16
    edge = ML.SIDE_MAX_COST * K / (2 * R)  # 6.4 adapters per tile
    assert ML.epilogue_side(512, K, R, edge + 0.5) and not ML.epilogue_side(512, K, R, edge - 0.5)
    assert not ML.epilogue_side(511, K, R, 128.0)
    assert ML.side_for(4096, 16384) and not ML.side_for(4096, 16385)  # 256 MiB: 4096 × 16384 × 4 bytes
    assert ML.heavy_variant(4096, 16385) == "sorted"
    monkeypatch.setattr(ML, "SIDE_TERM", False)
    assert ML.heavy_variant(4096, 64) == "sorted"
    assert not ML.tma_epilogue_split(torch.empty(4096, 64), lambda rows: None, 16, [64], interp=True, adapters=4)
    assert ML.tma_epilogue_split(torch.empty(4096, 64), lambda rows: 4.0, 16, [64], interp=True, adapters=4)
    # the sorted-row GEMM's rule needs the adapters present (SORTED_GATHER), the split path's does not
    assert not ML.tma_epilogue_split(torch.empty(4096, 64), lambda rows: 4.0, 16, [64], interp=True)
    saved = ML.SORTED_GATHER
    try:
        ML.SORTED_GATHER = False
        assert ML.tma_epilogue_split(torch.empty(4096, 64), lambda rows: 4.0, 16, [64], interp=True)
    finally:
        ML.SORTED_GATHER = saved
    # 2·d·BLOCK_R / K against SORTED_MAX_COST (0.15) from SORTED_MIN_TOKENS (512) tokens and 2 tokens per adapter
    K, R = 4096, 16
    edge = ML.SORTED_MAX_COST * K / (2 * R)  # 19.2 adapters per tile
    assert ML.epilogue_sorted(512, K, R, edge + 0.5, 256) and not ML.epilogue_sorted(512, K, R, edge - 0.5, 256)
    assert not ML.epilogue_sorted(511, K, R, 128.0, 128) and not ML.epilogue_sorted(512, K, R, 128.0, 257)
    # 2·d·BLOCK_R / K against EPILOGUE_SPLIT_MAX_COST (0.4), from EPILOGUE_SPLIT_MIN_TOKENS (1024) tokens
    K, R = 4096, 16
    edge = ML.EPILOGUE_SPLIT_MAX_COST * K / (2 * R)  # 51.2 adapters per tile
    assert ML.epilogue_split(1024, K, R, edge + 0.5) and not ML.epilogue_split(1024, K, R, edge - 0.5)
    assert not ML.epilogue_split(1023, K, R, 128.0)
    assert ML.epilogue_split(4096, K, 9, edge + 0.5)  # rank 9 pads to BLOCK_R 16
    assert not ML.epilogue_split(4096, 2 * K, R, edge + 0.5)  # twice the K: half the relative cost


@needs_triton
@pytest.mark.parametrize("mode", ["own-order", "sorted-gather", "side", *JOINED_MODES])
def test_gemm_path_tma_gemm_bad_ids_and_overflow(monkeypatch, tma_or_skip, mode):
    """Ids outside -1..L-1 (unchecked: they add nothing), a batch with spare capacity, and the fp16 overflow case
    (xa beyond 65504 stays fp32) on the TMA GEMM, and on the sorted-row GEMM fed by the shrink's sorted copy of x
    (the heavy-epilogue rule's thresholds at the test's sizes; the copy poisoned with NaN beforehand)."""
    path, made = "gemm", []
    if mode == "sorted-gather":
        _heavy_always(monkeypatch, 80)
        _poisoned_sorted_x(monkeypatch, made)
        path = None  # the rule decides (a forced path keeps the TMA GEMM in the ids' order)
    if mode == "side":
        _side_always(monkeypatch, 80, made)
        path = None
    if mode in JOINED_MODES:
        _joined(monkeypatch, mode)
        _poisoned_partials(monkeypatch)
    pool, weight, b, x, ids = _gemm_problem(90, torch.float16, GEMM_SLICES, "repeats", True, seed=13)
    bad = list(ids)
    bad[0], bad[33], bad[89] = 8, 1000, -7
    batch = LoRABatch.prepare(bad, max_tokens=128, device=DEVICE)
    got = lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton", path=path, check=False)
    want = _want(pool, weight, b, x, [i if 0 <= i < 8 else -1 for i in bad])
    torch.testing.assert_close(got.cpu().double(), want, **close(torch.float16))
    pool2, w2, x2, ids2 = overflow_case(tokens=80)
    got2 = lk.multi_lora_linear(
        x2, w2, None, pool2, LoRABatch.prepare(ids2, device=DEVICE), backend="triton", path=path
    )
    assert torch.isfinite(got2).all()
    torch.testing.assert_close(got2.cpu().double(), overflow_want(pool2, w2, x2, ids2), **close(torch.float16))
    assert len(made) == (2 if mode in ("sorted-gather", "side") else 0)  # both steps took the heavy step's path


@needs_triton
@pytest.mark.parametrize("mode", ["own-order", "sorted-w-tma", "sorted-gather", "side", *JOINED_MODES])
def test_gemm_path_tma_gemm_replays_with_new_ids(monkeypatch, tma_or_skip, mode):
    """The TMA GEMM reads each token's slot from the batch's token_slots at run time (the sorted-row GEMMs: the
    sorted lists; the one fed by the shrink's sorted copy of x also decides per tile at run time whether the copy
    holds its rows): launches recorded once (host checks off, as while capturing) and replayed after
    ``batch.prepare_`` with other ids give every token its new adapter (all tokens one adapter, none, many per row
    tile, ids outside the pool, an unloaded slot)."""
    from lora_kernels.triton import multi_lora as ML

    T = 72
    pool, weight, b, x, ids = _gemm_problem(T, torch.float16, GEMM_SLICES, "repeats", True, seed=21)
    monkeypatch.setattr(ML, "SORTED_TMA_GEMM", mode == "sorted-w-tma")
    if mode == "sorted-gather":
        _heavy_always(monkeypatch, T)
        _poisoned_sorted_x(monkeypatch)
    gemm = "_gemm_tma_expand_kernel" if mode in ("own-order", "side") else "_gemm_expand_kernel"
    kernels = ("_batched_shrink_kernel", gemm)
    if mode == "side":  # the replays reuse the first call's fp32 buffer: rows of no adapter stay NaN there
        _side_always(monkeypatch, T)
        kernels = ("_lora_side_kernel", gemm)
    if mode in JOINED_MODES:  # one launch, replayed on the same counters (each replay leaves them at zero)
        kernels = (_joined(monkeypatch, mode),)
    log = []
    for name in kernels:
        monkeypatch.setattr(ML, name, ReplayLog(getattr(ML, name), log))
    monkeypatch.setattr(ops, "_in_graph_or_compile", lambda t: True)
    batch = LoRABatch.prepare(ids, device=DEVICE)
    y = lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton")
    assert [entry[0] for entry in log] == [getattr(ML, name).real for name in kernels]
    if mode not in ("own-order", "side", *JOINED_MODES):
        assert log[1][3]["W_TMA"] is True and log[1][3]["X_SORTED"] is (mode == "sorted-gather")
        assert log[0][3]["GATHER"] is (mode == "sorted-gather")
    assert mode != "side" or log[1][3]["SIDE"] is True
    torch.testing.assert_close(y.cpu().double(), _want(pool, weight, b, x, ids), **close(torch.float16))
    refills = ([2] * T, [-1] * T, [(i * 5) % 7 - 1 for i in range(T)], [9, 4, -3] * (T // 3), [3, 0, 3, 1] * (T // 4))
    _check_replays(log, batch, refills, x, y, pool, weight, b, seed=3)


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_sorted_gemm_above_rank_32_runs_its_narrower_tile(monkeypatch, tma_or_skip, bias):
    """Above rank 32 the sorted-copy GEMM takes 128x64 tiles where the TMA GEMM takes 128x128 (the interpreter runs
    its own small tiles, so only a GPU runs this one): a rank-64 pool with mixed ranks below it, q|k|v slices, a
    heavy step of 300 tokens on the forced 128x128 TMA tile, against the float64 reference."""
    from lora_kernels.triton import multi_lora as ML

    gen = torch.Generator().manual_seed(64)
    K, slices = 64, GEMM_SLICES
    pool = AdapterPool(8, 64, K, slices, dtype=torch.float16, device=DEVICE)
    for i, r in enumerate((64, 40, 7)):
        pool.load(
            f"a{i}",
            [torch.randn(r, K, generator=gen) / math.sqrt(K) for _ in slices],
            [torch.randn(n, r, generator=gen) for n in slices],
            alpha=[1.5 * r + s for s in range(len(slices))],
        )
    T, N = 300, sum(slices)
    weight = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(DEVICE, torch.float16)
    b = torch.randn(N, generator=gen).to(DEVICE, torch.float16) if bias else None
    x = torch.randn(T, K, generator=gen).to(DEVICE, torch.float16)
    ids = torch.tensor([0, 1, 2, -1])[torch.randint(4, (T,), generator=gen)].tolist()
    monkeypatch.setattr(ML, "GEMM_TMA_TILE", (128, 128))
    _heavy_always(monkeypatch, T)
    made, tiles = [], []
    _poisoned_sorted_x(monkeypatch, made)
    real = ML._gemm_expand_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tiles.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["X_SORTED"]))
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(ML, "_gemm_expand_kernel", Spy())
    got = lk.multi_lora_linear(x, weight, b, pool, LoRABatch.prepare(ids, device=DEVICE), backend="triton")
    monkeypatch.undo()
    assert tiles == [(128, 64, True)] and len(made) == 1
    torch.testing.assert_close(got.cpu().double(), _want(pool, weight, b, x, ids), **close(torch.float16))


@needs_triton
@pytest.mark.parametrize("side", [True, False], ids=["side", "sorted"])
def test_sorted_gather_gemm_op_passes_opcheck(monkeypatch, tma_or_skip, side):
    """``torch.library.opcheck`` of the gemm op with ``sort_rows`` (what a heavy-epilogue step takes: the side path,
    or the sorted-row GEMM with SIDE_TERM off): schema, fake tensor, autograd registration and AOT dispatch see the
    flag."""
    from lora_kernels.triton import multi_lora as ML

    monkeypatch.setattr(ML, "SIDE_TERM", side)
    pool, weight, b, x, ids = _gemm_problem(72, torch.float16, GEMM_SLICES, "repeats", True, seed=23)
    batch = LoRABatch.prepare(ids, device=DEVICE)
    tile_m = ops.step_tile_m(batch.tile_m, x.shape[0])
    args = (x, weight, b, pool.A_stack, pool.B_stack, pool.ranks, pool.scales, *batch.meta, pool.slices, tile_m)
    torch.library.opcheck(ops._gemm_op, (*args, "triton", 0, True))
    got = ops._gemm_op(*args, "triton", 0, True)
    torch.testing.assert_close(got.cpu().double(), _want(pool, weight, b, x, ids), **close(torch.float16))


def _check_replays(log, batch, refills, x, y, pool, weight, b, seed):
    """For each id list of ``refills``: ``batch.prepare_`` it, new fp16 x in place, replay the recorded launches of
    ``log`` (as a CUDA graph would), and compare y with the float64 reference (ids outside 0..7 add nothing)."""
    gen = torch.Generator().manual_seed(seed)
    T = x.shape[0]
    for refill in refills:
        batch.prepare_(refill)
        x.copy_(torch.randn(T, x.shape[1], generator=gen).to(x.dtype))
        for real, grid, args, kwargs in list(log):
            real[grid](*args, **kwargs)
        want = _want(pool, weight, b, x, [i if 0 <= i < 8 else -1 for i in refill])
        torch.testing.assert_close(y.cpu().double(), want, **close(torch.float16))


def test_joined_counters_per_stream_thread_and_capture(monkeypatch):
    """The one-launch TMA step's counter pairs: a stream's (the interpreter: a thread's) calls share one pair, another
    thread gets its own, so two request threads never share counters; once all pairs are taken the step runs the two
    launches, with one warning. (A call captured into a CUDA graph takes a pair for good: checked on a GPU below.)"""
    import threading
    import warnings

    from lora_kernels.triton import multi_lora as ML

    monkeypatch.setattr(ML, "_SYNC_SLOTS", 3)
    slots = ML._SyncSlots()
    dev = torch.device("cpu")

    def in_threads(n):  # n threads alive at once (a finished thread's ident may be reused), each asking for a pair
        got, gate = [None] * n, threading.Barrier(n)

        def ask(i):
            got[i] = slots.get(dev)
            gate.wait()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return got

    a, b = slots.get(dev), slots.get(dev)
    assert a is not None and a.data_ptr() == b.data_ptr() and a.shape == (2,) and not a.any()
    two = in_threads(2)
    assert all(p is not None for p in two) and len({p.data_ptr() for p in (a, *two)}) == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        more = in_threads(4)  # all 3 pairs are held by live or finished threads' idents: new idents get none
    assert sum(p is None for p in more) >= 2
    assert len([w for w in caught if "counters" in str(w.message)]) == 1
    assert slots.get(dev).data_ptr() == a.data_ptr()  # this thread keeps its pair


@pytest.mark.skipif(
    not HAS_CUDA,
    reason="two kernels at once: the Triton interpreter patches triton.language for the process, one kernel at a time",
)
def test_joined_step_two_request_threads(monkeypatch, tma_or_skip):
    """Two request threads running the one-launch TMA step at once on one pool, each on its own stream with other
    ids and x: each gets its own counters, so no tile counts the other call's items and reads an xa that its own
    items have not written (poisoned with NaN). (Without a GPU, test_joined_counters_per_stream_thread_and_capture
    checks that concurrent threads get distinct counter pairs.)"""
    import threading

    _joined(monkeypatch, "joined-fallback")  # tiles first: every tile waits on its own call's counter
    _poisoned_partials(monkeypatch)
    pool, weight, b, x, ids = _gemm_problem(72, torch.float16, GEMM_SLICES, "repeats", True, seed=41)
    gen = torch.Generator().manual_seed(42)
    calls = [(x, ids), (torch.randn(x.shape, generator=gen).to(x), [(i * 3) % 6 - 1 for i in range(len(ids))])]
    got, errors = [None, None], []
    gate = threading.Barrier(2)

    def run(i):
        try:
            xi, idsi = calls[i]
            stream = torch.cuda.Stream() if DEVICE == "cuda" else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                batch = LoRABatch.prepare(idsi, device=DEVICE)
                gate.wait()
                got[i] = lk.multi_lora_linear(xi, weight, b, pool, batch, backend="triton")
                if stream is not None:
                    stream.synchronize()
        except Exception as exc:  # reported below, with the thread's index
            errors.append((i, exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (xi, idsi), y in zip(calls, got):
        torch.testing.assert_close(y.cpu().double(), _want(pool, weight, b, xi, idsi), **close(torch.float16))


@needs_triton
def test_joined_step_without_counters_runs_the_pair(monkeypatch, tma_or_skip):
    """No counter pair left: the step runs the shrink + GEMM pair, same result."""
    from lora_kernels.triton import multi_lora as ML

    pool, weight, b, x, ids = _gemm_problem(72, torch.float16, GEMM_SLICES, "repeats", True, seed=31)
    monkeypatch.setattr(ML, "JOINED", True)
    monkeypatch.setattr(ML._SYNC, "get", lambda device: None)
    launched = []
    for name in _GEMM_PATH_KERNELS:
        monkeypatch.setattr(ML, name, _NameSpy(getattr(ML, name), name, launched))
    got = lk.multi_lora_linear(x, weight, b, pool, LoRABatch.prepare(ids, device=DEVICE), backend="triton")
    assert launched == ["_batched_shrink_kernel", "_gemm_tma_expand_kernel"], launched
    torch.testing.assert_close(got.cpu().double(), _want(pool, weight, b, x, ids), **close(torch.float16))


@pytest.mark.skipif(not HAS_CUDA, reason="captures a CUDA graph")
def test_joined_step_in_a_cuda_graph(monkeypatch, tma_or_skip):
    """JOINED in a CUDA graph: the captured call takes a counter pair of its own (not the stream's), and replays with
    refilled ids and new x give the reference, leaving every pair at zero."""
    from lora_kernels.triton import multi_lora as ML

    monkeypatch.setattr(ML, "JOINED", True)
    T = 96
    pool, weight, b, x, ids = _gemm_problem(T, torch.float16, GEMM_SLICES, "repeats", True, seed=33)
    batch = LoRABatch.prepare(ids, device=DEVICE)
    y = lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton")  # eager: the stream's pair
    torch.testing.assert_close(y.cpu().double(), _want(pool, weight, b, x, ids), **close(torch.float16))
    taken = ML._SYNC.taken[(x.device.type, x.device.index)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton", check=False)
    assert ML._SYNC.taken[(x.device.type, x.device.index)] == taken + 1
    gen = torch.Generator().manual_seed(5)
    for refill in ([2] * T, [(i * 5) % 7 - 1 for i in range(T)], [3, 0, 3, 1] * (T // 4)):
        batch.prepare_(refill)
        x.copy_(torch.randn(T, x.shape[1], generator=gen).to(x.dtype))
        graph.replay()
        torch.testing.assert_close(y.cpu().double(), _want(pool, weight, b, x, refill), **close(torch.float16))
    assert _joined_counters_at_rest(x.device)


def test_gemm_tma_ok_refuses_what_the_tma_gemm_cannot_read():
    from lora_kernels.triton import multi_lora as ML

    if HAS_CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA GEMM needs compute capability >= 9")
    if not (HAS_CUDA or INTERPRET):
        pytest.skip("needs CUDA or the interpreter")
    x = torch.randn(80, 48, dtype=torch.float16, device=DEVICE)
    w = torch.randn(32, 48, dtype=torch.float16, device=DEVICE)
    assert ML.gemm_tma_ok(x, w)
    assert not ML.gemm_tma_ok(x[: ML.GEMM_TMA_MIN_TOKENS], w)  # too few rows
    assert not ML.gemm_tma_ok(x.float(), w.float())  # fp32 data keeps the exact kernel
    assert not ML.gemm_tma_ok(x, w.bfloat16())  # mixed dtypes
    odd = torch.randn(80, 36, dtype=torch.float16, device=DEVICE)  # 72-byte rows
    assert not ML.gemm_tma_ok(odd, torch.randn(32, 36, dtype=torch.float16, device=DEVICE))
    shifted = torch.randn(80, 56, dtype=torch.float16, device=DEVICE)[:, 8:]  # 16-byte base, 112-byte rows: fine
    assert ML.gemm_tma_ok(shifted, w)
    off = torch.randn(80, 49, dtype=torch.float16, device=DEVICE)[:, 1:]  # 98-byte rows, 2-byte offset base
    assert not ML.gemm_tma_ok(off, w) and not ML.gemm_tma_ok(off, w, check_addresses=False)
    base_only = torch.randn(80 * 48 + 1, dtype=torch.float16, device=DEVICE)[1:].view(80, 48)  # rows fine, base not
    assert not ML.gemm_tma_ok(base_only, w) and ML.gemm_tma_ok(base_only, w, check_addresses=False)


class _NameSpy:
    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(self.name)
            return self.kernel[grid](*args, **kwargs)

        return launch


def _no_call(what):
    def boom(*args, **kwargs):
        raise AssertionError(f"{what} called on the gemm path")

    return boom


@needs_triton
def test_gemm_path_bad_ids_and_fp32_pool_with_half_data():
    """Ids outside -1..L-1 (unchecked: they count as none and read nothing), a float32 pool with fp16 activations,
    the fp16 overflow case, and a batch whose capacity exceeds the step (padding entries)."""
    pool, weight, b, x, ids = _gemm_problem(
        37, torch.float16, GEMM_SLICES, "repeats", True, seed=3, pool_dtype=torch.float32
    )
    bad = list(ids)
    bad[0], bad[5], bad[9] = 8, 1000, -7
    batch = LoRABatch.prepare(bad, max_tokens=64, device=DEVICE)
    got = lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton", path="gemm", check=False)
    want = _want(pool, weight, b, x, [i if 0 <= i < 8 else -1 for i in bad])
    torch.testing.assert_close(got.cpu().double(), want, **close(torch.float16))
    with pytest.raises(ValueError, match="ids outside"):
        lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton", path="gemm")
    pool2, w2, x2, ids2 = overflow_case()
    got2 = lk.multi_lora_linear(
        x2, w2, None, pool2, LoRABatch.prepare(ids2, device=DEVICE), backend="triton", path="gemm"
    )
    assert torch.isfinite(got2).all()
    torch.testing.assert_close(got2.cpu().double(), overflow_want(pool2, w2, x2, ids2), **close(torch.float16))


def test_path_choice_and_argument_errors():
    assert ops.choose_path(None, None, 1, "triton") == "fused"
    assert ops.choose_path(None, None, ops.FUSED_MAX_TOKENS + 1, "triton") == "gemm"
    assert ops.choose_path(None, None, ops.GEMM_MAX_TOKENS, "triton") == "gemm"
    assert ops.choose_path(None, None, ops.GEMM_MAX_TOKENS + 1, "triton") == "split"
    # where the gemm path's GEMM is the TMA kernel it is the default at every size above FUSED_MAX_TOKENS
    assert ops.choose_path(None, None, 4096, "triton", tma=True) == "gemm"
    assert ops.choose_path(None, None, ops.FUSED_MAX_TOKENS, "triton", tma=True) == "fused"
    assert ops.choose_path(None, None, 4096, "torch", tma=True) == "split"
    assert ops.choose_path("split", None, 4096, "triton", tma=True) == "split"
    assert ops.choose_path(None, None, 100, "torch") == "split"
    assert ops.choose_path(None, None, 100, "cuda") == "split"
    assert ops.choose_path(None, False, 1, "triton") == "split"
    assert ops.choose_path("gemm", None, 1, "torch") == "gemm"
    with pytest.raises(ValueError, match="path must be one of"):
        ops.choose_path("fast", None, 1, "triton")
    with pytest.raises(ValueError, match="contradicts"):
        ops.choose_path("gemm", True, 1, "triton")
    with pytest.raises(ValueError, match="no CUDA-extension kernel"):
        ops.choose_path("gemm", None, 1, "cuda")
    pool, weight, b, x, ids = _gemm_problem(5, torch.float32, [40], "repeats", False, seed=1)
    batch = LoRABatch.prepare(ids + [-1], device=DEVICE)  # 6 ids for 5 rows
    with pytest.raises(ValueError, match="prepared for 6 tokens"):
        lk.multi_lora_linear(x, weight, b, pool, batch, backend="torch", path="gemm", check=False)


@needs_triton
def test_default_gemm_path_gives_way_to_split_for_a_batch_of_another_size(monkeypatch):
    # check=False (as while capturing) with a batch prepared for one id more than x has rows: path="gemm" refuses
    # it, the default takes the split path (rows past x are never read) instead of failing.
    from lora_kernels.triton import multi_lora as ML

    pool, weight, b, x, ids = _gemm_problem(20, torch.float32, GEMM_SLICES, "repeats", True, seed=30)
    assert ops.choose_path(None, None, 20, "triton") == "gemm"
    batch = LoRABatch.prepare(ids + [1], device=DEVICE)
    launched = []
    for name in _GEMM_PATH_KERNELS:
        monkeypatch.setattr(ML, name, _NameSpy(getattr(ML, name), name, launched))
    got = lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton", check=False)
    assert launched == ["_batched_shrink_kernel", "_expand_kernel"], launched
    torch.testing.assert_close(got.cpu().double(), _want(pool, weight, b, x, ids), **close(torch.float32))
    with pytest.raises(ValueError, match="prepared for 21 tokens"):
        lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton", path="gemm", check=False)


def test_opcheck_gemm_op():
    pool, weight, b, x, ids = _gemm_problem(9, torch.float32, GEMM_SLICES, "repeats", True, seed=4)
    batch = LoRABatch.prepare(ids, device=DEVICE)
    meta = batch.meta
    backends = ["torch"] + (["triton"] if TRITON_OK else [])
    for backend in backends:
        torch.library.opcheck(
            ops._gemm_op,
            (
                x,
                weight,
                b,
                pool.A_stack,
                pool.B_stack,
                pool.ranks,
                pool.scales,
                *meta,
                list(pool.slices),
                batch.tile_m,
                backend,
            ),
        )


# --------------------------------------------------------------------------------------- sm_90 ahead-of-time compile
# The serving kernels at serving sizes (K = 4096, N = 4096 or q|k|v 4096|1024|1024, r = 16 / 64, fp16 and bf16), in
# the configurations the launchers pick for a 132-SM H100 (the real launchers run with the kernels swapped for
# recorders), compiled for sm_90 in a child process without TRITON_INTERPRET, then assembled by the ptxas triton uses
# with -v: no spill stores or loads, and shared memory within the 227 KiB a block may use on an H100.
_AOT_SCRIPT = r"""
import time
import torch
from lora_kernels.pool import auto_tile_m
from lora_kernels.ops.multi_lora import step_tile_m
from lora_kernels.ops._batch import BatchMeta
from lora_kernels.triton import _utils as U
from lora_kernels.triton import multi_lora as ML
from _aot import Recorder, compile_for_sm90, no_spills, ptxas_report, sass_of

calls = []
for name in ("_batched_shrink_kernel", "_expand_kernel", "_fused_kernel", "_gemm_expand_kernel",
             "_gemm_tma_expand_kernel", "_gemm_lanes_kernel", "_gemm_tma_joined_kernel", "_lora_side_kernel"):
    setattr(ML, name, Recorder(getattr(ML, name), calls))
U.sm_count = lambda index: 132
U.max_smem = lambda index: 227 * 1024

K, L = 4096, 16
# (tokens, rank, output slices, dtype): every row tile of the gemm path (16/32/64/128 rows), rank 16 and rank 64 with
# q|k|v slices, both half dtypes; plus the fused and split paths' kernels (their expand now runs a tf32 dot).
for M, R, slices, dtype in ((1, 16, [4096], torch.bfloat16), (1, 64, [4096, 1024, 1024], torch.float16),
                            (32, 64, [4096, 1024, 1024], torch.bfloat16), (64, 16, [4096], torch.float16),
                            (4096, 16, [4096], torch.bfloat16), (4096, 64, [4096, 1024, 1024], torch.float16)):
    S, N = len(slices), sum(slices)
    tile_m = step_tile_m(auto_tile_m(4096), M)
    x = torch.empty(M, K, dtype=dtype)
    W = torch.empty(N, K, dtype=dtype)
    A = torch.empty(L, S * R, K, dtype=dtype)
    B = torch.empty(L, N, R, dtype=dtype)
    ranks = torch.empty(L, dtype=torch.int32)
    scales = torch.empty(L, S, dtype=torch.float32)
    ids, st_, ss, ts = (torch.empty(n, dtype=torch.int32) for n in (4096, 4096, 4096, 4097))
    ML.linear_gemm(x, W, None, A, B, ranks, scales, BatchMeta(ids, st_, ss, ts), slices, tile_m)
    if M in (1, 4096) and R == 64:
        y = torch.empty(M, N, dtype=dtype)
        if M == 1:
            ML.fused(x, A, B, ranks, scales, BatchMeta(ids, st_, ss, ts), y, slices, tile_m)
        else:
            ML.expand(torch.empty(M, S * R), B, ranks, scales, BatchMeta(ids, st_, ss, ts), y, slices, tile_m)


def gemm(M, R, slices, dtype, tile_m=None, lanes=0, sort_rows=False):  # ML.linear_gemm on empty CPU tensors, a bias
    S, N = len(slices), sum(slices)
    ids, st_, ss, ts = (torch.empty(n, dtype=torch.int32) for n in (4096, 4096, 4096, 4097))
    ML.linear_gemm(torch.empty(M, K, dtype=dtype), torch.empty(N, K, dtype=dtype), torch.empty(N, dtype=dtype),
                   torch.empty(L, S * R, K, dtype=dtype), torch.empty(L, N, R, dtype=dtype),
                   torch.empty(L, dtype=torch.int32), torch.empty(L, S, dtype=torch.float32),
                   BatchMeta(ids, st_, ss, ts), slices, tile_m or step_tile_m(auto_tile_m(4096), M), lanes, sort_rows)


# The TMA GEMM of the gemm path (Hopper) on every tile it picks: 64x64 (128 rows), 64x128 (256), 128x256 (1024 and
# 4096 rows; q|k|v at rank 64). CPU tensors stand for an H100's: the TMA check answers from the strides.
ML.gemm_tma_ok = lambda x, w, check_addresses=True: x.shape[0] > ML.GEMM_TMA_MIN_TOKENS
for M, R, slices, dtype in ((128, 16, [4096], torch.bfloat16), (256, 16, [4096], torch.float16),
                            (1024, 16, [4096], torch.bfloat16), (4096, 64, [4096, 1024, 1024], torch.float16)):
    gemm(M, R, slices, dtype)
# The sorted-row GEMM reading W0 by TMA (SORTED_TMA_GEMM) on the TMA GEMM's widest tiles: 128x256 (rank 16), 128x128
# (q|k|v at rank 64).
ML.SORTED_TMA_GEMM = True
for M, R, slices, dtype in ((4096, 16, [4096], torch.bfloat16), (4096, 64, [4096, 1024, 1024], torch.float16)):
    gemm(M, R, slices, dtype)
ML.SORTED_TMA_GEMM = False
# The sorted-row GEMM of heavy-epilogue steps with SIDE_TERM off (x and W0 by TMA, x from the shrink's sorted copy:
# X_SORTED) and the shrink that writes that copy (GATHER), on the same tiles.
ML.SIDE_TERM = False
for M, R, slices, dtype in ((4096, 16, [4096], torch.bfloat16), (4096, 64, [4096, 1024, 1024], torch.float16)):
    gemm(M, R, slices, dtype, sort_rows=True)
ML.SIDE_TERM = True
# The side path of heavy-epilogue steps (SIDE_TERM): the side kernel at 32-, 64- and 128-row tiles, rank 16 and q|k|v
# at rank 64, and the TMA GEMM adding its fp32 buffer (SIDE) on 128x256 / 128x128 tiles.
# Launched as on an sm_90 (PDL): the side kernel lets its dependent launch, the GEMM waits before its epilogue.
pdl_ok = ML.pdl_ok
ML.pdl_ok = lambda device: True
for M, R, slices, dtype, tile_m in ((1024, 16, [4096], torch.bfloat16, 32),
                                    (4096, 64, [4096, 1024, 1024], torch.float16, 64),
                                    (4096, 16, [4096], torch.bfloat16, 128)):  # a batch built with tile_m=128
    gemm(M, R, slices, dtype, tile_m=tile_m, sort_rows=True)
ML.pdl_ok = pdl_ok
# The gemm path's TMA steps in one launch (JOINED) where its programs fit on the SMs at once: 256 and 384 tokens
# (64x128 tiles), and q|k|v.
ML.JOINED = True
for M, R, slices, dtype in ((256, 16, [4096], torch.float16), (384, 16, [4096], torch.bfloat16),
                            (200, 16, [4096, 1024, 1024], torch.float16)):
    gemm(M, R, slices, dtype)
ML.JOINED = False
# The one-launch gemm path (few adapters): every tile (16 and 64 rows, and the 64 x 128 one for more rows) at the
# widest stacked A (64 columns: 4 lanes of rank 16, 2 of 32, 1 of 64 with q|k|v slices) and one lane.
for M, R, slices, dtype, lanes in ((1, 16, [4096], torch.bfloat16, 4), (16, 16, [4096], torch.float16, 1),
                                   (16, 32, [4096], torch.float16, 2), (64, 16, [4096], torch.bfloat16, 4),
                                   (64, 64, [4096, 1024, 1024], torch.float16, 1),
                                   (200, 16, [4096], torch.bfloat16, 4)):
    gemm(M, R, slices, dtype, tile_m=16, lanes=lanes)
seen = set()
names = set()
w_tma = x_sorted = gather = joined = 0
side_kernels, side_gemms = {}, {}
tma_loads = {}
for kernel, grid, args, kwargs in calls:
    key = (str(kernel), tuple(sorted(kwargs.items())),
           tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor)))
    if key in seen:
        continue
    seen.add(key)
    t0 = time.perf_counter()
    compiled, consts = compile_for_sm90(kernel, args, kwargs)
    smem = compiled.metadata.shared
    st, ld, regs = ptxas_report(compiled)
    name = str(kernel).split(":")[-1].strip(">) ")
    names.add(name)
    shown = {k: v for k, v in consts.items() if k.isupper()}
    print(name, shown, "warps", kwargs.get("num_warps"), "stages", kwargs.get("num_stages"), "smem", smem,
          "spill", st, ld, "regs", regs, "compile %.1fs" % (time.perf_counter() - t0), flush=True)
    assert smem <= 227 * 1024, (name, shown, smem)
    no_spills(st, ld, (name, shown))
    if name == "_gemm_tma_expand_kernel" or shown.get("W_TMA"):  # wgmma fed by TMA loads (W0's only with W_TMA)
        sass = sass_of(compiled)
        assert "HGMMA" in sass and "UTMALDG" in sass, (name, shown)
        w_tma += bool(shown.get("W_TMA"))
        x_sorted += bool(shown.get("X_SORTED"))
        if shown.get("W_TMA"):
            tma_loads[(bool(shown.get("X_SORTED")), shown["BLOCK_R"])] = sass.count("UTMALDG")
        if shown.get("X_SORTED") and shown["BLOCK_R"] > 32:  # 128x128 spilled there on triton 3.6
            assert (shown["BLOCK_M"], shown["BLOCK_N"]) == (128, 64), shown
    gather += bool(shown.get("GATHER"))
    if name == "_lora_side_kernel":
        side_kernels[(shown["BLOCK_M"], shown["BLOCK_R"])] = (regs, smem, kwargs["num_warps"])
        # the dependent GEMM may launch once every side program has run this (PREEXIT in the SASS)
        assert shown["PDL"] and "griddepcontrol.launch_dependents" in compiled.asm["ptx"], shown
        assert "PREEXIT" in sass_of(compiled), shown
    if shown.get("SIDE"):  # the fp32 tile by TMA (one more descriptor load than x and W0's)
        sass = sass_of(compiled)
        assert "HGMMA" in sass and "UTMALDG" in sass, shown
        # the wait for the side kernel (ACQBULK) comes before the side tile's load, the last bulk tensor copy
        ptx = compiled.asm["ptx"]
        assert shown["PDL"] and "ACQBULK" in sass, shown
        assert -1 < ptx.find("griddepcontrol.wait") < ptx.rfind("cp.async.bulk.tensor"), shown
        side_gemms[(shown["BLOCK_N"], shown["BLOCK_R"], shown["HAS_BIAS"])] = (regs, smem, kwargs["num_warps"])
    if name == "_gemm_tma_joined_kernel":
        sass = sass_of(compiled)
        # wgmma fed by TMA; the items' release (a GPU-scope fence before the add), the tiles' acquire polls (strong
        # GPU loads), the exit count and reset (atomics)
        assert "HGMMA" in sass and "UTMALDG" in sass, shown
        assert "MEMBAR.ALL.GPU" in sass and "LDG.E.STRONG.GPU" in sass and "ATOMG" in sass, shown
        # joined_grid counts the programs an SM holds by shared memory alone (an upper bound of the compiled
        # kernel's): its registers (rounded up to 8 per thread) and its compiled shared memory (+1 KiB per program,
        # of an H100 SM's 228 KiB) must hold as many, or the tiles would wait on item programs that cannot start
        elt = args[0].element_size()
        tiles = (shown["BLOCK_M"], shown["BLOCK_N"], shown["BLOCK_K"], kwargs["num_warps"], kwargs["num_stages"])
        per_sm = ML.tma_programs_per_sm(tiles, shown["BLOCK_R"], elt, 227 * 1024)
        assert per_sm >= 1 and 65536 // (-(-regs // 8) * 8 * 32 * kwargs["num_warps"]) >= per_sm, (shown, regs)
        assert (228 * 1024) // (smem + 1024) >= per_sm, (shown, smem)
        joined += 1
assert {"_gemm_expand_kernel", "_gemm_tma_expand_kernel", "_batched_shrink_kernel", "_fused_kernel",
        "_expand_kernel", "_gemm_lanes_kernel", "_gemm_tma_joined_kernel", "_lora_side_kernel"} <= names, names
# a side-kernel program fits on an SM beside a program of the GEMM it feeds (registers rounded up to 8 per thread of
# an H100 SM's 65,536, 1 KiB of shared memory per program of its 228 KiB): the GEMM starts beside the side kernel
# (PDL) instead of after it
assert len(side_kernels) == 3 and len(side_gemms) == 2, (side_kernels, side_gemms)
def fits(a, b):
    regs = sum(-(-r // 8) * 8 * 32 * w for r, _, w in (a, b))
    return regs <= 65536 and a[1] + b[1] + 2048 <= 228 * 1024
for (bn, br, _), g in side_gemms.items():
    s_cfg = [v for (bm, r), v in side_kernels.items() if r == br]
    assert s_cfg and all(fits(g, v) for v in s_cfg), (bn, br, g, s_cfg)
assert w_tma == 4 and x_sorted == 2 and gather == 2 and joined == 3, (w_tma, x_sorted, gather, joined)
# with X_SORTED the sorted copy's K loop reads x by TMA as well (W0's loads alone in the other)
assert all(tma_loads[(True, r)] > tma_loads[(False, r)] for r in (16, 64)), tma_loads
print("OK")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels are compiled and run by the GPU tests")
def test_serving_kernels_compile_for_sm90_without_spills(tmp_path):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    run_child(_AOT_SCRIPT, tmp_path, timeout=900)


def test_compile_fullgraph_gemm_path():
    """The gemm path's functional custom op under torch.compile(fullgraph=True): same result as eager, and new ids
    in the same batch buffers need no recompilation."""
    torch._dynamo.reset()
    if DEVICE != "cpu":
        pytest.skip("the torch backend's gemm path is checked on the CPU; the GPU compile test covers Triton")
    pool, weight, b, x, ids = _gemm_problem(21, torch.float32, GEMM_SLICES, "repeats", True, seed=8)
    batch = LoRABatch.prepare(ids, max_tokens=64)

    def step(x):
        return lk.multi_lora_linear(x, weight, b, pool, batch, backend="torch", path="gemm") * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), step(x), rtol=1e-6, atol=1e-6)
    batch.prepare_(list(reversed(ids)))
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(x), step(x), rtol=1e-6, atol=1e-6)  # the same ops, traced: ~bitwise


@pytest.mark.gpu
@pytest.mark.parametrize("T", [24, 300])
def test_gpu_gemm_path_graph_replay_with_new_ids(T):
    """The gemm path (the default for T = 24; forced at T = 300, its 128-row tiles) captured in a CUDA graph for a
    batch of capacity 4096 (decode-sized tiles for T = 24), replayed after prepare_ with new ids, against the float64
    reference."""
    pool, weight, b, x, ids = _gemm_problem(T, torch.float16, GEMM_SLICES, "repeats", True, seed=T)
    batch = LoRABatch.prepare(ids, max_tokens=4096, device="cuda")
    assert ops.choose_path(None, None, T, "triton") == ("gemm" if T <= ops.GEMM_MAX_TOKENS else "split")
    warm_up(lambda: lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton", path="gemm"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton", path="gemm")
    gen = torch.Generator().manual_seed(1)
    for choice in ([0, 1, 2, 4, -1], [-1], [4], [0, 1, 2, 3, 4, -1]):
        new = torch.tensor(choice)[torch.randint(len(choice), (T,), generator=gen)].tolist()
        batch.prepare_(new)
        x.copy_(torch.randn(T, x.shape[1], generator=gen).to("cuda", torch.float16))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_oracle(
            y, multi_lora_in_dtype(x, weight, b, pool, new, list(pool.slices)), _want(pool, weight, b, x, new)
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_side_path_graph_replay_with_new_ids(monkeypatch, dtype):
    """The side path (a heavy step's default: the side kernel, then the TMA GEMM as its programmatic dependent adding
    the fp32 buffer) captured in a CUDA graph for host ids over many adapters, replayed after prepare_ with new ids
    (other adapters, none, ids outside the pool, all one adapter) against the float64 reference."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the side path runs beside the TMA GEMM: compute capability >= 9")
    from lora_kernels.triton import multi_lora as ML

    T = 600
    _side_always(monkeypatch, T)
    pool, weight, b, x, ids = _gemm_problem(T, dtype, GEMM_SLICES, "repeats", True, seed=T)
    batch = LoRABatch.prepare(ids, device="cuda")
    launched = []
    for name in ("_lora_side_kernel", "_gemm_tma_expand_kernel"):
        monkeypatch.setattr(ML, name, _NameSpy(getattr(ML, name), name, launched))
    warm_up(lambda: lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton"))
    assert launched[:2] == ["_lora_side_kernel", "_gemm_tma_expand_kernel"], launched
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton")
    gen = torch.Generator().manual_seed(2)
    for choice in ([0, 1, 2, 4, -1], [-1], [4], [0, 1, 2, 3, 4, 9, -1]):
        new = torch.tensor(choice)[torch.randint(len(choice), (T,), generator=gen)].tolist()
        batch.prepare_(torch.tensor(new, device="cuda"))  # device ids, as an engine refills them
        x.copy_(torch.randn(T, x.shape[1], generator=gen).to("cuda", dtype))
        graph.replay()
        torch.cuda.synchronize()
        valid = [i if 0 <= i < pool.max_adapters else -1 for i in new]
        assert_close_to_oracle(
            y, multi_lora_in_dtype(x, weight, b, pool, valid, list(pool.slices)), _want(pool, weight, b, x, valid)
        )


# ------------------------------------------------------------------------ one launch for few adapters (the lanes)
# (T, dtype, slices, pattern, bias, pool dtype, lanes) for _gemm_lanes_kernel called directly. The pool is rank 32
# (at most 2 lanes); "repeats" and "distinct" name up to 5 slots (one unloaded, rank 0), so lanes 1 and 2 also take
# the groups past the first (one more K loop over x and A each) in every row tile. 16-row tiles in the interpreter:
# 33 and 100 tokens span several; 100 is past LANES_MAX_TOKENS (the kernel is exact there too, only not the default).
LANES_CASES = [
    (1, torch.float32, GEMM_SLICES, "one", True, None, 1),
    (7, torch.float16, [40], "distinct", False, None, 2),
    (33, torch.float32, GEMM_SLICES, "repeats", True, None, 2),
    (33, torch.float16, GEMM_SLICES, "repeats", True, torch.float32, 1),
    (20, torch.float16, [40], "none", True, None, 1),
    (100, torch.float16, GEMM_SLICES, "repeats", False, None, 2),
]


@needs_triton
@pytest.mark.parametrize("T,dtype,slices,pattern,bias,pool_dtype,lanes", LANES_CASES)
def test_lanes_kernel_matches_reference(T, dtype, slices, pattern, bias, pool_dtype, lanes):
    from lora_kernels.triton import multi_lora as ML

    pool, weight, b, x, ids = _gemm_problem(T, dtype, slices, pattern, bias, seed=T + 40, pool_dtype=pool_dtype)
    batch = LoRABatch.prepare(ids, device=DEVICE)
    got = ML.linear_lanes(
        x, weight, b, pool.A_stack, pool.B_stack, pool.ranks, pool.scales, batch.meta, list(pool.slices), lanes
    )
    assert got.dtype == dtype and got.shape == (T, sum(slices))
    torch.testing.assert_close(got.cpu().double(), _want(pool, weight, b, x, ids), **close(dtype))


@needs_triton
def test_lanes_kernel_bad_ids_overflow_and_arguments():
    """Ids outside -1..L-1 (unchecked: they add nothing, read nothing) in a batch of spare capacity, the fp16
    overflow case (xa beyond 65504 stays fp32), and lane counts the kernel cannot take."""
    from lora_kernels.triton import multi_lora as ML

    pool, weight, b, x, ids = _gemm_problem(30, torch.float16, GEMM_SLICES, "repeats", True, seed=17)
    bad = list(ids)
    bad[0], bad[13], bad[29] = 8, 1000, -7
    batch = LoRABatch.prepare(bad, max_tokens=64, device=DEVICE)
    args = (x, weight, b, pool.A_stack, pool.B_stack, pool.ranks, pool.scales, batch.meta, list(pool.slices))
    got = ML.linear_lanes(*args, 2)
    torch.testing.assert_close(
        got.cpu().double(), _want(pool, weight, b, x, [i if 0 <= i < 8 else -1 for i in bad]), **close(torch.float16)
    )
    for lanes in (0, 3, 4):  # rank 32: 1 or 2 lanes
        with pytest.raises(ValueError, match="lanes must be a power of two in \\[1, 2\\]"):
            ML.linear_lanes(*args, lanes)
    pool2, w2, x2, ids2 = overflow_case(tokens=9)
    b2 = LoRABatch.prepare(ids2, device=DEVICE)
    got2 = ML.linear_lanes(x2, w2, None, pool2.A_stack, pool2.B_stack, pool2.ranks, pool2.scales, b2.meta, [24], 1)
    assert torch.isfinite(got2).all()
    torch.testing.assert_close(got2.cpu().double(), overflow_want(pool2, w2, x2, ids2), **close(torch.float16))


def test_lanes_for():
    from lora_kernels.triton import multi_lora as ML

    M = ML.LANES_MAX_TOKENS
    assert [ML.lanes_for(M, 16, n) for n in (0, 1, 2, 3, 4, 5)] == [1, 1, 2, 4, 4, 0]
    assert [ML.lanes_for(1, 32, n) for n in (1, 2, 3)] == [1, 2, 0]
    assert [ML.lanes_for(1, r, 1) for r in (8, 64, 128)] == [1, 1, 0] and ML.lanes_for(1, 64, 2) == 0
    assert ML.max_lanes(8) == 4 and ML.max_lanes(16) == 4 and ML.max_lanes(64) == 1 and ML.max_lanes(128) == 0
    assert ML.lanes_for(M + 1, 16, 1) == 0 and ML.lanes_for(1, 16, None) == 0


def _kernels_of(monkeypatch, ML):
    launched = []
    for name in _GEMM_PATH_KERNELS:
        monkeypatch.setattr(ML, name, _NameSpy(getattr(ML, name), name, launched))
    return launched


@needs_triton
def test_gemm_path_is_one_launch_when_the_adapters_are_known_to_be_few(monkeypatch):
    """The default takes the one-launch gemm path when the step's adapters fit the lanes: counted from host ids
    eagerly; while capturing or compiling (ids of later replays unknown) only from the batch's max_adapters_per_step
    promise. More adapters, no promise, or more than LANES_MAX_TOKENS tokens: the two-launch paths."""
    from lora_kernels.triton import multi_lora as ML

    problem = _gemm_problem(24, torch.float16, GEMM_SLICES, "repeats", True, seed=50)
    ids_few = [(2, 4, -1)[i % 3] for i in range(24)]
    ids_many = ([2, 4, -1, 2, 9] * 5)[:24]  # an id outside the pool counts too: 3 named > 2 lanes at rank 32

    def run(ids, traced=False, promise=None, path=None, problem=problem):
        pool, weight, b, x, _ = problem
        mp = pytest.MonkeyPatch()
        launched = _kernels_of(mp, ML)
        mp.setattr(torch.Tensor, "zero_", _no_call("zero_"))
        if traced:
            mp.setattr(ops, "_in_graph_or_compile", lambda t: True)
        try:
            batch = LoRABatch.prepare(ids, device=DEVICE, max_adapters_per_step=promise)
            y = lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton", path=path, check=False)
        finally:
            mp.undo()
        want = _want(pool, weight, b, x, [i if 0 <= i < 8 else -1 for i in ids])
        torch.testing.assert_close(y.cpu().double(), want, **close(torch.float16))
        return launched

    assert run(ids_few) == ["_gemm_lanes_kernel"]
    assert run(ids_few, path="gemm") == ["_gemm_lanes_kernel"]
    assert run(ids_many) == ["_batched_shrink_kernel", "_gemm_expand_kernel"]
    assert run(ids_few, traced=True) == ["_batched_shrink_kernel", "_gemm_expand_kernel"]
    assert run(ids_few, traced=True, promise=2) == ["_gemm_lanes_kernel"]
    assert run(ids_few, traced=True, promise=3) == ["_batched_shrink_kernel", "_gemm_expand_kernel"]
    monkeypatch.setattr(ML, "LANES_GEMM", False)
    assert run(ids_few) == ["_batched_shrink_kernel", "_gemm_expand_kernel"]
    monkeypatch.undo()
    # one token of one adapter: one launch, not F.linear + the fused kernel
    assert run([4], problem=_gemm_problem(1, torch.float16, GEMM_SLICES, "one", True, seed=53)) == [
        "_gemm_lanes_kernel"
    ]
    # past LANES_MAX_TOKENS: the two-launch gemm path
    T = ML.LANES_MAX_TOKENS + 1
    big = _gemm_problem(T, torch.float16, GEMM_SLICES, "one", False, seed=51)
    assert run([2] * T, problem=big)[0] == "_batched_shrink_kernel"


def test_max_adapters_per_step_promise():
    with pytest.raises(ValueError, match="max_adapters_per_step must be a positive int"):
        LoRABatch(8, max_adapters_per_step=0)
    with pytest.raises(ValueError, match="max_adapters_per_step must be a positive int"):
        LoRABatch(8, max_adapters_per_step=True)
    batch = LoRABatch.prepare([0, 1, -1, 1], max_tokens=8, max_adapters_per_step=2)
    assert batch.step_adapters == 2 and batch.max_adapters_per_step == 2
    before = [t.clone() for t in batch.meta], batch.num_tokens, batch.host_unique
    with pytest.raises(ValueError, match="name 3 distinct adapters but this batch promised max_adapters_per_step=2"):
        batch.prepare_([0, 1, 2])
    # a failing prepare_ leaves the batch as it was
    assert all(torch.equal(a, b) for a, b in zip(before[0], batch.meta))
    assert (batch.num_tokens, batch.host_unique) == before[1:]
    assert LoRABatch.prepare([-1, -1]).step_adapters == 0
    seq = LoRABatch.prepare_sequences([3, -1], 2, max_adapters_per_step=1)
    assert seq.max_adapters_per_step == 1 and seq.step_adapters == 1


@needs_triton
def test_lanes_launch_replays_with_new_ids(monkeypatch):
    """The one-launch kernel reads each token's slot from the batch's token_slots at run time: a launch recorded
    while "capturing" (promise of 2 adapters) and replayed after ``batch.prepare_`` with other ids within the promise
    gives every token its new adapter (one adapter, none, two per row tile, an id outside the pool)."""
    from lora_kernels.triton import multi_lora as ML

    T = 40
    pool, weight, b, x, _ = _gemm_problem(T, torch.float16, GEMM_SLICES, "one", True, seed=52)
    log = []
    monkeypatch.setattr(ML, "_gemm_lanes_kernel", ReplayLog(ML._gemm_lanes_kernel, log))
    monkeypatch.setattr(ops, "_in_graph_or_compile", lambda t: True)
    batch = LoRABatch.prepare([1, 4] * (T // 2), device=DEVICE, max_adapters_per_step=2)
    y = lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton")
    assert len(log) == 1
    torch.testing.assert_close(y.cpu().double(), _want(pool, weight, b, x, [1, 4] * (T // 2)), **close(torch.float16))
    refills = ([2] * T, [-1] * T, [0, 0, 2, -1] * (T // 4), [9, 1, -3, 1] * (T // 4))
    _check_replays(log, batch, refills, x, y, pool, weight, b, seed=5)


@pytest.mark.gpu
@pytest.mark.parametrize("T,dtype", [(1, torch.bfloat16), (16, torch.float16), (64, torch.bfloat16)])
def test_gpu_lanes_graph_replay_with_new_ids(T, dtype):
    """The one-launch gemm path captured in a CUDA graph (the batch promises 2 adapters per step, rank-32 pool: 2
    lanes), replayed after prepare_ with new ids within the promise, against the float64 reference; the two-launch
    path (the same call without the promise) agrees."""
    pool, weight, b, x, _ = _gemm_problem(T, dtype, GEMM_SLICES, "one", True, seed=T + 7)
    ids = [(1, 4)[i % 2] for i in range(T)]
    batch = LoRABatch.prepare(ids, max_tokens=256, device="cuda", max_adapters_per_step=2)
    warm_up(lambda: lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton")
    gen = torch.Generator().manual_seed(2)
    for choice in ([0, 2, -1], [-1], [4], [1, 9]):
        new = torch.tensor(choice)[torch.randint(len(choice), (T,), generator=gen)].tolist()
        batch.prepare_(new)
        x.copy_(torch.randn(T, x.shape[1], generator=gen).to("cuda", dtype))
        graph.replay()
        torch.cuda.synchronize()
        valid = [i if 0 <= i < 8 else -1 for i in new]
        want = _want(pool, weight, b, x, valid)
        assert_close_to_oracle(y, multi_lora_in_dtype(x, weight, b, pool, valid, list(pool.slices)), want)
        two = lk.multi_lora_linear(
            x, weight, b, pool, LoRABatch.prepare(new, device="cuda"), backend="triton", path="split", check=False
        )
        assert_close_to_oracle(two, multi_lora_in_dtype(x, weight, b, pool, valid, list(pool.slices)), want)


def test_pdl_only_on_cuda_sm90_without_the_interpreter(monkeypatch):
    """The gemm path launches its GEMM as a programmatic dependent of its shrink only where that can work: a CUDA
    device of compute capability >= 9, no interpreter, PDL on."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    from lora_kernels import _backend
    from lora_kernels.triton import multi_lora as ML

    assert not ML.pdl_ok(torch.device("cpu"))
    monkeypatch.setattr(_backend, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(ML, "_capability", lambda index: 9)
    assert ML.pdl_ok(torch.device("cuda", 0)) == ML._HAS_GDC
    monkeypatch.setattr(ML, "_capability", lambda index: 8)
    assert not ML.pdl_ok(torch.device("cuda", 0))
    monkeypatch.setattr(ML, "_capability", lambda index: 9)
    monkeypatch.setattr(ML, "PDL", False)
    assert not ML.pdl_ok(torch.device("cuda", 0))
    monkeypatch.setattr(ML, "PDL", True)
    monkeypatch.setattr(_backend, "interpreter_enabled", lambda: True)
    assert not ML.pdl_ok(torch.device("cuda", 0))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [17, 100, 1000])
def test_gpu_gemm_path_same_result_with_and_without_pdl(monkeypatch, T):
    """The GEMM launched as a programmatic dependent of its shrink (sm_90+) waits for the shrink before its epilogue:
    bitwise the result of the two kernels run one after the other, and within tolerance of the float64 reference."""
    from lora_kernels.triton import multi_lora as ML

    pool, weight, b, x, ids = _gemm_problem(T, torch.float16, GEMM_SLICES, "repeats", True, seed=T)
    batch = LoRABatch.prepare(ids, device="cuda")
    with_pdl = lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton", path="gemm")
    monkeypatch.setattr(ML, "PDL", False)
    without = lk.multi_lora_linear(x, weight, b, pool, batch, backend="triton", path="gemm")
    torch.testing.assert_close(with_pdl, without, rtol=0, atol=0)
    assert_close_to_oracle(
        with_pdl, multi_lora_in_dtype(x, weight, b, pool, ids, list(pool.slices)), _want(pool, weight, b, x, ids)
    )
