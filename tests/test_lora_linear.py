"""Tests of the fused LoRA linear op (``lora_kernels.lora_linear``): the PyTorch reference against an independent
float64 oracle; the Triton kernels (CPU interpreter here, CUDA on a GPU machine) against the reference through the
public op and autograd; input checks; torch.library / torch.compile integration; backend selection."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from _aot import run_child
from _replay import warm_up
from _tolerances import FP32_SMALL_K, TOL, assert_close_scaled, assert_close_to_oracle

import lora_kernels
from lora_kernels import _backend
from lora_kernels.ops import lora_linear as op_mod
from lora_kernels.reference import dropout_keep_mask
from lora_kernels.reference import lora_linear as ref

from conftest import HAS_CUDA, INTERPRET

AUTOTUNE_ENV_VAR = "LORA_KERNELS_AUTOTUNE"  # lora_kernels.triton.lora_linear.AUTOTUNE_ENV_VAR (checked below)


@pytest.fixture(scope="module", autouse=True)
def _one_tile_config_per_kernel():
    """Tests check values, not speed: no autotune benchmarking (on a GPU it would compile every tile configuration
    for every constexpr combination the cases hit). The GPU training-shape test turns it back on."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(AUTOTUNE_ENV_VAR, "0")
        yield


needs_triton = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRET), reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (set by conftest without CUDA)"
)


def make_inputs(lead, K, N, r, dtype, lora_dtype, bias, device, noncontig=False, weight_t=False, gen=None):
    """Fresh random data with magnitudes that keep y and every gradient O(1)."""
    g = gen
    M = math.prod(lead)
    if noncontig:
        # Every other column of a wider buffer: last-dim stride 2, and a row stride that is not K.
        x = torch.randn(*lead, 2 * K, generator=g)
    elif len(lead) == 1 and M > 1:
        x = torch.randn(K, M, generator=g).t()  # column-major [M, K]: strides (1, M)
    else:
        x = torch.randn(*lead, K, generator=g)
    if weight_t:
        w = (torch.randn(K, N, generator=g) / math.sqrt(K)).t()  # [N, K] with strides (1, N)
    else:
        w = torch.randn(N, K, generator=g) / math.sqrt(K)
    a = torch.randn(r, K, generator=g) / math.sqrt(K)
    b = torch.randn(N, r, generator=g) / math.sqrt(r)
    bb = torch.randn(N, generator=g) if bias else None
    # .to() keeps the strides of a dense non-contiguous view (the transposes), so those layouts reach the op.
    cast = lambda t, dt: None if t is None else t.to(device=device, dtype=dt)  # noqa: E731
    x = cast(x, dtype)
    if noncontig:
        x = x[..., ::2]  # sliced after the cast: .to() would make a non-dense view contiguous
    return x, cast(w, dtype), cast(a, lora_dtype), cast(b, lora_dtype), cast(bb, dtype)


