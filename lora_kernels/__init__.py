"""lora_kernels: fused LoRA kernels for PyTorch.

Importing the package queries no device and builds nothing; Triton and the CUDA extension load on first use.
"""

from . import init as _init_package
from . import io  # noqa: F401 (the former name of adapter_files: lora_kernels.io.<name> keeps working)
from ._backend import BackendError
from .adapter_files import load_adapter, save_adapter
from .extension import cuda_ops_available, cuda_ops_unavailable_reason
from .init.lora_ga import lora_ga_init
from .init.pissa import pissa_init
from .modules import LoRALinear, inject_lora, load_lora_state_dict, lora_layers, lora_scaling, lora_state_dict
from .multi_modules import (
    MultiLoRALinear,
    inject_multi_lora,
    load_multi_adapter,
    multi_adapter_slot,
    multi_lora_layers,
    set_batch,
    unload_multi_adapter,
    use_batch,
)
from .ops.lora_linear import lora_linear
from .ops.multi_lora import lora_expand, lora_shrink, multi_lora_linear
from .peft import PeftLoRALinear, from_peft, load_adapters, set_adapter, to_peft
from .pool import AdapterPool, LoRABatch

# lora_ga_init builds LoRALinear layers, so init/__init__.py (below modules.py) cannot import it; the package root,
# which every import of lora_kernels.init runs first, keeps the former path lora_kernels.init.lora_ga_init working.
_init_package.lora_ga_init = lora_ga_init

__version__ = "0.1.0"

__all__ = [
    "AdapterPool",
    "LoRABatch",
    "MultiLoRALinear",
    "inject_multi_lora",
    "load_multi_adapter",
    "lora_expand",
    "lora_shrink",
    "multi_adapter_slot",
    "multi_lora_layers",
    "multi_lora_linear",
    "set_batch",
    "unload_multi_adapter",
    "use_batch",
    "BackendError",
    "cuda_ops_available",
    "cuda_ops_unavailable_reason",
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
    "PeftLoRALinear",
    "from_peft",
    "load_adapters",
    "set_adapter",
    "to_peft",
]
