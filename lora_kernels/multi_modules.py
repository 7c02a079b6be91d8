"""``MultiLoRALinear``: an ``nn.Linear`` drop-in that serves many LoRA adapters at once, one per token; plus
``inject_multi_lora``, the :func:`use_batch` context manager and model-level adapter loading.

State only; the math is :func:`lora_kernels.multi_lora_linear`. A layer holds the base ``weight``/``bias`` (shared
with the wrapped ``nn.Linear``, so the model's state dict is unchanged) and an :class:`~lora_kernels.AdapterPool`
whose tensors are registered as non-persistent buffers (they follow ``.to()``/``.cuda()``, the pool's scales stay
float32). Which adapter each token uses comes from a :class:`~lora_kernels.LoRABatch` passed to ``forward`` or set
on every layer of a model by ``with use_batch(model, batch):``, so unmodified models (e.g. transformers) work.

Example::

    inject_multi_lora(model, ["q_proj", "v_proj"], max_adapters=64, max_rank=16)
    slot = load_multi_adapter(model, "customer-42", {"layers.0.attn.q_proj": (A, B), ...}, alpha=32)
    batch = LoRABatch.prepare([slot, -1, slot, ...], device="cuda")   # one id per token of the flattened input
    with use_batch(model, batch):
        out = model(input_ids)

Slot ids are model-wide: :func:`load_multi_adapter` puts an adapter into the same slot of every layer (reserving the
slot, at no cost, in layers the adapter does not target), so one batch of slot ids serves the whole model.
"""

from __future__ import annotations

import contextlib
import re
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import _matches
from .ops.multi_lora import multi_lora_linear
from .pool import AdapterPool, LoRABatch

_POOL_BUFFERS = (("lora_A_stack", "A_stack"), ("lora_B_stack", "B_stack"), ("lora_ranks", "ranks"),
                 ("lora_scales", "scales"))


class MultiLoRALinear(nn.Module):
    """``y = x·Wᵀ + bias + scale_a·(x·A_aᵀ)·B_aᵀ`` with ``a`` the adapter (pool slot) of each token; inference only.

    ``out_features`` may be a list of widths for a fused projection (q|k|v, gate|up): each adapter then has one A and
    one B per slice (see :class:`~lora_kernels.AdapterPool`). Build from an existing layer with :meth:`from_linear`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: Union[int, Sequence[int]],
        max_adapters: int,
        max_rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
        pool_dtype=None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        pool = AdapterPool(max_adapters, max_rank, in_features, out_features,
                           dtype=pool_dtype if pool_dtype is not None else (dtype or torch.get_default_dtype()),
                           device=device)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(pool.out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(pool.out_features, **factory), requires_grad=False) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self._init_pool(pool, backend)

    def _init_pool(self, pool: AdapterPool, backend: Optional[str]) -> None:
        self.in_features = pool.in_features
        self.out_features = pool.out_features
        self.pool = pool
        self.backend = backend
        self.batch: Optional[LoRABatch] = None
        for buf, attr in _POOL_BUFFERS:
            self.register_buffer(buf, getattr(pool, attr), persistent=False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        max_adapters: int,
        max_rank: int,
        dtype=None,
        slices: Optional[Sequence[int]] = None,
        backend: Optional[str] = None,
    ) -> "MultiLoRALinear":
        """Wrap ``linear`` (its weight and bias are shared, not copied). ``dtype``: the pool's (default the weight's);
        ``slices``: output widths of a fused projection (default one slice of ``out_features``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        out = linear.out_features if slices is None else list(slices)
        if slices is not None and sum(out) != linear.out_features:
            raise ValueError(f"slices {out} must sum to the layer's out_features={linear.out_features}")
        w = linear.weight
        pool = AdapterPool(max_adapters, max_rank, linear.in_features, out, dtype=dtype or w.dtype, device=w.device)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._init_pool(pool, backend)
        return layer

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        # Keep the pool's tensors the module's buffers after .to()/.half(); scales stay float32, ranks int32.
        if self.lora_scales.dtype != torch.float32:
            self.lora_scales = self.lora_scales.float()
        for buf, attr in _POOL_BUFFERS:
            setattr(self.pool, attr, getattr(self, buf))
        self.pool.dtype = self.lora_A_stack.dtype
        return self

    # ------------------------------------------------------------------------------------------------- adapters
    def load_adapter(self, name: str, lora_A, lora_B, alpha=None, use_rslora: bool = False, scale=None,
                     slot: Optional[int] = None) -> int:
        """Copy an adapter into the pool (see :meth:`AdapterPool.load`); returns its slot."""
        return self.pool.load(name, lora_A, lora_B, alpha=alpha, use_rslora=use_rslora, scale=scale, slot=slot)

    def unload_adapter(self, name: str) -> int:
        return self.pool.unload(name)

    def slot_of(self, name: str) -> int:
        return self.pool.slot_of(name)

    # ------------------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, batch: Optional[LoRABatch] = None) -> torch.Tensor:
        """``batch`` (default: the one set by :func:`use_batch`); without any, the base layer alone."""
        batch = batch if batch is not None else self.batch
        if batch is None:
            return F.linear(x, self.weight, self.bias)
        return multi_lora_linear(x, self.weight, self.bias, self.pool, batch, backend=self.backend)

    def extra_repr(self) -> str:
        p = self.pool
        out = list(p.slices) if p.num_slices > 1 else p.out_features
        return (f"in_features={self.in_features}, out_features={out}, max_adapters={p.max_adapters}, "
                f"max_rank={p.max_rank}, loaded={len(p)}, bias={self.bias is not None}")


# --------------------------------------------------------------------------------------------------- model helpers
def multi_lora_layers(model: nn.Module) -> Dict[str, MultiLoRALinear]:
    """Qualified name → MultiLoRALinear, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def inject_multi_lora(
    model: nn.Module,
    target_modules: Union[str, Sequence[str]],
    max_adapters: int,
    max_rank: int,
    dtype=None,
    backend: Optional[str] = None,
) -> List[str]:
    """Replace, in place, every ``nn.Linear`` whose qualified name matches ``target_modules`` (PEFT's matching, as in
    :func:`lora_kernels.inject_lora`) by a :class:`MultiLoRALinear` with an empty pool. Returns the replaced names;
    raises listing the candidates when nothing matches."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regex: {exc}") from None
    elif not isinstance(target_modules, (list, tuple, set, frozenset)) or not all(
        isinstance(t, str) and t for t in target_modules
    ):
        raise TypeError(f"target_modules must be a regex str or a list of non-empty module names, "
                        f"got {target_modules!r}")
    if isinstance(target_modules, (list, tuple, set, frozenset)) and len(target_modules) == 0:
        raise ValueError("target_modules is empty")
    # n != "": the model itself cannot be replaced in place (wrap a bare nn.Linear with MultiLoRALinear.from_linear).
    candidates = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    chosen = [n for n in candidates if _matches(n, target_modules)]
    if not chosen:
        shown = ", ".join(candidates[:50]) + (" ..." if len(candidates) > 50 else "")
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear; candidates: {shown or '(none)'}")
    # Build every replacement before touching the model, so a failure leaves it unchanged.
    layers = [MultiLoRALinear.from_linear(model.get_submodule(n), max_adapters, max_rank, dtype=dtype,
                                          backend=backend) for n in chosen]
    for name, layer in zip(chosen, layers):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return chosen


