"""Contracts every implementation of the kernels must keep, tested through the public entry points so that a rewrite
of the kernels keeps them covered:

- a rank above the pool's R in the ranks tensor (``check=False``) is clamped to R: nothing past a slot's R rows of A,
  R columns of B or its slice's R columns of the shrink output is read or written;
- nothing reads the pool's padding (rows/columns past a slot's rank) or an empty slot: the reference included, with
  NaN planted in every such place and the shrink output's padding columns exactly zero;
- fp32 inputs take IEEE fp32 products unless TF32 is allowed (``torch.backends.cuda.matmul.allow_tf32``, which
  ``torch.set_float32_matmul_precision("high")`` turns on);
- ``lora_kernels.cuda.bgmv_shrink(..., scales=...)`` multiplies by the scales;
- the buffers that split-K / split-M / split-N programs accumulate into with atomics are zero-filled first: checked
  with every ``torch.empty`` NaN-filled, so the test cannot pass because fresh memory happened to be zero;
- on a GPU: column-major outputs and inputs past 2^31 elements (int64 offsets).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from _oracle import naive_multi_lora
from _tolerances import close, close_small_k

import lora_kernels as lk
from lora_kernels import cuda as lkc
from lora_kernels.ops import multi_lora as ops
from lora_kernels.pool import AdapterPool, LoRABatch
from lora_kernels.reference import multi_lora as ref

from conftest import DEVICE, HAS_CUDA, INTERPRET

TRITON_OK = (HAS_CUDA or INTERPRET) and importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs triton, and CUDA or TRITON_INTERPRET=1")
needs_interpreter = pytest.mark.skipif(
    not (INTERPRET and TRITON_OK), reason="observes tl.dot through the Triton interpreter (TRITON_INTERPRET=1)"
)
NAN = float("nan")


# ---------------------------------------------------------------------------------------------- private names
# Everything this file needs beyond the public API, in one place (update here when the kernels are rewritten).
def _triton_lora_linear():
    from lora_kernels.triton import lora_linear as m

    return m


def _precision_chooser():
    """(UPCAST, PREC, LORA_PREC) of the fused LoRA-linear kernels for an input dtype."""
    from lora_kernels.triton import _utils

    return _utils.tf32_precisions


SPLIT_FN = "_split"  # lora_kernels.triton.lora_linear: split factor of a reduction split into partial sums


def _cuda_backend_reason():
    """Why backend="cuda" cannot run the multi-adapter ops on this GPU (None: it can)."""
    return ops.BACKENDS.checks["cuda"](torch.empty(1, device="cuda"))


def _accept_cuda_backend(monkeypatch):
    """Let backend="cuda" through the ops' availability check (the emulated module runs on CPU tensors)."""
    monkeypatch.setitem(ops.BACKENDS.checks, "cuda", lambda *a: None)


def _emulated_cuda_module(request):
    """csrc/ built for the host (the emulation harness of test_cuda_ext.py) and lora_kernels.cuda pointed at it."""
    return request.getfixturevalue("emulated")


from test_cuda_ext import emu_module, emulated  # noqa: E402,F401  (fixtures: the CUDA kernels emulated on the host)


# ------------------------------------------------------------------------------------------------------ helpers
def _backends():
    """The multi-adapter backends this machine can run: the reference ("torch"), Triton (GPU or interpreter), and
    "cuda" (the real extension on a GPU, else its host emulation when g++ and the CUDA headers are there)."""
    names = ["torch"]
    if TRITON_OK:
        names.append("triton")
    names.append("cuda")
    return names


def _use_backend(backend, request, monkeypatch):
    """Make ``backend`` runnable here, or skip."""
    if backend != "cuda":
        return
    if HAS_CUDA:
        why = _cuda_backend_reason()
        if why:
            pytest.skip(f"backend cuda: {why}")
        return
    _emulated_cuda_module(request)  # skips when the emulation cannot be built here
    _accept_cuda_backend(monkeypatch)


