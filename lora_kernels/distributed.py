"""LoRA on sharded models: FSDP2 (``fully_shard``) and tensor parallel (DTensor) versions of the model-level helpers.

A ``LoRALinear`` under ``fully_shard`` needs nothing special to train: FSDP2 swaps its parameters for the all-gathered
(plain, unsharded) tensors before ``forward`` and before its backward, so the fused op only ever sees whole tensors,
and between steps the module holds ``DTensor`` shards (``Shard(0)``: each rank owns a block of rows of W0, lora_A and
lora_B). What breaks is everything that reads the parameters *outside* forward: merging, state dicts, adapter files,
the inits. The functions here are their collective versions; the public functions (``LoRALinear.merge``,
``lora_state_dict``, ``save_adapter``, ``load_adapter``, ``lora_ga_init``, ``pissa_init``) dispatch to them when a
layer's parameters are DTensors, so a user calls the same API on every rank.

This is a low layer: it imports no other module of the package above the leaves. It finds LoRA layers by their
attributes (:func:`is_lora_layer`), and what only a higher layer knows comes in as an argument: the single-process
save / load to run on whole tensors (:func:`collective_save`, :func:`collective_load`), the merged-weight rule, the
fused op for tensor parallelism.

Rules they follow:

* every rank calls (they run collectives); arguments are checked on every rank first and the verdicts are exchanged
  (:func:`agree`) before the first collective, so a bad argument on one rank raises the same error on every rank
  instead of leaving the others blocked in a collective;
* adapters are small (``r·(in + out)``), so they are gathered whole when needed; the base weight never is: merging,
  the W0 offset of LoRA-GA and PiSSA work on each rank's own block of W0;
* files: rank 0 writes, the others wait for its verdict (a failed write raises on every rank).

Supported layouts of a layer's parameters: plain tensors, or DTensors on a 1-D device mesh with ``Shard(0)``,
``Shard(1)`` or ``Replicate()`` placements (FSDP2 and the Colwise/Rowwise tensor-parallel plans).
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

_STATE = threading.local()  # .bypass: inside one of our own calls of a public function (dispatch turned off)


# ------------------------------------------------------------------------------------------------------ detection
def _dtensor_type():
    # No DTensor can exist before torch.distributed.tensor is imported, so a process that never imports it (one
    # device) does not pay for that import (seconds) on its first forward.
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def is_dtensor(t) -> bool:
    DT = _dtensor_type()
    return DT is not None and isinstance(t, DT)


def bypassed() -> bool:
    return getattr(_STATE, "bypass", False)


@contextlib.contextmanager
def bypass():
    old = bypassed()
    _STATE.bypass = True
    try:
        yield
    finally:
        _STATE.bypass = old


def is_sharded_layer(layer) -> bool:
    """True when the layer's base weight or adapter is a DTensor (FSDP2 shards between steps, tensor parallel)."""
    if bypassed():
        return False
    return any(is_dtensor(getattr(layer, a, None)) for a in ("weight", "lora_A", "lora_B"))


