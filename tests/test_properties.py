"""Property-based tests (hypothesis) of lora_linear and multi_lora_linear against a float64 oracle.

Random shapes (odd sizes, 1 included), leading dimensions, strides (sliced and transposed views), ranks, scales,
dtypes and, for the multi-adapter op, pools (slots, per-slice ranks, empty slots) and per-token adapter ids. The
oracle is plain float64 PyTorch written here, independent of lora_kernels.reference. Example counts are bounded and
the search is derandomized, so CI time is fixed and a failure reproduces.
"""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from _tolerances import TOL, assert_close_scaled  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lora_kernels as lk  # noqa: E402
from lora_kernels.pool import AdapterPool, LoRABatch  # noqa: E402

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SIZES = st.sampled_from([1, 2, 7, 16, 33, 40])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def triton_usable():
    try:
        lk.lora_linear(
            torch.randn(2, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2), 1.0, backend="triton"
        )
    except (lk.BackendError, ImportError, NotImplementedError) as exc:
        return str(exc)
    return None


def assert_close_to(actual, expected64, dtype, what, tol=None):
    """``actual`` (any dtype) against the float64 ``expected64``: NaN/inf never pass; error relative to the
    reference's largest magnitude (outputs near zero by cancellation are judged against the scale of the result)."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert_close_scaled(actual, expected64, TOL[dtype] if tol is None else tol, what)


def strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t`` in a different memory layout: contiguous, every other element of a wider buffer, or
    the transpose of a transposed copy."""
    if how == "contiguous":
        return t.contiguous()
    if how == "sliced":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)  # "transposed": column-major storage


# ------------------------------------------------------------------------------------------------- lora_linear
@st.composite
def lora_case(draw, dtypes, max_k=40):
    dtype = draw(st.sampled_from(dtypes))
    lora_dtype = draw(st.sampled_from([dtype, torch.float32]))
    lead = draw(st.sampled_from([(), (1,), (3,), (2, 3), (5, 1)]))
    M = draw(SIZES)
    K = draw(SIZES.filter(lambda k: k <= max_k))
    N = draw(SIZES)
    r = draw(st.sampled_from([1, 2, 3, 8, 16]))
    scale = draw(st.sampled_from([1.0, 0.5, -2.0, 3.0 / 7.0]))
    has_bias = draw(st.booleans())
    layout_x = draw(st.sampled_from(["contiguous", "sliced", "transposed"]))
    layout_w = draw(st.sampled_from(["contiguous", "transposed"]))
    seed = draw(st.integers(0, 2**16))
    return dtype, lora_dtype, lead + (M,), K, N, r, scale, has_bias, layout_x, layout_w, seed


def run_lora_case(case, backend):
    dtype, lora_dtype, lead, K, N, r, scale, has_bias, layout_x, layout_w, seed = case
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dt)

    x = strided(rnd(*lead, K), layout_x).requires_grad_(True)
    W = strided(rnd(N, K, std=K**-0.5), layout_w)
    A = rnd(r, K, dt=lora_dtype, std=K**-0.5).requires_grad_(True)
    B = rnd(N, r, dt=lora_dtype).requires_grad_(True)
    bias = rnd(N).requires_grad_(True) if has_bias else None
    dy = rnd(*lead, N)

    y = lk.lora_linear(x, W, A, B, scale, bias, backend=backend)
    assert y.shape == (*lead, N)
    y.backward(dy)

    x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    b64 = bias.detach().double().requires_grad_(True) if has_bias else None
    y64 = x64 @ W.double().t() + scale * (x64 @ A64.t()) @ B64.t()
    if has_bias:
        y64 = y64 + b64
    y64.backward(dy.double())

    assert_close_to(y, y64.detach(), dtype, "y")
    assert_close_to(x.grad, x64.grad, dtype, "dx")
    assert_close_to(A.grad, A64.grad, lora_dtype, "dA")
    assert_close_to(B.grad, B64.grad, lora_dtype, "dB")
    if has_bias:
        assert_close_to(bias.grad, b64.grad, dtype, "dbias")


@settings(max_examples=25, **SETTINGS)
@given(case=lora_case(DTYPES))
def test_lora_linear_torch_matches_float64(case):
    run_lora_case(case, "torch")


@settings(max_examples=15, **SETTINGS)
@given(case=lora_case([torch.float32, torch.float16, torch.bfloat16], max_k=33))
def test_lora_linear_triton_matches_float64(case):
    why = triton_usable()
    if why:
        pytest.skip(f"the triton backend cannot run here: {why}")
    run_lora_case(case, "triton")


