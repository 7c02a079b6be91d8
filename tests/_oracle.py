"""The float64 oracle of the tests: the PyTorch reference run with ``acc_dtype=torch.float64, out_dtype=torch.float64``
(every input promoted, nothing rounded), with the leading dims the ops accept. It runs where its inputs are: float64
arithmetic is not affected by TF32 or reduced-precision settings on a GPU."""

from __future__ import annotations

import torch

from lora_kernels.reference import lora_linear as _ref_linear

F64 = {"acc_dtype": torch.float64, "out_dtype": torch.float64}


def _d(t):
    return None if t is None else t.detach()


def lora_linear_f64(x, weight, lora_A, lora_B, scale, bias=None, dropout_p=0.0, seed=0) -> torch.Tensor:
    """float64 ``y = x·Wᵀ + scale·(dropout(x)·Aᵀ)·Bᵀ (+ bias)``; ``x [..., K]`` keeps its leading dims."""
    x2 = _d(x).reshape(-1, x.shape[-1])
    y, _ = _ref_linear.lora_linear_forward(x2, _d(weight), _d(lora_A), _d(lora_B), scale, _d(bias), dropout_p, seed,
                                           **F64)
    return y.reshape(*x.shape[:-1], weight.shape[0])

