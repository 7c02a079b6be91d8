"""Which backend serves a call: ``"auto" | "triton" | "cuda" | "torch"``, from the call's ``backend=``, else
``$LORA_KERNELS_BACKEND``, else ``"auto"``. Each op file declares one :class:`BackendTable` (per backend a checker,
None = can serve, else a reason, and a loader called on first use); when none can serve, one ``BackendError`` lists
every backend's reason. Nothing here touches a device at import. See docs/README.md ("Conventions").
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
ENV_VAR = "LORA_KERNELS_BACKEND"

Checker = Callable[..., str | None]


class BackendError(RuntimeError):
    """No backend can serve a call; the message lists each backend's reason."""


def requested_backend(backend: str | None) -> str:
    """The backend name a call asked for: the argument, else ``$LORA_KERNELS_BACKEND``, else ``"auto"``."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(
            f"backend must be a str ({', '.join(BACKENDS)}) or None, got {type(backend).__name__} {backend!r}"
        )
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = str(name).strip().lower()
    if name not in BACKENDS:
        source = "backend" if backend is not None else f"${ENV_VAR}"
        raise ValueError(f"{source}={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def triton_importable() -> str | None:
    """None when triton can be imported, else why not. Cached: importing is slow and the answer never changes."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs only
        return f"importing triton failed: {exc}"
    return None


def triton_device_reason(*tensors: torch.Tensor | None) -> str | None:
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
    backend: str | None,
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


# ------------------------------------------------------------------------------------------------- backend tables
def torch_reason(*tensors: torch.Tensor | None) -> str | None:
    """Checker of the PyTorch reference: it serves every input the op accepts."""
    return None


def triton_reason(*tensors: torch.Tensor | None) -> str | None:
    """Checker of the Triton kernels: :func:`triton_device_reason`, and no float64 tensor (the kernels have no
    float64 path; the reference has)."""
    why = triton_device_reason(*tensors)
    if why:
        return why
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return "float64 is not supported by the Triton kernels"
    return None


@dataclasses.dataclass(frozen=True)
class BackendTable:
    """The backends of one op file, declared once.

    ``name``: the op named in errors (a call may name another, see :meth:`resolve`). ``checks``: backend → checker,
    called with the call's tensors (the first one decides the device); a backend missing here is "not implemented".
    ``loaders``: backend → function returning its implementation, called on first use only, so importing the package
    loads neither triton nor the extension. ``auto_on_cuda``: the order ``"auto"`` tries for CUDA inputs; for inputs
    elsewhere ``"auto"`` is the reference (the Triton interpreter is for tests, never a default)."""

    name: str
    checks: dict[str, Checker]
    loaders: Mapping[str, Callable[[], Any]]
    auto_on_cuda: tuple[str, ...]

    def auto_order(self, x: torch.Tensor) -> tuple[str, ...]:
        return self.auto_on_cuda if x.device.type == "cuda" else ("torch",)

    def resolve(
        self, backend: str | None, x: torch.Tensor, *tensors: torch.Tensor | None, op: str | None = None
    ) -> str:
        """The backend that serves this call (see :func:`select`); ``op`` names the op in the error (default
        ``name``)."""
        return select(op or self.name, backend, self.checks, self.auto_order(x), x, *tensors)

    def impl(self, backend: str) -> Any:
        """The implementation of a backend :meth:`resolve` returned."""
        return self.loaders[backend]()
