"""Adapter initialisations that need more than a random draw.

``pissa_init(layer)``: principal singular directions of W0 (PiSSA), W0 replaced by its residual.
``lora_ga_init(model, batches, ...)``: LoRA-GA, from the gradient of the loss (official recipe, see lora_ga.py).
``randomized_svd(G, q, niter)``: ``torch.svd_lowrank`` for a batch of same-shaped matrices.

The simple inits ("default", "gaussian", "zeros") live in ``LoRALinear.reset_lora_parameters``.
"""

from .lora_ga import DIRECTIONS, lora_ga_init, lora_ga_factors
from .pissa import pissa_init
from .svd import randomized_svd

__all__ = ["DIRECTIONS", "lora_ga_factors", "lora_ga_init", "pissa_init", "randomized_svd"]
