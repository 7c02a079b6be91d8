"""lora_kernels: fused LoRA kernels for PyTorch.

Importing the package queries no device and builds nothing; Triton and the CUDA extension load on first use.
"""

from .ops.lora_linear import lora_linear
from .modules import LoRALinear, inject_lora, load_lora_state_dict, lora_layers, lora_scaling, lora_state_dict
from ._backend import BackendError
from .init import lora_ga_init, pissa_init
from .io import load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "LoRALinear",
    "inject_lora",
    "load_lora_state_dict",
    "lora_layers",
    "lora_linear",
    "lora_scaling",
    "lora_state_dict",
    "lora_ga_init",
    "pissa_init",
    "save_adapter",
    "load_adapter",
]
