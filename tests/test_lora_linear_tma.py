"""The persistent TMA GEMMs of lora_linear (``lora_kernels.triton.lora_linear_tma``) against the float64 reference:
forward ``y = x·W0ᵀ + scale·xa·Bᵀ + bias`` and ``dX = dY·W0 + keep ⊙ (dxa·A)/(1-p)``, on odd sizes, several tiles per
persistent program, the packed dropout mask; when the path applies (``tma_supported``); and an sm_90 compile of each
kernel's first config (no spills, wgmma, TMA)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from _aot import run_child
from _tolerances import assert_close_scaled

from lora_kernels import _backend
from lora_kernels.reference import lora_linear as ref
from lora_kernels.reference.dropout import dropout_keep_mask, pack_keep_bits

from conftest import DEVICE, HAS_CUDA, INTERPRET

AUTOTUNE_ENV_VAR = "LORA_KERNELS_AUTOTUNE"

needs_triton = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRET), reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (set by conftest without CUDA)"
)


@pytest.fixture(scope="module", autouse=True)
def _first_config_only():
    """Values, not speed: no autotune benchmarking on a GPU."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(AUTOTUNE_ENV_VAR, "0")
        yield


@pytest.fixture
def T():
    from lora_kernels.triton import lora_linear_tma

    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9")
    return lora_linear_tma


def _dtype_or_skip(dtype):
    if dtype == torch.bfloat16 and INTERPRET:
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter; bf16 runs on a GPU")


@contextlib.contextmanager
def _tf32_on_gpu(dtype):
    """Yields the dtype whose tolerance judges a ``dtype`` result. On a GPU the TMA path takes fp32 only with TF32
    allowed (``_dtype_ok``): turn it on there and judge like fp16 (TF32 keeps fp16's 10-bit mantissa)."""
    if dtype != torch.float32 or DEVICE != "cuda":
        yield dtype
        return
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        yield torch.float16
    finally:
        matmul.allow_tf32 = saved


