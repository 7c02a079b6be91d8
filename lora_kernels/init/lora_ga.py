"""LoRA-GA initialisation (Wang, Yu, Li, NeurIPS 2024, arXiv 2407.05000), following the authors' official code.

Recipe (official repository Outsider565/LoRA-GA, ``lora_ga_init`` with ``scale="stable"``), per target layer:

1. ``G`` = the gradient of the loss with respect to W0, averaged over the estimation batches (and over ranks), fp32,
   with the model in training mode (``model.train()``, as the official code and PEFT do: dropout active).
2. ``U, S, Vh`` = randomized SVD of G with ``q = min(4r, min(G.shape))`` and ``niter`` (4) power iterations.
   Each singular pair's sign is fixed (largest-magnitude entry of v positive, ``dist_svd.canonical_signs``), so the
   result does not depend on the SVD's random projections, on how many ranks summed G, or on how G was sharded.
3. ``direction="ArB2r"`` (default): ``A = Vh[:r]``, ``B = U[:, r:2r]``; "A2rBr": ``A = Vh[r:2r]``, ``B = U[:, :r]``;
   "ArBr": ``A = Vh[1:2r:2]``, ``B = U[:, 0:2r:2]``; "random": a seeded random split of the first 2r directions.
4. Both A and B are multiplied by ``c = d_out^(1/4) / √γ`` (γ = ``stable_gamma``); no singular value enters them.
5. ``ρ`` = the layer's scaling (α/√r with rsLoRA, which the paper's runs use; α/r without), and
   ``W0 ← W0 − ρ·B·A`` in fp32, cast back, so the model's output is unchanged up to W0's rounding.

Why: one SGD step of size λ on the adapters changes ``ρ·B·A`` by ``−λρ²(G·AᵀA + BBᵀ·G) = −λρ²c²·(U_{:2r} S_{:2r}
Vh_{:2r})`` to first order, i.e. along the best rank-2r approximation of the full fine-tuning step.

This is NOT Hugging Face PEFT's ``lora_ga`` variant, which sums (does not average) the gradients, puts S[r:2r] into
B and scales only B: there the initial adapter's size depends on the gradient's scale and the number of batches.

Gradient estimation holds at most one layer's full gradient on the accelerator: each target weight gets a
``register_post_accumulate_grad_hook`` that adds the fresh ``.grad`` (cast to fp32) into a per-layer buffer (on the
CPU by default) and frees it at once; every other parameter has ``requires_grad=False`` meanwhile, so no other
gradient is formed. Flags, training modes and any pre-existing ``.grad`` are restored afterwards, also on error.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .._progress import progress as progress_bar  # the name "progress" is lora_ga_init's argument
from ..targets import matches, tied_names
from .pissa import INIT_RECORD
from .dist_svd import canonical_signs
from .svd import autocast_off, randomized_svd

logger = logging.getLogger("lora_kernels")

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
# Llama-style projection names; pass your model's names (or "all-linear") for other architectures.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Stacked gradients of one SVD batch: 1 GiB holds 16 fp32 4096² matrices, enough to amortise launches on a GPU while
# bounding the extra memory of the SVD stage.
SVD_CHUNK_BYTES = 1 << 30

ProgressFn = Callable[[str, int, int, str], None]


# ------------------------------------------------------------------------------------------------------ factors
def direction_indices(r: int, direction: str, generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices into the 2r leading singular directions: (those used for A, those used for B)."""
    if direction == "ArB2r":
        return torch.arange(0, r), torch.arange(r, 2 * r)
    if direction == "A2rBr":
        return torch.arange(r, 2 * r), torch.arange(0, r)
    if direction == "ArBr":
        return torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    if direction == "random":
        perm = torch.randperm(2 * r, generator=generator)
        return perm[:r], perm[r:]
    raise ValueError(f"direction={direction!r} is not one of {', '.join(DIRECTIONS)}")