def _fenced(t: torch.Tensor, before: int, after: int, fill) -> tuple:
    """(storage, view): ``t`` copied into the middle of a larger tensor along dim 0, ``fill`` around it, so that an
    index past either end of the view reads ``fill`` (and a write there is seen), never foreign memory."""
    big = torch.full((before + t.shape[0] + after, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    big[before : before + t.shape[0]] = t
    return big, big[before : before + t.shape[0]]


def _oracle_shrink(x, A, ids, ranks, S, R):
    """float64 ``out[m, s·R + j] = x[m]·A[slot, s·R + j]`` for ``j < min(rank, R)``, 0 elsewhere (incl. no adapter)."""
    M = x.shape[0]
    L = A.shape[0]
    out = torch.zeros(M, S * R, dtype=torch.float64)
    for m, l in enumerate(ids):
        if not 0 <= l < L or ranks[l] <= 0:
            continue
        r = min(ranks[l], R)
        for s in range(S):
            out[m, s * R : s * R + r] = x[m].double() @ A[l, s * R : s * R + r].double().t()
    return out


def _oracle_expand(xa, B, ids, ranks, scales, y0, slices, R):
    y = y0.double().clone()
    L = B.shape[0]
    for m, l in enumerate(ids):
        if not 0 <= l < L or ranks[l] <= 0:
            continue
        r = min(ranks[l], R)
        off = 0
        for si, n in enumerate(slices):
            y[m, off : off + n] += float(scales[l][si]) * (
                xa[m, si * R : si * R + r].double() @ B[l, off : off + n, :r].double().t()
            )
            off += n
    return y


# ----------------------------------------------------------------------------------------- rank above R: clamped
# R = 4 is far below the smallest MMA width (16): a kernel that masks by the rank alone, unclamped, reads and writes
# up to 16 rows/columns per slice. Slices [9, 7] put slice 1's rows right after slice 0's and slot l+1's after slot l,
# so an unclamped rank reads a neighbour's numbers (or the NaN fence) and writes into the next slice or token row.
CLAMP_K, CLAMP_R, CLAMP_SLICES = 37, 4, [9, 7]
CLAMP_RANKS = [5, 2, 13]  # given to the kernels; effective [4, 2, 4]
CLAMP_IDS = [0, 2, 1, 2, 0, 1, -1, -1, -1]  # over-rank tokens first: an unclamped write past them stays in the fence


def _clamp_case(seed):
    g = torch.Generator().manual_seed(seed)
    L, S, R, K, N = len(CLAMP_RANKS), len(CLAMP_SLICES), CLAMP_R, CLAMP_K, sum(CLAMP_SLICES)
    A = torch.randn(L, S * R, K, generator=g) / math.sqrt(K)
    B = torch.randn(L, N, R, generator=g)
    x = torch.randn(len(CLAMP_IDS), K, generator=g)
    scales = torch.rand(L, S, generator=g) + 0.5
    return A, B, x, scales


@needs_triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rank_above_R_is_clamped_by_shrink_and_expand(backend):
    """check=False lets a ranks tensor with values above R reach the kernels (5 and 13 with R = 4): they must act as
    R. The stacks, the shrink output and s are views into NaN/sentinel-fenced storage, so reading past R gives NaN and
    writing past R changes the fence or a neighbour's columns."""
    A, B, x, scales = _clamp_case(1)
    S, R, M = len(CLAMP_SLICES), CLAMP_R, x.shape[0]
    _, A_v = _fenced(A.to(DEVICE), 0, 4, NAN)
    _, B_v = _fenced(B.to(DEVICE), 0, 4, NAN)
    ranks = torch.tensor(CLAMP_RANKS, dtype=torch.int32, device=DEVICE)
    batch = LoRABatch.prepare(CLAMP_IDS, device=DEVICE)
    sentinel = 1234.5
    out_big, out = _fenced(torch.full((M, S * R), NAN, device=DEVICE), 0, 3, sentinel)
    lk.lora_shrink(x.to(DEVICE), A_v, batch, out, ranks=ranks, num_slices=S, backend=backend, check=False)
    want_s = _oracle_shrink(x, A, CLAMP_IDS, CLAMP_RANKS, S, R)
    torch.testing.assert_close(out.cpu().double(), want_s, **close_small_k())
    assert torch.equal(out_big[M:].cpu(), torch.full((3, S * R), sentinel)), "shrink wrote past the output"

    # expand reads s through the same fence: columns past R of an over-rank token would be the next slice's / token's
    s_big, s_v = _fenced(want_s.float().to(DEVICE), 0, 3, NAN)
    y0 = torch.randn(M, sum(CLAMP_SLICES), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    y = y0.clone()
    lk.lora_expand(
        s_v, B_v, batch, y, scales.to(DEVICE), slices=CLAMP_SLICES, ranks=ranks, backend=backend, check=False
    )
    want_y = _oracle_expand(want_s, B, CLAMP_IDS, CLAMP_RANKS, scales.tolist(), y0.cpu(), CLAMP_SLICES, R)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.cpu().double(), want_y, **close_small_k())


@needs_triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fused", [False, True])
def test_rank_above_R_is_clamped_by_multi_lora_linear(backend, fused):
    """The same through multi_lora_linear: a pool whose ranks tensor says more than R (set by hand; the pool never
    does) behaves as rank R, on the fused (decode) kernel and on shrink + expand."""
    A, B, x, scales = _clamp_case(3)
    L, S, R, K = A.shape[0], len(CLAMP_SLICES), CLAMP_R, CLAMP_K
    N = sum(CLAMP_SLICES)
    pool = AdapterPool(L, R, K, CLAMP_SLICES, device=DEVICE)
    for l in range(L):  # full-rank adapters: rank R is what the over-rank slots must compute
        pool.load(
            f"ad{l}",
            [A[l, s * R : (s + 1) * R] for s in range(S)],
            [B[l, sum(CLAMP_SLICES[:s]) : sum(CLAMP_SLICES[: s + 1])] for s in range(S)],
            alpha=1.0,
        )
    pool.scales.copy_(scales)
    _, pool.A_stack = _fenced(pool.A_stack, 0, 4, NAN)
    _, pool.B_stack = _fenced(pool.B_stack, 0, 4, NAN)
    pool.ranks.copy_(torch.tensor(CLAMP_RANKS, dtype=torch.int32))
    g = torch.Generator().manual_seed(4)
    W = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(DEVICE)
    got = lk.multi_lora_linear(
        x.to(DEVICE),
        W,
        None,
        pool,
        LoRABatch.prepare(CLAMP_IDS, device=DEVICE),
        backend=backend,
        check=False,
        fused=fused,
    )
    want = x.double() @ W.cpu().double().t()
    want = _oracle_expand(
        _oracle_shrink(x, A, CLAMP_IDS, CLAMP_RANKS, S, R),
        B,
        CLAMP_IDS,
        CLAMP_RANKS,
        scales.tolist(),
        want,
        CLAMP_SLICES,
        R,
    )
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.cpu().double(), want, **close(torch.float32))


# ----------------------------------------------------------------------------------- poisoned pool, every backend
POISON_K, POISON_R, POISON_SLICES = 24, 8, [10, 6]
POISON_RANKS = {0: 8, 1: 3, 3: 1}  # slot 2 empty, slot 4 never loaded
POISON_L = 5
POISON_IDS = [1, 0, -1, 3, 1, 2, 4, 0, 3, 5, -3, 1]


def _poisoned_pool(seed):
    """A pool with NaN in every place no computation may read: rows of A / columns of B past each slot's rank, the
    whole of the empty and the never-loaded slots (weights and scales), and a fence before slot 0 and after slot L-1.
    Returns (pool, adapters {slot: (A_s list, B_s list, scales)}) with the adapters as loaded (NaN-free)."""
    g = torch.Generator().manual_seed(seed)
    K, R, slices = POISON_K, POISON_R, POISON_SLICES
    pool = AdapterPool(POISON_L, R, K, slices, device=DEVICE)
    adapters = {}
    for slot in range(3 + 1):
        r = POISON_RANKS.get(slot, R)
        a = [torch.randn(r, K, generator=g) / math.sqrt(K) for _ in slices]
        b = [torch.randn(n, r, generator=g) for n in slices]
        alpha = [2.0 * r + s for s in range(len(slices))]
        got = pool.load(f"ad{slot}", [t.to(DEVICE) for t in a], [t.to(DEVICE) for t in b], alpha=alpha, slot=slot)
        assert got == slot
        adapters[slot] = (a, b, [al / r for al in alpha])
    pool.unload("ad2")
    del adapters[2]
    S = len(slices)
    for slot in range(POISON_L):
        r = POISON_RANKS.get(slot, 0) if slot in adapters else 0
        for s in range(S):
            pool.A_stack[slot, s * R + r : (s + 1) * R] = NAN
        pool.B_stack[slot, :, r:] = NAN
        if slot not in adapters:
            pool.scales[slot] = NAN
    _, pool.A_stack = _fenced(pool.A_stack, 1, 1, NAN)
    _, pool.B_stack = _fenced(pool.B_stack, 1, 1, NAN)
    _, pool.scales = _fenced(pool.scales, 1, 1, NAN)
    return pool, adapters


def _naive_shrink(x, adapters, ids, S, R):
    out = torch.zeros(x.shape[0], S * R, dtype=torch.float64)
    for m, l in enumerate(ids):
        if l not in adapters:
            continue
        a = adapters[l][0]
        for s in range(S):
            out[m, s * R : s * R + a[s].shape[0]] = x[m].double() @ a[s].double().t()
    return out


def test_reference_reads_no_padding_and_no_empty_slot():
    """The reference functions themselves (the oracle of every kernel test) on the poisoned pool: NaN-free, equal to
    the adapters as loaded, shrink padding columns exactly 0."""
    pool, adapters = _poisoned_pool(5)
    g = torch.Generator().manual_seed(6)
    S, R, K, N = len(POISON_SLICES), POISON_R, POISON_K, sum(POISON_SLICES)
    x = torch.randn(len(POISON_IDS), K, generator=g)
    W = torch.randn(N, K, generator=g) / math.sqrt(K)
    ids = torch.tensor(POISON_IDS)
    A, B, ranks, scales = (t.cpu() for t in (pool.A_stack, pool.B_stack, pool.ranks, pool.scales))
    for dtype in (torch.float32, torch.float64):
        xa = ref.lora_shrink(x.to(dtype), A, ids, ranks, S)
        assert torch.isfinite(xa).all()
        torch.testing.assert_close(xa.double(), _naive_shrink(x, adapters, POISON_IDS, S, R), **close_small_k())
        y0 = torch.randn(len(POISON_IDS), N, generator=g, dtype=dtype)
        y = ref.lora_expand(xa, B, ids, ranks, scales, y0.clone(), POISON_SLICES)
        assert torch.isfinite(y).all()
        got = ref.multi_lora_linear(x.to(dtype), W.to(dtype), None, A, B, ranks, scales, ids, POISON_SLICES)
        assert torch.isfinite(got).all()
        want = naive_multi_lora(x, W, None, adapters, POISON_IDS, POISON_SLICES)
        torch.testing.assert_close(got.double(), want, **close(torch.float32))


@pytest.mark.parametrize("backend", _backends())
def test_no_backend_reads_padding_or_empty_slots(backend, request, monkeypatch):
    """Every backend runnable here, through the public ops, on the poisoned pool: lora_shrink (output pre-filled with
    NaN: every element written, padding columns 0), lora_expand, and multi_lora_linear fused and not."""
    _use_backend(backend, request, monkeypatch)
    pool, adapters = _poisoned_pool(7)
    g = torch.Generator().manual_seed(8)
    S, R, K, N = len(POISON_SLICES), POISON_R, POISON_K, sum(POISON_SLICES)
    M = len(POISON_IDS)
    x = torch.randn(M, K, generator=g)
    W = torch.randn(N, K, generator=g) / math.sqrt(K)
    batch = LoRABatch.prepare(POISON_IDS, device=DEVICE)
    out = torch.full((M, S * R), NAN, device=DEVICE)
    lk.lora_shrink(x.to(DEVICE), pool.A_stack, batch, out, ranks=pool.ranks, num_slices=S, backend=backend, check=False)
    want_s = _naive_shrink(x, adapters, POISON_IDS, S, R)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), want_s, **close_small_k())
    y0 = torch.randn(M, N, generator=g).to(DEVICE)
    y = y0.clone()
    lk.lora_expand(
        out, pool.B_stack, batch, y, pool.scales, slices=POISON_SLICES, ranks=pool.ranks, backend=backend, check=False
    )
    assert torch.isfinite(y).all()
    want = naive_multi_lora(x, W, None, adapters, POISON_IDS, POISON_SLICES)
    torch.testing.assert_close((y - y0).cpu().double(), want - x.double() @ W.double().t(), **close(torch.float32))
    for fused in (False, True):
        got = lk.multi_lora_linear(
            x.to(DEVICE), W.to(DEVICE), None, pool, batch, backend=backend, check=False, fused=fused
        )
        assert torch.isfinite(got).all(), f"fused={fused}"
        torch.testing.assert_close(got.cpu().double(), want, **close(torch.float32))


