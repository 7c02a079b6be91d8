"""The former name of :mod:`lora_kernels.adapter_files` (PEFT-format adapter files), kept so that old imports work."""

from . import adapter_files as _adapter_files
from .adapter_files import (
    ADAPTER_DTYPES,
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    adapter_key,
    check_config,
    exact_pattern_key,
    load_adapter,
    pattern_matches,
    pattern_value,
    read_config,
    read_raw_config,
    read_tensors,
    save_adapter,
    tensors_by_module,
)

__all__ = [
    "ADAPTER_DTYPES",
    "CONFIG_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "adapter_key",
    "check_config",
    "exact_pattern_key",
    "load_adapter",
    "pattern_matches",
    "pattern_value",
    "read_config",
    "read_raw_config",
    "read_tensors",
    "save_adapter",
    "tensors_by_module",
]


def __getattr__(name):
    # Every other name of the module (helpers that code written before the rename may use) comes from there too.
    return getattr(_adapter_files, name)
