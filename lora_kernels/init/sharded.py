"""LoRA-GA on ``LoRALinear`` layers already in the model: re-initialised in place, whole or sharded by FSDP2.

``lora_ga_init`` comes here when the model is sharded or ``target_modules`` selects injected layers. The steps
(:func:`check_reinit`, :func:`estimate_row_gradients`, :func:`decompose_rows`, :func:`install_factors`) are
collective on a sharded model: every rank calls them, and a refusal is agreed on before the first collective.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import distributed
from .._numerics import check_alpha, check_dropout, lora_scaling
from ..modules import LoRALinear, lora_layers
from ..targets import check_target_modules, no_match_error
from .dist_svd import LOCAL, sharded_randomized_svd
from .ga_common import (
    DEFAULT_TARGETS,
    all_reduce_sum,
    check_ga_args,
    dist_group,
    estimation_state,
    make_progress,
    resolve_targets,
    run_batches,
    select_targets,
    total_batches,
)
from .ga_factors import direction_indices, stable_scale
from .pissa import record_initial_adapter

Layers = "OrderedDict[str, LoRALinear]"


def targeted_layers(model: nn.Module, target_modules) -> Layers:
    """The model's LoRALinear layers that ``target_modules`` selects (PEFT's rules, as ``resolve_targets``)."""
    layers = lora_layers(model)
    return OrderedDict((n, layers[n]) for n in select_targets(model, layers, target_modules))


def lora_ga_reinit_applies(model, target_modules) -> bool:
    """Whether ``lora_ga_init`` re-initialises existing LoRALinear layers (this module) rather than replacing
    ``nn.Linear`` layers: the model is sharded, or ``target_modules`` selects LoRALinear layers."""
    if distributed.bypassed() or not isinstance(model, nn.Module):
        return False
    if distributed.is_sharded(model):
        return True
    try:
        return bool(targeted_layers(model, target_modules))
    except (TypeError, ValueError, re.error):
        return False  # the single-process path reports the bad target_modules


# ------------------------------------------------------------------------------------------------------ 0. checks
def _check_layer(n: str, layer: LoRALinear, r: int) -> None:
    if layer.r != r:
        raise ValueError(f"{n} has r={layer.r}; re-initialising an injected layer keeps its rank, pass r={layer.r}")
    if 2 * r > min(layer.out_features, layer.in_features):
        raise ValueError(
            f"LoRA-GA needs 2r = {2 * r} ≤ min(out, in) for every target; {n} has weight "
            f"{(layer.out_features, layer.in_features)}"
        )
    if layer.merged:
        raise ValueError(f"{n} is merged; unmerge() it before re-initialising its adapter")
    distributed.check_row_sharded_or_whole(layer.weight, f"{n}.weight")
    for a in ("lora_A", "lora_B"):
        distributed.check_placement(getattr(layer, a), f"{n}.{a}")
    W, A, B = layer.weight, layer.lora_A, layer.lora_B
    if (
        distributed.is_dtensor(W)
        and distributed.is_dtensor(A)
        and not any(type(p).__name__ == "Shard" for p in A.placements)
    ):
        # A replicated A next to a row-sharded W0 is the colwise tensor-parallel layout: the ranks see the same
        # batch, so the per-rank gradients must not be summed as FSDP2's data-parallel ones are.
        raise ValueError(
            f"{n}: LoRA-GA on tensor-parallel layers is not supported (FSDP2-sharded or whole "
            f"layers only); run it before parallelize_module"
        )
    if (
        distributed.is_dtensor(W)
        and not distributed.is_dtensor(B)
        and distributed.local_slices(B)[0] != distributed.local_slices(W)[0]
    ):
        raise ValueError(f"{n}: lora_B and weight must be sharded alike")


def check_reinit(
    model,
    batches,
    loss_fn,
    r,
    alpha,
    target_modules,
    direction,
    stable_gamma,
    use_rslora,
    num_batches,
    dtype,
    niter,
    dropout,
    grad_buffer,
    train_mode=None,
) -> tuple[Layers, float, float]:
    """Every argument check of the re-init path, on this rank only; returns (the target layers, alpha, dropout)."""
    check_ga_args(model, batches, loss_fn, r, direction, stable_gamma, num_batches, train_mode, grad_buffer, dtype)
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"niter must be a non-negative int, got {niter!r}")
    alpha, dropout = check_alpha(alpha), check_dropout(dropout)
    target_modules = check_target_modules(target_modules, allow_all_linear=True)
    layers = targeted_layers(model, target_modules)
    if not layers:
        raise no_match_error(
            target_modules,
            list(lora_layers(model)),
            "LoRALinear layer of the sharded model",
            " (inject_lora before sharding; lora_ga_init then re-initialises those layers)",
        )
    try:
        plain = resolve_targets(model, target_modules)
    except ValueError:
        plain = []
    if plain:
        raise ValueError(
            f"target_modules selects LoRALinear layers and plain nn.Linear layers ({', '.join(plain[:5])}"
            f"{' ...' if len(plain) > 5 else ''}); re-initialising injected layers and replacing plain "
            f"ones are separate calls: inject_lora those first, or narrow target_modules"
        )
    seen: dict[int, str] = {}
    for n, layer in layers.items():
        _check_layer(n, layer, r)
        if id(layer) in seen:
            raise ValueError(f"{n} and {seen[id(layer)]} are one layer; LoRA-GA needs distinct weights")
        seen[id(layer)] = n
    return layers, alpha, dropout


# ------------------------------------------------------------------------------------------ 1. gradient estimate
def _gradient_hook(layer: LoRALinear, name: str, buffer: torch.Tensor, rows: slice):
    """A forward hook on ``layer`` adding W0's gradient ``dYᵀ·X`` of every backward into ``buffer`` (this rank's
    ``rows`` of it when W0 is row-sharded: the layer's gradient is summed over the ranks' data first)."""
    sharded, group = distributed.is_dtensor(layer.weight), distributed.group_of(layer.weight)

    def on_grad(dy, x):
        G = dy.reshape(-1, dy.shape[-1]).float().transpose(0, 1) @ x.reshape(-1, x.shape[-1]).float()
        if sharded:  # this layer's gradient summed over the ranks' data; keep this rank's rows
            dist.all_reduce(G, group=group)
            G = G[rows]
        buffer.add_(G.to(buffer.device))
        return None

    def on_forward(module, args, out):
        if not torch.is_grad_enabled():
            return
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            raise RuntimeError(
                f"lora_ga_init: the output of {name} does not require grad; the adapters must "
                f"require grad while the gradient is estimated"
            )
        x = args[0].detach()
        out.register_hook(lambda dy: on_grad(dy, x))

    return layer.register_forward_hook(on_forward)


def estimate_row_gradients(
    model: nn.Module, layers: Layers, batches, loss_fn, num_batches, train_mode, grad_buffer: str, process_group, report
) -> dict[str, torch.Tensor]:
    """The average gradient of the loss w.r.t. each layer's W0 over the batches of every rank: fp32, this rank's
    rows of it for a row-sharded W0 (whole otherwise). W0 needs no ``requires_grad`` (hooks on the layer's input and
    output); ``.grad`` of every parameter and every module's training mode are restored, also on error."""
    buffers: dict[str, torch.Tensor] = {}
    try:
        with estimation_state(model, train_mode) as hooks:
            for n, layer in layers.items():
                rows = distributed.local_slices(layer.weight)[0]
                where = distributed.local(layer.weight).device if grad_buffer == "device" else torch.device("cpu")
                buffers[n] = torch.zeros(rows.stop - rows.start, layer.in_features, dtype=torch.float32, device=where)
                hooks.append(_gradient_hook(layer, n, buffers[n], rows))
            n_local = run_batches(model, batches, loss_fn, num_batches, report, what="layer")
    finally:
        distributed.reshard(model)
    total = total_batches(n_local, process_group)
    _, world = dist_group(process_group)
    for n, layer in layers.items():
        if not distributed.is_dtensor(layer.weight) and world > 1:  # data parallel, whole weights: one sum
            buffers[n] = all_reduce_sum(buffers[n], process_group, distributed.local(layer.weight))
        buffers[n] = buffers[n] / total
    bad = [n for n, b in buffers.items() if not bool(torch.isfinite(b).all())]
    distributed.agree(
        ValueError(
            f"lora_ga_init: the estimated gradient of {bad} contains inf or NaN (check loss_fn "
            f"and the batches); the model was not changed"
        )
        if bad
        else None
    )
    return buffers


