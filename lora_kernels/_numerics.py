"""Small numeric rules shared by the layers, the inits and the distributed helpers."""

from __future__ import annotations

import math
import numbers

import torch


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
