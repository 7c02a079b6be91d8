"""LoRA-GA initialisation (Wang, Yu, Li, NeurIPS 2024, arXiv 2407.05000), the authors' official recipe
(``scale="stable"``).

Per target: G = mean gradient of the loss w.r.t. W0 (fp32); randomized SVD with canonical signs;
``A = c·Vh[:r]``, ``B = c·U[:, r:2r]``, ``c = d_out^(1/4)/√γ``; ``W0 ← W0 − ρ·B·A``. Not PEFT's ``lora_ga`` variant.
At most one layer's gradient on the accelerator. Recipe, options and why: docs/init.md.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ..modules import LoRALinear
from ..targets import check_replaceable, replace_module, tied_names
from .ga_common import (  # noqa: F401
    DEFAULT_TARGETS,
    SVD_CHUNK_BYTES,
    ProgressFn,
    all_reduce_sum,
    as_loss,
    check_ga_args,
    default_loss,
    dist_group,
    estimation_state,
    make_progress,
    resolve_targets,
    run_batches,
    select_targets,
    total_batches,
)
from .ga_factors import DIRECTIONS, direction_indices, lora_ga_factors  # noqa: F401 (public here)
from .pissa import record_initial_adapter
from .sharded import lora_ga_reinit, lora_ga_reinit_applies
from .svd import autocast_off

Linears = "OrderedDict[str, nn.Linear]"


# ------------------------------------------------------------------------------------------------------ 0. checks
def check_targets(model: nn.Module, target_modules, r: int) -> Linears:
    """The ``nn.Linear`` layers LoRA-GA will replace (name → layer), after every check that needs them: 2r ≤
    min(out, in), floating weights, one weight per layer, layers a LoRALinear can replace, no weight tied to another
    module. Changes nothing."""
    names = resolve_targets(model, target_modules)
    linears: dict[str, nn.Linear] = OrderedDict((n, model.get_submodule(n)) for n in names)
    for n, lin in linears.items():
        if 2 * r > min(lin.weight.shape):
            raise ValueError(
                f"LoRA-GA needs 2r = {2 * r} ≤ min(out, in) for every target; {n} has weight {tuple(lin.weight.shape)}"
            )
        if not lin.weight.is_floating_point():
            raise TypeError(f"{n}.weight is {lin.weight.dtype}; LoRA-GA needs floating-point weights")
    seen = {}
    for n, lin in linears.items():
        if id(lin.weight) in seen:
            raise ValueError(f"{n} and {seen[id(lin.weight)]} share one weight tensor; LoRA-GA needs distinct weights")
        seen[id(lin.weight)] = n
    for n, lin in linears.items():
        check_replaceable(n, lin)  # here, so that the error names the layer
    tied = tied_names(model, list(linears.values()))
    for n, lin in linears.items():
        if id(lin) in tied:
            raise ValueError(
                f"{n}.weight is tied to {', '.join(tied[id(lin)])} (one tensor): LoRA-GA writes W0 − ρ·B·A into it and "
                f"would change those too; untie it first ({n}.weight = nn.Parameter({n}.weight.detach().clone())) "
                f"or leave {n} out of target_modules; nothing was changed"
            )
    return linears


def prepare_layers(
    model: nn.Module, linears: Linears, r: int, alpha, dropout, use_rslora: bool, dtype, backend
) -> OrderedDict[str, LoRALinear]:
    """The new layers (adapters zero, not attached to the model), built before any work so that a bad alpha,
    dropout, dtype or backend fails first and never leaves the model half-converted; every ``requires_grad`` flag of
    the model is as it was afterwards."""
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    try:
        return OrderedDict(
            (
                n,
                LoRALinear.from_linear(
                    lin,
                    r=r,
                    alpha=alpha,
                    dropout=dropout,
                    use_rslora=use_rslora,
                    init="zeros",
                    lora_dtype=dtype,
                    backend=backend,
                ),
            )
            for n, lin in linears.items()
        )
    finally:
        for p, flag in zip(params, saved_flags):  # from_linear froze the shared weights
            p.requires_grad_(flag)


# ------------------------------------------------------------------------------------------ 1. gradient estimate
def _accumulate_into(buffer: torch.Tensor):
    """A post-accumulate-grad hook adding a weight's fresh ``.grad`` (cast to fp32) into ``buffer`` and freeing it."""

    def hook(p):
        buffer.add_(p.grad.to(device=buffer.device, dtype=torch.float32))
        p.grad = None  # free the accelerator copy before the next layer's gradient arrives

    return hook