@pytest.mark.parametrize("backend", _backends())
def test_unloaded_slot_reads_nothing(backend, request, monkeypatch):
    """After unload the slot has rank 0 (the docstring's contract), so a token still naming it (check=False) gets the
    base output without reading the slot: NaN planted in the freed slot's weights must not reach the output."""
    _use_backend(backend, request, monkeypatch)
    g = torch.Generator().manual_seed(12)
    K, R, N = 16, 4, 8
    pool = AdapterPool(2, R, K, N, device=DEVICE)
    pool.load("keep", (torch.randn(R, K, generator=g) / 4).to(DEVICE), torch.randn(N, R, generator=g).to(DEVICE))
    slot = pool.load("gone", torch.randn(2, K, generator=g).to(DEVICE), torch.randn(N, 2, generator=g).to(DEVICE))
    assert pool.unload("gone") == slot
    assert int(pool.ranks[slot]) == 0 and float(pool.scales[slot].abs().sum()) == 0.0
    pool.A_stack[slot] = NAN
    pool.B_stack[slot] = NAN
    x = torch.randn(3, K, generator=g).to(DEVICE)
    W = torch.randn(N, K, generator=g).to(DEVICE)
    for fused in (False, True):
        got = lk.multi_lora_linear(
            x,
            W,
            None,
            pool,
            LoRABatch.prepare([slot, slot, -1], device=DEVICE),
            backend=backend,
            check=False,
            fused=fused,
        )
        torch.testing.assert_close(got, x @ W.t(), **close_small_k())