def oracle(x, w, a, b, scale, bias, p, seed):
    """Naive float64 formula of the layer (dropout mask from the reference Philox), differentiable by autograd."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if p > 0:
        keep = dropout_keep_mask(seed, x2.shape[0], K, p, device=x.device).to(torch.float64)
        xd = x2 * keep / (1.0 - p)
    else:
        xd = x2
    y = x2 @ w.t() + scale * ((xd @ a.t()) @ b.t())
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w.shape[0])


def leaf64(t, grad=True):
    return None if t is None else t.detach().to(torch.float64).requires_grad_(grad)


# ---------------------------------------------------------------------------------------- reference vs the oracle
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_reference_matches_float64_oracle(dtype, p, bias):
    g = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{p}{bias}".encode()))
    M, K, N, r, scale, seed = 33, 37, 29, 8, 1.7, 987654321987
    x, w, a, b, bb = make_inputs((M,), K, N, r, dtype, dtype, bias, "cpu", gen=g)
    y, xa = ref.lora_linear_forward(x, w, a, b, scale, bb, p, seed)
    dy = torch.randn(M, N, generator=g).to(dtype)
    dx, da, db, dw, dbias = ref.lora_linear_backward(dy, x, w, a, b, xa, scale, p, seed, True, True, bias)

    x64, w64, a64, b64, bb64 = (leaf64(t) for t in (x, w, a, b, bb))
    y64 = oracle(x64, w64, a64, b64, scale, bb64, p, seed)
    y64.backward(dy.to(torch.float64))
    tol = TOL[dtype]
    assert y.dtype == dtype and xa.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_scaled(y, y64, tol, "y")
    assert_close_scaled(dx, x64.grad, tol, "dx")
    assert_close_scaled(da, a64.grad, tol, "dA")
    assert_close_scaled(db, b64.grad, tol, "dB")
    assert_close_scaled(dw, w64.grad, tol, "dW")
    if bias:
        assert_close_scaled(dbias, bb64.grad, tol, "dbias")
    else:
        assert dbias is None


def test_public_torch_backend_matches_oracle():
    """The public op (custom op + autograd + leading dims) on the torch backend, no dropout: exact formula."""
    g = torch.Generator().manual_seed(11)
    x, w, a, b, bb = make_inputs((3, 5), 24, 19, 4, torch.float32, torch.float32, True, "cpu", gen=g)
    leaves = [t.requires_grad_() for t in (x, w, a, b, bb)]
    y = lora_kernels.lora_linear(x, w, a, b, 0.5, bias=bb, backend="torch")
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    l64 = [leaf64(t) for t in leaves]
    y64 = oracle(*l64[:4], 0.5, l64[4], 0.0, 0)
    y64.backward(dy.double())
    assert y.shape == (3, 5, 19)
    # fp32 throughout, K = 24, nothing rounded to 16 bits: the small-K fp32 bound applies.
    assert_close_scaled(y, y64, FP32_SMALL_K, "y")
    for t, t64, name in zip(leaves, l64, ["x", "weight", "lora_A", "lora_B", "bias"]):
        assert_close_scaled(t.grad, t64.grad, FP32_SMALL_K, f"d{name}")


def test_dropout_mask_is_seeded_and_has_the_right_rate():
    """Same torch.manual_seed, same output; another seed, another mask; the kept fraction is 1 - p."""
    g = torch.Generator().manual_seed(5)
    x, w, a, b, _ = make_inputs((64,), 48, 16, 8, torch.float32, torch.float32, False, "cpu", gen=g)
    outs = []
    for s in (1, 1, 2):
        torch.manual_seed(s)
        outs.append(lora_kernels.lora_linear(x, w, a, b, 1.0, dropout_p=0.5, backend="torch"))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert (outs[0] - outs[2]).abs().max() > 1e-3
    no_drop = lora_kernels.lora_linear(x, w, a, b, 1.0, dropout_p=0.5, training=False, backend="torch")
    assert (outs[0] - no_drop).abs().max() > 1e-3
    keep = dropout_keep_mask(12345, 256, 256, 0.25)
    assert abs(keep.double().mean().item() - 0.75) < 0.01


# ------------------------------------------------------------------------------------- Triton vs the reference
# (lead dims, K, N, r, dtype, lora dtype, bias, dropout p, weight trainable, x layout, weight transposed)
# A covering set, not the product: every M in {1, 7, 33, 100}, every r in {1, 8, 16, 64} plus r > 128 (several
# r-tiles), K and N off the 32-wide interpreter tiles, once on them (EVEN_K / EVEN_N) and once below 16, each dtype,
# mixed fp32 adapters, dropout on and off, bias on and off, frozen and trainable W0, leading dims, strided x and W0.
CASES = [
    ((1,), 33, 40, 1, torch.float32, torch.float32, True, 0.0, False, "contig", False),
    ((7,), 50, 70, 8, torch.float16, torch.float16, False, 0.1, True, "strided", False),
    ((3, 11), 40, 33, 16, torch.float32, torch.float32, True, 0.25, True, "strided", True),
    ((100,), 70, 37, 64, torch.float16, torch.float32, True, 0.0, False, "colmajor", False),
    ((4, 25), 37, 65, 16, torch.bfloat16, torch.bfloat16, True, 0.1, True, "contig", False),
    ((33,), 64, 64, 8, torch.bfloat16, torch.float32, False, 0.0, False, "colmajor", True),
    ((2, 3, 1), 24, 20, 136, torch.float32, torch.float32, False, 0.5, True, "contig", False),
    ((100,), 96, 31, 16, torch.float32, torch.float32, True, 0.2, False, "colmajor", False),
    ((7,), 5, 3, 2, torch.float16, torch.float16, True, 0.3, True, "strided", True),  # every dim under one MMA tile
]


def _case_id(c):
    lead, K, N, r, dt, ldt, bias, p, train_w, layout, wt = c
    return (
        f"M{math.prod(lead)}{'=' + 'x'.join(map(str, lead)) if len(lead) > 1 else ''}-K{K}-N{N}-r{r}-"
        f"{str(dt)[6:]}{'-A' + str(ldt)[6:] if ldt != dt else ''}-{'bias' if bias else 'nobias'}-p{p}-"
        f"{'trainW' if train_w else 'frozenW'}-{layout}{'-Wt' if wt else ''}"
    )


def _run_public(backend, x, w, a, b, bb, scale, p, train_w, dy, seed):
    # detach(), not clone(): a clone of a non-dense view would be contiguous, and the layouts are part of the test.
    leaves = [x.detach().requires_grad_(), w.detach().requires_grad_(train_w)]
    leaves += [a.detach().requires_grad_(), b.detach().requires_grad_()]
    leaves.append(None if bb is None else bb.detach().requires_grad_())
    torch.manual_seed(seed)  # same seed, same dropout mask in both backends
    y = lora_kernels.lora_linear(*leaves[:4], scale, bias=leaves[4], dropout_p=p, backend=backend)
    y.backward(dy)
    return y.detach(), [None if t is None else t.grad for t in leaves]


def _check_triton_against_reference(case, device, seed):
    lead, K, N, r, dtype, lora_dtype, bias, p, train_w, layout, weight_t = case
    if dtype == torch.bfloat16 and device == "cpu" and not INTERPRET:
        pytest.skip("bf16 Triton on the CPU needs the interpreter's upcast path")
    g = torch.Generator().manual_seed(seed)
    x, w, a, b, bb = make_inputs(
        lead,
        K,
        N,
        r,
        dtype,
        lora_dtype,
        bias,
        device,
        noncontig=layout == "strided",
        weight_t=weight_t,
        gen=g,
    )
    assert x.is_contiguous() == (layout == "contig") and w.is_contiguous() != weight_t
    dy = torch.randn(*lead, N, generator=g).to(device, dtype)
    scale = 0.75
    y_t, g_t = _run_public("triton", x, w, a, b, bb, scale, p, train_w, dy, seed)
    y_r, g_r = _run_public("torch", x, w, a, b, bb, scale, p, train_w, dy, seed)
    tol = TOL[dtype]
    assert y_t.dtype == dtype and y_t.shape == (*lead, N)
    assert_close_scaled(y_t, y_r, tol, "y")
    names = ["dx", "dW", "dA", "dB", "dbias"]
    for name, gt, gr in zip(names, g_t, g_r):
        if name == "dW" and not train_w:
            assert gt is None and gr is None, "dW formed for a frozen weight"
            continue
        if name == "dbias" and not bias:
            continue
        assert gt.dtype == gr.dtype, f"{name}: dtype {gt.dtype} vs reference {gr.dtype}"
        # dA/dB sum over M (and dB over N): compare at the LoRA dtype's tolerance, not tighter than x's.
        assert_close_scaled(gt, gr, max(tol, TOL[lora_dtype]) if name in ("dA", "dB") else tol, name)
    if p > 0:
        # The mask really applied (same seed, both paths): the output differs from the eval-mode one.
        y_eval = lora_kernels.lora_linear(x, w, a, b, scale, bias=bb, dropout_p=p, training=False, backend="triton")
        assert (y_eval.float() - y_t.float()).abs().max() > 10 * tol


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_triton_matches_reference(case, device):
    _check_triton_against_reference(case, device, seed=1000 + CASES.index(case))


@needs_triton
@pytest.mark.parametrize(
    "case", [CASES[2], CASES[3], CASES[4]], ids=[_case_id(c) for c in (CASES[2], CASES[3], CASES[4])]
)
def test_triton_cublas_base_path_matches_reference(case, device, monkeypatch):
    """BASE_GEMM = "cublas": torch computes the base product, the kernels add the LoRA term in place."""
    from lora_kernels.triton import lora_linear as tri

    monkeypatch.setattr(tri, "BASE_GEMM", "cublas")
    _check_triton_against_reference(case, device, seed=2000 + CASES.index(case))


@needs_triton
def test_triton_functions_match_reference_directly(device):
    """The backend functions themselves (no autograd), incl. S and dbias, with an explicit large seed."""
    from lora_kernels.triton import lora_linear as tri

    g = torch.Generator().manual_seed(3)
    x, w, a, b, bb = make_inputs((45,), 41, 35, 8, torch.float32, torch.float32, True, device, gen=g)
    # Strided adapters and bias: every pointer argument honours its strides.
    a = a.t().contiguous().t()
    b = torch.stack([b, b], dim=-1)[..., 0]
    bb = torch.stack([bb, bb], dim=-1)[:, 1]
    assert not (a.is_contiguous() or b.is_contiguous() or bb.is_contiguous())
    seed, p = 2**62 - 12345, 0.3
    y_t, s_t = tri.lora_linear_forward(x, w, a, b, 1.3, bb, p, seed)
    y_r, s_r = ref.lora_linear_forward(x, w, a, b, 1.3, bb, p, seed)
    assert_close_scaled(y_t, y_r, TOL[torch.float32], "y")
    assert_close_scaled(s_t, s_r, TOL[torch.float32], "S")
    dy = torch.randn(45, 35, generator=g).to(device)
    out_t = tri.lora_linear_backward(dy, x, w, a, b, s_t, 1.3, p, seed, True, False, True)
    out_r = ref.lora_linear_backward(dy, x, w, a, b, s_r, 1.3, p, seed, True, False, True)
    for name, gt, gr in zip(["dx", "dA", "dB", "dW", "dbias"], out_t, out_r):
        if name == "dW":
            assert gt is None
            continue
        assert_close_scaled(gt, gr, TOL[torch.float32], name)
    # needs_dx=False: no dX kernel, dA/dB unchanged.
    dx_none = tri.lora_linear_backward(dy, x, w, a, b, s_t, 1.3, p, seed, False, False, False)
    assert dx_none[0] is None and dx_none[4] is None
    assert_close_scaled(dx_none[1], out_r[1], TOL[torch.float32], "dA (no dx)")


@needs_triton
def test_triton_deterministic_mode_is_bitwise_reproducible(device):
    """Under torch.use_deterministic_algorithms no fp32 atomics are used: two runs agree bit for bit. (The interpreter
    runs programs one after another, so on the CPU this checks the values of the atomic-free path; the bitwise
    check bites on a GPU.)"""
    case = ((100,), 70, 75, 16, torch.float32, torch.float32, True, 0.2, True, "strided", False)
    lead, K, N, r, dtype, lora_dtype, bias, p, train_w, layout, weight_t = case
    g = torch.Generator().manual_seed(31)
    x, w, a, b, bb = make_inputs(lead, K, N, r, dtype, lora_dtype, bias, device, noncontig=True, gen=g)
    dy = torch.randn(*lead, N, generator=g).to(device, dtype)
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: cuBLAS wants CUBLAS_WORKSPACE_CONFIG
    try:
        runs = [_run_public("triton", x, w, a, b, bb, 0.6, p, train_w, dy, seed=9) for _ in range(2)]
        y_r, g_r = _run_public("torch", x, w, a, b, bb, 0.6, p, train_w, dy, seed=9)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
    (y1, g1), (y2, g2) = runs
    assert torch.equal(y1, y2)
    for name, t1, t2, tr in zip(["dx", "dW", "dA", "dB", "dbias"], g1, g2, g_r):
        assert torch.equal(t1, t2), f"{name} differs between two deterministic runs"
        assert t1.is_contiguous(), f"{name} is not contiguous"
        assert_close_scaled(t1, tr, TOL[dtype], name)
    assert_close_scaled(y1, y_r, TOL[dtype], "y")


@needs_triton
def test_gemm_config_pruning(monkeypatch):
    """The CUDA tile list after pruning: fits shared memory, short tiles for decode, the fp32 list for fp32, and one
    config with $LORA_KERNELS_AUTOTUNE=0. (Pure Python: runs on the CPU too.)"""
    import triton

    from lora_kernels.triton import lora_linear as tri

    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bc, "BLOCK_K": br, "GROUP_M": g}, num_warps=w, num_stages=st)
        for bm, bc, br, g, w, st in tri._CUDA_TILES
    ]
    prune = tri._gemm_pruner("x_ptr", "BLOCK_N", "BLOCK_K")
    monkeypatch.setenv(tri.AUTOTUNE_ENV_VAR, "1")

    def args(dtype, m_bucket):
        return {"x_ptr": torch.empty(1, dtype=dtype), "M_BUCKET": m_bucket}

    def smem(c, elem):
        return (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * elem * c.num_stages

    big = prune(configs, args(torch.bfloat16, 8192))
    assert len(big) == len(configs) and all(smem(c, 2) <= tri._SMEM_BUDGET for c in big)
    decode = prune(configs, args(torch.bfloat16, 1))
    assert decode and all(c.kwargs["BLOCK_M"] == 16 for c in decode)
    fp32 = prune(configs, args(torch.float32, 8192))
    assert len(fp32) == len(tri._CUDA_TILES_FP32)
    assert all(smem(c, 4) <= tri._SMEM_BUDGET and c.num_stages >= 2 and c.kwargs["BLOCK_K"] <= 64 for c in fp32)
    assert tri.AUTOTUNE_ENV_VAR == AUTOTUNE_ENV_VAR
    monkeypatch.setenv(tri.AUTOTUNE_ENV_VAR, "0")
    assert len(prune(configs, args(torch.bfloat16, 8192))) == 1
    # A GPU with less shared memory than an H100 (A100: 163 KiB, sm_89: 99 KiB): the budget shrinks with it, so the
    # config used without benchmarking still launches. (A stand-in tensor: only .device and .element_size() are read.)
    monkeypatch.setenv(tri.AUTOTUNE_ENV_VAR, "1")

    class OnGpu:
        device = torch.device("cuda", 0)

        def __init__(self, elem):
            self.elem = elem

        def element_size(self):
            return self.elem

    # Autotuning off: the autotuner's timing function launches nothing (triton benchmarks even a single pruned config).
    monkeypatch.setenv(tri.AUTOTUNE_ENV_VAR, "0")

    def must_not_run():
        raise AssertionError("benchmarked with autotuning off")

    assert tri._autotune_bench(must_not_run, (0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    monkeypatch.setenv(tri.AUTOTUNE_ENV_VAR, "1")
    for limit in (163 * 1024, 99 * 1024):
        monkeypatch.setattr(tri._utils, "max_smem", lambda index, limit=limit: limit)
        for elem in (2, 4):
            kept = prune(configs, {"x_ptr": OnGpu(elem), "M_BUCKET": 8192})
            assert kept and all(smem(c, elem) <= limit - (227 * 1024 - tri._SMEM_BUDGET) for c in kept), limit
        # The skinny kernels' r-tile: 128 fits 160 KiB (H100, A100), 64 below (sm_86/sm_89).
        assert tri._skinny_max_r(torch.device("cuda", 0)) == (64 if limit < 160 * 1024 else 128)
    assert tri._skinny_max_r(torch.device("cpu")) == tri._SKINNY_MAX_R


@needs_triton
def test_triton_empty_batch(device):
    """M = 0 (e.g. an empty micro-batch): empty output, zero LoRA gradients."""
    x = torch.randn(0, 5, 16, device=device, requires_grad=True)
    w = torch.randn(12, 16, device=device, requires_grad=True)
    a = torch.randn(4, 16, device=device, requires_grad=True)
    b = torch.randn(12, 4, device=device, requires_grad=True)
    bias = torch.randn(12, device=device, requires_grad=True)
    y = lora_kernels.lora_linear(x, w, a, b, 2.0, bias=bias, dropout_p=0.1, backend="triton")
    assert y.shape == (0, 5, 12)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for t in (w, a, b, bias):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("base_gemm", ["triton", "cublas"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_triton_gpu_training_shape(base_gemm, p, monkeypatch):
    """A mid-sized bf16 shape on the GPU (real tiles, autotuning, atomics across many programs)."""
    from lora_kernels.triton import lora_linear as tri

    monkeypatch.setattr(tri, "BASE_GEMM", base_gemm)
    monkeypatch.setenv(tri.AUTOTUNE_ENV_VAR, "1")
    case = ((4, 512), 1024, 1536, 16, torch.bfloat16, torch.float32, True, p, False, "contig", False)
    _check_triton_against_reference(case, "cuda", seed=77)


@needs_triton
def test_triton_reads_the_seed_through_its_pointer(device):
    """The kernels load the seed from a 0-dim int64 tensor (what the op passes): same result as the int seed and the
    reference mask; the value is read at launch (change the tensor, get the other seed's mask); and the dropout
    forward + backward through the public op draws exactly one seed, on x's device, that backward reuses."""
    from lora_kernels.triton import lora_linear as tri

    g = torch.Generator().manual_seed(17)
    x, w, a, b, bb = make_inputs((33,), 37, 29, 8, torch.float32, torch.float32, True, device, gen=g)
    dy = torch.randn(33, 29, generator=g).to(device)
    p = 0.4
    for seed in (5, 2**62 - 1):
        seed_t = torch.tensor(seed, dtype=torch.int64, device=device)
        y_t, s_t = tri.lora_linear_forward(x, w, a, b, 0.9, bb, p, seed_t)
        y_i, s_i = tri.lora_linear_forward(x, w, a, b, 0.9, bb, p, seed)
        y_r, s_r = ref.lora_linear_forward(x, w, a, b, 0.9, bb, p, seed)
        assert torch.equal(y_t, y_i) and torch.equal(s_t, s_i)
        assert_close_scaled(y_t, y_r, TOL[torch.float32], f"y (seed {seed})")
        assert_close_scaled(s_t, s_r, TOL[torch.float32], f"S (seed {seed})")
        out_t = tri.lora_linear_backward(dy, x, w, a, b, s_t, 0.9, p, seed_t, True, False, False)
        out_r = ref.lora_linear_backward(dy, x, w, a, b, s_r, 0.9, p, seed, True, False, False)
        for name, gt, gr in zip(["dx", "dA", "dB"], out_t, out_r):
            assert_close_scaled(gt, gr, TOL[torch.float32], f"{name} (seed {seed})")
    # Same tensor object, new value: the launch reads what the tensor holds now.
    seed_t = torch.tensor(5, dtype=torch.int64, device=device)
    s_5 = tri.lora_linear_forward(x, w, a, b, 0.9, bb, p, seed_t)[1]
    seed_t.fill_(6)
    s_6 = tri.lora_linear_forward(x, w, a, b, 0.9, bb, p, seed_t)[1]
    assert_close_scaled(s_6, ref.lora_linear_forward(x, w, a, b, 0.9, bb, p, 6)[1], TOL[torch.float32], "S (seed 6)")
    assert (s_5 - s_6).abs().max() > 1e-2

    # Through the op: one draw, on x's device, nonnegative and < 2^62; backward gets that same tensor.
    drawn, seen = [], []
    real_draw, real_bwd = op_mod._draw_seed, tri.lora_linear_backward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(op_mod, "_draw_seed", lambda *args: drawn.append(real_draw(*args)) or drawn[-1])
        mp.setattr(tri, "lora_linear_backward", lambda *args: seen.append(args[8]) or real_bwd(*args))
        xl = x.detach().requires_grad_()
        lora_kernels.lora_linear(xl, w, a, b, 0.9, bias=bb, dropout_p=p, backend="triton").backward(dy)
    assert len(drawn) == 1 and len(seen) == 1 and seen[0] is drawn[0]
    assert drawn[0].device == x.device and drawn[0].dtype == torch.int64 and drawn[0].dim() == 0
    assert 0 <= int(drawn[0]) < 2**62


def test_no_dropout_draws_no_seed():
    """p = 0 (or eval mode) leaves torch's generator untouched; p > 0 advances it."""
    x, w, a, b = _good("cpu")
    state = torch.get_rng_state()
    lora_kernels.lora_linear(x, w, a, b, 1.0, dropout_p=0.0, backend="torch")
    lora_kernels.lora_linear(x, w, a, b, 1.0, dropout_p=0.5, training=False, backend="torch")
    assert torch.equal(torch.get_rng_state(), state)
    lora_kernels.lora_linear(x, w, a, b, 1.0, dropout_p=0.5, backend="torch")
    assert not torch.equal(torch.get_rng_state(), state)


@pytest.mark.gpu
def test_triton_dropout_under_cuda_graph_replays_fresh_masks(monkeypatch):
    """A forward + backward with dropout captured in torch.cuda.graph: each replay draws a new seed on the device
    (fresh mask), and each replay's y and gradients equal the reference for the seed that replay drew. Capture itself
    fails on any host sync; an eager step also runs under set_sync_debug_mode("error")."""

    g = torch.Generator().manual_seed(23)
    x, w, a, b, bb = make_inputs((2, 50), 96, 80, 16, torch.float16, torch.float32, True, "cuda", gen=g)
    x = x.contiguous()
    dy = torch.randn(2, 50, 80, generator=g).to("cuda", torch.float16)
    leaves = [x.detach().requires_grad_(), a.detach().requires_grad_(), b.detach().requires_grad_()]
    p, scale = 0.3, 1.1

    def step():
        y = lora_kernels.lora_linear(leaves[0], w, leaves[1], leaves[2], scale, bias=bb, dropout_p=p, backend="triton")
        y.backward(dy)
        return y

    warm_up(step)  # on a side stream: compiles the kernels (autotune is off in this file)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()  # an eager step with no host sync
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for t in leaves:
        t.grad = None

    drawn = []
    real_draw = op_mod._draw_seed
    monkeypatch.setattr(op_mod, "_draw_seed", lambda *args: drawn.append(real_draw(*args)) or drawn[-1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()
    assert len(drawn) == 1
    seed_static = drawn[0]

    results = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        results.append((int(seed_static.item()), y_static.clone(), [t.grad.clone() for t in leaves]))
    (seed1, y1, g1), (seed2, y2, g2) = results
    assert seed1 != seed2, "the replays reused the captured seed"
    assert 0 <= seed1 < 2**62 and 0 <= seed2 < 2**62
    assert (y1.float() - y2.float()).abs().max() > 1e-2, "the replays drew the same mask"
    x2d, dy2d = x.reshape(-1, 96), dy.reshape(-1, 80)
    f64, f16 = {"acc_dtype": torch.float64, "out_dtype": torch.float64}, {"acc_dtype": torch.float16}
    for seed, y, grads in results:
        y64, xa64 = ref.lora_linear_forward(x2d, w, a, b, scale, bb, p, seed, **f64)
        y16, xa16 = ref.lora_linear_forward(x2d, w, a, b, scale, bb, p, seed, **f16)
        want64 = ref.lora_linear_backward(dy2d, x2d, w, a, b, xa64, scale, p, seed, True, False, False, **f64)
        want16 = ref.lora_linear_backward(dy2d, x2d, w, a, b, xa16, scale, p, seed, True, False, False, **f16)
        assert_close_to_oracle(y.reshape(-1, 80), y16, y64, what=f"y (seed {seed})")
        for name, got, g16, g64 in zip(["dx", "dA", "dB"], grads, want16, want64):
            if got.dtype == torch.float32:  # the fp32 adapter's gradients: the fp32 bound, not the 2x fp16 rule
                assert_close_scaled(got.reshape(g64.shape), g64, TOL[torch.float32], f"{name} (seed {seed})")
            else:
                assert_close_to_oracle(got.reshape(g64.shape), g16, g64, what=f"{name} (seed {seed})")


# Compiles each kernel for sm_90 with triton's bundled ptxas, in a child process without TRITON_INTERPRET (the kernels
# in this process are interpreter objects). Catches what the interpreter cannot: lowering errors in GPU-only code
# and shared-memory overflow of the tile configurations.
_AOT_SCRIPT = r"""
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lora_kernels.triton import lora_linear as L
from _aot import jit_function

UNIT = {"stride_xk", "stride_wk", "stride_xar", "stride_br", "stride_yn", "stride_dyn", "stride_ak"}
PTR = {"x_ptr": "bf16", "w_ptr": "bf16", "bias_ptr": "bf16", "y_ptr": "bf16", "dy_ptr": "bf16", "dx_ptr": "bf16",
       "xa_ptr": "fp32", "dxa_ptr": "fp32", "db_ptr": "fp32", "da_ptr": "fp32", "a_ptr": "fp32", "b_ptr": "fp32",
       "seed_ptr": "i64", "bits_ptr": "i32", "xa_out_ptr": "fp32", "ds_ptr": "fp32", "ds_out_ptr": "fp32",
       "db_parts_ptr": "fp32"}


def compile_for_sm90(kernel, consts, num_warps, num_stages, dtype):
    fn = jit_function(kernel)
    consts = dict(consts, **{n: 1 for n in fn.arg_names if n in UNIT})  # contiguous operands, as the JIT specialises
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = "*" + (dtype if PTR[n] == "bf16" else PTR[n])
        else:
            sig[n] = {"scale": "fp32", "inv_keep": "fp32"}.get(n, "i32")
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
             if t.startswith("*") or n.startswith("stride") or n in ("M", "N", "K")}
    compiled = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.metadata.shared


big = {"x_ptr": torch.empty(1, dtype=torch.bfloat16), "dy_ptr": torch.empty(1, dtype=torch.bfloat16), "M_BUCKET": 8192}
fwd = L._gemm_pruner("x_ptr", "BLOCK_N", "BLOCK_K")(L._gemm_configs("BLOCK_N", "BLOCK_K"), big)[0]
dx = L._gemm_pruner("dy_ptr", "BLOCK_K", "BLOCK_N")(L._gemm_configs("BLOCK_K", "BLOCK_N"), big)[0]
fwd32 = L._gemm_pruner("x_ptr", "BLOCK_N", "BLOCK_K")(L._gemm_configs("BLOCK_N", "BLOCK_K"),
                                                      dict(big, x_ptr=torch.empty(1)))[0]
lora = dict(UPCAST=False, PREC="tf32", LORA_PREC="tf32", BLOCK_R=32)
jobs = [
    ("fwd", L._fwd_kernel, dict(fwd.kwargs, HAS_BIAS=True, BASE=True, EVEN_K=False, FUSE_SHRINK=False,
                                XA_PARTIAL=True, SHRINK_F32=True, **lora), fwd),
    ("fwd fused shrink", L._fwd_kernel, dict(fwd.kwargs, HAS_BIAS=True, BASE=True, EVEN_K=False, FUSE_SHRINK=True,
                                             XA_PARTIAL=False, SHRINK_F32=True, **dict(lora, BLOCK_R=64)), fwd),
    ("fwd fp32 ieee", L._fwd_kernel, dict(fwd32.kwargs, HAS_BIAS=False, BASE=True, EVEN_K=True, UPCAST=False,
                                          FUSE_SHRINK=False, XA_PARTIAL=False, SHRINK_F32=False,
                                          PREC="ieee", LORA_PREC="ieee", BLOCK_R=16), fwd32),
    ("dx", L._dx_kernel, dict(dx.kwargs, HAS_DROPOUT=True, BITS=False, BASE=True, EVEN_N=False, **lora), dx),
    ("dx bits", L._dx_kernel, dict(dx.kwargs, HAS_DROPOUT=True, BITS=True, BASE=True, EVEN_N=False, **lora), dx),
    ("shrink", L._dropout_shrink_kernel, dict(HAS_DROPOUT=True, STORE_BITS=True, SPLIT_K=2, F32=True, PREC="tf32",
                                              BLOCK_M=64, BLOCK_K=64, BLOCK_R=16), None),
    ("shrink expand", L._shrink_expand_kernel, dict(HAS_DROPOUT=True, STORE_BITS=True, F32=True, PREC="tf32",
                                                    LORA_PREC="tf32", BLOCK_M=32, BLOCK_K=64, BLOCK_N=64,
                                                    BLOCK_R=128), None),
    ("dxa", L._dxa_kernel, dict(F32=True, PREC="tf32", BLOCK_M=64, BLOCK_N=64, BLOCK_R=128), None),
    ("dy pass", L._dy_pass_kernel, dict(F32=True, PREC="tf32", BLOCK_M=256, BLOCK_N=64, BLOCK_R=64), None),
    ("grad_ab", L._grad_ab_kernel, dict(HAS_DROPOUT=True, BITS=True, PREC="tf32", BLOCK_M=64, BLOCK_C=64,
                                        BLOCK_R=128), None),
]
for name, kernel, consts, cfg in jobs:
    dtype = "fp32" if "fp32" in name else "bf16"
    smem = compile_for_sm90(kernel, consts, cfg.num_warps if cfg else 4, cfg.num_stages if cfg else 3, dtype)
    print(name, smem)
    assert smem <= 227 * 1024, (name, smem)
print("OK")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels are compiled and run by the tests above")
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    import pathlib
    import shutil

    import triton

    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and shutil.which("ptxas") is None:
        pytest.skip("no ptxas available to compile for sm_90")
    run_child(_AOT_SCRIPT, tmp_path, timeout=600)


# -------------------------------------------------------------------------------------------------- bad inputs
def _good(device="cpu"):
    return (
        torch.randn(6, 8, device=device),
        torch.randn(5, 8, device=device),
        torch.randn(2, 8, device=device),
        torch.randn(5, 2, device=device),
    )


BAD = [
    # (description, mutate(x, w, a, b) -> kwargs for lora_linear, exception, message fragment)
    (
        "K of weight",
        lambda x, w, a, b: dict(weight=torch.randn(5, 9)),
        ValueError,
        r"in_features 9.*\(5, 9\).*\(6, 8\)",
    ),
    ("K of lora_A", lambda x, w, a, b: dict(lora_A=torch.randn(2, 7)), ValueError, r"lora_A.*\(2, 7\)"),
    ("r of lora_B", lambda x, w, a, b: dict(lora_B=torch.randn(5, 3)), ValueError, r"lora_B.*\(5, 3\)"),
    ("N of lora_B", lambda x, w, a, b: dict(lora_B=torch.randn(4, 2)), ValueError, r"lora_B.*\(4, 2\)"),
    ("rank 0", lambda x, w, a, b: dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(5, 0)), ValueError, r"rank 0"),
    ("bias N", lambda x, w, a, b: dict(bias=torch.randn(4)), ValueError, r"bias.*\(4,\)"),
    ("bias rank", lambda x, w, a, b: dict(bias=torch.randn(5, 1)), ValueError, r"bias must have 1 dim"),
    ("weight rank", lambda x, w, a, b: dict(weight=torch.randn(40)), ValueError, r"weight must have 2 dim.*\(40,\)"),
    ("lora_A rank", lambda x, w, a, b: dict(lora_A=torch.randn(1, 2, 8)), ValueError, r"lora_A must have 2 dim"),
    ("x rank 0", lambda x, w, a, b: dict(x=torch.tensor(1.0)), ValueError, r"x must have at least 1"),
    ("weight dtype", lambda x, w, a, b: dict(weight=w.half()), TypeError, r"weight dtype.*float16.*float32"),
    ("bias dtype", lambda x, w, a, b: dict(bias=torch.randn(5, dtype=torch.float64)), TypeError, r"bias dtype"),
    ("A/B dtypes", lambda x, w, a, b: dict(lora_B=b.double()), TypeError, r"lora_A dtype.*lora_B"),
    (
        "half adapters with fp32 x",
        lambda x, w, a, b: dict(lora_A=a.half(), lora_B=b.half()),
        TypeError,
        r"lora_A/lora_B dtype torch.float16",
    ),
    ("int x", lambda x, w, a, b: dict(x=torch.ones(6, 8, dtype=torch.int32)), TypeError, r"x has dtype torch.int32"),
    ("not a tensor", lambda x, w, a, b: dict(lora_A=[[1.0] * 8] * 2), TypeError, r"lora_A must be a torch.Tensor"),
    ("device", lambda x, w, a, b: dict(lora_B=torch.randn(5, 2, device="meta")), ValueError, r"one device.*meta"),
    ("nan scale", lambda x, w, a, b: dict(scale=float("nan")), ValueError, r"scale must be finite"),
    ("inf scale", lambda x, w, a, b: dict(scale=float("inf")), ValueError, r"scale must be finite"),
    ("str scale", lambda x, w, a, b: dict(scale="2"), TypeError, r"scale must be a float"),
    ("p = 1", lambda x, w, a, b: dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("p < 0", lambda x, w, a, b: dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("p nan", lambda x, w, a, b: dict(dropout_p=float("nan")), ValueError, r"dropout_p must be finite"),
    ("backend", lambda x, w, a, b: dict(backend="cudnn"), ValueError, r"backend='cudnn' is not a backend"),
]


@pytest.mark.parametrize("desc,mutate,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_rejected_with_a_clear_error(desc, mutate, exc, match):
    x, w, a, b = _good()
    kwargs = dict(x=x, weight=w, lora_A=a, lora_B=b, scale=1.0)
    kwargs.update(mutate(x, w, a, b))
    snapshot = [t.clone() for t in (x, w, a, b)]
    with pytest.raises(exc, match=match):
        lora_kernels.lora_linear(**kwargs)
    for before, after in zip(snapshot, (x, w, a, b)):
        assert torch.equal(before, after), "an input was modified by a failing call"


# ------------------------------------------------------------------------------- torch.library and torch.compile
def _op_args(backend, p, device="cpu", bias=True):
    g = torch.Generator().manual_seed(21)
    x, w, a, b, bb = make_inputs((7,), 20, 12, 4, torch.float32, torch.float32, bias, device, gen=g)
    x = x.contiguous()
    seed = torch.tensor(123456789, dtype=torch.int64)
    return [
        x.requires_grad_(),
        w.requires_grad_(),
        a.requires_grad_(),
        b.requires_grad_(),
        None if bb is None else bb.requires_grad_(),
        0.5,
        p,
        seed,
        backend,
    ]


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck_fwd_torch_backend(p):
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_fwd.default, _op_args("torch", p))


def test_opcheck_bwd_torch_backend():
    x, w, a, b, bb, scale, p, seed, backend = _op_args("torch", 0.2)
    with torch.no_grad():
        _, xa, _ = torch.ops.lora_kernels.lora_linear_fwd(x, w, a, b, bb, scale, p, seed, backend)
    dy = torch.randn(x.shape[0], w.shape[0])
    for flags in ((True, True, True), (False, False, False)):
        args = [dy, x.detach(), w.detach(), a.detach(), b.detach(), xa, scale, p, seed, backend, *flags]
        torch.library.opcheck(torch.ops.lora_kernels.lora_linear_bwd.default, args)


@needs_triton
def test_opcheck_triton_backend_tiny(device):
    args = _op_args("triton", 0.2, device=device, bias=False)
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_fwd.default, args)


def test_torch_compile_fullgraph_matches_eager():
    """fullgraph=True: validation, backend choice and the custom ops trace without a graph break, also when scale and
    dropout_p change between calls (dynamo then makes them symbolic floats)."""
    g = torch.Generator().manual_seed(8)
    x, w, a, b, bb = make_inputs((2, 9), 24, 16, 4, torch.float32, torch.float32, True, "cpu", gen=g)

    def layer(x, w, a, b, bb, scale, p):
        return torch.tanh(lora_kernels.lora_linear(x, w, a, b, scale, bias=bb, dropout_p=p, backend="torch"))

    # aot_eager: the Dynamo + AOTAutograd path that checks the fake impls and autograd registration, without
    # Inductor's C++ compile (tens of seconds on CI's 2 cores, and it adds nothing about these ops).
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for scale, p in ((0.5, 0.0), (0.7, 0.25), (0.9, 0.5)):
        results = []
        for fn in (layer, compiled):
            leaves = [t.detach().clone().requires_grad_() for t in (x, w, a, b, bb)]
            torch.manual_seed(4)
            y = fn(*leaves, scale, p)
            y.square().sum().backward()
            results.append((y.detach(), [t.grad for t in leaves]))
        (y_e, g_e), (y_c, g_c) = results
        torch.testing.assert_close(y_c, y_e)
        for ge, gc in zip(g_e, g_c):
            torch.testing.assert_close(gc, ge)


# ------------------------------------------------------------------------------------------------ backend choice
def test_env_var_selects_the_backend(monkeypatch):
    x, w, a, b = _good()
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    assert op_mod.BACKENDS.resolve(None, x, w, a, b, None) == "torch"
    monkeypatch.setenv(_backend.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=r"\$LORA_KERNELS_BACKEND='nonsense' is not a backend"):
        lora_kernels.lora_linear(x, w, a, b, 1.0)
    # An explicit argument wins over the variable.
    assert op_mod.BACKENDS.resolve("torch", x, w, a, b, None) == "torch"


@needs_triton
def test_env_var_routes_calls_to_triton(monkeypatch, device):
    from lora_kernels.triton import lora_linear as tri

    calls = []
    real = tri.lora_linear_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tri, "lora_linear_forward", spy)
    x, w, a, b = _good(device)
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    y = lora_kernels.lora_linear(x, w, a, b, 1.0)
    assert calls == [1]
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    y_ref = lora_kernels.lora_linear(x, w, a, b, 1.0)
    assert calls == [1]
    assert_close_scaled(y, y_ref, TOL[torch.float32], "y")


def test_triton_on_cpu_without_interpreter_lists_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, a, b = _good("cpu")
    with pytest.raises(_backend.BackendError, match=r"triton: .*TRITON_INTERPRET") as info:
        lora_kernels.lora_linear(x, w, a, b, 1.0, backend="triton")
    assert "asked for 'triton'" in str(info.value)
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    with pytest.raises(_backend.BackendError, match=r"TRITON_INTERPRET"):
        lora_kernels.lora_linear(x, w, a, b, 1.0)


def test_auto_on_cpu_uses_the_reference(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    x, w, a, b = _good("cpu")
    assert op_mod.BACKENDS.resolve(None, x, w, a, b, None) == "torch"
    assert op_mod.BACKENDS.resolve("auto", x, w, a, b, None) == "torch"


@needs_triton
def test_triton_rejects_float64_with_a_reason(device):
    x, w, a, b = (t.double() for t in _good(device))
    with pytest.raises(_backend.BackendError, match="float64"):
        lora_kernels.lora_linear(x, w, a, b, 1.0, backend="triton")