# ------------------------------------------------------------------------------------------------ 2. decompose
def decompose_rows(
    layers: Layers,
    grads: dict[str, torch.Tensor],
    r: int,
    direction: str,
    stable_gamma: float,
    niter: int,
    seed: int,
    report,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA-GA's whole ``(A, B)`` per layer from the (row blocks of the) averaged gradients, layer by layer, with
    :func:`~lora_kernels.init.dist_svd.sharded_randomized_svd` (collective for a row-sharded W0); ``grads`` are
    released as they are used."""
    gen = torch.Generator().manual_seed(int(seed))
    factors = OrderedDict()
    for i, (n, layer) in enumerate(layers.items()):
        W = layer.weight
        m, k = layer.out_features, layer.in_features
        idx_a, idx_b = direction_indices(r, direction, gen)
        G = grads[n].to(distributed.local(W).device)
        group = distributed.group_of(W) if distributed.is_dtensor(W) else LOCAL
        U_rows, _, Vh = sharded_randomized_svd(G, min(4 * r, min(m, k)), niter, gen, group)
        c = stable_scale(m, stable_gamma)
        A = Vh[idx_a.to(Vh.device)] * c
        B = torch.zeros(m, r, dtype=A.dtype, device=A.device)
        B[distributed.local_slices(W)[0]] = U_rows[:, idx_b.to(Vh.device)] * c
        if distributed.is_dtensor(W):
            dist.all_reduce(B, group=group)  # B is small (m×r): every rank gets all rows
        factors[n] = (A, B)
        grads[n] = None
        del G, U_rows
        report("layer", i + 1, len(layers), n)
    return factors


# -------------------------------------------------------------------------------------------------- 3. install
@torch.no_grad()
def install_factors(
    layers: Layers,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    r: int,
    alpha: float,
    use_rslora: bool,
    dropout: float,
) -> None:
    """Write each layer's own blocks of ``A`` and ``B``, set its ``alpha``, ``use_rslora``, ``dropout`` and scaling
    ρ, write ``W0 ← W0 − ρ·B·A`` on its block of W0 and record the initial adapter. No communication."""
    for n, layer in layers.items():
        A, B = factors[n]
        A = A.to(layer.lora_A.dtype)
        B = B.to(layer.lora_B.dtype)
        distributed.local(layer.lora_A).copy_(A[distributed.local_slices(layer.lora_A)])
        distributed.local(layer.lora_B).copy_(B[distributed.local_slices(layer.lora_B)])
        layer.alpha, layer.use_rslora, layer.dropout = alpha, bool(use_rslora), dropout
        layer.scaling = lora_scaling(r, alpha, bool(use_rslora))
        rows, cols = distributed.local_slices(layer.weight)
        w = distributed.local(layer.weight)
        w.copy_((w.float() - layer.scaling * (B[rows].float() @ A[:, cols].float())).to(w.dtype))
        record_initial_adapter(layer, A, B)


def lora_ga_reinit(
    model,
    batches,
    loss_fn=None,
    r=8,
    alpha=16,
    target_modules=None,
    direction="ArB2r",
    stable_gamma=16,
    use_rslora=True,
    num_batches=None,
    dtype=torch.float32,
    *,
    niter=4,
    seed=0,
    dropout=0.0,
    backend=None,
    grad_buffer="cpu",
    train_mode=None,
    freeze_base=True,
    process_group=None,
    progress=None,
    svd_chunk_bytes=None,
) -> Layers:
    """``lora_ga_init`` on LoRALinear layers that are already in the model, sharded by FSDP2 or not.

    Same recipe, data handling and results as ``lora_ga_init`` (see ``lora_kernels/init/lora_ga.py``) with these
    differences, which make it work when the model only fits sharded:

    * the layers are re-initialised in place (``r`` must be theirs; ``alpha``, ``use_rslora`` and ``dropout`` are set
      on them; their adapter keeps its dtype and backend, so ``dtype`` and ``backend`` do not apply);
    * W0's gradient is ``dYᵀ·X`` taken from each layer's input and output gradient (hooks), so W0 needs no
      ``requires_grad`` and FSDP2 forms no gradient for it. For a row-sharded W0 every backward sums that one
      layer's gradient over the ranks and keeps this rank's rows only: the accumulators are row blocks, and at most
      one layer's whole gradient exists at a time (with FSDP2 every rank must run the same number of batches, as
      FSDP's own collectives require). A whole (unsharded) W0 is accumulated locally and summed over
      ``process_group`` once at the end, as in ``lora_ga_init`` (ranks may then have different numbers of batches);
    * the SVD is :func:`~lora_kernels.init.dist_svd.sharded_randomized_svd` on the row blocks (whole W0: one block),
      with its canonical signs, so the factors do not depend on the world size; every rank ends with the same A and
      its own rows of B and of the new W0 = W0 − ρ·B·A.

    ``svd_chunk_bytes`` is accepted for signature compatibility (layers are decomposed one at a time).
    """
    target_modules = DEFAULT_TARGETS if target_modules is None else target_modules
    found = {}

    def checks():
        found["v"] = check_reinit(
            model,
            batches,
            loss_fn,
            r,
            alpha,
            target_modules,
            direction,
            stable_gamma,
            use_rslora,
            num_batches,
            dtype,
            niter,
            dropout,
            grad_buffer,
            train_mode,
        )

    distributed.agree(distributed.capture_error(checks), "the model was not changed")
    layers, alpha, dropout = found["v"]
    distributed.reshard(model)
    report = make_progress(progress)
    grads = estimate_row_gradients(
        model, layers, batches, loss_fn, num_batches, train_mode, grad_buffer, process_group, report
    )
    factors = decompose_rows(layers, grads, r, direction, float(stable_gamma), niter, seed, report)
    install_factors(layers, factors, r, alpha, use_rslora, dropout)
    if freeze_base:
        keep = {id(p) for layer in layers.values() for p in (layer.lora_A, layer.lora_B)}
        keep |= {
            id(p) for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B) if p.requires_grad
        }
        for p in model.parameters():
            if id(p) not in keep and p.requires_grad:
                p.requires_grad_(False)
    return OrderedDict(layers)
