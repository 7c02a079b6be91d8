"""Autocast helpers shared by the ops, the modules and the inits.

``torch.amp.is_autocast_available`` is asked once per device type at import (it queries no device): under
``torch.compile`` on torch 2.11 it does not trace, and a ``LoRALinear`` forward asks it on every call.
"""

from __future__ import annotations

import contextlib

import torch

# Device types whose autocast exists in this build ("meta" has none: torch.is_autocast_enabled("meta") raises).
AUTOCAST_DEVICE_TYPES = frozenset(
    d
    for d in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla", "privateuseone")
    if torch.amp.is_autocast_available(d)
)


def autocast_enabled(device_type: str) -> bool:
    """Whether an autocast region is active for ``device_type`` (False where autocast does not exist)."""
    return device_type in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type)


def autocast_off(t: torch.Tensor):
    """A context with autocast disabled on ``t``'s device: for math whose dtypes are fixed (fp32/fp64 merges and
    inits, the ops' real implementations), which inside a user's ``torch.autocast`` block would otherwise run in the
    autocast dtype."""
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if dev in AUTOCAST_DEVICE_TYPES else contextlib.nullcontext()


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype an autocast ``nn.Linear`` computes ``x`` in: the autocast dtype inside ``torch.autocast`` on x's
    device; None outside autocast and for float64 and non-float x, which autocast leaves alone."""
    dev = x.device.type
    if not autocast_enabled(dev) or not x.is_floating_point() or x.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(dev)


def autocast_operands(x, weight, bias, lora_A, lora_B):
    """Inside ``torch.autocast``, the operands an autocast ``nn.Linear`` would use, for the fused LoRA op (which is not
    an autocast-aware ATen op): x, W0 and bias in the autocast dtype; the adapter kept when it is that dtype or float32
    (the usual fp32 master adapter) and cast otherwise. float64 and non-float inputs are left alone, as autocast
    does. The casts are differentiable. Outside autocast, the operands unchanged."""
    dt = autocast_dtype(x)
    if dt is None:
        return x, weight, bias, lora_A, lora_B
    x, weight = x.to(dt), weight.to(dt)
    bias = bias.to(dt) if bias is not None else None
    if lora_A.dtype not in (dt, torch.float32):
        lora_A, lora_B = lora_A.to(dt), lora_B.to(dt)
    return x, weight, bias, lora_A, lora_B