def estimate_gradients(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    batches: Iterable,
    loss_fn: Callable | None,
    num_batches: int | None,
    train_mode: bool | None,
    grad_buffer: str,
    report: ProgressFn,
) -> tuple[dict[str, torch.Tensor], int]:
    """Sum of the gradients of the loss w.r.t. each of ``weights`` over this rank's batches (fp32, on the CPU or,
    with ``grad_buffer="device"``, next to the weight), and how many batches ran. Only those weights require grad
    meanwhile; every flag, ``.grad`` and training mode is restored afterwards, also on error."""
    buffers: dict[str, torch.Tensor] = {}
    with estimation_state(model, train_mode, trainable=list(weights.values())) as hooks:
        for n, w in weights.items():
            where = w.device if grad_buffer == "device" else torch.device("cpu")
            buffers[n] = torch.zeros(w.shape, dtype=torch.float32, device=where)
            hooks.append(w.register_post_accumulate_grad_hook(_accumulate_into(buffers[n])))
        n_local = run_batches(model, batches, loss_fn, num_batches, report, what="weight")
    return buffers, n_local


# ------------------------------------------------------------------------------------------------ 2. decompose
def decompose(
    weights: dict[str, torch.Tensor],
    sums: dict[str, torch.Tensor],
    total: int,
    r: int,
    direction: str = "ArB2r",
    stable_gamma: float = 16.0,
    niter: int = 4,
    seed: int = 0,
    process_group=None,
    svd_chunk_bytes: int = SVD_CHUNK_BYTES,
    report: ProgressFn | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA-GA's ``(A, B)`` per weight from the gradient ``sums`` of ``total`` batches (summed over the ranks of
    ``process_group`` here when distributed): one batched SVD per chunk of same-shaped weights (at most
    ``svd_chunk_bytes`` of stacked fp32 gradients). ValueError for a non-finite gradient, a warning for a zero one.
    ``sums`` are released as they are used."""
    report = report if report is not None else make_progress(None)
    group, world = dist_group(process_group)
    gen = torch.Generator().manual_seed(int(seed))
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    groups: dict[tuple, list[str]] = OrderedDict()
    for n, w in weights.items():
        groups.setdefault((tuple(w.shape), w.device), []).append(n)
    done = 0
    for (shape, device), members in groups.items():
        per = max(1, int(svd_chunk_bytes) // (4 * shape[0] * shape[1]))
        for i in range(0, len(members), per):
            chunk = members[i : i + per]
            G = torch.stack([sums[n] for n in chunk])
            if world > 1:
                G = all_reduce_sum(G, group, weights[chunk[0]])
            G = G.to(device) / total
            _check_gradients(chunk, G)
            A, B = lora_ga_factors(G, r, direction, float(stable_gamma), niter, gen)
            for j, n in enumerate(chunk):
                factors[n] = (A[j], B[j])
                sums[n] = None  # release the host accumulator
                done += 1
                report("layer", done, len(weights), n)
            del G, A, B
    return factors


def _check_gradients(names: Sequence[str], G: torch.Tensor) -> None:
    finite = torch.isfinite(G).flatten(1).all(dim=1).tolist()
    if not all(finite):
        bad = [n for n, ok in zip(names, finite) if not ok]
        raise ValueError(
            f"lora_ga_init: the estimated gradient of {bad} contains inf or NaN (check loss_fn "
            "and the batches); the model was not changed"
        )
    zero = (G == 0).flatten(1).all(dim=1).tolist()
    if any(zero):
        warnings.warn(
            f"lora_ga_init: the estimated gradient of {[n for n, z in zip(names, zero) if z]} is exactly zero "
            "(the loss does not reach that layer on these batches): its adapter starts from arbitrary "
            "directions, not from the gradient. Check target_modules and loss_fn.",
            stacklevel=4,
        )


# -------------------------------------------------------------------------------------------------- 3. install
@torch.no_grad()
def install(
    model: nn.Module,
    linears: Linears,
    prepared: OrderedDict[str, LoRALinear],
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    freeze_base: bool,
) -> OrderedDict[str, LoRALinear]:
    """Write each factor pair into its prepared layer, ``W0 ← W0 − ρ·B·A`` (fp32, cast back), record the initial
    adapter, and put the layer in place of its ``nn.Linear``. Afterwards only the adapters require grad with
    ``freeze_base``; the new layers' base weights are frozen either way."""
    new_layers: dict[str, LoRALinear] = OrderedDict()
    for n, lin in linears.items():
        layer = prepared[n]
        A, B = factors[n]
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        rho = layer.scaling  # ρ: α/√r with rsLoRA, α/r without
        W = layer.weight
        with autocast_off(W):
            W.copy_((W.float() - rho * (layer.lora_B.float() @ layer.lora_A.float())).to(W.dtype))
        record_initial_adapter(layer, layer.lora_A, layer.lora_B)
        layer.train(lin.training)
        replace_module(model, n, layer)
        new_layers[n] = layer
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for layer in new_layers.values():
        layer.weight.requires_grad_(False)
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    return new_layers


