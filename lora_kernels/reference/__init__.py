"""Pure PyTorch references: the spec for every kernel, imported by tests, benchmarks and the CPU fallback."""

from .dropout import apply_dropout, dropout_keep_mask, dropout_threshold, philox_randint
from .lora_linear import lora_linear_backward, lora_linear_forward
from . import multi_lora

__all__ = [
    "apply_dropout",
    "dropout_keep_mask",
    "dropout_threshold",
    "philox_randint",
    "lora_linear_backward",
    "lora_linear_forward",
]
