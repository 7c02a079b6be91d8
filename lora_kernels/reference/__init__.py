"""Pure PyTorch references: the spec for every kernel, imported by tests, benchmarks and the CPU fallback.

Every function takes ``acc_dtype=`` (float32 by default, float64 for float64 inputs); with ``acc_dtype=torch.float64``
(and ``out_dtype=torch.float64`` where the function has one) it is the float64 oracle the kernels are tested against.
"""

from . import multi_lora  # noqa: F401 (lora_kernels.reference.multi_lora is part of this package's API)
from .dropout import apply_dropout, dropout_keep_mask, dropout_threshold, dropout_words, philox_4x32, philox_randint
from .lora_linear import lora_linear_backward, lora_linear_forward

__all__ = [
    "apply_dropout",
    "dropout_keep_mask",
    "dropout_threshold",
    "dropout_words",
    "philox_4x32",
    "philox_randint",
    "lora_linear_backward",
    "lora_linear_forward",
]
