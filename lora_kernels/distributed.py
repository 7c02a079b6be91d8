"""LoRA layers on sharded models (FSDP2 ``fully_shard``, DTensor tensor parallel): the low layer that the public
functions call when a layer's parameters are DTensors (merge, state dicts, adapter files, tensor-parallel forward).

It imports nothing above it: LoRA layers are recognised by their attributes, and the single-process steps (check,
save, load, the op) are passed in by the callers. Every rank calls; arguments are checked on every rank and the
verdicts exchanged (``agree``) before the first collective; adapters are gathered whole, W0 never; rank 0 writes
files. Layouts: plain tensors, or a 1-D mesh with ``Shard(0)`` / ``Shard(1)`` / ``Replicate()``. See
docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import OrderedDict

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


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
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
    return (
        isinstance(module, nn.Module)
        and all(isinstance(getattr(module, a, None), torch.Tensor) for a in ("weight", "lora_A", "lora_B"))
        and all(hasattr(module, a) for a in ("r", "scaling", "merged"))
    )


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


_ERRORS = {
    c.__name__: c
    for c in (TypeError, ValueError, RuntimeError, FileNotFoundError, NotADirectoryError, PermissionError, OSError)
}


def agree(error: BaseException | None, what: str = "") -> None:
    """Collective: every rank passes the error its local checks raised (or None); if any rank failed, every rank
    raises the same error (the first failing rank's type and message, naming the rank). A no-op verdict exchange of
    one small object per rank; without torch.distributed it simply re-raises ``error``."""
    if not dist_on():
        if error is not None:
            raise error
        return
    mine = None if error is None else (type(error).__name__, str(error))
    verdicts: list[tuple[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, mine)
    failed = [(rank, v) for rank, v in enumerate(verdicts) if v is not None]
    if not failed:
        return
    rank, (name, msg) = failed[0]
    others = [str(r) for r, _ in failed[1:]]
    where = f"rank {rank}" + (f" (and rank {', '.join(others)})" if others else "")
    cls = _ERRORS.get(name, RuntimeError)
    raise cls(f"{msg} [on {where}; every rank refused{', ' + what if what else ''}]") from error


def capture_error(fn) -> BaseException | None:
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


def local_slices(t: torch.Tensor) -> tuple[slice, ...]:
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
            raise ValueError(
                f"{what}: placements {t.placements}; this init needs W0 whole or sharded by rows "
                f"(Shard(0), as fully_shard does)"
            )


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
def lora_layers_of(model: nn.Module, is_layer=None) -> dict[str, nn.Module]:
    """Qualified name → LoRA layer of ``model``, in module order (a shared layer once, under its first name): the
    modules :func:`is_lora_layer` recognises, or those for which ``is_layer(module)`` is true."""
    test = is_lora_layer if is_layer is None else is_layer
    return {n: m for n, m in model.named_modules() if test(m)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``lora_state_dict`` of a sharded model: the whole adapter tensors (plain, detached copies) on every rank, keyed
    as for an unsharded model. Collective (one all-gather per adapter tensor)."""
    layers = lora_layers_of(model)
    agree(
        capture_error(
            lambda: [
                check_placement(getattr(l, a), f"{n}.{a}") for n, l in layers.items() for a in ("lora_A", "lora_B")
            ]
        )
    )
    reshard(model)
    out = OrderedDict()
    for name, layer in layers.items():
        prefix = f"{name}." if name else ""
        out[prefix + "lora_A"] = full(layer.lora_A).clone()
        out[prefix + "lora_B"] = full(layer.lora_B).clone()
    return out


@contextlib.contextmanager
def _whole_adapters(layers, values: dict[str, tuple[torch.Tensor, torch.Tensor]]):
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


def _checked_layers(check, what: str) -> dict[str, nn.Module]:
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


def collective_save(model: nn.Module, check, save, same: dict[str, object] | None = None):
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
            scratch[n] = (
                torch.zeros(tuple(A.shape), dtype=A.dtype, device=local(A).device),
                torch.zeros(tuple(B.shape), dtype=B.dtype, device=local(B).device),
            )
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


# ----------------------------------------------------------------------------------------------- tensor parallel
def _tp_kind(layer) -> str:
    """ "colwise" (W0, lora_B, bias: Shard(0); lora_A: Replicate) or "rowwise" (W0, lora_A: Shard(1); lora_B, bias:
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
    raise ValueError(
        f"tensor-parallel LoRALinear: placements (weight, lora_A, lora_B, bias) = {got} are neither "
        f"colwise (S0, R, S0, S0) nor rowwise (S1, S1, R, R); shard it with LoRAColwiseParallel or "
        f"LoRARowwiseParallel"
    )


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

            return local_map(
                fn,
                out_placements=[last],
                device_mesh=mesh,
                in_placements=([Replicate()], [Shard(0)], [Replicate()], [Shard(0)]),
                in_grad_placements=([Partial()], [Shard(0)], [Partial()], [Shard(0)]),
            )(x, weight, lora_A, lora_B)

        def fn_b(x_, w_, a_, b_, bias_):
            return linear(x_, w_, a_, b_, scale, bias_, dropout_p=p, training=training, backend=backend)

        return local_map(
            fn_b,
            out_placements=[last],
            device_mesh=mesh,
            in_placements=([Replicate()], [Shard(0)], [Replicate()], [Shard(0)], [Shard(0)]),
            in_grad_placements=([Partial()], [Shard(0)], [Partial()], [Shard(0)], [Shard(0)]),
        )(x, weight, lora_A, lora_B, bias)

    if x.placements[0] != last:
        x = x.redistribute(mesh, [last])

    def fn_r(x_, w_, a_, b_):
        return linear(x_, w_, a_, b_, scale, None, dropout_p=p, training=training, backend=backend)

    y = local_map(
        fn_r,
        out_placements=[Partial()],
        device_mesh=mesh,
        in_placements=([last], [Shard(1)], [Shard(1)], [Replicate()]),
        in_grad_placements=([last], [Shard(1)], [Shard(1)], [Partial()]),
    )(x, weight, lora_A, lora_B)
    return y if bias is None else y + bias


def _styles():
    from functools import partial

    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    def partition(placements, style, name, module, device_mesh):
        for pname, param in list(module.named_parameters(recurse=False)):
            dist_param = nn.Parameter(
                distribute_tensor(param, device_mesh, [placements[pname]], src_data_rank=style.src_data_rank),
                requires_grad=param.requires_grad,
            )
            module.register_parameter(pname, dist_param)

    def apply(style, module, device_mesh, placements):
        if module.merged:
            raise ValueError(f"{type(style).__name__}: the LoRALinear is merged; unmerge() it before sharding")
        return distribute_module(
            module,
            device_mesh,
            partial(partition, placements, style),
            partial(style._prepare_input_fn, style.input_layouts, style.desired_input_layouts),
            partial(style._prepare_output_fn, style.output_layouts, style.use_local_output),
        )

    class LoRAColwiseParallel(ColwiseParallel):
        """``ColwiseParallel`` that also accepts :class:`~lora_kernels.LoRALinear`: W0, bias and lora_B are sharded by
        output rows (``Shard(0)``), lora_A is replicated (PEFT + transformers' ``tp_plan`` layout). Plain
        ``nn.Linear`` / ``nn.Embedding`` are handled as by ``ColwiseParallel``."""

        def _apply(self, module, device_mesh):
            if is_lora_layer(module):
                return apply(
                    self,
                    module,
                    device_mesh,
                    {"weight": Shard(0), "bias": Shard(0), "lora_A": Replicate(), "lora_B": Shard(0)},
                )
            return super()._apply(module, device_mesh)

    class LoRARowwiseParallel(RowwiseParallel):
        """``RowwiseParallel`` that also accepts :class:`~lora_kernels.LoRALinear`: W0 and lora_A are sharded by input
        columns (``Shard(1)``), lora_B and the bias are replicated; the LoRA branch's partial sums are reduced in the
        same all-reduce as the base output's. Plain ``nn.Linear`` / ``nn.Embedding`` as ``RowwiseParallel``."""

        def _apply(self, module, device_mesh):
            if is_lora_layer(module):
                self.desired_input_layouts = (Shard(-1),)
                return apply(
                    self,
                    module,
                    device_mesh,
                    {"weight": Shard(1), "bias": Replicate(), "lora_A": Shard(1), "lora_B": Replicate()},
                )
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
                raise ValueError(
                    f"load_lora_state_dict: {n} is merged; unmerge() it before loading into a sharded "
                    f"model; nothing was loaded"
                )
        return layers

    return collective_load(model, check, lambda: load(model, state_dict, strict=strict), from_current=True)
