"""PiSSA initialisation (Meng, Wang, Zhang 2024, arXiv 2404.02948), PEFT's conventions.

``W0 = U·diag(S)·Vh``: ``A = diag(√(S_r/scale))·Vh[:r]``, ``B = U[:, :r]·diag(√(S_r/scale))``, ``W0 ← W0 − scale·B·A``;
the layer records its initial adapter for saving against the original W0. See docs/init.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import distributed
from .dist_svd import sharded_randomized_svd
from .svd import autocast_off, randomized_svd

# The attribute of a layer that holds its initial adapter (A0, B0), fp32 on the CPU, when an init (PiSSA, LoRA-GA)
# replaced its W0 by a residual. LoRALinear declares it (``initial_adapter``) and keeps it in its state dict.
INIT_RECORD = "_lk_init_adapter"


def record_initial_adapter(layer, A: torch.Tensor, B: torch.Tensor) -> None:
    """Remember ``(A, B)`` as ``layer``'s initial adapter: fp32 copies on the CPU, whatever the layer's device and
    dtype, so that saving against the original W0 is exact and costs no accelerator memory."""
    setattr(layer, INIT_RECORD, (A.detach().float().cpu().clone(), B.detach().float().cpu().clone()))


def pissa_factors(
    weight: torch.Tensor, r: int, scaling: float, niter: int | None = None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's ``(A [r, in], B [out, r])`` for ``weight`` in float32, without writing anything: ``scaling·B·A`` is
    the best rank-r approximation of ``weight``. ValueError when r > min(out, in) or scaling ≤ 0."""
    out_f, in_f = weight.shape
    if r > min(out_f, in_f):
        raise ValueError(f"pissa_init: r={r} exceeds min(out, in) = {min(out_f, in_f)} of weight {tuple(weight.shape)}")
    scale = float(scaling)
    if scale <= 0:
        raise ValueError(f"pissa_init needs a positive scaling, got {scale}")
    with torch.no_grad(), autocast_off(weight):
        W32 = weight.detach().float()
        if niter is None:
            U, S, Vh = torch.linalg.svd(W32, full_matrices=False)
        else:
            U, S, Vh = randomized_svd(W32, q=min(4 * r, min(out_f, in_f)), niter=int(niter), generator=generator)
        root = torch.sqrt(S[:r] / scale)
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
    record_initial_adapter(layer, layer.lora_A, layer.lora_B)


@torch.no_grad()
def pissa_init(layer, niter: int | None = None, generator: torch.Generator | None = None) -> None:
    """Set ``layer.lora_A``/``lora_B`` to W0's principal directions and replace ``layer.weight`` by the residual.

    ``niter=None`` uses an exact ``torch.linalg.svd`` (PEFT's ``"pissa"``); an int uses a randomized SVD with that
    many power iterations (PEFT's ``"pissa_niter_<k>"``), much faster for large layers. Refused (nothing changed)
    for a merged layer, a layer whose weight is tied to another parameter, and a layer whose weight an init
    (PiSSA, LoRA-GA) already replaced by a residual: a second PiSSA would take the residual for W0, change the
    layer's output and lose the record that saving against the original W0 needs. A layer whose W0 is sharded by
    rows (FSDP2) goes to :func:`sharded_pissa_init` (collective).
    """
    if distributed.is_sharded_layer(layer):
        return sharded_pissa_init(layer, niter, generator)
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


def _sharded_pissa_checks(layer, niter) -> None:
    if layer.merged:
        raise RuntimeError("pissa_init: the layer is merged; unmerge() it first")
    if niter is None:
        raise ValueError(
            "pissa_init: a sharded layer needs niter (a randomized SVD on the row shards; the "
            "exact SVD would gather the whole weight on one rank)"
        )
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"pissa_init: niter must be a non-negative int, got {niter!r}")
    if layer.r > min(layer.out_features, layer.in_features):
        raise ValueError(f"pissa_init: r={layer.r} exceeds min(out, in) = {min(layer.out_features, layer.in_features)}")
    if float(layer.scaling) <= 0:
        raise ValueError(f"pissa_init needs a positive scaling, got {layer.scaling}")
    distributed.check_row_sharded_or_whole(layer.weight, "weight")
    for a in ("lora_A", "lora_B"):
        distributed.check_placement(getattr(layer, a), a)


@torch.no_grad()
def sharded_pissa_init(layer, niter: int | None = None, generator: torch.Generator | None = None) -> None:
    """``pissa_init`` of a layer whose W0 is sharded by rows (FSDP2): the randomized SVD runs on the row blocks
    (:func:`~lora_kernels.init.dist_svd.sharded_randomized_svd`), every rank writes its own rows of B and of the
    residual W0 and the same A. Collective. An exact SVD (``niter=None``) would need the whole W0 on one rank, so a
    sharded layer needs ``niter`` (PEFT's ``pissa_niter_<k>``)."""
    distributed.agree(
        distributed.capture_error(lambda: _sharded_pissa_checks(layer, niter)), "the layer was not changed"
    )
    r, scale = int(layer.r), float(layer.scaling)
    m, k = layer.out_features, layer.in_features
    W = layer.weight
    rows, cols = distributed.local_slices(W)
    w = distributed.local(W)
    group = distributed.group_of(W)
    U_rows, S, Vh = sharded_randomized_svd(w.detach().float(), min(4 * r, min(m, k)), int(niter), generator, group)
    root = torch.sqrt(S[:r] / scale)
    A = (root[:, None] * Vh[:r]).to(layer.lora_A.dtype)
    B = torch.zeros(m, r, dtype=torch.float32, device=w.device)
    B[rows] = U_rows[:, :r] * root[None, :]
    if distributed.is_dtensor(W):
        dist.all_reduce(B, group=group)
    B = B.to(layer.lora_B.dtype)
    distributed.local(layer.lora_A).copy_(A[distributed.local_slices(layer.lora_A)])
    distributed.local(layer.lora_B).copy_(B[distributed.local_slices(layer.lora_B)])
    w.copy_((w.float() - scale * (B[rows].float() @ A[:, cols].float())).to(w.dtype))
    record_initial_adapter(layer, A, B)
