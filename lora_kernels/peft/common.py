"""What the PEFT modules share: PEFT's names and imports, and its rules for ``adapter_names``.

Imports of ``peft`` and ``transformers`` happen inside the functions, so importing lora_kernels loads neither.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


class PeftConversionWarning(UserWarning):
    """Some PEFT layers were left as they are because lora_kernels cannot run them exactly."""


# ------------------------------------------------------------------------------------------------ PEFT imports
def peft_lora():
    """``peft.tuners.lora.layer`` (ImportError naming the package when PEFT is not installed)."""
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as exc:  # pragma: no cover - peft is an optional dependency
        raise ImportError("lora_kernels.from_peft needs the peft package (pip install peft)") from exc
    return lora_layer


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's projections, weight ``[in, out]``), None when transformers is missing."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or broken: no Conv1D can exist in the model either
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return conv1d is not None and type(module) is conv1d


def check_requires_grad(requires_grad) -> None:
    if requires_grad is not None and not isinstance(requires_grad, bool):  # "no" would be truthy
        raise TypeError(
            f"set_adapter: requires_grad must be True, False or None, got {type(requires_grad).__name__} "
            f"{requires_grad!r}"
        )


# ------------------------------------------------------------------------------------- adapter_names rules
def as_name_list(names) -> list[str]:
    """``adapter_names`` as a list of str, or TypeError (a str is not a list of names)."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(
            f"adapter_names must be a list of str, one per sequence ({BASE!r}: no adapter), got {type(names).__name__}"
        )
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"adapter_names must hold adapter names (str), got {bad[0]!r}")
    return list(names)


def expand_for_beams(names, num_beams) -> list[str]:
    """PEFT's rule for ``generate(..., num_beams=k)``: generate repeats each input k times in place, so each name is
    repeated k times; no other expansion (``num_return_sequences`` without beams gets a length error, as in PEFT)."""
    names = as_name_list(names)
    if isinstance(num_beams, int) and not isinstance(num_beams, bool) and num_beams > 1:
        return [n for n in names for _ in range(num_beams)]
    return names


def check_names_length(names: Sequence[str], rows: int, shape_note: str = "") -> None:
    """One name per sequence, exactly (PEFT raises too): a shorter list is never repeated to fit."""
    if len(names) != rows:
        raise ValueError(
            f"adapter_names has {len(names)} names but the batch has {rows} sequences{shape_note}; give "
            "one name per sequence (generate(num_beams=k) repeats each name k times, as PEFT does)"
        )