def _fsdp_modules(model: nn.Module) -> List[nn.Module]:
    # fully_shard lives in torch.distributed.fsdp: without that module imported no FSDP2 module exists (and a
    # single-device process does not pay for importing it).
    FSDPModule = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if FSDPModule is None:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_lora_layer(module) -> bool:
    """Whether ``module`` is a LoRALinear, recognised by the attributes the functions here use (a base ``weight``
    and ``lora_A`` / ``lora_B`` tensors, ``r``, ``scaling`` and the ``merged`` flag), so that this module needs no
    import of the one that defines the class. PEFT's own LoRA layers (``lora_A`` is a ModuleDict) and the
    multi-adapter layers (no ``lora_A``) are not."""
    return (isinstance(module, nn.Module)
            and all(isinstance(getattr(module, a, None), torch.Tensor) for a in ("weight", "lora_A", "lora_B"))
            and all(hasattr(module, a) for a in ("r", "scaling", "merged")))


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` is (or contains) an FSDP2 module or a LoRALinear with DTensor parameters."""
    if bypassed() or not isinstance(model, nn.Module):
        return False
    if _fsdp_modules(model):
        return True
    return any(is_sharded_layer(m) for m in model.modules() if is_lora_layer(m))


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit of ``model`` back into its sharded state. The root keeps its parameters unsharded after a
    forward without backward; writing into those would be lost at the next all-gather."""
    for m in _fsdp_modules(model):
        m.reshard()


# ------------------------------------------------------------------------------------------------------ consensus
def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_ERRORS = {c.__name__: c for c in (TypeError, ValueError, RuntimeError, FileNotFoundError, NotADirectoryError,
                                     PermissionError, OSError)}


def agree(error: Optional[BaseException], what: str = "") -> None:
    """Collective: every rank passes the error its local checks raised (or None); if any rank failed, every rank
    raises the same error (the first failing rank's type and message, naming the rank). A no-op verdict exchange of
    one small object per rank; without torch.distributed it simply re-raises ``error``."""
    if not dist_on():
        if error is not None:
            raise error
        return
    mine = None if error is None else (type(error).__name__, str(error))
    verdicts: List[Optional[Tuple[str, str]]] = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, mine)
    failed = [(rank, v) for rank, v in enumerate(verdicts) if v is not None]
    if not failed:
        return
    rank, (name, msg) = failed[0]
    others = [str(r) for r, _ in failed[1:]]
    where = f"rank {rank}" + (f" (and rank {', '.join(others)})" if others else "")
    cls = _ERRORS.get(name, RuntimeError)
    raise cls(f"{msg} [on {where}; every rank refused{', ' + what if what else ''}]") from error


def capture_error(fn) -> Optional[BaseException]:
    """Run the local checks ``fn()``; return the error instead of raising it (for :func:`agree`)."""
    try:
        fn()
    except (TypeError, ValueError, RuntimeError, OSError) as exc:
        return exc
    return None


def _same_on_every_rank(name: str, value) -> None:
    """Collective: ValueError on every rank when ``value`` differs between ranks (those settings must agree)."""
    if not dist_on():
        return
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise ValueError(f"{name} must be the same on every rank, got {values} (by rank)")


# ------------------------------------------------------------------------------------------------ local blocks
def check_placement(t: torch.Tensor, what: str) -> None:
    if not is_dtensor(t):
        return
    from torch.distributed.tensor import Replicate, Shard

    if t.device_mesh.ndim != 1:
        raise ValueError(f"{what}: DTensor on a {t.device_mesh.ndim}-D device mesh; only 1-D meshes are supported")
    for p in t.placements:
        if not isinstance(p, (Replicate, Shard)):
            raise ValueError(f"{what}: placement {p} is not supported (Shard or Replicate only)")


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's block of ``t`` (the tensor itself when it is not a DTensor); writes go into the parameter."""
    return t.to_local() if is_dtensor(t) else t


def local_slices(t: torch.Tensor) -> Tuple[slice, ...]:
    """Which block of the global tensor this rank holds (every index when ``t`` is not a DTensor)."""
    if not is_dtensor(t):
        return tuple(slice(0, s) for s in t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (collective for a sharded DTensor); detached."""
    return t.full_tensor().detach() if is_dtensor(t) else t.detach()


def group_of(t: torch.Tensor):
    return t.device_mesh.get_group() if is_dtensor(t) else None


def check_row_sharded_or_whole(t: torch.Tensor, what: str) -> None:
    """LoRA-GA/PiSSA work on row blocks of W0 (FSDP2's layout) or on a whole W0."""
    if is_dtensor(t):
        from torch.distributed.tensor import Shard

        check_placement(t, what)
        if not all(isinstance(p, Shard) and p.dim == 0 for p in t.placements):
            raise ValueError(f"{what}: placements {t.placements}; this init needs W0 whole or sharded by rows "
                             f"(Shard(0), as fully_shard does)")


# --------------------------------------------------------------------------------------------- merge / unmerge
def _merge_checks(layer) -> None:
    if layer.merged:
        raise RuntimeError("this LoRALinear is already merged")
    for attr in ("weight", "lora_A", "lora_B"):
        check_placement(getattr(layer, attr), attr)


@torch.no_grad()
def merge_layer(layer, merged_weight=None) -> None:
    """``LoRALinear.merge`` on a sharded layer: each rank adds its own block of s·B·A to its block of W0 (the adapter
    is gathered, the base weight never is). Collective. ``merged_weight(w0, lora_A, lora_B)`` is the layer's rule
    for ``W0 + s·B·A`` (rounded once to W0's dtype; ValueError when not finite), here given a block of W0 and the
    matching columns of A and rows of B; by default the layer's own (``LoRALinear._merged_weight``). Refuses on every
    rank, nothing changed, when any rank's block of the merged weight would not be finite. ``unmerge`` restores
    every block bit for bit."""
    if merged_weight is None:
        merged_weight = layer._merged_weight
    agree(capture_error(lambda: _merge_checks(layer)), "nothing was merged")
    W = layer.weight
    rows, cols = local_slices(W)
    A, B = full(layer.lora_A), full(layer.lora_B)
    w_loc = local(W)
    result = {}
    agree(capture_error(lambda: result.setdefault("w", merged_weight(w_loc, A[:, cols], B[rows]))))
    layer._unmerged_weight = W.detach().clone()  # a DTensor with W's placements: a local copy, no communication
    w_loc.copy_(result["w"])


@torch.no_grad()
def unmerge_layer(layer) -> None:
    """``LoRALinear.unmerge`` on a sharded layer: every rank restores its own block (no communication)."""
    if not layer.merged:
        raise RuntimeError("this LoRALinear is not merged")
    local(layer.weight).copy_(local(layer._unmerged_weight))
    layer._unmerged_weight = None


# -------------------------------------------------------------------------------------------------- state dicts
def lora_layers_of(model: nn.Module, is_layer=None) -> Dict[str, nn.Module]:
    """Qualified name → LoRA layer of ``model``, in module order (a shared layer once, under its first name): the
    modules :func:`is_lora_layer` recognises, or those for which ``is_layer(module)`` is true."""
    test = is_lora_layer if is_layer is None else is_layer
    return {n: m for n, m in model.named_modules() if test(m)}


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``lora_state_dict`` of a sharded model: the whole adapter tensors (plain, detached copies) on every rank, keyed
    as for an unsharded model. Collective (one all-gather per adapter tensor)."""
    layers = lora_layers_of(model)
    agree(capture_error(lambda: [check_placement(getattr(l, a), f"{n}.{a}") for n, l in layers.items()
                          for a in ("lora_A", "lora_B")]))
    reshard(model)
    out = OrderedDict()
    for name, layer in layers.items():
        prefix = f"{name}." if name else ""
        out[prefix + "lora_A"] = full(layer.lora_A).clone()
        out[prefix + "lora_B"] = full(layer.lora_B).clone()
    return out


@contextlib.contextmanager
def _whole_adapters(layers, values: Dict[str, Tuple[torch.Tensor, torch.Tensor]]):
    """Temporarily make each layer's lora_A/lora_B the given whole plain tensors (the DTensor parameters are put
    back afterwards, also on error); inside, the public functions run their single-process code on them."""
    saved = {}
    try:
        for name, layer in layers.items():
            saved[name] = (layer._parameters["lora_A"], layer._parameters["lora_B"])
            A, B = values[name]
            layer._parameters["lora_A"] = nn.Parameter(A, requires_grad=False)
            layer._parameters["lora_B"] = nn.Parameter(B, requires_grad=False)
        with bypass():
            yield
    finally:
        for name, (a, b) in saved.items():
            layers[name]._parameters["lora_A"] = a
            layers[name]._parameters["lora_B"] = b


def _checked_layers(check, what: str) -> Dict[str, nn.Module]:
    """Collective: every rank runs ``check()`` (the single-process checks of the arguments; it returns the LoRA
    layers, name → layer) and checks their adapters' placements; the verdicts are exchanged (:func:`agree`), so a
    failure on any rank raises on every rank before anything is gathered or changed."""
    found = {}

    def checks():
        layers = found["layers"] = check()
        for n, layer in layers.items():
            for a in ("lora_A", "lora_B"):
                check_placement(getattr(layer, a), f"{n}.{a}")

    agree(capture_error(checks), what)
    return found["layers"]


def collective_save(model: nn.Module, check, save, same: Optional[Dict[str, object]] = None):
    """A save of a sharded model (``save_adapter``), called on every rank: ``check()`` runs on every rank
    (:func:`_checked_layers`; it returns the layers whose adapters are saved), the values of ``same`` (message →
    value) must agree between ranks, the adapters are gathered whole, and rank 0 runs ``save()`` (the single-process
    save, dispatch turned off) on them; the other ranks write nothing. Every rank returns rank 0's result; a failed
    check on any rank, or a failed write on rank 0, raises the same error on every rank."""
    layers = _checked_layers(check, "nothing was written")
    for name, value in (same or {}).items():
        _same_on_every_rank(name, value)
    reshard(model)
    whole = OrderedDict((n, (full(l.lora_A).clone(), full(l.lora_B).clone())) for n, l in layers.items())
    rank = dist.get_rank() if dist_on() else 0
    result, error = None, None
    if rank == 0:
        try:
            with _whole_adapters(layers, whole):
                result = save()
        except Exception as exc:  # the write failed on rank 0: every rank must hear of it
            error = exc
    agree(error, "rank 0 could not write the adapter")
    if dist_on():
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


# The layer settings a load may change (load_adapter gives the layers the file's); put back when a rank fails.
_SETTINGS = ("alpha", "use_rslora", "dropout", "scaling")


def collective_load(model: nn.Module, check, load, *, from_current: bool):
    """A load into a sharded model (``load_adapter``, ``load_lora_state_dict``), called on every rank: ``check()``
    runs on every rank (:func:`_checked_layers`; it returns the layers loaded into), then every rank runs ``load()``
    (the single-process load with all its checks, dispatch turned off) on whole plain adapter tensors: copies of
    the current ones (``from_current``: a load may keep some of them) or zeros (a load that replaces them all, no
    gathering). The verdicts are exchanged; only when every rank's load passed does each rank copy its own blocks
    into the parameters. When any rank fails, nothing changes on any rank (a rank whose own load passed puts its
    layers' settings back). Returns ``load()``'s result."""
    layers = _checked_layers(check, "nothing was loaded")
    reshard(model)
    scratch = OrderedDict()
    snapshot = {}
    for n, layer in layers.items():
        A, B = layer.lora_A, layer.lora_B
        if from_current:
            scratch[n] = (full(A).clone(), full(B).clone())
        else:
            scratch[n] = (torch.zeros(tuple(A.shape), dtype=A.dtype, device=local(A).device),
                          torch.zeros(tuple(B.shape), dtype=B.dtype, device=local(B).device))
        snapshot[n] = tuple(getattr(layer, a) for a in _SETTINGS)
    result, error = None, None
    try:
        with _whole_adapters(layers, scratch):
            result = load()
    except Exception as exc:
        error = exc
    try:
        agree(error, "nothing was loaded")
    except Exception:
        for n, values in snapshot.items():  # a rank whose own load passed: undo its settings
            for a, v in zip(_SETTINGS, values, strict=True):
                setattr(layers[n], a, v)
        raise
    with torch.no_grad():
        for n, layer in layers.items():
            A, B = scratch[n]
            local(layer.lora_A).copy_(A[local_slices(layer.lora_A)])
            local(layer.lora_B).copy_(B[local_slices(layer.lora_B)])
    return result


# --------------------------------------------------------------------------------------- LoRA-GA / PiSSA re-init
def _targeted_layers(model: nn.Module, target_modules) -> "OrderedDict[str, nn.Module]":
    """The model's LoRALinear layers that ``target_modules`` selects (PEFT's rules, as ``resolve_targets``)."""
    from .init.lora_ga import select_targets

    layers = lora_layers_of(model)
    return OrderedDict((n, layers[n]) for n in select_targets(model, layers, target_modules))


def lora_ga_reinit_applies(model, target_modules) -> bool:
    """Whether ``lora_ga_init`` re-initialises existing LoRALinear layers (this module) rather than replacing
    ``nn.Linear`` layers: the model is sharded, or ``target_modules`` selects LoRALinear layers."""
    if bypassed() or not isinstance(model, nn.Module):
        return False
    if is_sharded(model):
        return True
    try:
        return bool(_targeted_layers(model, target_modules))
    except (TypeError, ValueError, re.error):
        return False  # the single-process path reports the bad target_modules


def _ga_checks(model, batches, loss_fn, r, alpha, target_modules, direction, stable_gamma, use_rslora, num_batches,
               dtype, niter, dropout, grad_buffer, train_mode=None):
    """Every argument check of ``lora_ga_init`` for the re-init path; returns the target layers."""
    from .init.lora_ga import check_ga_args
    from .modules import LoRALinear
    from ._numerics import real_number

    check_ga_args(model, batches, loss_fn, r, direction, stable_gamma, num_batches, train_mode, grad_buffer, dtype)
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"niter must be a non-negative int, got {niter!r}")
    alpha = real_number("alpha", alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    dropout = real_number("dropout", dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if isinstance(target_modules, str) and target_modules != "all-linear":
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regex: {exc}") from None
    elif not isinstance(target_modules, str) and (not hasattr(target_modules, "__iter__") or not list(target_modules)):
        raise ValueError(f"target_modules must be a regex, 'all-linear' or a non-empty list, got {target_modules!r}")
    layers = _targeted_layers(model, target_modules)
    if not layers:
        raise ValueError(f"target_modules={target_modules!r} matched no LoRALinear layer of the sharded model "
                         f"(inject_lora before sharding; lora_ga_init then re-initialises those layers)")
    from .init.lora_ga import resolve_targets

    try:
        plain = resolve_targets(model, target_modules)
    except ValueError:
        plain = []
    if plain:
        raise ValueError(f"target_modules selects LoRALinear layers and plain nn.Linear layers ({', '.join(plain[:5])}"
                         f"{' ...' if len(plain) > 5 else ''}); re-initialising injected layers and replacing plain "
                         f"ones are separate calls: inject_lora those first, or narrow target_modules")
    for n, layer in layers.items():
        if layer.r != r:
            raise ValueError(f"{n} has r={layer.r}; re-initialising an injected layer keeps its rank, pass r={layer.r}")
        if 2 * r > min(layer.out_features, layer.in_features):
            raise ValueError(f"LoRA-GA needs 2r = {2 * r} ≤ min(out, in) for every target; {n} has weight "
                             f"{(layer.out_features, layer.in_features)}")
        if layer.merged:
            raise ValueError(f"{n} is merged; unmerge() it before re-initialising its adapter")
        check_row_sharded_or_whole(layer.weight, f"{n}.weight")
        for a in ("lora_A", "lora_B"):
            check_placement(getattr(layer, a), f"{n}.{a}")
        if is_dtensor(layer.weight) and is_dtensor(layer.lora_A) and not any(
                type(p).__name__ == "Shard" for p in layer.lora_A.placements):
            # A replicated A next to a row-sharded W0 is the colwise tensor-parallel layout: the ranks see the same
            # batch, so the per-rank gradients must not be summed as FSDP2's data-parallel ones are.
            raise ValueError(f"{n}: LoRA-GA on tensor-parallel layers is not supported (FSDP2-sharded or whole "
                             f"layers only); run it before parallelize_module")
        if is_dtensor(layer.weight) and local_slices(layer.lora_B)[0] != local_slices(layer.weight)[0] and \
                not is_dtensor(layer.lora_B):
            raise ValueError(f"{n}: lora_B and weight must be sharded alike")
    seen = {}
    for n, layer in layers.items():
        if id(layer) in seen:
            raise ValueError(f"{n} and {seen[id(layer)]} are one layer; LoRA-GA needs distinct weights")
        seen[id(layer)] = n
    return layers, alpha, dropout


def lora_ga_reinit(model, batches, loss_fn=None, r=8, alpha=16, target_modules=None, direction="ArB2r",
                   stable_gamma=16, use_rslora=True, num_batches=None, dtype=torch.float32, *, niter=4, seed=0,
                   dropout=0.0, backend=None, grad_buffer="cpu", train_mode=None, freeze_base=True,
                   process_group=None, progress=None, svd_chunk_bytes=None):
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
    from .init.dist_svd import LOCAL, sharded_randomized_svd
    from .init.lora_ga import DEFAULT_TARGETS, as_loss, default_loss, direction_indices, make_progress
    from .init.pissa import INIT_RECORD
    from .modules import lora_scaling

    target_modules = DEFAULT_TARGETS if target_modules is None else target_modules
    found = {}

    def checks():
        found["v"] = _ga_checks(model, batches, loss_fn, r, alpha, target_modules, direction, stable_gamma,
                                use_rslora, num_batches, dtype, niter, dropout, grad_buffer, train_mode)

    agree(capture_error(checks), "the model was not changed")
    layers, alpha, dropout = found["v"]
    reshard(model)
    report = make_progress(progress)
    loss_fn = loss_fn if loss_fn is not None else default_loss

    # ---------------------------------------------------------------- 1. gradient estimate, row blocks
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    saved_modes = {m: m.training for m in model.modules()}
    buffers: Dict[str, torch.Tensor] = {}
    rows_of: Dict[str, slice] = {}
    hooks = []
    for n, layer in layers.items():
        W = layer.weight
        rows_of[n] = local_slices(W)[0]
        where = local(W).device if grad_buffer == "device" else torch.device("cpu")
        buffers[n] = torch.zeros(rows_of[n].stop - rows_of[n].start, layer.in_features, dtype=torch.float32,
                                 device=where)

    def make_hooks(n, layer):
        sharded, group, rows = is_dtensor(layer.weight), group_of(layer.weight), rows_of[n]

        def on_grad(dy, x):
            G = dy.reshape(-1, dy.shape[-1]).float().transpose(0, 1) @ x.reshape(-1, x.shape[-1]).float()
            if sharded:  # this layer's gradient summed over the ranks' data; keep this rank's rows
                dist.all_reduce(G, group=group)
                G = G[rows]
            buffers[n].add_(G.to(buffers[n].device))
            return None

        def on_forward(module, args, out):
            if not torch.is_grad_enabled():
                return
            if not (isinstance(out, torch.Tensor) and out.requires_grad):
                raise RuntimeError(f"lora_ga_init: the output of {n} does not require grad; the adapters must "
                                   f"require grad while the gradient is estimated")
            x = args[0].detach()
            out.register_hook(lambda dy: on_grad(dy, x))

        return layer.register_forward_hook(on_forward)

    n_local = 0
    try:
        for p in params:
            p.grad = None
        for n, layer in layers.items():
            hooks.append(make_hooks(n, layer))
        if train_mode is not None:
            model.train(bool(train_mode))
        expected = num_batches if num_batches is not None else (len(batches) if hasattr(batches, "__len__") else 0)
        for batch in batches:
            loss = as_loss(loss_fn(model, batch))
            if not loss.requires_grad:
                raise RuntimeError("the loss does not depend on any target layer (no grad_fn); check target_modules")
            loss.backward()
            n_local += 1
            report("batch", n_local, expected, f"loss={loss.item():.4g}")
            if num_batches is not None and n_local >= num_batches:
                break
    finally:
        for h in hooks:
            h.remove()
        for p, g in zip(params, saved_grads):
            p.grad = g
        for m, mode in saved_modes.items():
            m.training = mode
        reshard(model)

    count = torch.tensor([float(n_local)], dtype=torch.float64)
    if dist_on():
        if "nccl" in str(dist.get_backend(process_group)) and torch.cuda.is_available():
            count = count.cuda()
        dist.all_reduce(count, group=process_group)
    total = int(round(count.item()))
    if total == 0:
        raise ValueError("lora_ga_init got no batches (batches was empty or num_batches=0 on every rank)")
    for n, layer in layers.items():
        if not is_dtensor(layer.weight) and dist_on():  # data parallel over whole weights: one sum at the end
            from .init.lora_ga import all_reduce_sum

            buffers[n] = all_reduce_sum(buffers[n], process_group, local(layer.weight))
    bad = [n for n, b in buffers.items() if not bool(torch.isfinite(b).all())]
    agree(ValueError(f"lora_ga_init: the estimated gradient of {bad} contains inf or NaN (check loss_fn and the "
                     f"batches); the model was not changed") if bad else None)

    # ---------------------------------------------------------------- 2. SVD of the row blocks, layer by layer
    gen = torch.Generator().manual_seed(int(seed))
    plan = OrderedDict()
    for i, (n, layer) in enumerate(layers.items()):
        W = layer.weight
        m, k = layer.out_features, layer.in_features
        idx_a, idx_b = direction_indices(r, direction, gen)
        G = buffers[n].to(local(W).device) / total
        group = group_of(W) if is_dtensor(W) else LOCAL
        U_rows, _, Vh = sharded_randomized_svd(G, min(4 * r, min(m, k)), niter, gen, group)
        c = m ** 0.25 / math.sqrt(float(stable_gamma))
        A = Vh[idx_a.to(Vh.device)] * c
        B = torch.zeros(m, r, dtype=A.dtype, device=A.device)
        B[rows_of[n]] = U_rows[:, idx_b.to(Vh.device)] * c
        if is_dtensor(W):
            dist.all_reduce(B, group=group)  # B is small (m×r): every rank gets all rows
        plan[n] = (A, B)
        buffers[n] = None
        del G, U_rows
        report("layer", i + 1, len(layers), n)

    # ---------------------------------------------------------------- 3. write, W0 ← W0 − ρ·B·A on each block
    with torch.no_grad():
        for n, layer in layers.items():
            A, B = plan[n]
            A = A.to(layer.lora_A.dtype)
            B = B.to(layer.lora_B.dtype)
            local(layer.lora_A).copy_(A[local_slices(layer.lora_A)])
            local(layer.lora_B).copy_(B[local_slices(layer.lora_B)])
            layer.alpha, layer.use_rslora, layer.dropout = alpha, bool(use_rslora), dropout
            layer.scaling = lora_scaling(r, alpha, bool(use_rslora))
            rows, cols = local_slices(layer.weight)
            w = local(layer.weight)
            w.copy_((w.float() - layer.scaling * (B[rows].float() @ A[:, cols].float())).to(w.dtype))
            setattr(layer, INIT_RECORD, (A.detach().float().cpu().clone(), B.detach().float().cpu().clone()))
    if freeze_base:
        keep = {id(p) for l in layers.values() for p in (l.lora_A, l.lora_B)}
        keep |= {id(p) for l in lora_layers_of(model).values() for p in (l.lora_A, l.lora_B) if p.requires_grad}
        for p in model.parameters():
            if id(p) not in keep and p.requires_grad:
                p.requires_grad_(False)
    return OrderedDict(layers)


@torch.no_grad()
def pissa_init_layer(layer, niter: Optional[int] = None, generator: Optional[torch.Generator] = None) -> None:
    """``pissa_init`` of a layer whose W0 is sharded by rows (FSDP2): the randomized SVD runs on the row blocks
    (:func:`~lora_kernels.init.dist_svd.sharded_randomized_svd`), every rank writes its own rows of B and of the
    residual W0 and the same A. Collective. An exact SVD (``niter=None``) would need the whole W0 on one rank, so a
    sharded layer needs ``niter`` (PEFT's ``pissa_niter_<k>``)."""
    from .init.dist_svd import sharded_randomized_svd
    from .init.pissa import INIT_RECORD

    def checks():
        if layer.merged:
            raise RuntimeError("pissa_init: the layer is merged; unmerge() it first")
        if niter is None:
            raise ValueError("pissa_init: a sharded layer needs niter (a randomized SVD on the row shards; the "
                             "exact SVD would gather the whole weight on one rank)")
        if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
            raise ValueError(f"pissa_init: niter must be a non-negative int, got {niter!r}")
        if layer.r > min(layer.out_features, layer.in_features):
            raise ValueError(f"pissa_init: r={layer.r} exceeds min(out, in) = "
                             f"{min(layer.out_features, layer.in_features)}")
        if float(layer.scaling) <= 0:
            raise ValueError(f"pissa_init needs a positive scaling, got {layer.scaling}")
        check_row_sharded_or_whole(layer.weight, "weight")
        for a in ("lora_A", "lora_B"):
            check_placement(getattr(layer, a), a)

    agree(capture_error(checks), "the layer was not changed")
    r, s = int(layer.r), float(layer.scaling)
    m, k = layer.out_features, layer.in_features
    W = layer.weight
    rows, cols = local_slices(W)
    w = local(W)
    group = group_of(W)
    U_rows, S, Vh = sharded_randomized_svd(w.detach().float(), min(4 * r, min(m, k)), int(niter), generator, group)
    root = torch.sqrt(S[:r] / s)
    A = (root[:, None] * Vh[:r]).to(layer.lora_A.dtype)
    B = torch.zeros(m, r, dtype=torch.float32, device=w.device)
    B[rows] = U_rows[:, :r] * root[None, :]
    if is_dtensor(W):
        dist.all_reduce(B, group=group)
    B = B.to(layer.lora_B.dtype)
    local(layer.lora_A).copy_(A[local_slices(layer.lora_A)])
    local(layer.lora_B).copy_(B[local_slices(layer.lora_B)])
    w.copy_((w.float() - s * (B[rows].float() @ A[:, cols].float())).to(w.dtype))
    setattr(layer, INIT_RECORD, (A.float().cpu().clone(), B.float().cpu().clone()))


# ----------------------------------------------------------------------------------------------- tensor parallel
def _tp_kind(layer) -> str:
    """"colwise" (W0, lora_B, bias: Shard(0); lora_A: Replicate) or "rowwise" (W0, lora_A: Shard(1); lora_B, bias:
    Replicate), from the placements; ValueError for any other layout."""
    from torch.distributed.tensor import Replicate, Shard

    def pl(t):
        if t is None:
            return None
        if not is_dtensor(t) or t.device_mesh.ndim != 1:
            return "other"
        p = t.placements[0]
        return "R" if isinstance(p, Replicate) else (f"S{p.dim}" if isinstance(p, Shard) else "other")

    got = (pl(layer.weight), pl(layer.lora_A), pl(layer.lora_B), pl(layer.bias))
    if got[:3] == ("S0", "R", "S0") and got[3] in (None, "S0"):
        return "colwise"
    if got[:3] == ("S1", "S1", "R") and got[3] in (None, "R"):
        return "rowwise"
    raise ValueError(f"tensor-parallel LoRALinear: placements (weight, lora_A, lora_B, bias) = {got} are neither "
                     f"colwise (S0, R, S0, S0) nor rowwise (S1, S1, R, R); shard it with LoRAColwiseParallel or "
                     f"LoRARowwiseParallel")


def tp_forward(layer, x: torch.Tensor, weight, bias, lora_A, lora_B, linear) -> torch.Tensor:
    """``LoRALinear.forward`` with DTensor parameters: the fused op ``linear`` (``lora_linear``'s signature) runs on
    each rank's shards (``local_map``), so no weight is ever gathered. ``x``, ``weight``, ``bias``, ``lora_A``,
    ``lora_B`` are what the layer computes with (its parameters after its autocast casts); the scaling, dropout,
    training mode and backend are the layer's.

    colwise: every rank computes its own output columns, ``x·W0_iᵀ + s·(x·Aᵀ)·B_iᵀ + b_i`` (x and A replicated);
    the gradients of x and A are partial sums (reduced by DTensor where needed).
    rowwise: every rank computes ``x_i·W0_iᵀ + s·(x_i·A_iᵀ)·Bᵀ`` from its input columns, a partial sum whose
    reduction (the layer's one all-reduce) also sums the LoRA branch; the bias is added once, to the sum."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import local_map

    kind = _tp_kind(layer)
    mesh = layer.weight.device_mesh
    scale, p, training, backend = layer.scaling, layer.dropout, layer.training, layer.backend
    if not isinstance(x, DTensor):  # a plain input is what each style's input layout says it is
        x = DTensor.from_local(x, mesh, [Replicate() if kind == "colwise" else Shard(x.dim() - 1)], run_check=False)
    last = Shard(x.dim() - 1)

    if kind == "colwise":
        if bias is None:
            def fn(x_, w_, a_, b_):
                return linear(x_, w_, a_, b_, scale, None, dropout_p=p, training=training, backend=backend)

            return local_map(fn, out_placements=[last], device_mesh=mesh,
                             in_placements=([Replicate()], [Shard(0)], [Replicate()], [Shard(0)]),
                             in_grad_placements=([Partial()], [Shard(0)], [Partial()], [Shard(0)]))(
                x, weight, lora_A, lora_B)

        def fn_b(x_, w_, a_, b_, bias_):
            return linear(x_, w_, a_, b_, scale, bias_, dropout_p=p, training=training, backend=backend)

        return local_map(fn_b, out_placements=[last], device_mesh=mesh,
                         in_placements=([Replicate()], [Shard(0)], [Replicate()], [Shard(0)], [Shard(0)]),
                         in_grad_placements=([Partial()], [Shard(0)], [Partial()], [Shard(0)], [Shard(0)]))(
            x, weight, lora_A, lora_B, bias)

    if x.placements[0] != last:
        x = x.redistribute(mesh, [last])

    def fn_r(x_, w_, a_, b_):
        return linear(x_, w_, a_, b_, scale, None, dropout_p=p, training=training, backend=backend)

    y = local_map(fn_r, out_placements=[Partial()], device_mesh=mesh,
                  in_placements=([last], [Shard(1)], [Shard(1)], [Replicate()]),
                  in_grad_placements=([last], [Shard(1)], [Shard(1)], [Partial()]))(x, weight, lora_A, lora_B)
    return y if bias is None else y + bias


def _styles():
    from functools import partial

    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    def partition(placements, style, name, module, device_mesh):
        for pname, param in list(module.named_parameters(recurse=False)):
            dist_param = nn.Parameter(
                distribute_tensor(param, device_mesh, [placements[pname]], src_data_rank=style.src_data_rank),
                requires_grad=param.requires_grad)
            module.register_parameter(pname, dist_param)

    def apply(style, module, device_mesh, placements):
        if module.merged:
            raise ValueError(f"{type(style).__name__}: the LoRALinear is merged; unmerge() it before sharding")
        return distribute_module(
            module, device_mesh, partial(partition, placements, style),
            partial(style._prepare_input_fn, style.input_layouts, style.desired_input_layouts),
            partial(style._prepare_output_fn, style.output_layouts, style.use_local_output))

    class LoRAColwiseParallel(ColwiseParallel):
        """``ColwiseParallel`` that also accepts :class:`~lora_kernels.LoRALinear`: W0, bias and lora_B are sharded by
        output rows (``Shard(0)``), lora_A is replicated (PEFT + transformers' ``tp_plan`` layout). Plain
        ``nn.Linear`` / ``nn.Embedding`` are handled as by ``ColwiseParallel``."""

        def _apply(self, module, device_mesh):
            if is_lora_layer(module):
                return apply(self, module, device_mesh,
                             {"weight": Shard(0), "bias": Shard(0), "lora_A": Replicate(), "lora_B": Shard(0)})
            return super()._apply(module, device_mesh)

    class LoRARowwiseParallel(RowwiseParallel):
        """``RowwiseParallel`` that also accepts :class:`~lora_kernels.LoRALinear`: W0 and lora_A are sharded by input
        columns (``Shard(1)``), lora_B and the bias are replicated; the LoRA branch's partial sums are reduced in the
        same all-reduce as the base output's. Plain ``nn.Linear`` / ``nn.Embedding`` as ``RowwiseParallel``."""

        def _apply(self, module, device_mesh):
            if is_lora_layer(module):
                self.desired_input_layouts = (Shard(-1),)
                return apply(self, module, device_mesh,
                             {"weight": Shard(1), "bias": Replicate(), "lora_A": Shard(1), "lora_B": Replicate()})
            return super()._apply(module, device_mesh)

    return LoRAColwiseParallel, LoRARowwiseParallel


def __getattr__(name):
    # The styles subclass torch's; built on first use so that importing this module needs no tensor-parallel import.
    if name in ("LoRAColwiseParallel", "LoRARowwiseParallel"):
        col, row = _styles()
        globals().update(LoRAColwiseParallel=col, LoRARowwiseParallel=row)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_lora_state_dict(model: nn.Module, state_dict, strict: bool = True, *, load):
    """``load_lora_state_dict`` into a sharded model, called on every rank with whole tensors (as
    :func:`lora_state_dict` returns them): every rank runs all the single-process checks (``load(model, state_dict,
    strict=strict)``, the single-process function), the verdicts are exchanged, then each rank copies its own
    blocks (:func:`collective_load`). Merged layers are refused (unmerge first)."""
    from collections.abc import Mapping

    def check():
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of name -> tensor, got {type(state_dict).__name__}")
        layers = lora_layers_of(model)
        for n, layer in layers.items():
            if layer.merged:
                raise ValueError(f"load_lora_state_dict: {n} is merged; unmerge() it before loading into a sharded "
                                 f"model; nothing was loaded")
        return layers

    return collective_load(model, check, lambda: load(model, state_dict, strict=strict), from_current=True)
