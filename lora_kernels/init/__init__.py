"""Adapter initialisations that need more than a random draw.

``pissa_init(layer)``: principal singular directions of W0 (PiSSA), W0 replaced by its residual.
``lora_ga_init(model, batches, ...)``: LoRA-GA, from the gradient of the loss (official recipe, see lora_ga.py).
``randomized_svd(G, q, niter)``: ``torch.svd_lowrank`` for a batch of same-shaped matrices.

The simple inits ("default", "gaussian", "zeros") live in ``LoRALinear.reset_lora_parameters``.

Layering: ``svd``, ``dist_svd``, ``pissa``, ``ga_factors`` and ``ga_common`` work on tensors and on layers by their
attributes, and sit below ``lora_kernels.modules`` (which uses PiSSA for ``init="pissa"``); ``lora_ga`` and
``sharded`` build or re-initialise ``LoRALinear`` layers and sit above it, so this package does not import them
(``lora_kernels.init.lora_ga_init`` is set by the package root, for the former import path).
"""

from .ga_factors import DIRECTIONS, lora_ga_factors
from .pissa import pissa_init
from .svd import randomized_svd

__all__ = ["DIRECTIONS", "lora_ga_factors", "pissa_init", "randomized_svd"]
