"""Small numeric rules shared by the layers, the inits and the distributed helpers."""

from __future__ import annotations

import math
import numbers

import torch

from ._autocast import autocast_off


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: α/r, or α/√r with rsLoRA."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def real_number(name: str, value) -> float:
    """``value`` as a float, or TypeError naming the argument (a str such as "16" is refused, not parsed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that products of ``dtype`` tensors are accumulated in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_alpha(alpha) -> float:
    """``alpha`` as a finite float (TypeError for a non-number, ValueError for inf or NaN)."""
    alpha = real_number("alpha", alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return alpha


def check_dropout(dropout) -> float:
    """``dropout`` as a float in [0, 1) (TypeError for a non-number, ValueError outside the range)."""
    dropout = real_number("dropout", dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return dropout


@torch.no_grad()
def merged_weight(w0: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W0 + scaling·B·A``, accumulated in :func:`acc_dtype` with autocast off and rounded once to W0's dtype (also
    for blocks: rows of B and columns of A against their block of W0). ValueError, saying nothing was changed, when
    the result is not finite before or after the rounding."""
    acc = acc_dtype(w0.dtype)
    with autocast_off(w0):
        merged = w0.to(acc) + scaling * (lora_B.to(acc) @ lora_A.to(acc))
    if not torch.isfinite(merged).all():
        raise ValueError("merge refused: the merged weight would contain inf or NaN; nothing was changed")
    merged = merged.to(w0.dtype)
    if not torch.isfinite(merged).all():
        raise ValueError(f"merge refused: the merged weight overflows {w0.dtype}; nothing was changed")
    return merged