# ----------------------------------------------------------------------------------------------------- main entry
def lora_ga_init(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable | None = None,
    r: int = 8,
    alpha: float = 16,
    target_modules: str | Sequence[str] = DEFAULT_TARGETS,
    direction: str = "ArB2r",
    stable_gamma: float = 16,
    use_rslora: bool = True,
    num_batches: int | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    niter: int = 4,
    seed: int = 0,
    dropout: float = 0.0,
    backend: str | None = None,
    grad_buffer: str = "cpu",
    train_mode: bool | None = True,
    freeze_base: bool = True,
    process_group=None,
    progress: None | bool | ProgressFn = None,
    svd_chunk_bytes: int = SVD_CHUNK_BYTES,
) -> dict[str, nn.Module]:
    """Estimate the gradient on ``batches`` and replace the target ``nn.Linear`` layers of ``model`` (in place) by
    LoRA-GA-initialised :class:`~lora_kernels.LoRALinear` layers; returns ``{qualified name: layer}``.

    ``batches``: an iterable of batches (at most ``num_batches`` are used). ``loss_fn(model, batch)`` returns the
    loss; by default a Mapping batch is called as ``model(**batch)`` and anything else as ``model(batch)`` (tensors
    moved to the model's device), and the result must be a scalar tensor or have ``.loss`` (HF models given labels).
    ``r``, ``alpha``, ``use_rslora``, ``dropout``, ``backend``: the new layers' settings (scaling ρ = α/√r with
    rsLoRA, α/r without). ``dtype``: A and B's dtype (fp32 by default, as in the official code). ``direction``,
    ``stable_gamma``, ``niter``: see the module docstring; ``seed`` fixes the SVD's random projections (identical
    on every rank). ``grad_buffer``: ``"cpu"`` (fp32 accumulators on the host: the accelerator holds at most one
    layer's gradient at a time) or ``"device"`` (fp32 accumulators next to the weights: faster, 4 bytes per target
    weight element on the accelerator). ``train_mode``: True (default, the official recipe and PEFT's: dropout
    active as in fine-tuning) calls ``model.train()`` for the estimate, False ``model.eval()``, None keeps the
    model's current modes; every module's mode is restored afterwards either way. A target whose estimated gradient
    is exactly zero (the loss does not reach it) gets a warning: its adapter then starts from arbitrary directions.
    ``freeze_base``: afterwards only the adapters
    require grad (as ``inject_lora``); False restores the other parameters' flags. With ``torch.distributed``
    initialised, gradients and batch counts are summed over ``process_group`` so every rank gets the average over the
    union of the data and the same adapters. ``progress``: None logs to the ``lora_kernels`` logger (INFO), True
    prints to stderr, a callable gets ``(stage, done, total, name)`` for every batch and layer.

    After the call the model's outputs equal the original's up to the rounding of W0 in its dtype. Each new layer
    remembers its initial adapter so that :func:`lora_kernels.save_adapter` can write the adapter against the
    original W0 (PEFT's rank-2r form).
    """
    if lora_ga_reinit_applies(model, target_modules):  # FSDP2-sharded models, already-injected targets
        return lora_ga_reinit(**dict(locals()))
    check_ga_args(model, batches, loss_fn, r, direction, stable_gamma, num_batches, train_mode, grad_buffer, dtype)
    linears = check_targets(model, target_modules, r)
    report = make_progress(progress)
    prepared = prepare_layers(model, linears, r, alpha, dropout, use_rslora, dtype, backend)
    weights = OrderedDict((n, lin.weight) for n, lin in linears.items())
    sums, n_local = estimate_gradients(model, weights, batches, loss_fn, num_batches, train_mode, grad_buffer, report)
    total = total_batches(n_local, process_group)
    factors = decompose(
        weights, sums, total, r, direction, stable_gamma, niter, seed, process_group, svd_chunk_bytes, report
    )
    return install(model, linears, prepared, factors, freeze_base)