@settings(max_examples=15, **SETTINGS)
@given(
    p=st.sampled_from([0.1, 0.5, 0.9]),
    M=SIZES,
    K=SIZES,
    r=st.sampled_from([1, 4]),
    backend=st.sampled_from(["torch", "triton"]),
)
def test_lora_linear_dropout_is_off_outside_training(p, M, K, r, backend):
    if backend == "triton" and triton_usable():
        pytest.skip("the triton backend cannot run here")
    g = torch.Generator().manual_seed(M * 100 + K)
    x, W = torch.randn(M, K, generator=g), torch.randn(5, K, generator=g)
    A, B = torch.randn(r, K, generator=g), torch.randn(5, r, generator=g)
    off = lk.lora_linear(x, W, A, B, 0.7, dropout_p=p, training=False, backend=backend)
    ref = lk.lora_linear(x, W, A, B, 0.7, dropout_p=0.0, backend=backend)
    torch.testing.assert_close(off, ref, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ multi_lora_linear
@st.composite
def multi_case(draw, dtypes):
    dtype = draw(st.sampled_from(dtypes))
    pool_dtype = draw(st.sampled_from([dtype, torch.float32]))
    L = draw(st.integers(1, 4))
    R = draw(st.sampled_from([1, 4, 8]))
    slices = draw(st.sampled_from([[7], [16], [5, 3], [8, 4, 4]]))
    K = draw(SIZES)
    M = draw(SIZES)
    lead = draw(st.sampled_from([(), (2,)]))
    loaded = draw(st.lists(st.booleans(), min_size=L, max_size=L))
    ranks = [draw(st.lists(st.integers(1, R), min_size=len(slices), max_size=len(slices))) for _ in range(L)]
    valid = [-1] + [l for l in range(L) if loaded[l]]
    ids = draw(
        st.lists(st.sampled_from(valid), min_size=M * (lead[0] if lead else 1), max_size=M * (lead[0] if lead else 1))
    )
    has_bias = draw(st.booleans())
    layout_x = draw(st.sampled_from(["contiguous", "sliced"]))
    fused = draw(st.sampled_from([None, True, False]))
    seed = draw(st.integers(0, 2**16))
    return dtype, pool_dtype, L, R, slices, K, lead + (M,), loaded, ranks, ids, has_bias, layout_x, fused, seed


def run_multi_case(case, backend):
    dtype, pool_dtype, L, R, slices, K, lead, loaded, ranks, ids, has_bias, layout_x, fused, seed = case
    g = torch.Generator().manual_seed(seed)
    N = sum(slices)

    def rnd(*shape, dt=dtype, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dt)

    pool = AdapterPool(L, R, K, slices if len(slices) > 1 else slices[0], dtype=pool_dtype)
    adapters = {}
    for l in range(L):
        if not loaded[l]:
            continue
        A = [rnd(r, K, dt=pool_dtype, std=K**-0.5) for r in ranks[l]]
        B = [rnd(n, r, dt=pool_dtype) for n, r in zip(slices, ranks[l])]
        alphas = [float(1 + l + s) for s in range(len(slices))]
        rslora = l % 2 == 1
        pool.load(
            f"a{l}",
            A if len(slices) > 1 else A[0],
            B if len(slices) > 1 else B[0],
            alpha=alphas if len(slices) > 1 else alphas[0],
            use_rslora=rslora,
            slot=l,
        )
        adapters[l] = [(a, b, al / (r**0.5 if rslora else r)) for a, b, al, r in zip(A, B, alphas, ranks[l])]
    x = strided(rnd(*lead, K), layout_x)
    W = rnd(N, K, std=K**-0.5)
    bias = rnd(N) if has_bias else None
    batch = LoRABatch.prepare(ids)

    y = lk.multi_lora_linear(x, W, bias, pool, batch, backend=backend, fused=fused)
    assert y.shape == (*lead, N)

    x64 = x.double().reshape(-1, K)
    y64 = x64 @ W.double().t()
    if has_bias:
        y64 = y64 + bias.double()
    for m, l in enumerate(ids):
        if l < 0:
            continue
        off = 0
        for (a, b, s), n in zip(adapters[l], slices):
            y64[m, off : off + n] += s * (x64[m] @ a.double().t()) @ b.double().t()
            off += n
    # The pool keeps its scales (α/r, α/√r) in float32 by design, so float64 is only float32-exact in the scale.
    tol = max(TOL[dtype], 1e-6)
    assert_close_to(y, y64.reshape(*lead, N), dtype, "y", tol=tol)


@settings(max_examples=25, **SETTINGS)
@given(case=multi_case(DTYPES))
def test_multi_lora_linear_torch_matches_float64(case):
    run_multi_case(case, "torch")


@settings(max_examples=15, **SETTINGS)
@given(case=multi_case([torch.float32, torch.float16, torch.bfloat16]))
def test_multi_lora_linear_triton_matches_float64(case):
    why = triton_usable()
    if why:
        pytest.skip(f"the triton backend cannot run here: {why}")
    run_multi_case(case, "triton")
