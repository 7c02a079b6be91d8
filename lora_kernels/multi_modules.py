"""``MultiLoRALinear`` (an ``nn.Linear`` drop-in serving one adapter per token), ``inject_multi_lora``,
``use_batch`` / ``set_batch`` and model-wide adapter loading (one slot id per adapter for the whole model).

State only; the math is ``lora_kernels.multi_lora_linear``. The batch set by ``use_batch`` belongs to the calling
thread / contextvars context. See docs/multi_lora.md ("The module", "Isolation guarantees").
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _autocast, _backend
from .ops._validate import FLOAT_DTYPES
from .ops.multi_lora import multi_lora_linear
from .pool import IN_FLIGHT_LOCK, AdapterPool, LoRABatch, hold_slots, release_slots
from .targets import check_target_modules, linear_refusal, matches, named_linears, no_match_error, replace_module

_POOL_BUFFERS = (
    ("lora_A_stack", "A_stack"),
    ("lora_B_stack", "B_stack"),
    ("lora_ranks", "ranks"),
    ("lora_scales", "scales"),
)


# ------------------------------------------------------------------------------------------ per-context batches
# layer -> LoRABatch, the batch each MultiLoRALinear uses when forward gets none. One immutable dict per thread and
# contextvars context (replaced, never mutated), so concurrent requests on one model are isolated. Eager code reads
# the ContextVar; compiled code reads _MIRROR, a thread-local that every change below keeps equal to the ContextVar
# of the context that made it (Dynamo traces and guards a thread-local attribute, it cannot trace ContextVar.get).
_NO_BATCHES: dict[nn.Module, LoRABatch] = {}
_ACTIVE: contextvars.ContextVar[dict[nn.Module, LoRABatch] | None] = contextvars.ContextVar(
    "lora_kernels_active_batches", default=None
)
_MIRROR = threading.local()


def _active_batches() -> dict[nn.Module, LoRABatch]:
    if torch.compiler.is_compiling():
        return getattr(_MIRROR, "batches", None) or _NO_BATCHES
    return _ACTIVE.get() or _NO_BATCHES


def swap_batches(updates: Mapping[nn.Module, LoRABatch | None]) -> dict[nn.Module, LoRABatch] | None:
    """Set (None: clear) the batch of some layers in the calling thread/context, unchecked; returns the previous
    state, to hand to :func:`restore_batches`. The low-level form of :func:`use_batch`, for hooks that set a batch
    before a forward and restore it after (the caller checks the batch and holds its slots)."""
    previous = _ACTIVE.get()
    new = dict(previous or _NO_BATCHES)
    for layer, batch in updates.items():
        if batch is None:
            new.pop(layer, None)
        else:
            new[layer] = batch
    _ACTIVE.set(new)
    _MIRROR.batches = new
    return previous


def restore_batches(previous: dict[nn.Module, LoRABatch] | None) -> None:
    """Put back the state :func:`swap_batches` returned."""
    _ACTIVE.set(previous)
    _MIRROR.batches = previous


def _check_batch_for(layers: Sequence[MultiLoRALinear], batch: LoRABatch | None) -> None:
    if batch is None:
        return
    if not isinstance(batch, LoRABatch):
        raise TypeError(f"batch must be a LoRABatch or None, got {type(batch).__name__}")
    devices = {m.weight.device for m in layers}
    if any(d != batch.device for d in devices):
        raise ValueError(
            f"batch is on {batch.device} but the model's MultiLoRALinear layers are on "
            f"{', '.join(sorted(map(str, devices)))}; prepare the batch with device="
        )


def _check_backend(backend: str | None) -> str | None:
    """Refuse an unknown backend name at the call (a layer would otherwise fail on every forward)."""
    if backend is not None:
        _backend.requested_backend(backend)  # TypeError/ValueError naming `backend` and the accepted names
    return backend


def _check_pool_dtype(dtype, weight_dtype: torch.dtype, what: str = "dtype") -> None:
    """The op takes a pool in the activations' dtype (the base weight's) or float32."""
    if dtype is None:
        return
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be one of {', '.join(map(str, FLOAT_DTYPES))} or None, got {dtype!r}")
    if dtype not in (weight_dtype, torch.float32):
        raise ValueError(
            f"{what}={dtype} cannot serve a layer whose weight is {weight_dtype}: the pool must be the "
            f"weight's dtype or torch.float32"
        )


WEIGHT_LAYOUTS = ("out_in", "in_out")  # nn.Linear's [out, in]; transformers Conv1D's [in, out]


def _check_weight_layout(weight_layout) -> None:
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout must be one of {', '.join(map(repr, WEIGHT_LAYOUTS))}, got {weight_layout!r}")


class MultiLoRALinear(nn.Module):
    """``y = x·Wᵀ + bias + scale_a·(x·A_aᵀ)·B_aᵀ`` with ``a`` the adapter (pool slot) of each token; inference only.

    ``out_features`` may be a list of widths for a fused projection (q|k|v, gate|up): each adapter then has one A and
    one B per slice (see :class:`~lora_kernels.AdapterPool`). Build from an existing layer with :meth:`from_linear`,
    or from an existing weight with :meth:`from_weight`. ``weight_layout`` says how ``weight`` is stored: ``"out_in"``
    (``[out, in]``, nn.Linear's) or ``"in_out"`` (``[in, out]``, transformers' ``Conv1D``, as in GPT-2; the op reads
    its transpose, a strided view, and the state dict keeps the checkpoint's layout).
    """

    weight_layout = "out_in"  # the class's default, also for layers pickled before the flag existed

    def __init__(
        self,
        in_features: int,
        out_features: int | Sequence[int],
        max_adapters: int,
        max_rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
        pool_dtype=None,
        backend: str | None = None,
        weight_layout: str = "out_in",
    ):
        super().__init__()
        _check_weight_layout(weight_layout)
        _check_backend(backend)
        _check_pool_dtype(pool_dtype, dtype or torch.get_default_dtype(), "pool_dtype")
        pool = AdapterPool(
            max_adapters,
            max_rank,
            in_features,
            out_features,
            dtype=pool_dtype if pool_dtype is not None else (dtype or torch.get_default_dtype()),
            device=device,
        )
        factory = {"device": device, "dtype": dtype}
        shape = (pool.out_features, in_features) if weight_layout == "out_in" else (in_features, pool.out_features)
        self.weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(pool.out_features, **factory), requires_grad=False) if bias else None
        self._init_pool(pool, backend, weight_layout)
        nn.init.kaiming_uniform_(self.base_weight(), a=5**0.5)  # nn.Linear's init, on the [out, in] view

    def _init_pool(self, pool: AdapterPool, backend: str | None, weight_layout: str) -> None:
        self.in_features = pool.in_features
        self.out_features = pool.out_features
        self.pool = pool
        self.backend = backend
        self.weight_layout = weight_layout
        for buf, attr in _POOL_BUFFERS:
            self.register_buffer(buf, getattr(pool, attr), persistent=False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        max_adapters: int,
        max_rank: int,
        dtype=None,
        slices: Sequence[int] | None = None,
        backend: str | None = None,
    ) -> MultiLoRALinear:
        """Wrap ``linear`` (its weight and bias are shared, not copied). ``dtype``: the pool's (default the weight's);
        ``slices``: output widths of a fused projection (default one slice of ``out_features``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        return cls.from_weight(
            linear.weight, linear.bias, max_adapters, max_rank, dtype=dtype, slices=slices, backend=backend
        )

    @classmethod
    def from_weight(
        cls,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        max_adapters: int,
        max_rank: int,
        *,
        weight_layout: str = "out_in",
        dtype=None,
        slices: Sequence[int] | None = None,
        backend: str | None = None,
    ) -> MultiLoRALinear:
        """A layer over an existing base ``weight`` and ``bias`` (parameters of another module, shared, not copied):
        ``weight`` is ``[out, in]`` with ``weight_layout="out_in"``, ``[in, out]`` with ``"in_out"`` (a transformers
        ``Conv1D``'s). ``dtype``, ``slices``, ``backend``: as :meth:`from_linear`."""
        _check_weight_layout(weight_layout)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            raise TypeError(
                f"weight must be a 2-D nn.Parameter, got {type(weight).__name__}"
                + (f" of shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else "")
            )
        out_f, in_f = weight.shape if weight_layout == "out_in" else weight.shape[::-1]
        if bias is not None and (not isinstance(bias, nn.Parameter) or tuple(bias.shape) != (out_f,)):
            raise TypeError(
                f"bias must be None or an nn.Parameter of shape ({out_f},), got {type(bias).__name__}"
                + (f" of shape {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else "")
            )
        _check_backend(backend)
        _check_pool_dtype(dtype, weight.dtype)
        out = out_f if slices is None else list(slices)
        if slices is not None and sum(out) != out_f:
            raise ValueError(f"slices {out} must sum to the layer's out_features={out_f}")
        pool = AdapterPool(max_adapters, max_rank, in_f, out, dtype=dtype or weight.dtype, device=weight.device)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.weight = weight
        layer.bias = bias
        layer._init_pool(pool, backend, weight_layout)
        return layer

    def base_weight(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (for ``weight_layout="in_out"`` a transposed view, no copy)."""
        return self.weight if self.weight_layout == "out_in" else self.weight.t()

    def _apply(self, fn, *args, **kwargs):
        scales, pool_dtype = self.lora_scales, self.lora_A_stack.dtype
        super()._apply(fn, *args, **kwargs)
        # Keep the pool's tensors the module's buffers after .to()/.half(); scales stay float32 (from the values
        # before the cast: 1/3 through fp16 would come back 0.333984375, 1e5 inf), ranks int32.
        if self.lora_scales.dtype != torch.float32:
            self.lora_scales = scales.to(device=self.lora_scales.device, dtype=torch.float32, copy=True)
        if (
            self.lora_A_stack.dtype != pool_dtype
            and self.lora_A_stack.device.type != "meta"
            and not (torch.isfinite(self.lora_A_stack).all() and torch.isfinite(self.lora_B_stack).all())
        ):
            # AdapterPool.load refuses such values; a cast after loading cannot refuse, so it says so.
            slots = sorted(
                {
                    int(i)
                    for i in (
                        (~torch.isfinite(self.lora_A_stack)).flatten(1).any(1)
                        | (~torch.isfinite(self.lora_B_stack)).flatten(1).any(1)
                    )
                    .nonzero()
                    .flatten()
                    .tolist()
                }
            )
            names = [n for n, s in self.pool.names.items() if s in slots]
            warnings.warn(
                f"MultiLoRALinear: casting the pool to {self.lora_A_stack.dtype} overflowed adapter(s) "
                f"{names} to inf; keep the pool in float32 (MultiLoRALinear.from_linear(dtype=...)) or "
                f"reload them",
                RuntimeWarning,
                stacklevel=3,
            )
        for buf, attr in _POOL_BUFFERS:
            setattr(self.pool, attr, getattr(self, buf))
        self.pool.dtype = self.lora_A_stack.dtype
        return self

    # ------------------------------------------------------------------------------------------------- adapters
    def load_adapter(
        self, name: str, lora_A, lora_B, alpha=None, use_rslora: bool = False, scale=None, slot: int | None = None
    ) -> int:
        """Copy an adapter into the pool (see :meth:`AdapterPool.load`); returns its slot."""
        return self.pool.load(name, lora_A, lora_B, alpha=alpha, use_rslora=use_rslora, scale=scale, slot=slot)

    def unload_adapter(self, name: str) -> int:
        return self.pool.unload(name)

    def slot_of(self, name: str) -> int:
        return self.pool.slot_of(name)

    # ------------------------------------------------------------------------------------------------------ forward
    @property
    def batch(self) -> LoRABatch | None:
        """The batch set for this layer in the calling thread/context (:func:`use_batch`, :func:`set_batch`)."""
        return _active_batches().get(self)

    @batch.setter
    def batch(self, batch: LoRABatch | None) -> None:
        _check_batch_for([self], batch)
        swap_batches({self: batch})

    def forward(self, x: torch.Tensor, batch: LoRABatch | None = None) -> torch.Tensor:
        """``batch`` (default: the one set in this thread/context by :func:`use_batch`); without any, the base layer
        alone."""
        batch = batch if batch is not None else _active_batches().get(self)
        weight = self.base_weight()
        if batch is None:
            return F.linear(x, weight, self.bias)
        x, weight, bias = self._autocast(x, weight)
        return multi_lora_linear(x, weight, bias, self.pool, batch, backend=self.backend)

    def _autocast(self, x: torch.Tensor, weight: torch.Tensor):
        """Inside ``torch.autocast``, (x, W0, bias) in the autocast dtype, as an autocast ``nn.Linear`` (and this
        layer without a batch) computes: the result then has that dtype too. Left alone when the pool is neither that
        dtype nor float32 (the op takes a pool of x's dtype or float32), for float64 or non-float x, and outside
        autocast."""
        bias = self.bias
        dt = _autocast.autocast_dtype(x)
        if dt is None or self.pool.dtype not in (dt, torch.float32):
            return x, weight, bias
        return x.to(dt), weight.to(dt), bias.to(dt) if bias is not None else None

    def extra_repr(self) -> str:
        p = self.pool
        out = list(p.slices) if p.num_slices > 1 else p.out_features
        layout = f", weight_layout={self.weight_layout!r}" if self.weight_layout != "out_in" else ""
        return (
            f"in_features={self.in_features}, out_features={out}, max_adapters={p.max_adapters}, "
            f"max_rank={p.max_rank}, loaded={len(p)}, bias={self.bias is not None}{layout}"
        )


# --------------------------------------------------------------------------------------------------- model helpers
def multi_lora_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    """Qualified name → MultiLoRALinear, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def inject_multi_lora(
    model: nn.Module,
    target_modules: str | Sequence[str],
    max_adapters: int,
    max_rank: int,
    dtype=None,
    backend: str | None = None,
) -> list[str]:
    """Replace, in place, every ``nn.Linear`` whose qualified name matches ``target_modules`` (PEFT's matching, as in
    :func:`lora_kernels.inject_lora`) by a :class:`MultiLoRALinear` with an empty pool. Returns the replaced names;
    raises listing the candidates when nothing matches. A Linear shared under several names becomes one layer, under
    every name. Refused, before anything changes: a Linear whose forward is not nn.Linear's (a subclass with its own
    forward, a replaced instance forward), a parametrized or hook-computed (weight_norm) weight, an unknown
    ``backend`` and a ``dtype`` other than the weight's or float32."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = check_target_modules(target_modules)
    _check_backend(backend)
    # The model itself ("") is no candidate (wrap a bare nn.Linear with MultiLoRALinear.from_linear). A Linear
    # reachable under two names (shared, tied) is one layer; it is adapted once and replaced under every name, so
    # that no path of the model keeps the unadapted module.
    candidates = named_linears(model)
    matched = {id(candidates[n]) for n in candidates if matches(n, targets)}
    if not matched:
        raise no_match_error(target_modules, list(candidates))
    chosen = [n for n, m in candidates.items() if id(m) in matched]
    refused = []
    for name in chosen:
        why = linear_refusal(candidates[name])
        if why:
            refused.append(f"{name}: {why}")
    if refused:
        raise ValueError(
            "inject_multi_lora cannot wrap these layers without losing what they compute: "
            + "; ".join(refused)
            + " (leave them out of target_modules)"
        )
    # Build every replacement before touching the model, so a failure leaves it unchanged.
    layers: dict[int, MultiLoRALinear] = {}
    for name in chosen:
        linear = candidates[name]
        if id(linear) not in layers:
            layers[id(linear)] = MultiLoRALinear.from_linear(
                linear, max_adapters, max_rank, dtype=dtype, backend=backend
            )
    for name in chosen:
        replace_module(model, name, layers[id(candidates[name])])
    return chosen


def set_batch(model: nn.Module, batch: LoRABatch | None) -> None:
    """Set (None: clear) the batch every MultiLoRALinear of ``model`` uses when forward gets none, in the calling
    thread/context only (other threads keep theirs; a thread started later starts without one)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = list(multi_lora_layers(model).values())
    _check_batch_for(layers, batch)
    swap_batches({m: batch for m in layers})


@contextlib.contextmanager
def use_batch(model: nn.Module, batch: LoRABatch | None) -> Iterator[nn.Module]:
    """``with use_batch(model, batch): model(...)``: every MultiLoRALinear inside uses ``batch`` in the calling
    thread/context (the previous batches are restored on exit). Concurrent requests, each in its own thread (or
    asyncio task) with its own ``use_batch``, do not see each other's batch."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = list(multi_lora_layers(model).values())
    if not layers:
        raise ValueError("the model has no MultiLoRALinear layer (see inject_multi_lora)")
    _check_batch_for(layers, batch)
    held = hold_slots([m.pool for m in layers], _batch_slots(batch))
    previous = swap_batches({m: batch for m in layers})
    try:
        yield model
    finally:
        restore_batches(previous)
        release_slots(held)


def _batch_slots(batch: LoRABatch | None) -> list[int] | None:
    """The slots a batch uses (host ids), None when unknown (ids on the device), [] for no batch."""
    if batch is None:
        return []
    return batch.host_unique


def _layer_aliases(model: nn.Module) -> dict[str, MultiLoRALinear]:
    """Every qualified name of every MultiLoRALinear, a shared layer under each of its names."""
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, MultiLoRALinear)}


def load_multi_adapter(
    model: nn.Module,
    name: str,
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    alpha=None,
    use_rslora: bool = False,
    scale=None,
    slot: int | None = None,
) -> int:
    """Load adapter ``name`` into every MultiLoRALinear of ``model`` at one slot, and return it (the id to use in a
    :class:`LoRABatch` for the tokens of this adapter).

    ``weights``: qualified layer name → ``(lora_A, lora_B)`` (per-slice lists allowed, as in
    :meth:`AdapterPool.load`). Layers the adapter does not target get the slot reserved (no weights, no cost). The
    slot is the lowest free in every layer unless given. All or nothing: on any error no layer keeps the adapter.
    """
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping of layer name -> (lora_A, lora_B), got {type(weights).__name__}")
    bad = [k for k, v in weights.items() if not isinstance(v, (tuple, list)) or len(v) != 2]
    if bad:
        raise ValueError(f"weights[{bad[0]!r}] must be a pair (lora_A, lora_B)")
    layers = multi_lora_layers(model)
    if not layers:
        raise ValueError("the model has no MultiLoRALinear layer (see inject_multi_lora)")
    aliases = _layer_aliases(model)
    unknown = [k for k in weights if k not in aliases]
    if unknown:
        raise KeyError(f"{unknown} are not MultiLoRALinear layers of the model; layers: {', '.join(aliases)}")
    # A shared layer may be named by any of its names, but only once: weights are given per layer.
    canonical = {id(m): n for n, m in layers.items()}
    by_layer: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, v in weights.items():
        c = canonical[id(aliases[k])]
        if c in by_layer:
            raise ValueError(f"weights names one shared layer twice ({c!r} and {k!r}); give it once")
        by_layer[c] = v
    weights = by_layer
    taken = [n for n, m in layers.items() if name in m.pool]
    if taken:
        raise ValueError(f"adapter {name!r} is already loaded (layers {taken[:5]}...); unload it first")
    if slot is None:
        free = set.intersection(*(set(m.pool.free_slots()) for m in layers.values()))
        if not free:
            raise RuntimeError("no slot is free in every layer; unload an adapter first")
        slot = min(free)
    done: list[MultiLoRALinear] = []
    lname = ""
    try:
        for lname, m in layers.items():
            if lname in weights:
                a, b = weights[lname]
                m.pool.load(name, a, b, alpha=alpha, use_rslora=use_rslora, scale=scale, slot=slot)
            else:
                m.pool.reserve(name, slot=slot)
            done.append(m)
    except (ValueError, TypeError) as exc:
        for m in done:
            m.pool._unload(name)
        raise type(exc)(f"layer {lname!r}: {exc}; the adapter was loaded in no layer") from exc
    except Exception:
        for m in done:
            m.pool._unload(name)
        raise
    return slot


def unload_multi_adapter(model: nn.Module, name: str) -> int:
    """Remove adapter ``name`` from every layer; returns the slot it had."""
    pools = [m.pool for m in multi_lora_layers(model).values() if name in m.pool]
    if not pools:
        raise KeyError(f"adapter {name!r} is not loaded in this model")
    with IN_FLIGHT_LOCK:  # every layer or none: no request can start using the slot half way
        for pool in pools:
            pool.check_unloadable(name)
        slots = {pool._unload(name) for pool in pools}
    return slots.pop()


def multi_adapter_slot(model: nn.Module, name: str) -> int:
    """The slot of adapter ``name`` (the same in every layer)."""
    for m in multi_lora_layers(model).values():
        if name in m.pool:
            return m.pool.slot_of(name)
    raise KeyError(f"adapter {name!r} is not loaded in this model")
