"""Input checks shared by the ops: each error names the argument and the shapes involved, and runs before anything
is written."""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Output slices of one multi-adapter layer (a fused projection: q|k|v needs 3, gate|up 2), on every backend. The
# Triton kernels take the slice widths as this many scalar arguments (N0..N3), and the CUDA extension's parameter
# blocks hold this many slices (kMaxSlices in csrc/lora_cuda.h; tests/test_cuda_ext.py checks that they agree).
MAX_SLICES = 4


def shape(t: torch.Tensor | None) -> str:
    return "None" if t is None else f"{tuple(t.shape)}"


def check_tensor(name: str, t, ndim: int | None = None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {shape(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {names}")


def check_scale(name: str, value) -> float:
    """A finite Python float from ``value``. Written so torch.compile can trace it: when a float argument changes
    between calls dynamo makes it symbolic, and ``math.isfinite`` on a symbolic float is a graph break (an error under
    ``fullgraph=True``); ``v - v != 0`` holds exactly for inf and nan and traces as a guard."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            # The ops take the value as a constant (read with .item()): a tensor that asks for a gradient would
            # silently get none. A learnable scale belongs in the adapter (e.g. fold it into lora_B).
            raise ValueError(
                f"{name} is a tensor that requires grad, but {name} is a constant of the op and would "
                f"get no gradient; pass a float or {name}.detach()"
            )
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {shape(value)}")
        value = value.item()
    if not isinstance(value, (int, float)) and isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)  # numpy floats/ints (np.float32 is no subclass of float); np.bool_ is not Real
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if value - value != 0:
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        detail = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device: {detail}")