# -------------------------------------------------------------------------------------------- precision contract
def _dot_precisions(fn):
    """Run ``fn`` in the Triton interpreter and return {(a dtype, b dtype, input precision)} of every tl.dot."""
    import triton.runtime.interpreter as interp

    seen = set()
    real = interp.InterpreterBuilder.create_dot

    def spy(self, a, b, d, input_precision, max_num_imprecise_acc):
        seen.add((str(a.dtype), str(b.dtype), str(input_precision).rsplit(".", 1)[-1].lower()))
        return real(self, a, b, d, input_precision, max_num_imprecise_acc)

    interp.InterpreterBuilder.create_dot = spy
    try:
        fn()
    finally:
        interp.InterpreterBuilder.create_dot = real
    return seen


@pytest.fixture
def tf32_flag():
    """Restores torch's float32 matmul precision and TF32 flag after the test. Both: restoring the flag alone leaves
    ``set_float32_matmul_precision("medium")`` in force for CPU matmuls, which then run in bf16 on CPUs with AMX /
    AVX512-BF16 (the float32 references of every later test lose their precision)."""
    precision = torch.get_float32_matmul_precision()
    saved = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cuda.matmul.allow_tf32 = saved


def test_precision_chooser_follows_torch_tf32_policy(tf32_flag):
    """fp32 inputs: IEEE fp32 products for the base and the LoRA products unless TF32 is allowed (the cuBLAS policy,
    so lora_linear on fp32 matches F.linear's precision); half inputs: TF32 for their fp32 LoRA operands."""
    choose = _precision_chooser()
    for setting, want in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
        torch.set_float32_matmul_precision(setting)
        _, prec, lora_prec = choose(torch.float32)
        assert (prec, lora_prec) == (want, want), setting
    for flag, want in ((False, "ieee"), (True, "tf32")):
        torch.backends.cuda.matmul.allow_tf32 = flag
        assert choose(torch.float32)[1:] == (want, want), flag
        for half in (torch.float16, torch.bfloat16):
            assert choose(half)[2] == "tf32", (flag, half)