def lora_ga_factors(
    G: torch.Tensor,
    r: int,
    direction: str = "ArB2r",
    stable_gamma: float = 16.0,
    niter: int = 4,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's ``A [..., r, n]`` and ``B [..., m, r]`` for gradients ``G [..., m, n]`` (steps 2-4 of the recipe).

    Computed in float32 (float64 if G is), batched over leading dimensions. Needs ``2r ≤ min(m, n)``.
    """
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    m, n = G.shape[-2:]
    if 2 * r > min(m, n):
        raise ValueError(f"LoRA-GA needs 2r = {2 * r} ≤ min(out, in) = {min(m, n)}; got G of shape {tuple(G.shape)}")
    if not stable_gamma > 0:
        raise ValueError(f"stable_gamma must be positive, got {stable_gamma}")
    idx_a, idx_b = direction_indices(r, direction, generator)
    G = G if G.dtype == torch.float64 else G.float()
    with autocast_off(G):
        U, _, Vh = randomized_svd(G, q=min(4 * r, min(m, n)), niter=niter, generator=generator)
        U, Vh = canonical_signs(U, Vh)
    c = m ** 0.25 / math.sqrt(stable_gamma)  # "stable" scale: forward/backward magnitudes Θ(1) in width and rank
    A = Vh[..., idx_a.to(G.device), :] * c
    B = U[..., :, idx_b.to(G.device)] * c
    return A, B


# ------------------------------------------------------------------------------------------------------ helpers
def select_targets(model: nn.Module, candidates: "Mapping[str, nn.Module]", target_modules) -> List[str]:
    """The names among ``candidates`` (name → module of ``model``) that ``target_modules`` selects, by PEFT's rules:
    ``"all-linear"`` = every candidate except the output layer (``get_output_embeddings()`` or a ``lm_head``), else
    a regex or a list of name suffixes. Shared by the replacing and the re-initialising (sharded) LoRA-GA paths."""
    if isinstance(target_modules, str) and target_modules == "all-linear":
        out_layer = None
        get_out = getattr(model, "get_output_embeddings", None)
        if callable(get_out):
            try:
                out_layer = get_out()
            except Exception:  # pragma: no cover - models that do not implement it
                out_layer = None
        return [n for n, m in candidates.items() if m is not out_layer and n.split(".")[-1] != "lm_head"]
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    return [n for n in candidates if matches(n, target_modules)]


def resolve_targets(model: nn.Module, target_modules) -> List[str]:
    """Qualified names of the plain ``nn.Linear`` layers that ``target_modules`` selects (PEFT's matching rules;
    ``"all-linear"`` = every nn.Linear except the output layer, as in PEFT)."""
    from ..modules import LoRALinear

    candidates = OrderedDict((n, m) for n, m in model.named_modules()
                             if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear))
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError("target_modules is empty")
    chosen = select_targets(model, candidates, target_modules)
    if not chosen:
        names = list(candidates)
        shown = ", ".join(names[:50]) + (" ..." if len(names) > 50 else "")
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear; candidates: {shown or '(none)'}")
    return chosen


def make_progress(progress) -> ProgressFn:
    if callable(progress):
        return progress
    if progress:
        def _print(stage, done, total, name=""):
            print(f"lora_ga_init: {stage} {done}/{total} {name}".rstrip(), file=sys.stderr, flush=True)
        return _print

    def _log(stage, done, total, name=""):
        logger.info("lora_ga_init: %s %d/%d %s", stage, done, total, name)
    return _log


def default_loss(model: nn.Module, batch):
    device = next((p.device for p in model.parameters()), None)

    def move(v):
        return v.to(device) if isinstance(v, torch.Tensor) and device is not None else v

    if isinstance(batch, Mapping):
        return model(**{k: move(v) for k, v in batch.items()})
    return model(move(batch))


def as_loss(out) -> torch.Tensor:
    loss = out if isinstance(out, torch.Tensor) else getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"the loss must be a scalar tensor or an object with .loss; got {type(out).__name__}. "
            "Pass loss_fn=lambda model, batch: ... to lora_ga_init."
        )
    if loss.numel() != 1:
        raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
    return loss.reshape(())


def _dist_group(process_group):
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None, 1
    import torch.distributed as dist

    return process_group, dist.get_world_size(process_group)


def all_reduce_sum(t: torch.Tensor, group, like: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks; NCCL needs CUDA tensors, so CPU buffers travel to ``like``'s device for the reduction."""
    import torch.distributed as dist

    backend = dist.get_backend(group)
    if t.device.type == "cpu" and "nccl" in str(backend) and like.device.type == "cuda":
        dev = t.to(like.device)
        dist.all_reduce(dev, op=dist.ReduceOp.SUM, group=group)
        return dev
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


# ----------------------------------------------------------------------------------------------------- main entry
def check_ga_args(model, batches, loss_fn, r, direction, stable_gamma, num_batches, train_mode, grad_buffer,
                  dtype) -> None:
    """The argument checks of :func:`lora_ga_init` that need no layer (also run by the sharded re-init path)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) or None, got {type(loss_fn).__name__}")
    if isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
        raise TypeError(f"batches must be an iterable of batches (a list, a DataLoader, a generator), "
                        f"got {type(batches).__name__}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is not one of {', '.join(DIRECTIONS)}")
    if not stable_gamma > 0:
        raise ValueError(f"stable_gamma must be positive, got {stable_gamma}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches <= 0):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if train_mode is not None and not isinstance(train_mode, bool):
        raise TypeError(f"train_mode must be True, False or None, got {type(train_mode).__name__} {train_mode!r}")
    if grad_buffer not in ("cpu", "device"):
        raise ValueError(f"grad_buffer must be 'cpu' or 'device', got {grad_buffer!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")


def lora_ga_init(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Optional[Callable] = None,
    r: int = 8,
    alpha: float = 16,
    target_modules: Union[str, Sequence[str]] = DEFAULT_TARGETS,
    direction: str = "ArB2r",
    stable_gamma: float = 16,
    use_rslora: bool = True,
    num_batches: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    *,
    niter: int = 4,
    seed: int = 0,
    dropout: float = 0.0,
    backend: Optional[str] = None,
    grad_buffer: str = "cpu",
    train_mode: Optional[bool] = True,
    freeze_base: bool = True,
    process_group=None,
    progress: Union[None, bool, ProgressFn] = None,
    svd_chunk_bytes: int = SVD_CHUNK_BYTES,
) -> Dict[str, nn.Module]:
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
    is exactly zero (the loss does not reach it) gets a warning: its adapter then starts from arbitrary directions. ``freeze_base``: afterwards only the adapters
    require grad (as ``inject_lora``); False restores the other parameters' flags. With ``torch.distributed``
    initialised, gradients and batch counts are summed over ``process_group`` so every rank gets the average over the
    union of the data and the same adapters. ``progress``: None logs to the ``lora_kernels`` logger (INFO), True
    prints to stderr, a callable gets ``(stage, done, total, name)`` for every batch and layer.

    After the call the model's outputs equal the original's up to the rounding of W0 in its dtype. Each new layer
    remembers its initial adapter so that :func:`lora_kernels.save_adapter` can write the adapter against the
    original W0 (PEFT's rank-2r form).
    """
    args = dict(locals())  # FSDP2-sharded models and already-injected LoRALinear targets: re-initialised in place
    from .. import distributed
    if distributed.lora_ga_reinit_applies(model, target_modules):
        return distributed.lora_ga_reinit(**args)
    from ..modules import LoRALinear

    check_ga_args(model, batches, loss_fn, r, direction, stable_gamma, num_batches, train_mode, grad_buffer, dtype)
    names = resolve_targets(model, target_modules)
    linears: Dict[str, nn.Linear] = OrderedDict((n, model.get_submodule(n)) for n in names)
    for n, lin in linears.items():
        if 2 * r > min(lin.weight.shape):
            raise ValueError(f"LoRA-GA needs 2r = {2 * r} ≤ min(out, in) for every target; {n} has weight "
                             f"{tuple(lin.weight.shape)}")
        if not lin.weight.is_floating_point():
            raise TypeError(f"{n}.weight is {lin.weight.dtype}; LoRA-GA needs floating-point weights")
    seen = {}
    for n, lin in linears.items():
        if id(lin.weight) in seen:
            raise ValueError(f"{n} and {seen[id(lin.weight)]} share one weight tensor; LoRA-GA needs distinct weights")
        seen[id(lin.weight)] = n
    from ..targets import check_replaceable

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
    report = make_progress(progress)
    loss_fn = loss_fn if loss_fn is not None else default_loss
    group, world = _dist_group(process_group)

    # ---------------------------------------------------------------- 1. gradient estimation (state saved first)
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    # Build the new layers now (adapters zero, nothing attached to the model yet), so that a bad alpha, dropout,
    # dtype or backend fails before any work and never leaves the model half-converted.
    try:
        prepared = OrderedDict(
            (n, LoRALinear.from_linear(lin, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init="zeros",
                                       lora_dtype=dtype, backend=backend))
            for n, lin in linears.items()
        )
    finally:
        for p, flag in zip(params, saved_flags):  # from_linear froze the shared weights
            p.requires_grad_(flag)
    saved_modes = {m: m.training for m in model.modules()}
    weights = {n: lin.weight for n, lin in linears.items()}
    saved_grads = {n: w.grad for n, w in weights.items()}
    buffers: Dict[str, torch.Tensor] = {}
    hooks = []
    n_local = 0
    batch_iter = None
    try:
        for p in params:
            p.requires_grad_(False)
        for n, w in weights.items():
            w.grad = None
            w.requires_grad_(True)
            where = w.device if grad_buffer == "device" else torch.device("cpu")
            buffers[n] = torch.zeros(w.shape, dtype=torch.float32, device=where)

            def hook(p, buf=buffers[n]):
                buf.add_(p.grad.to(device=buf.device, dtype=torch.float32))
                p.grad = None  # free the accelerator copy before the next layer's gradient arrives

            hooks.append(w.register_post_accumulate_grad_hook(hook))
        if train_mode is not None:
            model.train(bool(train_mode))
        t0 = time.perf_counter()
        expected = num_batches if num_batches is not None else (len(batches) if hasattr(batches, "__len__") else 0)
        if hasattr(batches, "__len__") and num_batches is not None:
            expected = min(expected, len(batches))
        batch_iter = progress_bar(batches, total=expected or None, desc="LoRA-GA gradient", unit="batch")
        for batch in batch_iter:
            loss = as_loss(loss_fn(model, batch))
            if not loss.requires_grad:
                raise RuntimeError("the loss does not depend on any target weight (no grad_fn); check target_modules")
            loss.backward()
            n_local += 1
            report("batch", n_local, expected, f"loss={loss.item():.4g} t={time.perf_counter() - t0:.1f}s")
            if num_batches is not None and n_local >= num_batches:
                break  # before drawing another batch: an iterator keeps its unused items
    finally:
        if batch_iter is not None:
            batch_iter.close()  # closes the bar now; draws nothing more from batches
        for h in hooks:
            h.remove()
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
        for n, w in weights.items():
            w.grad = saved_grads[n]
        for m, mode in saved_modes.items():
            m.training = mode

    distributed = world > 1
    count = torch.tensor([float(n_local)], dtype=torch.float64)
    if distributed:
        import torch.distributed as dist

        if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
            count = count.cuda()
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    total = int(round(count.item()))
    if total == 0:
        raise ValueError("lora_ga_init got no batches (batches was empty or num_batches=0 on every rank)")

    # ---------------------------------------------------------------- 2. SVD per group of same-shaped layers
    gen = torch.Generator().manual_seed(int(seed))
    factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    groups: Dict[tuple, List[str]] = OrderedDict()
    for n, w in weights.items():
        groups.setdefault((tuple(w.shape), w.device), []).append(n)
    done = 0
    for (shape, device), members in groups.items():
        per = max(1, int(svd_chunk_bytes) // (4 * shape[0] * shape[1]))
        for i in range(0, len(members), per):
            chunk = members[i:i + per]
            G = torch.stack([buffers[n] for n in chunk])
            if distributed:
                G = all_reduce_sum(G, group, weights[chunk[0]])
            G = G.to(device) / total
            finite = torch.isfinite(G).flatten(1).all(dim=1).tolist()
            if not all(finite):
                bad = [n for n, ok in zip(chunk, finite) if not ok]
                raise ValueError(f"lora_ga_init: the estimated gradient of {bad} contains inf or NaN (check loss_fn "
                                 "and the batches); the model was not changed")
            zero = (G == 0).flatten(1).all(dim=1).tolist()
            if any(zero):
                warnings.warn(
                    f"lora_ga_init: the estimated gradient of {[n for n, z in zip(chunk, zero) if z]} is exactly zero "
                    "(the loss does not reach that layer on these batches): its adapter starts from arbitrary "
                    "directions, not from the gradient. Check target_modules and loss_fn.", stacklevel=2,
                )
            A, B = lora_ga_factors(G, r, direction, float(stable_gamma), niter, gen)
            for j, n in enumerate(chunk):
                factors[n] = (A[j], B[j])
                buffers[n] = None  # release the host accumulator
                done += 1
                report("layer", done, len(weights), n)
            del G, A, B

    # ---------------------------------------------------------------- 3. replace the layers, W0 ← W0 − ρ·B·A
    new_layers: Dict[str, nn.Module] = OrderedDict()
    with torch.no_grad():
        for n, lin in linears.items():
            layer = prepared[n]
            A, B = factors[n]
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            rho = layer.scaling  # ρ: α/√r with rsLoRA, α/r without
            W = layer.weight
            with autocast_off(W):
                W.copy_((W.float() - rho * (layer.lora_B.float() @ layer.lora_A.float())).to(W.dtype))
            setattr(layer, INIT_RECORD, (layer.lora_A.detach().float().cpu().clone(),
                                         layer.lora_B.detach().float().cpu().clone()))
            layer.train(lin.training)
            parent_name, _, child = n.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer)
            new_layers[n] = layer
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for layer in new_layers.values():
        layer.weight.requires_grad_(False)
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    return new_layers
