"""The former name of :mod:`lora_kernels.extension` (loader and wrappers of the optional CUDA extension), kept so
existing imports keep working. ``lora_kernels.cuda`` *is* that module object: an attribute read or set through either
name is the same attribute."""

import sys

from . import extension

sys.modules[__name__] = extension
