"""Old name of :mod:`lora_kernels.peft` (re-exports its public names)."""

import importlib

from .multi_modules import MultiLoRALinear
from .peft import (  # noqa: F401
    PeftConversionWarning,
    PeftLoRALinear,
    __all__,
    from_peft,
    load_adapters,
    set_adapter,
    to_peft,
    unsupported_peft_layers,
)
from .peft.common import BASE  # noqa: F401

# A model saved whole (torch.save) before the split names its hooks, patches and layer classes by this module's
# path; unpickling looks them up here and finds them in their new modules.
_MOVED = {
    "_Adapter": "layer",
    "_EnableAdapterLayers": "patches",
    "_DisableAdapter": "patches",
    "_MixedBatchHooks": "patches",
    "_mixed_names_pre_hook": "patches",
    "_Serving": "serving",
    "_ServingGenerate": "serving",
    "_serving_pre_hook": "serving",
    "_serving_post_hook": "serving",
}


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(importlib.import_module(f"{__package__}.peft.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _MultiLoRAConv1D(MultiLoRALinear):
    """A served Conv1D layer as a model saved whole before ``MultiLoRALinear(weight_layout="in_out")`` pickled it;
    unpickling only (no such layer is built any more)."""

    weight_layout = "in_out"
