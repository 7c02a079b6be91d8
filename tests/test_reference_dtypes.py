"""The reference functions' ``acc_dtype`` / ``out_dtype`` keywords: float64 arithmetic on low-precision inputs is the
same computation as on the inputs promoted by hand, the defaults are unchanged, and bad values are refused before
anything is written."""

from __future__ import annotations

import pytest
import torch

from lora_kernels.reference import lora_linear as ref
from lora_kernels.reference import multi_lora as mref

F64 = {"acc_dtype": torch.float64, "out_dtype": torch.float64}


def _inputs(dtype, M=7, K=33, N=17, r=5):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(*shape, generator=g) / 4).to(dtype) for shape in ((M, K), (N, K), (r, K), (N, r), (N,))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_linear_float64_oracle_equals_promoted_inputs(dtype, p):
    x, w, a, b, bias = _inputs(dtype)
    y, xa = ref.lora_linear_forward(x, w, a, b, 1.5, bias, p, 123, **F64)
    promoted = [t.double() for t in (x, w, a, b, bias)]
    y_want, xa_want = ref.lora_linear_forward(*promoted[:4], 1.5, promoted[4], p, 123)
    assert y.dtype == xa.dtype == torch.float64
    assert torch.equal(y, y_want) and torch.equal(xa, xa_want)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    got = ref.lora_linear_backward(dy, x, w, a, b, xa, 1.5, p, 123, True, True, True, **F64)
    want = ref.lora_linear_backward(dy.double(), *promoted[:4], xa_want, 1.5, p, 123, True, True, True)
    for g_, w_ in zip(got, want):
        assert g_.dtype == torch.float64 and torch.equal(g_, w_)
    # the default is unchanged: fp32 arithmetic, y in x's dtype, each gradient in its input's dtype
    y32, xa32 = ref.lora_linear_forward(x, w, a, b, 1.5, bias, p, 123)
    assert y32.dtype == dtype and xa32.dtype == torch.float32
    dx, da, db, dw, dbias = ref.lora_linear_backward(dy, x, w, a, b, xa32, 1.5, p, 123, True, True, True)
    assert (dx.dtype, da.dtype, db.dtype, dw.dtype, dbias.dtype) == (dtype, dtype, dtype, dtype, torch.float32)


def test_multi_lora_float64_oracle_equals_promoted_inputs():
    g = torch.Generator().manual_seed(5)
    L, R, K, slices = 3, 4, 24, [8, 5]
    S, N = len(slices), sum(slices)
    x = torch.randn(6, K, generator=g).half()
    w = torch.randn(N, K, generator=g).half()
    A = torch.randn(L, S * R, K, generator=g).half()
    B = torch.randn(L, N, R, generator=g).half()
    ranks = torch.tensor([4, 0, 2], dtype=torch.int32)
    scales = torch.rand(L, S, generator=g)
    ids = torch.tensor([0, 2, -1, 1, 0, 5])
    got = mref.multi_lora_linear(x, w, None, A, B, ranks, scales, ids, slices, **F64)
    want = mref.multi_lora_linear(x.double(), w.double(), None, A.double(), B.double(), ranks, scales, ids, slices)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    xa = mref.lora_shrink(x, A, ids, ranks, S, acc_dtype=torch.float64)
    assert xa.dtype == torch.float64 and torch.equal(xa, mref.lora_shrink(x.double(), A.double(), ids, ranks, S))
    assert mref.lora_shrink(x, A, ids, ranks, S).dtype == torch.float32  # default unchanged


@pytest.mark.parametrize("bad", [torch.int32, torch.complex64, "float64"])
def test_bad_acc_dtype_is_refused_before_anything_is_written(bad):
    x, w, a, b, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="acc_dtype"):
        ref.lora_linear_forward(x, w, a, b, 1.0, acc_dtype=bad)
    _, xa = ref.lora_linear_forward(x, w, a, b, 1.0)
    with pytest.raises(ValueError, match="acc_dtype"):
        ref.lora_linear_backward(torch.ones(7, 17), x, w, a, b, xa, 1.0, acc_dtype=bad)
    B = torch.ones(1, 17, 5)
    y = torch.zeros(7, 17)
    with pytest.raises(ValueError, match="acc_dtype"):
        mref.lora_expand(
            xa, B, torch.zeros(7, dtype=torch.int64), torch.tensor([5]), torch.ones(1, 1), y, acc_dtype=bad
        )
    assert torch.count_nonzero(y) == 0
    out = torch.full((7, 5), 7.0)
    with pytest.raises(ValueError, match="acc_dtype"):
        mref.lora_shrink(x, a[None], torch.zeros(7, dtype=torch.int64), torch.tensor([5]), 1, out=out, acc_dtype=bad)
    assert torch.all(out == 7.0)


@pytest.mark.parametrize("bad", [torch.int64, "float64"])
def test_bad_out_dtype_is_refused(bad):
    x, w, a, b, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        ref.lora_linear_forward(x, w, a, b, 1.0, out_dtype=bad)
    with pytest.raises(ValueError, match="out_dtype"):
        mref.multi_lora_linear(
            x,
            w,
            None,
            a[None],
            b[None],
            torch.tensor([5]),
            torch.ones(1, 1),
            torch.zeros(7, dtype=torch.int64),
            out_dtype=bad,
        )
