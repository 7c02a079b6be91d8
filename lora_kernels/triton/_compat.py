"""Compatibility of the Triton CPU interpreter across the triton versions this package supports (3.6 to 3.9).

Loop bounds. Inside an interpreted kernel every scalar (a kernel argument, ``tl.program_id``, ``tl.cdiv(K, B)``) is a
1-element numpy array of shape ``(1,)``, and a loop ``for t in range(lo, hi)`` converts its bounds to Python ints
through ``tensor.__index__``. triton 3.6's interpreter implements that as ``int(self.handle.data)``; numpy 2.4
turned "convert an array with ndim > 0 to a scalar" from a DeprecationWarning into a ``TypeError`` ("only
0-dimensional arrays can be converted to Python scalars"), so under triton 3.6 + numpy >= 2.4 EVERY loop whose bound
is a runtime value fails in the interpreter (not only bounds computed with ``tl.minimum``). triton 3.9 squeezes the
array first. No rewrite of a kernel's loop avoids this (all interpreter scalars are shape-(1,) arrays, so any runtime
bound goes through ``__index__``), and making bounds ``tl.constexpr`` would recompile the GPU kernels for every
shape. So the fix lives here, in the interpreter only: :func:`patch_interpreter` makes the interpreter's
``__index__`` squeeze the array, as triton 3.9 does. Compiled GPU code is untouched (nothing here runs when
``TRITON_INTERPRET`` is off) and results are unchanged (the same integer comes out).

The patch is applied only when it is needed, i.e. when the installed interpreter still uses the un-squeezed
conversion AND the installed numpy rejects it; otherwise nothing is changed.
"""

from __future__ import annotations

import inspect

from .. import _backend

_PATCHED = False


def _numpy_rejects_1d_to_int() -> bool:
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int32))
    except TypeError:
        return True
    return False


def patch_interpreter() -> None:
    """Make the interpreter's ``tensor.__index__`` accept the shape-(1,) scalars of triton < 3.7 under numpy >= 2.4.

    Idempotent; a no-op outside the interpreter, on triton versions that already squeeze, and on older numpy."""
    global _PATCHED
    if _PATCHED or not _backend.interpreter_enabled():
        return
    _PATCHED = True
    try:
        from triton.runtime import interpreter as interp
    except ImportError:  # pragma: no cover - triton without the interpreter module
        return
    original = getattr(interp, "_patch_lang_tensor", None)
    if original is None:
        return
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):  # pragma: no cover - no source shipped
        return
    # triton 3.6: `lambda self: int(self.handle.data)`; 3.9: `int(self.handle.data.squeeze())`.
    if "int(self.handle.data)" not in source or not _numpy_rejects_1d_to_int():
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # Registered through the same scope after the original: the interpreter restores both in reverse order when
        # the kernel returns, so the class ends up as it was.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interp._patch_lang_tensor = _patch_lang_tensor