@needs_interpreter
@pytest.mark.parametrize("what", ["lora_linear", "multi_lora_fused", "multi_lora_split"])
def test_fp32_products_are_ieee_unless_tf32_is_allowed(what, tf32_flag):
    """What the kernels actually issue: with TF32 off (torch's default) every fp32 x fp32 tl.dot of an fp32 call is
    IEEE, forward and backward; with TF32 on, lora_linear follows it (the multi-adapter kernels may stay IEEE)."""
    g = torch.Generator().manual_seed(9)
    if what == "lora_linear":
        x = torch.randn(6, 40, generator=g, requires_grad=True)
        W, A, B = torch.randn(9, 40, generator=g), torch.randn(3, 40, generator=g), torch.randn(9, 3, generator=g)
        A.requires_grad_(True)
        B.requires_grad_(True)

        def run():
            lk.lora_linear(x, W, A, B, 2.0, backend="triton").sum().backward()
    else:
        pool = AdapterPool(2, 4, 20, 12)
        pool.load("a", torch.randn(4, 20, generator=g), torch.randn(12, 4, generator=g))
        xm, Wm = torch.randn(3, 20, generator=g), torch.randn(12, 20, generator=g)
        batch = LoRABatch.prepare([0, -1, 0])

        def run():
            lk.multi_lora_linear(xm, Wm, None, pool, batch, backend="triton", fused=what == "multi_lora_fused")

    torch.backends.cuda.matmul.allow_tf32 = False
    seen = _dot_precisions(run)
    fp32 = {p for a, b, p in seen if a == b == "fp32"}
    assert fp32, f"no fp32 tl.dot observed: {seen}"
    assert fp32 == {"ieee"}, f"fp32 inputs with TF32 disallowed ran {sorted(fp32)} products"
    if what == "lora_linear":
        torch.backends.cuda.matmul.allow_tf32 = True
        assert {p for a, b, p in _dot_precisions(run) if a == b == "fp32"} == {"tf32"}


