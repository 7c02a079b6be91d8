"""PEFT compatibility: convert PEFT LoRA layers to lora_kernels layers and back (``from_peft``, ``to_peft``,
``set_adapter``), keep PEFT's mixed batch and ``disable_adapter`` working on a converted ``PeftModel``, and serve PEFT
adapter directories by name through the multi-adapter kernels (``load_adapters``, ``adapter_names=[...]``).

Only exact conversions: anything else stays a PEFT layer, with one warning naming it. Importing this package loads
neither peft nor transformers. See docs/peft.md.
"""

from .common import PeftConversionWarning
from .convert import from_peft, set_adapter, to_peft, unsupported_peft_layers
from .layer import PeftLoRALinear
from .serving import load_adapters

__all__ = [
    "PeftConversionWarning",
    "PeftLoRALinear",
    "from_peft",
    "load_adapters",
    "to_peft",
    "set_adapter",
    "unsupported_peft_layers",
]