def set_batch(model: nn.Module, batch: Optional[LoRABatch]) -> None:
    """Set (None: clear) the batch every MultiLoRALinear of ``model`` uses when forward gets none."""
    if batch is not None and not isinstance(batch, LoRABatch):
        raise TypeError(f"batch must be a LoRABatch or None, got {type(batch).__name__}")
    for m in model.modules():
        if isinstance(m, MultiLoRALinear):
            m.batch = batch


@contextlib.contextmanager
def use_batch(model: nn.Module, batch: Optional[LoRABatch]) -> Iterator[nn.Module]:
    """``with use_batch(model, batch): model(...)``: every MultiLoRALinear inside uses ``batch`` (the previous
    batches are restored on exit)."""
    layers = list(multi_lora_layers(model).values())
    if not layers:
        raise ValueError("the model has no MultiLoRALinear layer (see inject_multi_lora)")
    previous = [m.batch for m in layers]
    set_batch(model, batch)
    try:
        yield model
    finally:
        for m, b in zip(layers, previous):
            m.batch = b


def load_multi_adapter(
    model: nn.Module,
    name: str,
    weights: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
    alpha=None,
    use_rslora: bool = False,
    scale=None,
    slot: Optional[int] = None,
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
    unknown = [k for k in weights if k not in layers]
    if unknown:
        raise KeyError(f"{unknown} are not MultiLoRALinear layers of the model; layers: {', '.join(layers)}")
    taken = [n for n, m in layers.items() if name in m.pool]
    if taken:
        raise ValueError(f"adapter {name!r} is already loaded (layers {taken[:5]}...); unload it first")
    if slot is None:
        free = set.intersection(*(set(m.pool.free_slots()) for m in layers.values()))
        if not free:
            raise RuntimeError(f"no slot is free in every layer; unload an adapter first")
        slot = min(free)
    done: List[MultiLoRALinear] = []
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
            m.pool.unload(name)
        raise type(exc)(f"layer {lname!r}: {exc}; the adapter was loaded in no layer") from exc
    except Exception:
        for m in done:
            m.pool.unload(name)
        raise
    return slot


def unload_multi_adapter(model: nn.Module, name: str) -> int:
    """Remove adapter ``name`` from every layer; returns the slot it had."""
    slots = {m.pool.unload(name) for m in multi_lora_layers(model).values() if name in m.pool}
    if not slots:
        raise KeyError(f"adapter {name!r} is not loaded in this model")
    return slots.pop()


def multi_adapter_slot(model: nn.Module, name: str) -> int:
    """The slot of adapter ``name`` (the same in every layer)."""
    for m in multi_lora_layers(model).values():
        if name in m.pool:
            return m.pool.slot_of(name)
    raise KeyError(f"adapter {name!r} is not loaded in this model")