# ------------------------------------------------------------------------------------------ bgmv_shrink(scales=)
@pytest.mark.parametrize("tiled", [False, True])
def test_bgmv_shrink_applies_scales(tiled, request):
    """``out[s, m, j] = scales[id, s] · x[m]·A_s[id, j]`` (the option the package's own shrink never passes): per-
    token and tiled kernels, int32 ranks, distinct per-slice scales, a negative one."""
    if HAS_CUDA:
        if lkc.cuda_ops_available():
            pytest.skip(f"CUDA extension: {lkc.cuda_ops_available()}")
        device = "cuda"
    else:
        _emulated_cuda_module(request)
        device = "cpu"
    g = torch.Generator().manual_seed(10)
    L, R, K, S = 3, 8, 20, 2
    ids_l = [0, 2, -1, 1, 2, 0, 2, 2, 0, 1, 0, 2]
    M = len(ids_l)
    ranks_l = [8, 3, 5]
    x = torch.randn(M, K, generator=g)
    A = [torch.randn(L, R, K, generator=g) / math.sqrt(K) for _ in range(S)]
    scales = torch.tensor([[0.5, -2.0], [3.0, 0.25], [-1.5, 4.0]])
    out = torch.full((S, M, R), NAN, device=device)
    tiles = None
    if tiled:
        batch = LoRABatch.prepare(ids_l, device=device, tile_m=16)
        tiles = lkc.TileList(batch.sorted_tokens, batch.sorted_slots, batch.tile_starts, batch.max_tiles(M, L), 16)
    lkc.bgmv_shrink(
        x.to(device),
        [a.to(device) for a in A],
        torch.tensor(ids_l, dtype=torch.int32, device=device),
        out,
        ranks=torch.tensor(ranks_l, dtype=torch.int32, device=device),
        scales=scales.to(device),
        tiles=tiles,
    )
    want = torch.zeros(S, M, R, dtype=torch.float64)
    for m, l in enumerate(ids_l):
        if l < 0:
            continue
        for s in range(S):
            want[s, m, : ranks_l[l]] = float(scales[l, s]) * (x[m].double() @ A[s][l, : ranks_l[l]].double().t())
    torch.testing.assert_close(out.cpu().double(), want, **close_small_k())


# --------------------------------------------------------------------------------- zero-filled atomic buffers
def _nan_empty(monkeypatch):
    """Every torch.empty / empty_like of a float dtype returns NaN-filled memory for the rest of the test: a buffer
    that is accumulated into without being zeroed first poisons the result instead of passing by luck."""
    real_empty, real_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(NAN) if t.is_floating_point() else t

    def empty_like(*args, **kwargs):
        t = real_like(*args, **kwargs)
        return t.fill_(NAN) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


# Shapes (M, K, N, r) whose shrink S = x·Aᵀ is split over K when many programs are asked for (K over several tiles).
SPLIT_SHAPES = [(20, 70, 50, 5), (70, 100, 50, 5)]


@needs_triton
@pytest.mark.parametrize("M,K,N,r", SPLIT_SHAPES)
def test_lora_linear_split_buffers_are_zeroed_before_atomics(M, K, N, r, monkeypatch, device):
    """Forward and backward of lora_linear on the Triton backend with NaN-filled torch.empty equal the reference:
    every buffer is written whole before it is read (the split shrink's partial sums, xa, dxa, dA, dB; no kernel
    relies on a zero-filled buffer)."""
    g = torch.Generator().manual_seed(M + K)
    x0 = torch.randn(M, K, generator=g)
    W, bias = torch.randn(N, K, generator=g) / math.sqrt(K), torch.randn(N, generator=g)
    A0, B0 = torch.randn(r, K, generator=g) / math.sqrt(K), torch.randn(N, r, generator=g)
    dy = torch.randn(M, N, generator=g)

    def run(backend):
        x, A, B = (t.clone().to(device).requires_grad_(True) for t in (x0, A0, B0))
        y = lk.lora_linear(x, W.to(device), A, B, 1.5, bias.to(device), backend=backend)
        y.backward(dy.to(device))
        return [t.detach().cpu() for t in (y, x.grad, A.grad, B.grad)]

    want = run("torch")
    mod = _triton_lora_linear()
    # The Triton base with the separate shrink (not the one-launch decode forward), asked for more programs than
    # these rows give, so the shrink splits K into partial sums.
    monkeypatch.setattr(mod, "BASE_GEMM", "triton")
    monkeypatch.setattr(mod, "_FUSED_SHRINK_MAX_M", 0)
    monkeypatch.setattr(mod, "_target_programs", lambda t: 64)
    splits = []
    real_split = getattr(mod, SPLIT_FN)
    monkeypatch.setattr(mod, SPLIT_FN, lambda *a: splits.append(real_split(*a)) or splits[-1])
    _nan_empty(monkeypatch)
    got = run("triton")
    monkeypatch.undo()
    assert max(splits) > 1, f"this shape split nothing ({splits}): the test would not see a missing zero-fill"
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, want):
        assert torch.isfinite(a).all(), f"{name} has NaN: a buffer was read before it was written whole"
        torch.testing.assert_close(a, b, **close(torch.float32), msg=lambda m: f"{name}: {m}")


