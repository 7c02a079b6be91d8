"""Pure PyTorch reference of the fused LoRA linear: the spec every backend is tested against, and the CPU path.

    y = x·W0ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ (+ bias)

All arithmetic is done in the accumulation dtype (float32, or float64 when the inputs are float64) and cast to x's
dtype once at the end, which is what the fused kernels do with their fp32 accumulators. Shapes (2-D at this level, the
op flattens leading dims): x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N], xa [M, r] (= dropout(x)·Aᵀ,
in the accumulation dtype).

The float64 oracle of tests and benchmarks is the same code with ``acc_dtype=torch.float64, out_dtype=torch.float64``:
every input is promoted, nothing is rounded, so the result is exact to float64 rounding whatever the inputs' dtype.

``seed`` is a Python int (a 0-dim tensor also works: it is read with ``int()``, a host sync for a CUDA tensor). That
read is why the torch backend of ``lora_kernels.lora_linear`` cannot be captured in a CUDA graph with dropout; the
Triton kernels read the seed on the device instead.
"""

from __future__ import annotations

import torch

from .dropout import apply_dropout, dropout_keep_mask
from .dtypes import accumulation_dtype, check_out_dtype


def lora_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    *,
    acc_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y [M, N], xa [M, r] = dropout(x)·Aᵀ in the accumulation dtype)``.

    ``acc_dtype``: the dtype every product and sum is computed in, float32 or float64; ``None`` (default) is float32,
    float64 for float64 ``x``. ``out_dtype``: the dtype of ``y``; ``None`` (default) is ``x.dtype`` (one rounding at
    the end). The float64 oracle is ``acc_dtype=torch.float64, out_dtype=torch.float64``.
    """
    acc = accumulation_dtype(x, acc_dtype=acc_dtype)
    check_out_dtype(out_dtype)
    xf = x.to(acc)
    xa = apply_dropout(xf, dropout_p, seed) @ lora_A.to(acc).t()
    y = xf @ weight.to(acc).t() + (scale * xa) @ lora_B.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype if out_dtype is None else out_dtype), xa


def lora_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    needs_dx: bool = True,
    needs_dweight: bool = False,
    needs_dbias: bool = False,
    *,
    acc_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
):
    """Gradients ``(dx, dA, dB, dweight, dbias)``; the ones not asked for are ``None``.

    dXA = scale·dY·B, dB = scale·dYᵀ·XA, dA = dXAᵀ·dropout(x), dX = dY·W0 + mask⊙(dXA·A)/(1-p), dW = dYᵀ·x,
    dbias = Σ_m dY.

    ``acc_dtype``: the dtype of the arithmetic, float32 or float64; ``None`` (default) is ``xa.dtype`` (the forward's
    accumulation dtype). ``out_dtype``: the dtype of every returned gradient; ``None`` (default) is each input's own
    dtype (dx: x's, dA: lora_A's, dB: lora_B's, dweight: weight's) and the accumulation dtype for dbias. The float64
    oracle is ``acc_dtype=torch.float64, out_dtype=torch.float64``.
    """
    acc = xa.dtype if acc_dtype is None else accumulation_dtype(acc_dtype=acc_dtype)
    check_out_dtype(out_dtype)

    def out(t: torch.Tensor, like: torch.dtype) -> torch.Tensor:
        return t.to(like if out_dtype is None else out_dtype)

    dyf = dy.to(acc)
    xf = x.to(acc)
    xa = xa.to(acc)
    dxa = scale * (dyf @ lora_B.to(acc))
    d_b = out(scale * (dyf.t() @ xa), lora_B.dtype)
    d_a = out(dxa.t() @ apply_dropout(xf, dropout_p, seed), lora_A.dtype)
    dx = None
    if needs_dx:
        lora_dx = dxa @ lora_A.to(acc)
        if dropout_p > 0.0:
            keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p, device=x.device)
            lora_dx = torch.where(keep, lora_dx / (1.0 - dropout_p), torch.zeros((), dtype=acc, device=x.device))
        dx = out(dyf @ weight.to(acc) + lora_dx, x.dtype)
    dw = out(dyf.t() @ xf, weight.dtype) if needs_dweight else None
    dbias = out(dyf.sum(0), acc) if needs_dbias else None
    return dx, d_a, d_b, dw, dbias
