"""LoRA on sharded models: FSDP2 (``fully_shard``) and tensor parallel (DTensor) versions of the model-level helpers.

A ``LoRALinear`` under ``fully_shard`` needs nothing special to train: FSDP2 swaps its parameters for the all-gathered
(plain, unsharded) tensors before ``forward`` and before its backward, so the fused op only ever sees whole tensors,
and between steps the module holds ``DTensor`` shards (``Shard(0)``: each rank owns a block of rows of W0, lora_A and
lora_B). What breaks is everything that reads the parameters *outside* forward: merging, state dicts, adapter files,
the inits. The functions here are their collective versions; the public functions (``LoRALinear.merge``,
``lora_state_dict``, ``save_adapter``, ``load_adapter``, ``lora_ga_init``, ``pissa_init``) dispatch to them when a
layer's parameters are DTensors, so a user calls the same API on every rank.

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
import threading
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

_STATE = threading.local()  # .bypass: inside one of our own calls of a public function (dispatch turned off)


# ------------------------------------------------------------------------------------------------------ detection
def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without torch.distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    DT = _dtensor_type()
    return DT is not None and isinstance(t, DT)


def _bypassed() -> bool:
    return getattr(_STATE, "bypass", False)


@contextlib.contextmanager
def _bypass():
    old = _bypassed()
    _STATE.bypass = True
    try:
        yield
    finally:
        _STATE.bypass = old


def is_sharded_layer(layer) -> bool:
    """True when the layer's base weight or adapter is a DTensor (FSDP2 shards between steps, tensor parallel)."""
    if _bypassed():
        return False
    return any(is_dtensor(getattr(layer, a, None)) for a in ("weight", "lora_A", "lora_B"))