@needs_triton
def test_multi_lora_split_k_buffer_is_zeroed_before_atomics(monkeypatch):
    """multi_lora_linear's shrink + expand path allocates its fp32 buffer with torch.empty; the shrink (split over
    K in the interpreter for K over one block) must zero it before adding into it, and lora_shrink must overwrite a
    NaN-filled ``out`` completely."""
    if torch.are_deterministic_algorithms_enabled():
        pytest.skip("deterministic mode splits nothing")
    g = torch.Generator().manual_seed(11)
    K, R, slices = 100, 8, [12, 5]
    pool = AdapterPool(3, R, K, slices, device=DEVICE)
    adapters = {}
    for slot, r in enumerate([8, 3]):
        a = [torch.randn(r, K, generator=g) / math.sqrt(K) for _ in slices]
        b = [torch.randn(n, r, generator=g) for n in slices]
        pool.load(f"ad{slot}", [t.to(DEVICE) for t in a], [t.to(DEVICE) for t in b], alpha=float(r))
        adapters[slot] = (a, b, [1.0, 1.0])
    ids = [0, 1, -1, 1, 0, 0, 1]
    x = torch.randn(len(ids), K, generator=g)
    W = torch.randn(sum(slices), K, generator=g) / math.sqrt(K)
    batch = LoRABatch.prepare(ids, device=DEVICE)
    want = naive_multi_lora(x, W, None, adapters, ids, slices)
    _nan_empty(monkeypatch)
    got = lk.multi_lora_linear(x.to(DEVICE), W.to(DEVICE), None, pool, batch, backend="triton", fused=False)
    out = torch.full((len(ids), 2 * R), NAN, device=DEVICE)
    lk.lora_shrink(x.to(DEVICE), pool.A_stack, batch, out, ranks=pool.ranks, num_slices=2, backend="triton")
    monkeypatch.undo()
    assert torch.isfinite(got).all() and torch.isfinite(out).all()
    torch.testing.assert_close(got.cpu().double(), want, **close(torch.float32))
    torch.testing.assert_close(out.cpu().double(), _naive_shrink(x, adapters, ids, 2, R), **close_small_k())


# --------------------------------------------------------------------------------- GPU: offsets past 2^31 elements
# Column-major tensors make a column index times the column stride (= M) the large term: with int32 arithmetic
# it wraps past 2^31 elements. Sized for one large GPU: the biggest test holds about 10 GiB at once.
BIG = 2**31


