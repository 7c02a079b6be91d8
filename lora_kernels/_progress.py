"""Progress display for long loops (LoRA-GA gradient estimation, benchmark sweeps).

A tqdm bar on stderr when stderr is a terminal, nothing otherwise (logs and CI stay clean). ``LORA_KERNELS_PROGRESS``
forces it: ``1`` always shows the bar, ``0`` never does. Without tqdm installed the loop runs silently.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

PROGRESS_ENV = "LORA_KERNELS_PROGRESS"


def progress_enabled(enabled: bool | None = None) -> bool:
    """Whether to show a bar: ``enabled`` if given, else ``$LORA_KERNELS_PROGRESS``, else "stderr is a terminal"."""
    if enabled is not None:
        return bool(enabled)
    env = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stderr
        return False


def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str | None = None,
    enabled: bool | None = None,
    unit: str = "it",
) -> Iterator[T]:
    """Yield from ``iterable``, showing a progress bar when :func:`progress_enabled` says so."""
    if not progress_enabled(enabled):
        yield from iterable
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield from iterable
        return
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        yield from bar
