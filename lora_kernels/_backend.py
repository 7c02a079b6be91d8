"""Which backend serves a call.

Backends are named ``"auto" | "triton" | "cuda" | "torch"``. A call may name one; otherwise the environment variable
``LORA_KERNELS_BACKEND`` (same names) is used, and failing that ``"auto"``. Each op supplies, per backend, a function
that returns ``None`` when the backend can serve these inputs or a short reason when it cannot. When the named backend
cannot serve, or ``"auto"`` finds none, one error lists every backend with its reason.

Nothing here touches a device at import time.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable, Mapping, Optional, Sequence

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
ENV_VAR = "LORA_KERNELS_BACKEND"

Checker = Callable[..., Optional[str]]


class BackendError(RuntimeError):
    """No backend can serve a call; the message lists each backend's reason."""


def requested_backend(backend: Optional[str]) -> str:
    """The backend name a call asked for: the argument, else ``$LORA_KERNELS_BACKEND``, else ``"auto"``."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str ({', '.join(BACKENDS)}) or None, got {type(backend).__name__} "
                        f"{backend!r}")
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = str(name).strip().lower()
    if name not in BACKENDS:
        source = "backend" if backend is not None else f"${ENV_VAR}"
        raise ValueError(f"{source}={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def triton_importable() -> Optional[str]:
    """None when triton can be imported, else why not. Cached: importing is slow and the answer never changes."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs only
        return f"importing triton failed: {exc}"
    return None


def triton_device_reason(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """Common Triton check: importable, and every tensor on CUDA (or on the CPU with the interpreter on)."""
    why = triton_importable()
    if why:
        return why
    devices = {t.device.type for t in tensors if t is not None}
    if devices <= {"cuda"}:
        return None
    if devices <= {"cpu"}:
        if interpreter_enabled():
            return None
        return "tensors are on the CPU and TRITON_INTERPRET is not 1"
    return f"tensors are on {sorted(devices)}; triton needs CUDA (or the CPU with TRITON_INTERPRET=1)"


def select(
    op: str,
    backend: Optional[str],
    checks: Mapping[str, Checker],
    auto_order: Sequence[str],
    *args,
    **kwargs,
) -> str:
    """Pick the backend for ``op``.

    ``checks`` maps backend name to a checker called with ``*args, **kwargs``; a backend missing from ``checks`` is
    reported as "not implemented for this op". ``auto_order`` is the preference list for ``"auto"``.
    """
    name = requested_backend(backend)
    candidates = list(auto_order) if name == "auto" else [name]
    reasons = {}
    for cand in candidates:
        check = checks.get(cand)
        if check is None:
            reasons[cand] = f"not implemented for {op}"
            continue
        why = check(*args, **kwargs)
        if why is None:
            return cand
        reasons[cand] = why
    if name == "auto":
        for other in BACKENDS[1:]:
            reasons.setdefault(other, "not considered by 'auto' for these inputs")
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise BackendError(f"{op}: no backend can serve this call (asked for {name!r}). {detail}")