@pytest.mark.gpu
def test_gpu_multi_lora_column_major_y_past_2_31_elements():
    """lora_expand into a column-major y [M, N] with M·N > 2^31 (fp16: 4 GiB): columns at the far end land where an
    int32 column offset would wrap."""
    torch.manual_seed(0)
    M, N, R, L = 65536, BIG // 65536 + 3, 16, 2
    K = 16
    ids = torch.randint(-1, L, (M,), dtype=torch.int32)
    batch = LoRABatch.prepare(ids, device="cuda")
    pool = AdapterPool(L, R, K, N, dtype=torch.float16, device="cuda")
    for l in range(L):
        pool.load(f"a{l}", torch.randn(R, K, device="cuda").half() / 4, torch.randn(N, R, device="cuda").half() / 4)
    x = torch.randn(M, K, device="cuda").half()
    y = torch.zeros(N, M, device="cuda", dtype=torch.float16).t()  # column-major [M, N]
    assert y.stride() == (1, M) and M * N > BIG
    s = torch.zeros(M, R, device="cuda")
    lk.lora_shrink(x, pool.A_stack, batch, s, ranks=pool.ranks, backend="triton")
    lk.lora_expand(s, pool.B_stack, batch, y, pool.scales, ranks=pool.ranks, backend="triton")
    cols = torch.tensor([0, 1, N // 2, BIG // M - 1, BIG // M, BIG // M + 1, N - 1], device="cuda")
    idx = ids.to("cuda").long().clamp(min=0)
    has = (ids >= 0).to("cuda")
    Bsel = pool.B_stack[:, cols][idx].float()  # [M, len(cols), R]: only the sampled columns
    want = torch.einsum("mr,mcr->mc", s, Bsel) * (pool.scales[idx, 0] * has)[:, None]
    # An offset test: a wrapped column offset gives O(1) errors; the bound only has to clear fp16 rounding of y.
    torch.testing.assert_close(y[:, cols].float(), want, rtol=2e-2, atol=2e-2)


def _sample_shrink(x, A, ids, rows):
    """float32 x[rows]·A[slot]ᵀ at full rank for the sampled rows (0 for tokens without adapter)."""
    sel = ids[rows].long()
    want = torch.einsum("mk,mrk->mr", x[rows].float(), A[sel.clamp(min=0)].float())
    return want * (sel >= 0)[:, None]


@pytest.mark.gpu
def test_gpu_multi_lora_column_major_out_past_2_31_elements():
    """lora_shrink into a column-major out [M, R] with (R-1)·M >= 2^31 (fp32: 8.7 GiB): the output column offset
    j·M of the last columns must be 64-bit. Pre-filled with NaN: every element is written."""
    torch.manual_seed(1)
    R, K, L = 64, 16, 2
    M = BIG // (R - 1) + 5
    ids = torch.randint(-1, L, (M,), dtype=torch.int32, device="cuda")
    batch = LoRABatch.prepare(ids, device="cuda")
    A = torch.randn(L, R, K, device="cuda").half() / 4
    x = torch.randn(M, K, device="cuda").half()
    out = torch.full((R, M), NAN, device="cuda").t()
    assert out.stride() == (1, M) and (R - 1) * M >= BIG
    ranks = torch.full((L,), R, dtype=torch.int32, device="cuda")
    lk.lora_shrink(x, A, batch, out, ranks=ranks, backend="triton")
    assert torch.isfinite(out).all()
    rows = torch.tensor([0, 1, M // 2, M - 2, M - 1], device="cuda")
    # An offset test: a wrapped column offset gives O(1) errors (or NaN); the bound is loose on purpose.
    torch.testing.assert_close(out[rows], _sample_shrink(x, A, ids, rows), rtol=2e-2, atol=2e-2)


_COLUMN_MAJOR_X = r"""
import json, sys, torch
import lora_kernels as lk
from lora_kernels.pool import LoRABatch
torch.manual_seed(2)
R, K, L = 16, 64, 2
M = 2**31 // (K - 1) + 5
ids = torch.randint(-1, L, (M,), dtype=torch.int32, device="cuda")
A = torch.randn(L, R, K, device="cuda").half() / 8
x = torch.randn(K, M, device="cuda").half().t()
assert x.stride() == (1, M) and (K - 1) * M >= 2**31
out = torch.full((M, R), float("nan"), device="cuda")
lk.lora_shrink(x, A, LoRABatch.prepare(ids, device="cuda"), out, ranks=torch.full((L,), R, dtype=torch.int32,
               device="cuda"), backend="triton")
torch.cuda.synchronize()
rows = torch.tensor([0, 1, M // 2, M - 2, M - 1], device="cuda")
sel = ids[rows].long()
want = torch.einsum("mk,mrk->mr", x[rows].float(), A[sel.clamp(min=0)].float()) * (sel >= 0)[:, None]
print(json.dumps({"finite": bool(torch.isfinite(out).all()), "err": float((out[rows] - want).abs().max())}))
"""


@pytest.mark.gpu
def test_gpu_multi_lora_column_major_x_past_2_31_elements():
    """lora_shrink from a column-major x [M, K] with (K-1)·M >= 2^31 (fp16: 4.4 GiB): the k·M offset of the last
    columns must be 64-bit. In a subprocess: a wrapped offset may be an illegal address, which would leave this
    process's CUDA context unusable for the tests after it."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _COLUMN_MAJOR_X], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["finite"] and got["err"] < 2e-2, got
