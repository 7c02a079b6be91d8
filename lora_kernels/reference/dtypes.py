"""The accumulation-dtype rule every reference function follows, and the checks of its ``acc_dtype`` / ``out_dtype``
keywords.

By default a reference computes in float32, which is what the kernels' accumulators hold, and in float64 when an input
is float64 (so a float64 call is a float64 computation end to end). ``acc_dtype=torch.float64`` asks for float64
arithmetic whatever the inputs: the oracle that tests and benchmarks compare every backend with.
``acc_dtype=torch.float16`` / ``torch.bfloat16`` is the plain same-precision PyTorch computation (every product
rounded to that dtype): the baseline the half-precision kernels' error is measured against, never a backend's path.
"""

from __future__ import annotations

import torch

ACC_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(*tensors: torch.Tensor, acc_dtype: torch.dtype | None = None) -> torch.dtype:
    """``acc_dtype`` when given (one of ``ACC_DTYPES``, else ValueError), otherwise float64 if any of ``tensors`` is
    float64 and float32 if none is."""
    if acc_dtype is None:
        return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if acc_dtype not in ACC_DTYPES:
        raise ValueError(f"acc_dtype must be one of {', '.join(map(str, ACC_DTYPES))} or None, got {acc_dtype!r}")
    return acc_dtype


def check_out_dtype(out_dtype: torch.dtype | None) -> None:
    """ValueError unless ``out_dtype`` is None or a floating-point dtype."""
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"out_dtype must be a floating-point torch.dtype or None, got {out_dtype!r}")