def _fsdp_modules(model: nn.Module) -> List[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` is (or contains) an FSDP2 module or a LoRALinear with DTensor parameters."""
    if _bypassed() or not isinstance(model, nn.Module):
        return False
    from .modules import LoRALinear

    if _fsdp_modules(model):
        return True
    return any(is_sharded_layer(m) for m in model.modules() if isinstance(m, LoRALinear))


def _reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit of ``model`` back into its sharded state. The root keeps its parameters unsharded after a
    forward without backward; writing into those would be lost at the next all-gather."""
    for m in _fsdp_modules(model):
        m.reshard()


# ------------------------------------------------------------------------------------------------------ consensus
def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_ERRORS = {c.__name__: c for c in (TypeError, ValueError, RuntimeError, FileNotFoundError, NotADirectoryError,
                                     PermissionError, OSError)}


def agree(error: Optional[BaseException], what: str = "") -> None:
    """Collective: every rank passes the error its local checks raised (or None); if any rank failed, every rank
    raises the same error (the first failing rank's type and message, naming the rank). A no-op verdict exchange of
    one small object per rank; without torch.distributed it simply re-raises ``error``."""
    if not _dist_on():
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


def _check(fn) -> Optional[BaseException]:
    """Run the local checks ``fn()``; return the error instead of raising it (for :func:`agree`)."""
    try:
        fn()
    except (TypeError, ValueError, RuntimeError, OSError) as exc:
        return exc
    return None


def _same_on_every_rank(name: str, value) -> None:
    """Collective: ValueError on every rank when ``value`` differs between ranks (those settings must agree)."""
    if not _dist_on():
        return
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise ValueError(f"{name} must be the same on every rank, got {values} (by rank)")


# ------------------------------------------------------------------------------------------------ local blocks
def _placement_check(t: torch.Tensor, what: str) -> None:
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


def _group_of(t: torch.Tensor):
    return t.device_mesh.get_group() if is_dtensor(t) else None


def _row_sharded_or_whole(t: torch.Tensor, what: str) -> None:
    """LoRA-GA/PiSSA work on row blocks of W0 (FSDP2's layout) or on a whole W0."""
    if is_dtensor(t):
        from torch.distributed.tensor import Shard

        _placement_check(t, what)
        if not all(isinstance(p, Shard) and p.dim == 0 for p in t.placements):
            raise ValueError(f"{what}: placements {t.placements}; this init needs W0 whole or sharded by rows "
                             f"(Shard(0), as fully_shard does)")


# --------------------------------------------------------------------------------------------- merge / unmerge
def _merge_checks(layer) -> None:
    if layer.merged:
        raise RuntimeError("this LoRALinear is already merged")
    for attr in ("weight", "lora_A", "lora_B"):
        _placement_check(getattr(layer, attr), attr)


@torch.no_grad()
def merge_layer(layer) -> None:
    """``LoRALinear.merge`` on a sharded layer: each rank adds its own block of s·B·A to its block of W0 (the adapter
    is gathered, the base weight never is). Collective. Refuses on every rank, nothing changed, when any rank's block
    of the merged weight would not be finite. ``unmerge`` restores every block bit for bit."""
    from .modules import _acc_dtype

    agree(_check(lambda: _merge_checks(layer)), "nothing was merged")
    W = layer.weight
    rows, cols = local_slices(W)
    A, B = full(layer.lora_A), full(layer.lora_B)
    w_loc = local(W)
    acc = _acc_dtype(w_loc.dtype)

    def compute():
        merged = w_loc.to(acc) + layer.scaling * (B[rows].to(acc) @ A[:, cols].to(acc))
        if not torch.isfinite(merged).all():
            raise ValueError("merge refused: the merged weight would contain inf or NaN; nothing was changed")
        out = merged.to(w_loc.dtype)
        if not torch.isfinite(out).all():
            raise ValueError(f"merge refused: the merged weight overflows {w_loc.dtype}; nothing was changed")
        return out

    result = {}
    agree(_check(lambda: result.setdefault("w", compute())))
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
def _layers(model: nn.Module):
    from .modules import lora_layers

    return lora_layers(model)


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``lora_state_dict`` of a sharded model: the whole adapter tensors (plain, detached copies) on every rank, keyed
    as for an unsharded model. Collective (one all-gather per adapter tensor)."""
    layers = _layers(model)
    agree(_check(lambda: [_placement_check(getattr(l, a), f"{n}.{a}") for n, l in layers.items()
                          for a in ("lora_A", "lora_B")]))
    _reshard(model)
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
        with _bypass():
            yield
    finally:
        for name, (a, b) in saved.items():
            layers[name]._parameters["lora_A"] = a
            layers[name]._parameters["lora_B"] = b


def save_adapter(model: nn.Module, path, *, convert_to_original: bool = True,
                 base_model_name_or_path: Optional[str] = None) -> Dict[str, object]:
    """``save_adapter`` of a sharded model, called on every rank: the adapters are gathered whole, rank 0 writes the
    same file a single process would, the other ranks write nothing; every rank returns the config. A bad argument on
    any rank, or a failed write on rank 0, raises the same error on every rank."""
    import os

    from . import io

    def checks():
        if not isinstance(model, nn.Module):
            raise TypeError(f"save_adapter: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"save_adapter: path must be a str or os.PathLike (a directory), "
                            f"got {type(path).__name__}")
        if not isinstance(convert_to_original, bool):
            raise TypeError(f"save_adapter: convert_to_original must be a bool, got {convert_to_original!r}")
        layers = _layers(io._unwrap_peft(model))
        if not layers:
            raise ValueError("save_adapter: the model has no LoRALinear layer (use inject_lora or lora_ga_init first)")
        for n, layer in layers.items():
            if layer.merged:
                raise ValueError(f"save_adapter: {n} is merged; unmerge() it first (its W0 holds the adapter)")
            for a in ("lora_A", "lora_B"):
                _placement_check(getattr(layer, a), f"{n}.{a}")

    agree(_check(checks), "nothing was written")
    _same_on_every_rank("save_adapter: convert_to_original", convert_to_original)
    inner = io._unwrap_peft(model)
    _reshard(inner)
    layers = _layers(inner)
    whole = OrderedDict((n, (full(l.lora_A).clone(), full(l.lora_B).clone())) for n, l in layers.items())
    rank = dist.get_rank() if _dist_on() else 0
    config, error = None, None
    if rank == 0:
        try:
            with _whole_adapters(layers, whole):
                config = io.save_adapter(model, path, convert_to_original=convert_to_original,
                                         base_model_name_or_path=base_model_name_or_path)
        except Exception as exc:  # the write failed on rank 0: every rank must hear of it
            error = exc
    agree(error, "rank 0 could not write the adapter")
    if _dist_on():
        box = [config]
        dist.broadcast_object_list(box, src=0)
        config = box[0]
    return config


def load_adapter(model: nn.Module, path, *, backend: Optional[str] = None,
                 lora_dtype: Optional[torch.dtype] = None) -> Dict[str, nn.Module]:
    """``load_adapter`` into a sharded model, called on every rank: every rank reads and checks the file (all checks
    of the single-process load), the verdicts are exchanged, and only then does each rank copy its own blocks of the
    adapter. Nothing changes on any rank when any rank's check fails. The model must already hold the LoRALinear
    layers (inject before sharding): a sharded ``nn.Linear`` cannot be wrapped afterwards."""
    import os

    from . import io

    snapshot = {}

    def checks():
        if not isinstance(model, nn.Module):
            raise TypeError(f"load_adapter: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"load_adapter: path must be a str or os.PathLike (a directory), "
                            f"got {type(path).__name__}")
        layers = _layers(io._unwrap_peft(model))
        if not layers:
            raise ValueError("load_adapter: this sharded model has no LoRALinear layer; call inject_lora before "
                             "fully_shard / parallelize_module (a sharded nn.Linear cannot be wrapped afterwards)")
        for n, layer in layers.items():
            for a in ("lora_A", "lora_B"):
                _placement_check(getattr(layer, a), f"{n}.{a}")

    agree(_check(checks), "nothing was loaded")
    inner = io._unwrap_peft(model)
    _reshard(inner)
    layers = _layers(inner)
    scratch = OrderedDict()
    for n, layer in layers.items():
        A, B = layer.lora_A, layer.lora_B
        scratch[n] = (torch.zeros(tuple(A.shape), dtype=A.dtype, device=local(A).device),
                      torch.zeros(tuple(B.shape), dtype=B.dtype, device=local(B).device))
        snapshot[n] = (layer.alpha, layer.use_rslora, layer.dropout, layer.scaling)
    error = None
    try:
        with _whole_adapters(layers, scratch):
            io.load_adapter(model, path, backend=backend, lora_dtype=lora_dtype)
    except Exception as exc:
        error = exc
    try:
        agree(error, "nothing was loaded")
    except Exception:
        for n, (alpha, rs, drop, scaling) in snapshot.items():  # a rank whose own load passed: undo its settings
            layers[n].alpha, layers[n].use_rslora, layers[n].dropout, layers[n].scaling = alpha, rs, drop, scaling
        raise
    with torch.no_grad():
        for n, layer in layers.items():
            A, B = scratch[n]
            local(layer.lora_A).copy_(A[local_slices(layer.lora_A)])
            local(layer.lora_B).copy_(B[local_slices(layer.lora_B)])
    return OrderedDict(layers)
