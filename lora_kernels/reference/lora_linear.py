"""Pure PyTorch reference of the fused LoRA linear: the spec every backend is tested against, and the CPU path.

    y = x·W0ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ (+ bias)

All arithmetic is done in float32 (float64 when the inputs are float64) and cast to x's dtype once at the end, which
is what the fused kernels do with their fp32 accumulators. Shapes (2-D at this level, the op flattens leading dims):
x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N], S [M, r] (float32 or float64).

``seed`` is a Python int (a 0-dim tensor also works: it is read with ``int()``, a host sync for a CUDA tensor). That
read is why the torch backend of ``lora_kernels.lora_linear`` cannot be captured in a CUDA graph with dropout; the
Triton kernels read the seed on the device instead.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .dropout import apply_dropout, dropout_keep_mask


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def lora_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y [M, N] in x.dtype, S [M, r] = dropout(x)·Aᵀ in the accumulation dtype)``."""
    acc = _acc_dtype(x)
    xf = x.to(acc)
    s_mat = apply_dropout(xf, dropout_p, seed) @ lora_A.to(acc).t()
    y = xf @ weight.to(acc).t() + (scale * s_mat) @ lora_B.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), s_mat


def lora_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    s_mat: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    needs_dx: bool = True,
    needs_dweight: bool = False,
    needs_dbias: bool = False,
):
    """Gradients ``(dx, dA, dB, dweight, dbias)``; the ones not asked for are ``None``.

    dS = s·dY·B, dB = s·dYᵀ·S, dA = dSᵀ·dropout(x), dX = dY·W0 + mask⊙(dS·A)/(1-p), dW = dYᵀ·x, dbias = Σ_m dY.
    """
    acc = s_mat.dtype
    dyf = dy.to(acc)
    xf = x.to(acc)
    d_s = scale * (dyf @ lora_B.to(acc))
    d_b = (scale * (dyf.t() @ s_mat)).to(lora_B.dtype)
    d_a = (d_s.t() @ apply_dropout(xf, dropout_p, seed)).to(lora_A.dtype)
    dx = None
    if needs_dx:
        lora_dx = d_s @ lora_A.to(acc)
        if dropout_p > 0.0:
            keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p, device=x.device)
            lora_dx = torch.where(keep, lora_dx / (1.0 - dropout_p), torch.zeros((), dtype=acc, device=x.device))
        dx = (dyf @ weight.to(acc) + lora_dx).to(x.dtype)
    dw = (dyf.t() @ xf).to(weight.dtype) if needs_dweight else None
    dbias = dyf.sum(0) if needs_dbias else None
    return dx, d_a, d_b, dw, dbias
