"""PiSSA initialisation (Meng, Wang, Zhang 2024, arXiv 2404.02948), with PEFT's conventions.

With ``W0 = U·diag(S)·Vh`` and s the layer's scaling: ``A = diag(√(S_r/s))·Vh[:r]``, ``B = U[:, :r]·diag(√(S_r/s))``,
so ``s·B·A`` is the best rank-r approximation of W0, and ``W0 ← W0 − s·B·A`` (the residual, in fp32, cast back) keeps
the layer's output unchanged up to W0's rounding. The layer records its initial adapter so that
:func:`lora_kernels.save_adapter` can write PEFT's rank-2r form against the original W0.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .svd import autocast_off, randomized_svd

INIT_RECORD = "_lk_init_adapter"  # attribute of a LoRALinear whose W0 an init changed: (A0, B0) fp32 on the CPU


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: Optional[int] = None,
                  generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's ``(A [r, in], B [out, r])`` for ``weight`` in float32, without writing anything: ``scaling·B·A`` is
    the best rank-r approximation of ``weight``. ValueError when r > min(out, in) or scaling ≤ 0."""
    out_f, in_f = weight.shape
    if r > min(out_f, in_f):
        raise ValueError(f"pissa_init: r={r} exceeds min(out, in) = {min(out_f, in_f)} of weight {tuple(weight.shape)}")
    s = float(scaling)
    if s <= 0:
        raise ValueError(f"pissa_init needs a positive scaling, got {s}")
    with torch.no_grad(), autocast_off(weight):
        W32 = weight.detach().float()
        if niter is None:
            U, S, Vh = torch.linalg.svd(W32, full_matrices=False)
        else:
            U, S, Vh = randomized_svd(W32, q=min(4 * r, min(out_f, in_f)), niter=int(niter), generator=generator)
        root = torch.sqrt(S[:r] / s)
        return root[:, None] * Vh[:r], U[:, :r] * root[None, :]


@torch.no_grad()
def apply_pissa(layer, A: torch.Tensor, B: torch.Tensor) -> None:
    """Write factors from :func:`pissa_factors` into ``layer`` and replace its weight by the residual."""
    W = layer.weight
    layer.lora_A.copy_(A)
    layer.lora_B.copy_(B)
    # Subtract with the adapter as stored (possibly rounded to lora dtype) so that W_res + s·B·A == W0 to W's rounding.
    with autocast_off(W):
        residual = W.detach().float() - float(layer.scaling) * (layer.lora_B.float() @ layer.lora_A.float())
    W.copy_(residual.to(W.dtype))
    setattr(layer, INIT_RECORD, (layer.lora_A.detach().float().cpu().clone(), layer.lora_B.detach().float().cpu().clone()))


@torch.no_grad()
def pissa_init(layer, niter: Optional[int] = None, generator: Optional[torch.Generator] = None) -> None:
    """Set ``layer.lora_A``/``lora_B`` to W0's principal directions and replace ``layer.weight`` by the residual.

    ``niter=None`` uses an exact ``torch.linalg.svd`` (PEFT's ``"pissa"``); an int uses a randomized SVD with that
    many power iterations (PEFT's ``"pissa_niter_<k>"``), much faster for large layers. Refused (nothing changed)
    for a merged layer, a layer whose weight is tied to another parameter, and a layer whose weight an init
    (PiSSA, LoRA-GA) already replaced by a residual: a second PiSSA would take the residual for W0, change the
    layer's output and lose the record that saving against the original W0 needs.
    """
    from .. import distributed  # W0 sharded by rows (FSDP2): the SVD runs on the row shards
    if distributed.is_sharded_layer(layer):
        return distributed.pissa_init_layer(layer, niter, generator)
    for attr in ("weight", "lora_A", "lora_B", "r", "scaling"):
        if not hasattr(layer, attr):
            raise TypeError(f"pissa_init needs a LoRALinear-like layer; {type(layer).__name__} has no {attr!r}")
    if getattr(layer, "merged", False):
        # The weight holds W0 + s·B·A and unmerge() would restore the old W0 over the residual written here.
        raise RuntimeError("pissa_init: the layer is merged; unmerge() it first")
    if getattr(layer, INIT_RECORD, None) is not None:
        raise ValueError(
            "pissa_init: this layer's base weight was already replaced by a residual (a PiSSA or LoRA-GA init); a "
            "second init would treat the residual as W0, change the layer's output and break adapters saved "
            "against the original weight. Start from the original layer instead; nothing was changed"
        )
    check = getattr(layer, "check_untied", None)
    if check is not None:
        check("PiSSA init")
    A, B = pissa_factors(layer.weight, int(layer.r), float(layer.scaling), niter, generator)
    apply_pissa(layer, A, B)