def _problem(M, K, N, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    a = torch.randn(r, K, generator=g) / math.sqrt(K)
    b = torch.randn(N, r, generator=g) / math.sqrt(r)
    bias = torch.randn(N, generator=g)
    dy = torch.randn(M, N, generator=g) / math.sqrt(N)
    cast = lambda t: t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(a), cast(b), cast(bias), cast(dy)


def _oracle_forward(x, w, a, b, scale, bias, p, seed):
    """(y float64, xa fp32 for the kernel): the reference's float64 forward; xa rounded to fp32, as the shrink's."""
    y, xa = ref.lora_linear_forward(x, w, a, b, scale, bias, p, seed, acc_dtype=torch.float64, out_dtype=torch.float64)
    return y, xa.float()


# (M, K, N): odd batch sizes; K and N keep TMA's 16-byte row strides in fp16 and fp32 (multiples of 8 elements); N
# = 36 gives an output whose fp16 rows are 72 bytes, stored without TMA.
SHAPES = [(1, 32, 48), (7, 48, 96), (33, 96, 32), (100, 48, 36)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M, K, N", SHAPES)
@pytest.mark.parametrize("r, bias", [(1, True), (7, False), (16, True)])
def test_forward_matches_reference(T, dtype, M, K, N, r, bias):
    _dtype_or_skip(dtype)
    x, w, a, b, bb, _ = _problem(M, K, N, r, dtype, seed=M * 1000 + K + N + r)
    bb = bb if bias else None
    with _tf32_on_gpu(dtype) as tol:
        assert T.tma_supported(x, w)
        want, xa = _oracle_forward(x, w, a, b, 0.75, bb, 0.0, 0)
        y = T.fwd_gemm(x, w, xa, b, 0.75, bb)
    assert y.dtype == dtype and y.shape == (M, N) and y.is_contiguous()
    assert_close_scaled(y, want, tol, "y")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M, K, N", SHAPES)
@pytest.mark.parametrize("r, bias, store", [(1, True, True), (7, False, False), (16, True, True), (64, False, True)])
def test_forward_with_the_shrink_inside_matches_reference(T, dtype, M, K, N, r, bias, store):
    # FUSE_SHRINK: xa = x·Aᵀ from the main loop's x boxes, the rank padded to a power of two by TMA's zero fill
    # (r = 1, 7), up to the largest fused rank (64); xa stored by the first column of tiles when asked.
    _dtype_or_skip(dtype)
    x, w, a, b, bb, _ = _problem(M, K, N, r, dtype, seed=M * 1000 + K + N + r + 3)
    bb = bb if bias else None
    with _tf32_on_gpu(dtype) as tol:
        assert T.tma_supported(x, w, a)
        want, want_xa = _oracle_forward(x, w, a, b, 0.75, bb, 0.0, 0)
        xa_out = torch.full((M, r), float("nan"), device=DEVICE) if store else None
        y = T.fwd_gemm(x, w, None, b, 0.75, bb, lora_A=a, xa_out=xa_out)
    assert y.dtype == dtype and y.shape == (M, N) and y.is_contiguous()
    assert_close_scaled(y, want, tol, "y")
    if store:
        assert_close_scaled(xa_out, want_xa.double(), tol, "xa")


@needs_triton
@pytest.mark.parametrize("programs", [1, 3])
def test_fused_forward_with_several_tiles_per_program(T, programs):
    # 100×96 outputs in 32×32 tiles (interpreter): each of 1 or 3 programs walks several tiles; only tiles of the first
    # column store xa (a wrong column test writes other columns' rows or leaves NaN).
    M, K, N, r = 100, 48, 96, 7
    x, w, a, b, bb, _ = _problem(M, K, N, r, torch.float16, seed=programs + 40)
    want, want_xa = _oracle_forward(x, w, a, b, 1.5, bb, 0.0, 0)
    xa_out = torch.full((M, r), float("nan"), device=DEVICE)
    y = T.fwd_gemm(x, w, None, b, 1.5, bb, lora_A=a, xa_out=xa_out, max_programs=programs)
    assert_close_scaled(y, want, torch.float16, "y")
    assert_close_scaled(xa_out, want_xa.double(), torch.float16, "xa")


@needs_triton
def test_fused_shrink_stays_fp32_beyond_the_fp16_range(T):
    # x·Aᵀ = 102400 in fp16 data, the output ~512: xa stays fp32 up to the epilogue.
    K, N = 48, 32
    x = torch.full((70, K), 16.0, dtype=torch.float16, device=DEVICE)
    a = torch.stack([torch.full((K,), 133.0), torch.full((K,), -133.0)]).to(DEVICE, torch.float16)
    b = torch.stack([torch.full((N,), 0.0075), torch.full((N,), 0.0025)], dim=1).to(DEVICE, torch.float16)
    w = torch.zeros(N, K, dtype=torch.float16, device=DEVICE)
    want, _ = _oracle_forward(x, w, a, b, 1.0, None, 0.0, 0)
    assert (x[0].double() @ a[0].double()) > 65504 and want.abs().max() < 1000
    y = T.fwd_gemm(x, w, None, b, 1.0, None, lora_A=a)
    assert torch.isfinite(y).all()
    assert_close_scaled(y, want, torch.float16, "y")


@needs_triton
def test_fused_forward_bad_arguments(T):
    x, w, a, b, _, _ = _problem(7, 48, 32, 4, torch.float16, seed=2)
    xa = torch.zeros(7, 4, device=DEVICE)
    with pytest.raises(ValueError, match="xa=None and lora_A"):
        T.fwd_gemm(x, w, xa, b, 1.0, lora_A=a)
    big = torch.zeros(T.FUSED_MAX_R + 1, 48, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="1 <= r <= 64"):
        T.fwd_gemm(x, w, None, torch.zeros(32, T.FUSED_MAX_R + 1, device=DEVICE), 1.0, lora_A=big)
    with pytest.raises(ValueError, match=r"xa_out must be fp32 \[7, 4\]"):
        T.fwd_gemm(x, w, None, b, 1.0, lora_A=a, xa_out=torch.zeros(7, 4, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="needs xa, or lora_A"):
        T.fwd_gemm(x, w, None, b, 1.0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M, K, N", SHAPES)
@pytest.mark.parametrize("r, p", [(1, 0.0), (7, 0.3), (16, 0.1), (16, 0.0)])
def test_dx_matches_reference(T, dtype, M, K, N, r, p):
    _dtype_or_skip(dtype)
    x, w, a, b, _, dy = _problem(M, K, N, r, dtype, seed=M * 1000 + K + N + r + 7)
    with _tf32_on_gpu(dtype) as tol:
        supported = T.tma_supported(dy, w)
    if not supported:
        assert (N * dy.element_size()) % 16  # dY's rows are not 16-byte multiples: the caller takes other kernels
        pytest.skip(f"dY rows of {N} {dtype} are not 16-byte multiples: not a TMA operand")
    seed = 1234 + M
    _, xa = _oracle_forward(x, w, a, b, 0.75, None, p, seed)
    want = ref.lora_linear_backward(
        dy, x, w, a, b, xa, 0.75, p, seed, acc_dtype=torch.float64, out_dtype=torch.float64
    )[0]
    dxa = (0.75 * (dy.double() @ b.double())).float()
    bits = pack_keep_bits(dropout_keep_mask(seed, M, K, p, device=DEVICE)) if p > 0 else None
    with _tf32_on_gpu(dtype) as tol:
        dx = T.dx_gemm(dy, w, dxa, a, bits, 1.0 / (1.0 - p))
    assert dx.dtype == dtype and dx.shape == (M, K) and dx.is_contiguous()
    assert_close_scaled(dx, want, tol, "dx")


@needs_triton
@pytest.mark.parametrize("programs", [1, 3])
def test_several_tiles_per_program(T, programs):
    # 100×96 outputs in 32×32 tiles (interpreter) are 12 tiles; 1 or 3 programs walk 12 or 4 each, ragged edges too.
    dtype = torch.float16
    M, K, N, r, p = 100, 48, 96, 7, 0.2
    x, w, a, b, bb, dy = _problem(M, K, N, r, dtype, seed=programs)
    want, xa = _oracle_forward(x, w, a, b, 1.5, bb, 0.0, 0)
    assert_close_scaled(T.fwd_gemm(x, w, xa, b, 1.5, bb, max_programs=programs), want, dtype, "y")
    want_dx = ref.lora_linear_backward(dy, x, w, a, b, xa, 1.5, p, 9, acc_dtype=torch.float64, out_dtype=torch.float64)[
        0
    ]
    dxa = (1.5 * (dy.double() @ b.double())).float()
    bits = pack_keep_bits(dropout_keep_mask(9, M, K, p, device=DEVICE))
    dx = T.dx_gemm(dy, w, dxa, a, bits, 1.0 / (1.0 - p), max_programs=programs)
    assert_close_scaled(dx, want_dx, dtype, "dx")


@needs_triton
def test_dx_plain_store_when_output_rows_are_not_16_byte_multiples(T):
    # W0 a column slice of a wider fp32 buffer: its row stride (64 B) suits TMA, but dX's rows of K = 13 (52 B) do not.
    M, K, N, r = 7, 13, 32, 3
    x, w_full, a, b, _, dy = _problem(M, 16, N, r, torch.float32, seed=5)
    w, x, a = w_full[:, :K], x[:, :K].contiguous(), a[:, :K].contiguous()
    _, xa = _oracle_forward(x, w, a, b, 0.5, None, 0.0, 0)
    want = ref.lora_linear_backward(dy, x, w, a, b, xa, 0.5, acc_dtype=torch.float64, out_dtype=torch.float64)[0]
    with _tf32_on_gpu(torch.float32) as tol:
        assert T.tma_supported(dy, w) and not T.tma_supported(x, w)
        dx = T.dx_gemm(dy, w, (0.5 * (dy.double() @ b.double())).float(), a)
    assert_close_scaled(dx, want, tol, "dx")


@needs_triton
def test_tma_supported_refuses_what_tma_cannot_read(T, monkeypatch):
    x = torch.randn(8, 48, dtype=torch.float16, device=DEVICE)
    w = torch.randn(16, 48, dtype=torch.float16, device=DEVICE)
    assert T.tma_supported(x, w)
    odd = torch.randn(8, 33, dtype=torch.float16, device=DEVICE)  # 66-byte rows
    assert not T.tma_supported(odd, w)
    assert not T.tma_supported(x[:, 1:], w)  # base address 2 bytes past an aligned one
    assert not T.tma_supported(x.t().contiguous().t(), w)  # column-major: last stride is not 1
    assert not T.tma_supported(x.float(), w)  # mixed dtypes
    assert not T.tma_supported(x[:0], w)  # empty
    assert not T.tma_supported(x.double(), w.double())
    assert T._dtype_ok(torch.float32, on_gpu=False)
    matmul = torch.backends.cuda.matmul  # a module with a property, not an attribute monkeypatch can set everywhere
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert not T._dtype_ok(torch.float32, on_gpu=True)  # exact fp32 products spill in these tiles
        matmul.allow_tf32 = True
        assert T._dtype_ok(torch.float32, on_gpu=True) and T._dtype_ok(torch.bfloat16, on_gpu=True)
    finally:
        matmul.allow_tf32 = saved
    if DEVICE == "cpu":
        monkeypatch.setattr(_backend, "interpreter_enabled", lambda: False)
        assert not T.tma_supported(x, w)  # CPU tensors only run in the interpreter


@needs_triton
def test_bad_keep_bits_are_refused(T):
    M, K, N, r = 7, 48, 32, 4
    _, w, a, b, _, dy = _problem(M, K, N, r, torch.float16, seed=3)
    dxa = torch.zeros(M, r, device=DEVICE)
    with pytest.raises(ValueError, match=r"keep_bits must be an int32 \[7, 2\] packed mask"):
        T.dx_gemm(dy, w, dxa, a, torch.zeros(M, K, dtype=torch.bool, device=DEVICE), 2.0)
    with pytest.raises(ValueError, match=r"keep_bits must be an int32 \[7, 2\]"):
        T.dx_gemm(dy, w, dxa, a, torch.zeros(M, 1, dtype=torch.int32, device=DEVICE), 2.0)


@needs_triton
def test_a_users_triton_allocator_is_kept(T):
    import triton
    from triton.runtime import _allocation

    def users(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8, device=DEVICE)

    before = _allocation._allocator.get()
    try:
        triton.set_allocator(users)
        T.ensure_allocator(torch.device(DEVICE))
        assert _allocation._allocator.get() is users
        triton.set_allocator(_allocation.NullAllocator())
        T.ensure_allocator(torch.device(DEVICE))
        assert getattr(_allocation._allocator.get(), "lora_kernels_scratch", False)
    finally:
        triton.set_allocator(before)


def test_importing_queries_no_device(monkeypatch):
    import importlib
    import sys

    def boom(*args, **kwargs):
        raise AssertionError("a device was queried at import")

    monkeypatch.setattr(torch.cuda, "get_device_properties", boom)
    monkeypatch.setattr(torch.cuda, "get_device_capability", boom)
    monkeypatch.setattr(torch.cuda, "current_device", boom)
    import lora_kernels.triton as package

    saved = sys.modules.pop("lora_kernels.triton.lora_linear_tma", None)
    try:
        importlib.import_module("lora_kernels.triton.lora_linear_tma")
    finally:
        # The import also rebinds the package's attribute: put both back, or later tests would patch a second copy
        # of the module that lora_linear.py does not call.
        if saved is not None:
            sys.modules["lora_kernels.triton.lora_linear_tma"] = saved
            package.lora_linear_tma = saved


# Compiles the first config of each kernel (what runs with autotuning off) for sm_90 in a child process without the
# interpreter, at a training shape, and reads the machine code.
_AOT_SCRIPT = r"""
import os, subprocess, tempfile
import torch, triton
from lora_kernels.triton import lora_linear_tma as T
from _aot import Recorder, compile_for_sm90, ptxas_report, jit_function, no_spills

calls = []
for name in ("_fwd_tma_kernel", "_dx_tma_kernel"):
    setattr(T, name, Recorder(getattr(T, name), calls))
M, K, N, R = 8192, 4096, 4096, 16
bf = torch.bfloat16
w = torch.empty(N, K, dtype=bf)
b, bias = torch.empty(N, R, dtype=bf), torch.empty(N, dtype=bf)
T.fwd_gemm(torch.empty(M, K, dtype=bf), w, torch.empty(M, R), b, 2.0, bias)
T.dx_gemm(torch.empty(M, N, dtype=bf), w, torch.empty(M, R), torch.empty(R, K, dtype=bf), None, 1.0)
T.dx_gemm(torch.empty(M, N, dtype=bf), w, torch.empty(M, R), torch.empty(R, K, dtype=bf),
          torch.empty(M, K // 32, dtype=torch.int32), 1 / 0.9)
# The decode-sized forward with the shrink inside: 64x64, 64x128 and 64x256 tiles.
for rows, n in ((128, N), (256, N), (256, 2 * N)):
    T.fwd_gemm(torch.empty(rows, K, dtype=bf), torch.empty(n, K, dtype=bf), None, torch.empty(n, R, dtype=bf), 2.0,
               torch.empty(n, dtype=bf), lora_A=torch.empty(R, K, dtype=bf), xa_out=torch.empty(rows, R))
assert len(calls) == 6, calls
nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
for kernel, grid, args, kwargs in calls:
    fn = jit_function(kernel)
    cfg = kernel.early_config_prune(kernel.configs, dict(zip(fn.arg_names, args), **kwargs))[0]
    compiled, consts = compile_for_sm90(kernel, args, dict(kwargs, **cfg.kwargs, num_warps=cfg.num_warps,
                                                           num_stages=cfg.num_stages))
    st, ld, regs = ptxas_report(compiled)
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        open(cubin, "wb").write(compiled.asm["cubin"])
        sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    smem = compiled.metadata.shared
    shown = {k: v for k, v in consts.items() if k.startswith(("BLOCK", "HAS"))}
    print(fn.__name__, shown, cfg.num_warps, cfg.num_stages, "regs", regs, "spill", st, ld, "smem", smem, flush=True)
    no_spills(st, ld, (fn.__name__, shown))
    assert smem <= 227 * 1024, (fn.__name__, shown, smem)
    assert "HGMMA" in sass, ("no wgmma", fn.__name__, shown)
    assert "UTMALDG" in sass, ("no TMA load", fn.__name__, shown)
print("OK")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels are compiled and run by the tests above")
def test_first_configs_compile_for_sm90_with_wgmma_tma_and_no_spills(tmp_path):
    import pathlib

    import triton

    nv = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (nv / "ptxas").exists() or not (nv / "nvdisasm").exists():
        pytest.skip("needs triton's bundled ptxas and nvdisasm to compile for sm_90 and read the SASS")
    run_child(_AOT_SCRIPT, tmp_path, timeout=600)


# ----------------------------------------------------------------------------------------- dispatch of lora_linear
@pytest.fixture
def spied(T, monkeypatch):
    """lora_linear's Triton launchers with the Triton base GEMM and the TMA launchers counted."""
    from lora_kernels.triton import lora_linear as LL

    calls = []
    for name in ("fwd_gemm", "dx_gemm"):
        real = getattr(T, name)
        monkeypatch.setattr(T, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    monkeypatch.setattr(LL, "BASE_GEMM", "triton")
    monkeypatch.setattr(LL, "_FUSED_SHRINK_MAX_M", 0)  # the one-launch decode forward has its own kernel
    return LL, calls


def _layer_against_reference(LL, M, K, N, r, dtype, p, keep_bits=True):
    x, w, a, b, bb, dy = _problem(M, K, N, r, dtype, seed=M + K + N)
    seed = 77
    y, xa, bits = LL.lora_linear_forward(x, w, a, b, 0.5, bb, p, seed, return_keep_bits=True)
    bits = bits if keep_bits else None
    dx, d_a, d_b, _, _ = LL.lora_linear_backward(dy, x, w, a, b, xa, 0.5, p, seed, keep_bits=bits)
    want_y, want_xa = ref.lora_linear_forward(
        x, w, a, b, 0.5, bb, p, seed, acc_dtype=torch.float64, out_dtype=torch.float64
    )
    want = ref.lora_linear_backward(
        dy, x, w, a, b, want_xa, 0.5, p, seed, acc_dtype=torch.float64, out_dtype=torch.float64
    )
    assert_close_scaled(y, want_y, dtype, "y")
    assert_close_scaled(dx, want[0], dtype, "dx")
    assert_close_scaled(d_a, want[1], dtype, "dA")
    assert_close_scaled(d_b, want[2], dtype, "dB")


@needs_triton
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_lora_linear_takes_the_tma_gemms_when_they_apply(spied, p):
    LL, calls = spied
    _layer_against_reference(LL, 33, 48, 32, 7, torch.float16, p)
    assert calls == ["fwd_gemm", "dx_gemm"]


@needs_triton
@pytest.mark.parametrize("M, r, bias", [(65, 5, True), (100, 16, False), (70, 64, True)])
def test_decode_sized_forward_takes_the_fused_tma_kernel(spied, monkeypatch, M, r, bias):
    # From FUSED_MIN_ROWS + 1 rows up to _FUSED_SHRINK_MAX_M, without dropout: one fwd_gemm launch with the shrink
    # inside, its xa stored for the backward (checked through dA and dB).
    LL, calls = spied
    monkeypatch.setattr(LL, "_FUSED_SHRINK_MAX_M", 256)
    fused = []
    real = LL._shrink
    monkeypatch.setattr(LL, "_shrink", lambda *a, **k: fused.append("shrink") or real(*a, **k))
    _layer_against_reference(LL, M, 48, 40, r, torch.float16, 0.0)
    assert calls == ["fwd_gemm", "dx_gemm"] and not fused


@needs_triton
def test_decode_sized_forward_at_64_rows_keeps_the_plain_fused_kernel(spied, monkeypatch):
    LL, calls = spied
    monkeypatch.setattr(LL, "_FUSED_SHRINK_MAX_M", 256)
    _layer_against_reference(LL, LL._tma.FUSED_MIN_ROWS, 48, 40, 5, torch.float16, 0.0)
    assert calls == ["dx_gemm"]


@needs_triton
def test_dx_with_dropout_but_no_kept_mask_takes_the_kernel_that_draws_it(spied):
    # The TMA dX reads the forward's packed mask; without one (a backend that keeps no bits) the mask is regenerated
    # from the seed by _dx_kernel, with the same result.
    LL, calls = spied
    _layer_against_reference(LL, 33, 48, 32, 7, torch.float16, 0.2, keep_bits=False)
    assert calls == ["fwd_gemm"]


@needs_triton
def test_lora_linear_falls_back_when_tma_cannot_read_the_operands(spied):
    LL, calls = spied
    _layer_against_reference(LL, 7, 33, 40, 3, torch.float16, 0.0)  # x's and W0's rows: 66 bytes
    assert calls == []


@needs_triton
def test_auto_keeps_the_cublas_base_at_training_sizes(spied, monkeypatch):
    LL, calls = spied
    monkeypatch.setattr(LL, "BASE_GEMM", "auto")
    monkeypatch.setattr(LL, "_TRITON_BASE_MAX_M", 4)  # a 7-row batch stands for a training-sized one
    _layer_against_reference(LL, 7, 48, 32, 3, torch.float16, 0.0)
    assert calls == []


@needs_triton
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_tma_forward_after_a_split_shrink(spied, monkeypatch, p):
    # A small batch on a big GPU splits the shrink over K into partial sums; the TMA forward reads a finished xa, so
    # the partials are added up first (a wrong or missing sum changes y and the saved xa).
    LL, calls = spied
    monkeypatch.setattr(LL, "_target_programs", lambda t: 64)
    splits = []
    real = LL._shrink
    monkeypatch.setattr(LL, "_shrink", lambda *a, **k: splits.append(real(*a, **k)[1]) or real(*a, **k))
    _layer_against_reference(LL, 7, 96, 32, 7, torch.float16, p)
    assert splits and splits[0] > 1, splits
    assert calls == ["fwd_gemm", "dx_gemm"]
