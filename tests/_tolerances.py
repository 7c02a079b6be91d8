"""Tolerances of the kernel and reference tests, in one place, with the reason for each number.

What is compared: a result computed with fp32 accumulation (fp64 for fp64 data) and rounded once to its dtype, against
the float64 oracle (``lora_kernels.reference`` with ``acc_dtype=torch.float64``) on the same, already rounded, inputs.
So the error is the final rounding plus fp32 accumulation error, not the inputs' own rounding.

- ``TOL[dtype]``: a number used both ways the tests compare. Elementwise (``close(dtype)`` gives
  ``rtol = atol = TOL``), and as a fraction of the largest |oracle| value floored at 1 (``assert_close_scaled``), which
  judges outputs near zero by cancellation against the scale of the result.
- ``FP32_SMALL_K``: an fp32 result of a small problem (K <= 64) never rounded to a 16-bit dtype (the shrink output
  ``xa``, an fp32 layer), against the oracle or against another fp32 evaluation order of the same function (merged
  vs unmerged weight, compiled vs eager, a state_dict round trip); ``close_small_k()`` gives the keywords.
- GPU half-precision tests use ``assert_close_to_oracle``: the error may be at most twice the error of the same
  computation done by PyTorch in that precision, plus a small atol (the rule of flash-attention's tests).
"""

from __future__ import annotations

import torch

TOL = {
    # fp64 eps 2.2e-16; K <= a few hundred terms of O(1): ~1e-13 accumulated; 1e-10 leaves 1000x and still fails any
    # computation that went through fp32 (error ~1e-7).
    torch.float64: 1e-10,
    # fp32 accumulation over K <= 256 of O(1) terms: typically sqrt(K)·2^-24·Σ|terms| ~ 2e-5 of the result's scale,
    # and the kernels sum in other orders (K blocks, split-K, the LoRA term's two chained products): 1e-4. A TF32
    # product (10-bit mantissa, error ~5e-4) does not pass.
    torch.float32: 1e-4,
    # fp16: the output is rounded once (half an ulp = 2^-11 = 4.9e-4 relative); 4e-3 is 8 half-ulps. A wrong element
    # or an intermediate that overflowed fp16 (past 65504) does not pass; a single extra fp16 rounding can.
    torch.float16: 4e-3,
    # bf16: one rounding is 2^-8 = 3.9e-3 relative; 2e-2 is 5 of them.
    torch.bfloat16: 2e-2,
}

# fp32 arithmetic kept in fp32 (no 16-bit rounding), K <= 64 terms of O(1): error ~sqrt(K)·2^-24·Σ|terms| ~ 1e-6
# of the result; 1e-5 leaves 10x and still fails a TF32 or fp16 intermediate (~5e-4).
FP32_SMALL_K = 1e-5

# atol of the 2x rule: covers outputs where the same-precision PyTorch computation happens to be exact (the 2x term
# is then 0); one ulp at magnitude 1.
ORACLE_ATOL = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}


def close(dtype: torch.dtype) -> dict:
    """``rtol`` / ``atol`` keywords for ``torch.testing.assert_close`` of a ``dtype`` result against the oracle."""
    return {"rtol": TOL[dtype], "atol": TOL[dtype]}


def close_small_k() -> dict:
    """``rtol`` / ``atol`` keywords for an fp32 result of a small problem, never rounded to 16 bits."""
    return {"rtol": FP32_SMALL_K, "atol": FP32_SMALL_K}


def assert_close_scaled(actual, expected, tol, what="output"):
    """``actual`` against the float64 ``expected`` with error ≤ ``tol`` · max(1, max|expected|) (plus ``tol`` relative):
    outputs near zero by cancellation are judged against the scale of the result; NaN/inf never pass. ``tol``: a
    number, or a dtype (then ``TOL[dtype]``)."""
    if isinstance(tol, torch.dtype):
        tol = TOL[tol]
    assert actual is not None, f"{what}: missing"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    bound = tol * max(1.0, e.abs().max().item() if e.numel() else 1.0)
    torch.testing.assert_close(a, e, atol=bound, rtol=tol, msg=lambda m: f"{what}: {m}")


def assert_close_to_oracle(out, out_same_precision_torch, oracle, atol=None, what="output"):
    """flash-attention's rule for half-precision kernels: max|out - oracle| ≤ 2 · max|out_torch - oracle| + atol.

    ``out``: the kernel's result; ``out_same_precision_torch``: the same computation by PyTorch in ``out``'s dtype
    (for example the reference with ``acc_dtype=out.dtype``); ``oracle``: the float64 oracle. ``atol`` defaults to
    ``ORACLE_ATOL[out.dtype]``."""
    assert out.shape == oracle.shape == out_same_precision_torch.shape, (
        f"{what}: shapes {tuple(out.shape)}, {tuple(out_same_precision_torch.shape)}, {tuple(oracle.shape)}"
    )
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    if atol is None:
        atol = ORACLE_ATOL[out.dtype]
    o = oracle.detach().to(torch.float64)
    o_dev = o.to(out.device)
    err = (out.detach().to(torch.float64) - o_dev).abs().max().item() if out.numel() else 0.0
    err_torch = (
        (out_same_precision_torch.detach().to(torch.float64) - o.to(out_same_precision_torch.device)).abs().max().item()
        if out.numel()
        else 0.0
    )
    assert err <= 2 * err_torch + atol, (
        f"{what}: max error {err:.3g} against the float64 oracle > 2 x {err_torch:.3g} (PyTorch in {out.dtype}) + "
        f"{atol:.3g}"
    )
