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
