"""Drop-in for PEFT users: convert a PEFT LoRA model to lora_kernels layers and back, with identical numbers.

``from_peft(model)`` replaces, in place, every PEFT ``lora.Linear`` layer it can convert exactly by a
:class:`PeftLoRALinear` (a :class:`~lora_kernels.LoRALinear` that keeps all the adapters of the PEFT layer);
``to_peft(model)`` puts the PEFT layers back, holding the current adapter tensors, so that ``save_pretrained`` and
every other PEFT API work again.

How PEFT's several adapters per layer map here. A PEFT layer holds a dict of adapters and a list of active ones. A
``PeftLoRALinear`` holds the same adapters in ``lora_adapters`` (one small module per adapter name: ``lora_A``
``[r, in]``, ``lora_B`` ``[out, r]`` and its r, alpha, scaling, dropout, rsLoRA flag) and one active adapter name;
``lora_A``, ``lora_B``, ``r``, ``alpha``, ``scaling``, ``dropout`` and ``use_rslora`` read and write the active
adapter's, so the layer is a ``LoRALinear`` for every other part of lora_kernels (``lora_state_dict``, ``merge``,
saving). ``set_adapter(model, name)`` switches every converted layer (and the PEFT model's own record); the tensors
are the PEFT model's own ``nn.Parameter`` objects, shared, never copied, so an optimizer built before or after the
conversion trains the same tensors. A mixed batch (PEFT's ``adapter_names=[...]`` argument of ``forward`` and
``generate``) keeps working on a converted ``PeftModel``: each sequence gets its adapter, ``"__base__"`` none.

What is left as a PEFT layer (never converted approximately), with one warning naming each layer and why: LoRA
variants (DoRA, aLoRA, ...), ``lora_bias=True``, layers other than ``lora.Linear`` (Embedding, Conv, quantized
bitsandbytes/GPTQ/... layers), base layers that are not a plain ``nn.Linear`` or transformers' ``Conv1D``,
``fan_in_fan_out`` on an ``nn.Linear`` base, several adapters active at once, a layer that does not hold the active
adapter, merged adapters, and adapter dtypes the op does not take. GPT-2's ``Conv1D`` (``fan_in_fan_out=True``) is
converted exactly: the base weight stays the ``[in, out]`` tensor of the checkpoint and the op reads its transpose (a
strided view, no copy). On a converted ``PeftModel``, ``disable_adapter()`` switches converted layers too, and under
``torch.autocast`` they compute like an autocast ``nn.Linear`` (fp32 adapters kept), as PEFT's layers do.

Dropout: the probability is kept, but the mask comes from lora_kernels' Philox generator, not from ``nn.Dropout``,
so with dropout > 0 converted and PEFT models agree in distribution, not sample for sample.

A converted model's ``state_dict`` names adapter tensors ``<layer>.lora_adapters.<name>.lora_A`` (the base weights
keep their names); for PEFT's checkpoint names and files, ``to_peft(model)`` then ``save_pretrained``, or
``lora_kernels.save_adapter(peft_model.base_model.model, path)`` for the active adapter.

Serving: ``load_adapters(model, {name: path})`` fills :class:`~lora_kernels.MultiLoRALinear` pools of a plain
transformers model from several PEFT adapter directories; ``model(..., adapter_names=[...])`` and
``model.generate(..., adapter_names=[...])`` then run PEFT's mixed batch through the batched multi-adapter kernels,
with the per-token ids prepared once per forward for all layers. On both kinds of model the names of a call belong
to the calling thread/context (concurrent requests never mix) and must number one per sequence, as in PEFT.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import _autocast
import torch.nn as nn
import torch.nn.functional as F

from .modules import LoRALinear
from .multi_modules import MultiLoRALinear, _active_batches
from .ops.lora_linear import lora_linear
from .ops.multi_lora import multi_lora_linear

__all__ = [
    "PeftConversionWarning",
    "PeftLoRALinear",
    "from_peft",
    "load_adapters",
    "to_peft",
    "set_adapter",
    "unsupported_peft_layers",
]

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


class PeftConversionWarning(UserWarning):
    """Some PEFT layers were left as they are because lora_kernels cannot run them exactly."""


# ------------------------------------------------------------------------------------------------ PEFT imports
def _peft_lora():
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as exc:  # pragma: no cover - peft is an optional dependency
        raise ImportError("lora_kernels.from_peft needs the peft package (pip install peft)") from exc
    return lora_layer


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or broken: no Conv1D can exist in the model either
        return None
    return Conv1D


# --------------------------------------------------------------------------------------------------- the layer
class _Adapter(nn.Module):
    """One adapter of a :class:`PeftLoRALinear`: its two factors and the numbers that scale them."""

    def __init__(self, lora_A: nn.Parameter, lora_B: nn.Parameter, r: int, alpha: float, scaling: float,
                 dropout: float, use_rslora: bool):
        super().__init__()
        self.lora_A = lora_A
        self.lora_B = lora_B
        self.r = int(r)
        self.alpha = float(alpha)
        self.scaling = float(scaling)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}"


_DELEGATED = ("lora_A", "lora_B", "r", "alpha", "scaling", "dropout", "use_rslora")


def _delegate(name: str) -> property:
    def get(self):
        return getattr(self.lora_adapters[self.active_adapter], name)

    def set(self, value):
        setattr(self.lora_adapters[self.active_adapter], name, value)

    return property(get, set, doc=f"The active adapter's ``{name}``.")


class PeftLoRALinear(LoRALinear):
    """A :class:`~lora_kernels.LoRALinear` holding every adapter of the PEFT layer it was converted from.

    ``lora_adapters[name]`` holds each adapter; ``active_adapter`` names the one ``forward`` applies, and the
    ``LoRALinear`` attributes (``lora_A``, ``lora_B``, ``r``, ``alpha``, ``scaling``, ``dropout``, ``use_rslora``)
    are that adapter's. ``fan_in_fan_out`` is True for a transformers ``Conv1D`` base, whose ``weight`` is
    ``[in, out]``. ``forward(x, adapter_names=[...])`` applies one adapter per row of ``x`` (PEFT's mixed batch).
    Built by :func:`from_peft` only.
    """

    _warned_merged_training = False  # set on the instance by the first training-mode forward while merged
    lora_A = _delegate("lora_A")
    lora_B = _delegate("lora_B")
    r = _delegate("r")
    alpha = _delegate("alpha")
    scaling = _delegate("scaling")
    dropout = _delegate("dropout")
    use_rslora = _delegate("use_rslora")

    def __init__(self, *args, **kwargs):
        raise TypeError("PeftLoRALinear is built by lora_kernels.from_peft; use LoRALinear for a new layer")

    def __setattr__(self, name, value):
        # nn.Module.__setattr__ would register a Parameter under this name and hide the property: route the
        # adapter attributes to the active adapter instead.
        if name in _DELEGATED and "lora_adapters" in self.__dict__.get("_modules", {}):
            setattr(self.lora_adapters[self.active_adapter], name, value)
            return
        super().__setattr__(name, value)

    @classmethod
    def _from_peft_layer(cls, layer, backend: Optional[str]) -> "PeftLoRALinear":
        base = layer.base_layer
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.fan_in_fan_out = not isinstance(base, nn.Linear)
        self.in_features = int(layer.in_features)
        self.out_features = int(layer.out_features)
        self.weight = base.weight
        self.bias = base.bias
        self.backend = backend
        self.register_buffer("_unmerged_weight", None, persistent=False)  # LoRALinear's merge state
        adapters = nn.ModuleDict()
        for name in layer.lora_A.keys():
            dropout = layer.lora_dropout[name]
            adapters[name] = _Adapter(
                layer.lora_A[name].weight, layer.lora_B[name].weight, r=layer.r[name], alpha=layer.lora_alpha[name],
                scaling=layer.scaling[name], dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
                use_rslora=getattr(layer, "use_rslora", {}).get(name, False),
            )
        self.lora_adapters = adapters
        self.active_adapter = layer.active_adapters[0]
        self._disable_adapters = bool(layer.disable_adapters)  # PeftModel.disable_adapter() sets it, see below
        # PeftModel.from_pretrained returns an eval() model: a converted layer must not start applying dropout.
        self.train(layer.training)
        # The PEFT layer itself, kept outside the module tree (its tensors are this layer's) for to_peft.
        object.__setattr__(self, "_peft_layer", layer)
        return self

    # ------------------------------------------------------------------------------------------------ adapters
    @property
    def adapter_names(self) -> List[str]:
        return list(self.lora_adapters.keys())

    def set_adapter(self, name: str, requires_grad: Optional[bool] = None) -> None:
        """Make ``name`` the active adapter. ``requires_grad`` (default: leave as is) sets the adapters' trainable
        flags the way PEFT's ``set_adapter`` does: the active one ``requires_grad``, the others not."""
        _check_requires_grad(requires_grad)
        self._check_switch(name)
        self.active_adapter = name
        if requires_grad is not None:
            for n, ad in self.lora_adapters.items():
                ad.requires_grad_(bool(requires_grad) and n == name)

    def _check_switch(self, name: str) -> None:
        """Raise if ``set_adapter(name)`` cannot switch this layer (nothing changed)."""
        if not isinstance(name, str):
            raise TypeError(f"set_adapter: name must be a str (an adapter name), got {type(name).__name__} {name!r}")
        if name not in self.lora_adapters:
            raise ValueError(f"adapter {name!r} is not in this layer; it holds {', '.join(self.lora_adapters)}")
        if self.merged and name != self.active_adapter:
            raise RuntimeError("unmerge() before switching the adapter of a merged layer")

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's switch (``PeftModel.disable_adapter()`` uses it): when off, forward is the base layer alone."""
        self._disable_adapters = not enabled

    # ----------------------------------------------------------------------------------------------- math
    def _base_weight(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (a transposed view for Conv1D)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in float32, laid out like ``weight`` (``[in, out]`` for Conv1D)."""
        delta = super().delta_weight()
        return delta.t() if self.fan_in_fan_out else delta

    def _merged_weight(self, w0, lora_A, lora_B):
        if self.fan_in_fan_out:  # W0 is [in, out]: merge in the [out, in] layout, give back W0's layout
            return super()._merged_weight(w0.t(), lora_A, lora_B).t()
        return super()._merged_weight(w0, lora_A, lora_B)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The adapters are child modules, loaded after this method returns: LoRALinear's "unmerge, load, merge again"
        # would merge the OLD adapter. Merge with the active adapter's tensors from the checkpoint instead.
        if not self.merged:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            return
        if local_metadata.get("assign_to_params_buffers", False):
            error_msgs.append(f"{prefix or 'PeftLoRALinear'}: is merged; unmerge() before load_state_dict(assign=True)")
            return
        ad_prefix = f"{prefix}lora_adapters.{self.active_adapter}."
        factors = []
        for attr in ("lora_A", "lora_B"):
            current = getattr(self, attr)
            new = state_dict.get(ad_prefix + attr, current)
            if not isinstance(new, torch.Tensor) or tuple(new.shape) != tuple(current.shape):
                return  # the adapter's own load reports the mismatch; this layer stays as it is (merged)
            factors.append(new.detach().to(device=current.device, dtype=current.dtype))
        self.unmerge()
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)
        try:
            merged = self._merged_weight(self.weight, *factors)
        except ValueError as exc:
            error_msgs.append(f"{prefix or 'PeftLoRALinear'}: loaded but left unmerged: {exc}")
            return
        with torch.no_grad():
            self._unmerged_weight = self.weight.detach().clone()
            self.weight.copy_(merged)

    def forward(self, x: torch.Tensor, adapter_names: Optional[Sequence[str]] = None) -> torch.Tensor:
        if self._disable_adapters:
            # The base layer alone: while merged, W0 is the exact copy kept by merge(), not the merged weight.
            w0 = self._unmerged_weight if self.merged else self.weight
            return F.linear(x, w0.t() if self.fan_in_fan_out else w0, self.bias)
        weight = self._base_weight()
        if adapter_names is not None:
            return self._mixed_forward(x, weight, adapter_names)
        if self.merged:
            # As PEFT (and LoRALinear): a merged layer computes with the merged weight in either mode; say once that
            # the adapter learns nothing meanwhile.
            if (self.training and torch.is_grad_enabled() and not self._warned_merged_training
                    and (self.lora_A.requires_grad or self.lora_B.requires_grad)):
                self._warned_merged_training = True
                warnings.warn("a merged PeftLoRALinear is run in training mode: it computes with the merged weight "
                              "and its adapter gets no gradient until unmerge()", UserWarning, stacklevel=2)
            return F.linear(x, weight, self.bias)
        x, weight, bias, lora_A, lora_B = _autocast_args(x, weight, self.bias, self.lora_A, self.lora_B)
        return lora_linear(
            x, weight, lora_A, lora_B, self.scaling, bias,
            dropout_p=self.dropout, training=self.training, backend=self.backend,
        )

    def _mixed_forward(self, x: torch.Tensor, weight: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        """Row ``i`` of ``x`` (a sequence) gets adapter ``adapter_names[i]``; ``"__base__"`` and adapters this layer
        does not hold get the base layer only, as in PEFT."""
        adapter_names = _as_name_list(adapter_names)
        _check_names_length(adapter_names, x.shape[0], f" (x shape {tuple(x.shape)})")
        if self.merged:
            raise ValueError("cannot pass adapter_names to a merged layer; unmerge() first")
        if len(set(adapter_names)) == 1:  # one adapter for the whole batch: no gather/scatter
            name = adapter_names[0]
            if name == BASE or name not in self.lora_adapters:
                return F.linear(x, weight, self.bias)
            return self._adapter_forward(x, weight, self.lora_adapters[name])
        # Each group of rows goes through the base product once, fused with its adapter (PEFT computes the base for
        # every row and then the adapter per group: twice the base reads for the adapted rows).
        groups: Dict[str, List[int]] = {}
        for i, n in enumerate(adapter_names):
            groups.setdefault(n if n in self.lora_adapters else BASE, []).append(i)
        order, parts = [], []
        for name, rows in groups.items():
            idx = torch.tensor(rows, device=x.device)
            xs = x.index_select(0, idx)
            if name == BASE:
                parts.append(F.linear(xs, weight, self.bias))
            else:
                parts.append(self._adapter_forward(xs, weight, self.lora_adapters[name]))
            order.extend(rows)
        out = torch.cat([p.to(parts[0].dtype) for p in parts])  # one dtype already, except odd autocast mixes
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return out.index_select(0, inverse.to(x.device))

    def _adapter_forward(self, x: torch.Tensor, weight: torch.Tensor, ad: _Adapter) -> torch.Tensor:
        x, weight, bias, lora_A, lora_B = _autocast_args(x, weight, self.bias, ad.lora_A, ad.lora_B)
        return lora_linear(x, weight, lora_A, lora_B, ad.scaling, bias, dropout_p=ad.dropout,
                           training=self.training, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, active_adapter={self.active_adapter!r}, "
                f"adapters={self.adapter_names}, fan_in_fan_out={self.fan_in_fan_out}")


def _check_requires_grad(requires_grad) -> None:
    if requires_grad is not None and not isinstance(requires_grad, bool):  # "no" would be truthy
        raise TypeError(f"set_adapter: requires_grad must be True, False or None, got {type(requires_grad).__name__} "
                        f"{requires_grad!r}")


def _autocast_args(x, weight, bias, lora_A, lora_B):
    """Inside ``torch.autocast``, the operands an autocast ``nn.Linear`` (PEFT's base layer and lora_A/lora_B) would
    use: x, W0 and bias in the autocast dtype; the adapter kept when it is that dtype or float32 (the op takes an
    fp32 adapter), cast otherwise. The same rule as :class:`~lora_kernels.LoRALinear`; the casts are differentiable."""
    dev = x.device.type
    if not _autocast.autocast_enabled(dev):
        return x, weight, bias, lora_A, lora_B
    if not x.is_floating_point() or x.dtype == torch.float64:
        return x, weight, bias, lora_A, lora_B
    dt = torch.get_autocast_dtype(dev)
    x, weight = x.to(dt), weight.to(dt)
    bias = bias.to(dt) if bias is not None else None
    if lora_A.dtype not in (dt, torch.float32):
        lora_A, lora_B = lora_A.to(dt), lora_B.to(dt)
    return x, weight, bias, lora_A, lora_B


# ------------------------------------------------------------------------------------------- conversion checks
def _unsupported_reason(layer, lora_layer_mod) -> Optional[str]:
    """None when ``layer`` (a PEFT LoraLayer) converts exactly, else why not."""
    if type(layer) is not lora_layer_mod.Linear:
        return f"{type(layer).__module__}.{type(layer).__name__} is not a plain PEFT lora.Linear"
    base = layer.base_layer
    conv1d = _conv1d_type()
    if type(base) is nn.Linear or (isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward):
        if layer.fan_in_fan_out:
            return "fan_in_fan_out=True on an nn.Linear base layer"
    elif conv1d is not None and type(base) is conv1d:
        if not layer.fan_in_fan_out:
            return "Conv1D base layer with fan_in_fan_out=False"
    else:
        return f"base layer {type(base).__module__}.{type(base).__name__} is not an nn.Linear or Conv1D"
    if len(getattr(layer, "lora_embedding_A", {})) > 0:
        return "holds embedding adapters"
    variants = getattr(layer, "lora_variant", {})  # PEFT >= 0.15; older versions flag DoRA in use_dora only
    if variants:
        kinds = ", ".join(f"{n}: {type(v).__name__}" for n, v in variants.items())
        return f"LoRA variant ({kinds})"
    if any(getattr(layer, "use_dora", {}).values()):
        return "DoRA"
    if any(getattr(layer, "lora_bias", {}).values()):
        return "lora_bias=True"
    if layer.merged:
        return f"adapters {layer.merged_adapters} are merged into the base weight (unmerge_adapter() first)"
    active = list(layer.active_adapters)
    if len(active) != 1:
        return f"{len(active)} adapters active at once ({active}); lora_kernels applies one"
    if active[0] not in layer.lora_A:
        return f"the active adapter {active[0]!r} is not in this layer (it holds {list(layer.lora_A.keys())})"
    dtype = base.weight.dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"base weight dtype {dtype} (quantized?)"
    for name in layer.lora_A.keys():
        a, b = layer.lora_A[name], layer.lora_B[name]
        if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None:
            return f"adapter {name!r} factors are not bias-free nn.Linear"
        if a.weight.dtype != b.weight.dtype or (a.weight.dtype != dtype and a.weight.dtype != torch.float32):
            return f"adapter {name!r} dtype {a.weight.dtype}/{b.weight.dtype} with base {dtype}"
        drop = layer.lora_dropout[name]
        if not isinstance(drop, (nn.Dropout, nn.Identity)):
            return f"adapter {name!r} dropout module {type(drop).__name__}"
    return None


def unsupported_peft_layers(model: nn.Module) -> Dict[str, str]:
    """Qualified name → reason, for every PEFT LoRA layer of ``model`` that :func:`from_peft` would leave as is."""
    lora_layer_mod = _peft_lora()
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, lora_layer_mod.LoraLayer):
            why = _unsupported_reason(module, lora_layer_mod)
            if why:
                out[name] = why
    return out


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _tuner(model: nn.Module):
    """The PEFT tuner (``LoraModel``) of a PeftModel, or the LoraModel itself; None for a plain module."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraModel
    except ImportError:  # pragma: no cover
        return None
    if isinstance(model, PeftModel):
        return model.base_model if isinstance(model.base_model, LoraModel) else None
    return model if isinstance(model, LoraModel) else None


# ---------------------------------------------------------------------------------------------- public API
def from_peft(model: nn.Module, backend: Optional[str] = None, warn: bool = True) -> nn.Module:
    """Replace, in place, every PEFT LoRA Linear layer of ``model`` that converts exactly by a
    :class:`PeftLoRALinear` (all its adapters kept, the active one active, dropout, rsLoRA and scaling, base bias and
    its ``requires_grad`` as they are). Returns ``model``.

    ``model`` is a ``PeftModel``, a ``LoraModel`` or any module holding PEFT LoRA layers. Layers that cannot be
    converted exactly are left as PEFT layers; one :class:`PeftConversionWarning` names them with the reason (set
    ``warn=False`` to silence it; :func:`unsupported_peft_layers` returns the same list). On a ``PeftModel``,
    ``adapter_names=[...]`` in ``forward``/``generate`` keeps giving PEFT's mixed batch and ``disable_adapter()``
    keeps working: pass the ``PeftModel`` itself, not its inner model, for those (PEFT's own hooks reach PEFT layers
    only). ``backend`` is passed to :func:`lora_kernels.lora_linear` by every converted layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_peft: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(warn, bool):
        raise TypeError(f"from_peft: warn must be True or False, got {type(warn).__name__} {warn!r}")
    if backend is not None:
        from ._backend import requested_backend

        requested_backend(backend)  # at the call, not at every later forward
    lora_layer_mod = _peft_lora()
    skipped: Dict[str, str] = {}
    chosen: List[Tuple[str, nn.Module]] = []
    already = 0
    for name, module in model.named_modules():
        if isinstance(module, PeftLoRALinear):
            already += 1
            continue
        if isinstance(module, lora_layer_mod.LoraLayer):
            why = _unsupported_reason(module, lora_layer_mod)
            if why:
                skipped[name] = why
            else:
                chosen.append((name, module))
    if not chosen and not skipped and not already:
        raise ValueError(f"from_peft: {type(model).__name__} holds no PEFT LoRA layer (wrap it with "
                         "peft.get_peft_model first, or use lora_kernels.inject_lora for a plain model)")
    built = [(name, PeftLoRALinear._from_peft_layer(module, backend)) for name, module in chosen]  # then replace
    for name, layer in built:
        _set_child(model, name, layer)
    tuner = _tuner(model)
    if tuner is not None and chosen:
        _install_mixed_batch_hooks(tuner)
        if tuner is not model:
            _install_disable_adapter(model)
    if skipped and warn:
        detail = "; ".join(f"{n}: {why}" for n, why in skipped.items())
        warnings.warn(f"from_peft left {len(skipped)} PEFT layer(s) unconverted (they still run through PEFT): "
                      f"{detail}", PeftConversionWarning, stacklevel=2)
    return model


def to_peft(model: nn.Module) -> nn.Module:
    """Put back, in place, the PEFT layer of every :class:`PeftLoRALinear` of ``model``, holding the converted
    layer's current tensors (base weight and bias, each adapter's factors, scaling, dropout probability) and its
    active adapter. Trainable flags and training mode are kept. Each adapter's ``LoraConfig`` is updated to describe
    the layers (an alpha or rank changed since the conversion, e.g. by ``load_adapter``, gets an ``alpha_pattern`` /
    ``rank_pattern`` entry matching that layer only; ``use_rslora`` and ``lora_dropout`` follow the layers), so that
    ``save_pretrained`` then writes PEFT's format of what the model computes. Returns ``model``."""
    converted = [(n, m) for n, m in model.named_modules() if isinstance(m, PeftLoRALinear)]
    for name, layer in converted:
        if layer.merged:
            raise RuntimeError(f"{name} is merged; unmerge() it before to_peft")
    for name, layer in converted:
        peft_layer = layer._peft_layer
        base = peft_layer.base_layer
        base.weight = layer.weight
        base.bias = layer.bias
        flags = {}
        for ad_name, ad in layer.lora_adapters.items():
            peft_layer.lora_A[ad_name].weight = ad.lora_A
            peft_layer.lora_B[ad_name].weight = ad.lora_B
            peft_layer.r[ad_name] = ad.r
            peft_layer.lora_alpha[ad_name] = ad.alpha
            peft_layer.scaling[ad_name] = ad.scaling
            peft_layer.use_rslora[ad_name] = ad.use_rslora
            peft_layer.lora_dropout[ad_name] = nn.Dropout(p=ad.dropout) if ad.dropout > 0 else nn.Identity()
            flags[ad_name] = (ad.lora_A.requires_grad, ad.lora_B.requires_grad)
        peft_layer.set_adapter(layer.active_adapter)  # PEFT's bookkeeping; it also resets requires_grad ...
        peft_layer.enable_adapters(not layer.disable_adapters)
        for ad_name, (ga, gb) in flags.items():  # ... which the converted layer's flags override
            peft_layer.lora_A[ad_name].weight.requires_grad_(ga)
            peft_layer.lora_B[ad_name].weight.requires_grad_(gb)
        peft_layer.train(layer.training)
        _set_child(model, name, peft_layer)
    tuner = _tuner(model)
    if tuner is not None:
        _sync_peft_config(tuner)
        _remove_mixed_batch_hooks(tuner)
        model.__dict__.pop("disable_adapter", None)
    return model


def _sync_peft_config(tuner) -> None:
    """Make each adapter's ``LoraConfig`` describe its layers again, so that ``save_pretrained`` writes what the model
    computes: the layers may have changed since the conversion (``load_adapter`` with another alpha, dropout or
    rsLoRA flag). A layer whose r / alpha the config no longer gives gets a ``rank_pattern`` / ``alpha_pattern`` entry
    matching that layer only; ``use_rslora`` and ``lora_dropout`` (one value per adapter in PEFT's config) follow the
    layers when they agree, and a warning says when they do not."""
    from . import io as lk_io

    lora_layer_mod = _peft_lora()
    names = [n for n, _ in tuner.model.named_modules()]
    per_adapter: Dict[str, Dict[str, tuple]] = {}
    for n, m in tuner.model.named_modules():
        if isinstance(m, lora_layer_mod.LoraLayer):
            for ad in m.lora_A.keys():
                drop = m.lora_dropout[ad] if ad in m.lora_dropout else None
                per_adapter.setdefault(ad, {})[n] = (
                    int(m.r[ad]), float(m.lora_alpha[ad]), bool(m.use_rslora.get(ad, False)),
                    float(drop.p) if isinstance(drop, nn.Dropout) else 0.0,
                )
    for ad, layers in per_adapter.items():
        cfg = tuner.peft_config.get(ad)
        if cfg is None or not hasattr(cfg, "alpha_pattern"):
            continue
        for field, pattern_field, idx, kind in (("r", "rank_pattern", 0, int), ("lora_alpha", "alpha_pattern", 1, float)):
            glob, pattern = getattr(cfg, field), dict(getattr(cfg, pattern_field) or {})
            wrong = [n for n, v in layers.items() if kind(lk_io._pattern_value(n, pattern, glob)) != v[idx]]
            if not wrong:
                continue  # the config already describes the layers: left as the user wrote it
            # Describe every layer again: the most common value in the plain field (the config's own on a tie), the
            # others under keys that each match one layer only.
            values = [v[idx] for v in layers.values()]
            top = max(values.count(v) for v in values)
            glob = kind(glob) if values.count(kind(glob)) == top else next(v for v in values if values.count(v) == top)
            setattr(cfg, field, _json_number(glob))
            setattr(cfg, pattern_field, {lk_io.exact_pattern_key(n, names): _json_number(v[idx])
                                         for n, v in layers.items() if v[idx] != glob})
        for field, idx in (("use_rslora", 2), ("lora_dropout", 3)):
            values = {v[idx] for v in layers.values()}
            if len(values) == 1:
                setattr(cfg, field, values.pop())
            else:
                warnings.warn(f"to_peft: the layers of adapter {ad!r} use several {field} values {sorted(values)}, "
                              f"but PEFT's config holds one; save_pretrained will not reproduce them all",
                              PeftConversionWarning, stacklevel=3)


def _json_number(v):
    return int(v) if float(v).is_integer() else float(v)


def set_adapter(model: nn.Module, name: str, requires_grad: Optional[bool] = None) -> None:
    """Activate adapter ``name`` in every converted layer of ``model`` and, for a PeftModel, in PEFT's layers and
    records too. ``requires_grad``: as :meth:`PeftLoRALinear.set_adapter` (a PeftModel's own ``set_adapter`` makes
    the active adapter trainable, so pass ``True`` to get PEFT's behaviour on the converted layers)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_adapter: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"set_adapter: name must be a str (an adapter name), got {type(name).__name__} {name!r}")
    _check_requires_grad(requires_grad)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PeftLoRALinear)]
    missing = [n for n, m in layers if name not in m.lora_adapters]
    if missing:
        raise ValueError(f"adapter {name!r} is missing from converted layer(s) {missing}; to_peft(model) and use "
                         "PEFT's set_adapter, which leaves such layers without adapter")
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        PeftModel = ()
    if not layers and not isinstance(model, PeftModel):
        raise ValueError(f"set_adapter: {type(model).__name__} has no converted PEFT layer (from_peft first); "
                         "models served by load_adapters pick adapters per call with adapter_names=[...]")
    blocked = [n for n, m in layers if m.merged and m.active_adapter != name]
    if blocked:  # checked for every layer before any is switched
        raise RuntimeError(f"set_adapter: converted layer(s) {blocked} are merged; unmerge() them before switching "
                           f"the adapter (nothing was switched)")
    if isinstance(model, PeftModel):
        model.set_adapter(name)  # PEFT layers that are left, and PeftModel.active_adapter
    for _, layer in layers:
        layer.set_adapter(name, requires_grad=requires_grad)


# ------------------------------------------------------------------------------------- PEFT's mixed batch
def _install_mixed_batch_hooks(tuner) -> None:
    """Make PeftModel.disable_adapter() reach converted layers (PEFT switches BaseTunerLayer instances only), and
    make ``adapter_names=[...]`` reach converted layers. PEFT's ``LoraModel._enable_peft_forward_hooks`` (used by
    PeftModel.forward and .generate) hooks ``LoraLayer`` instances only, so converted layers would silently apply
    the active adapter to every sequence; this instance-level replacement serves both kinds, with PEFT's checks.
    Both replacements are picklable objects holding the tuner (no closures), so ``copy.deepcopy`` gives the copy its
    own and ``torch.save`` works."""
    if "_enable_peft_forward_hooks" in tuner.__dict__:
        return
    tuner._enable_peft_forward_hooks = _make_hooks_context(tuner)
    tuner._enable_adapter_layers = _EnableAdapterLayers(tuner)


class _EnableAdapterLayers:
    """``tuner._enable_adapter_layers`` of a converted model: PEFT's switch, then the converted layers'."""

    def __init__(self, tuner):
        self.tuner = tuner

    def __call__(self, enabled: bool = True) -> None:
        type(self.tuner)._enable_adapter_layers(self.tuner, enabled)
        for module in self.tuner.modules():
            if isinstance(module, PeftLoRALinear):
                module.enable_adapters(enabled)


def _remove_mixed_batch_hooks(tuner) -> None:
    tuner.__dict__.pop("_enable_peft_forward_hooks", None)
    tuner.__dict__.pop("_enable_adapter_layers", None)
    for module in tuner.modules():
        for key in [k for k, h in module._forward_pre_hooks.items() if h is _mixed_names_pre_hook]:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


def _install_disable_adapter(peft_model) -> None:
    """PeftModel.disable_adapter() first asks get_model_status(), which raises when no PEFT layer is left (all were
    converted). This instance-level replacement skips that question in that case only; the switching itself goes
    through the tuner's disable/enable_adapter_layers, which reach converted layers (see above)."""
    if "disable_adapter" in peft_model.__dict__:
        return
    peft_model.disable_adapter = _DisableAdapter(peft_model)


class _DisableAdapter:
    """``disable_adapter`` of a converted PeftModel: an object holding the model, not a closure over it, so that a
    ``copy.deepcopy`` of the model gets one switching the copy, and ``torch.save`` can pickle it."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    @contextlib.contextmanager
    def __call__(self):
        peft_model = self.peft_model
        if any(isinstance(m, _peft_lora().LoraLayer) for m in peft_model.modules()):
            with type(peft_model).disable_adapter(peft_model):
                yield
            return
        # Every layer is converted: switch them directly, and give each its own state back afterwards.
        converted = [m for m in peft_model.modules() if isinstance(m, PeftLoRALinear)]
        was_disabled = peft_model._adapters_disabled
        states = [(m, m.disable_adapters) for m in converted]
        try:
            for m in converted:
                m.enable_adapters(False)
            peft_model._adapters_disabled = True
            yield
        finally:
            for m, disabled in states:
                m.enable_adapters(not disabled)
            peft_model._adapters_disabled = was_disabled


# adapter_names of the mixed-batch forward/generate calls in progress: layer → names, per thread and contextvars
# context, so two requests on one converted model never see each other's names (PEFT registers per-call hooks on the
# shared layers, which mixes concurrent requests).
_MIXED_NAMES: "contextvars.ContextVar[Optional[Dict[nn.Module, List[str]]]]" = contextvars.ContextVar(
    "lora_kernels_mixed_adapter_names", default=None)


def _mixed_names_pre_hook(module, args, kwargs):
    """Permanent pre-hook of the layers of a converted model: hands them the calling context's adapter_names."""
    names = (_MIXED_NAMES.get() or {}).get(module)
    if names is None:
        return None
    kwargs["adapter_names"] = names
    return args, kwargs


def _make_hooks_context(tuner) -> "_MixedBatchHooks":
    return _MixedBatchHooks(tuner)


class _MixedBatchHooks:
    """``tuner._enable_peft_forward_hooks`` of a converted model (see :func:`_install_mixed_batch_hooks`)."""

    def __init__(self, tuner):
        self.tuner = tuner

    def __call__(self, *args, **kwargs):
        return _mixed_batch_context(self.tuner, *args, **kwargs)


@contextlib.contextmanager
def _mixed_batch_context(tuner, *args, **kwargs):
    original = type(tuner)._enable_peft_forward_hooks
    adapter_names = kwargs.get("adapter_names", None)
    converted = [m for m in tuner.modules() if isinstance(m, PeftLoRALinear)]
    if adapter_names is None or not converted:
        with original(tuner, *args, **kwargs):
            yield
        return
    if kwargs.get("alora_offsets", None) is not None:
        raise ValueError("alora_offsets is not supported by converted (lora_kernels) layers")
    if tuner.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    given = _as_name_list(adapter_names)
    lora_layer_mod = _peft_lora()
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # pragma: no cover - older PEFT
        AuxiliaryTrainingWrapper = ()
    known = set()
    targets = []
    for module in tuner.modules():
        if isinstance(module, PeftLoRALinear):
            known |= set(module.lora_adapters.keys())
            targets.append(module)
        elif isinstance(module, lora_layer_mod.LoraLayer):
            known |= set(module.lora_A.keys()) | set(module.lora_embedding_A.keys())
            targets.append(module)
        elif AuxiliaryTrainingWrapper and isinstance(module, AuxiliaryTrainingWrapper):
            targets.append(module)
    unknown = {n for n in given if n != BASE} - known
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
    names = _expand_for_beams(given, kwargs.get("num_beams", None))
    per_layer = {m: names for m in targets}
    if len(names) != len(given):  # beam search: an encoder runs on the inputs before their expansion (PEFT's rule)
        get_encoder = getattr(getattr(tuner, "model", None), "get_encoder", None)
        encoder = get_encoder() if callable(get_encoder) else None
        if isinstance(encoder, nn.Module):
            inside = {id(m) for m in encoder.modules()}
            per_layer.update({m: given for m in targets if id(m) in inside})
    for m in targets:
        if not any(h is _mixed_names_pre_hook for h in m._forward_pre_hooks.values()):
            m.register_forward_pre_hook(_mixed_names_pre_hook, with_kwargs=True)
    previous = _MIXED_NAMES.get()
    _MIXED_NAMES.set({**(previous or {}), **per_layer})
    try:
        yield
    finally:
        _MIXED_NAMES.set(previous)


# ------------------------------------------------------------------------------------- adapter_names rules
def _as_name_list(names) -> List[str]:
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list of str, one per sequence ({BASE!r}: no adapter), got "
                        f"{type(names).__name__}")
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"adapter_names must hold adapter names (str), got {bad[0]!r}")
    return list(names)


def _expand_for_beams(names, num_beams) -> List[str]:
    """PEFT's rule for ``generate(..., num_beams=k)``: generate repeats each input k times in place, so each name is
    repeated k times; no other expansion (``num_return_sequences`` without beams gets a length error, as in PEFT)."""
    names = _as_name_list(names)
    if isinstance(num_beams, int) and not isinstance(num_beams, bool) and num_beams > 1:
        return [n for n in names for _ in range(num_beams)]
    return names


def _check_names_length(names: Sequence[str], rows: int, shape_note: str = "") -> None:
    """One name per sequence, exactly (PEFT raises too): a shorter list is never repeated to fit."""
    if len(names) != rows:
        raise ValueError(f"adapter_names has {len(names)} names but the batch has {rows} sequences{shape_note}; give "
                         "one name per sequence (generate(num_beams=k) repeats each name k times, as PEFT does)")


# ------------------------------------------------------------------------------------------------------ serving
_SERVING_ATTR = "_lora_kernels_serving"


# LoraConfig fields that change what an adapter computes beyond y += s·B·A·x: adapters using them are refused.
_VARIANT_FIELDS = ("use_dora", "lora_bias", "use_qalora", "alora_invocation_tokens", "arrow_config", "use_bdlora",
                   "velora_config", "monteclora_config", "kasa_config", "use_mica", "mica")


def _read_serving_config(path) -> dict:
    """``adapter_config.json`` through lora_kernels.io's checks, except ``fan_in_fan_out``: it only says how PEFT
    merges into a Conv1D weight; lora_A/lora_B are ``[r, in]``/``[out, r]`` whatever it says, and the served layer
    follows its base module (nn.Linear or Conv1D)."""
    import json
    import os

    from . import io as lk_io

    if os.path.exists(os.fspath(path)) and not os.path.isdir(os.fspath(path)):
        raise NotADirectoryError(f"load_adapters: {os.fspath(path)} is a file; pass the adapter's directory")
    cpath = os.path.join(os.fspath(path), lk_io.CONFIG_NAME)
    try:
        with open(cpath) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"load_adapters: {cpath} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"load_adapters: {cpath} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"load_adapters: {cpath} must hold a JSON object")
    fields, inits = set(_VARIANT_FIELDS), {"mica"}
    try:  # the installed PEFT knows its own variants (fields tagged is_lora_variant, variant inits)
        import dataclasses

        from peft import LoraConfig

        for fld in dataclasses.fields(LoraConfig):
            if fld.metadata.get("is_lora_variant"):
                fields.add(fld.name)
            inits.update(fld.metadata.get("lora_variants", ()) if fld.name == "init_lora_weights" else ())
    except Exception:  # peft not installed: the list above
        pass
    variants = [f"{k}={raw[k]!r}" for k in sorted(fields) if raw.get(k)]
    if isinstance(raw.get("init_lora_weights"), str) and raw["init_lora_weights"] in inits:
        variants.append(f"init_lora_weights={raw['init_lora_weights']!r}")
    if variants:
        raise ValueError(f"load_adapters: {cpath}: LoRA variant settings cannot be served: {', '.join(variants)}")
    if raw.get("fan_in_fan_out"):
        import tempfile

        # io's reader refuses the flag (its layers are nn.Linear); check everything else through it on a copy.
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, lk_io.CONFIG_NAME), "w") as f:
                json.dump(dict(raw, fan_in_fan_out=False), f)
            return lk_io._read_config(tmp)
    return lk_io._read_config(path)


def _read_peft_dir(name: str, path) -> Tuple[dict, Dict[str, Tuple[torch.Tensor, torch.Tensor, float]], bool]:
    """(config, module name → (A, B, scale), use_rslora) of a PEFT adapter directory; raises on anything it cannot
    serve exactly. Module names are the base model's (PEFT's ``base_model.model.`` prefix removed)."""
    from . import io as lk_io

    cfg = _read_serving_config(path)
    state = lk_io._read_tensors(path)
    state, metadata = state if isinstance(state, tuple) else (state, {})
    if metadata.get("lora_kernels.base") == "mutated":
        raise ValueError(f"load_adapters: adapter {name!r} ({path}) was saved for a mutated base weight "
                         "(PiSSA/LoRA-GA, convert_to_original=False); a served model shares one original base")
    use_rslora = bool(cfg.get("use_rslora", False))
    r_glob, a_glob = int(cfg["r"]), float(cfg["lora_alpha"])
    found: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        for part, suffix in (("A", lk_io._SUFFIX_A), ("B", lk_io._SUFFIX_B)):
            if key.startswith(lk_io.PREFIX) and key.endswith(suffix):
                found.setdefault(key[len(lk_io.PREFIX):-len(suffix)], {})[part] = t
                break
        else:
            raise ValueError(f"load_adapters: adapter {name!r} ({path}) holds {key!r}, which is not a LoRA "
                             f"lora_A/lora_B weight under {lk_io.PREFIX!r}")
    if not found:
        raise ValueError(f"load_adapters: adapter {name!r} ({path}) holds no LoRA weights")
    out = {}
    for module, parts in found.items():
        if set(parts) != {"A", "B"}:
            raise ValueError(f"load_adapters: adapter {name!r} has lora_{'A' if 'A' not in parts else 'B'} missing "
                             f"for {module}")
        A, B = parts["A"], parts["B"]
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r:
            raise ValueError(f"load_adapters: adapter {name!r}, {module}: lora_A {tuple(A.shape)} and lora_B "
                             f"{tuple(B.shape)} are not [r, in] and [out, r]")
        r_cfg = int(lk_io._pattern_value(module, cfg.get("rank_pattern") or {}, r_glob))
        if r != r_cfg:
            raise ValueError(f"load_adapters: adapter {name!r}, {module}: rank {r} in the file, {r_cfg} in the config")
        alpha = float(lk_io._pattern_value(module, cfg.get("alpha_pattern") or {}, a_glob))
        out[module] = (A, B, alpha / (r ** 0.5 if use_rslora else r))
    return cfg, out, use_rslora


def load_adapters(
    model: nn.Module,
    adapters,
    *,
    max_adapters: Optional[int] = None,
    max_rank: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> Dict[str, int]:
    """Serve several PEFT adapter directories at once from one (e.g. transformers) model; returns name → slot.

    ``adapters``: ``{name: path}`` of directories in PEFT's format (``adapter_config.json`` +
    ``adapter_model.safetensors``). Every ``nn.Linear`` (or transformers ``Conv1D``, as in GPT-2) any adapter
    targets becomes a :class:`~lora_kernels.MultiLoRALinear` (base weights shared, state dict unchanged) whose pool
    holds every adapter at one model-wide
    slot (reserved, at no cost, in the layers an adapter does not target). Afterwards
    ``model(input_ids, adapter_names=[...])`` and ``model.generate(input_ids, adapter_names=[...])`` take one name
    per sequence (``"__base__"``: no adapter), PEFT's mixed-batch argument; the per-token slot ids are prepared once
    per forward into one :class:`~lora_kernels.LoRABatch` shared by all layers. Without ``adapter_names`` a forward
    uses whatever batch is set (``use_batch``), by default none: the base model.

    ``adapter_names`` must have exactly one name per sequence (ValueError otherwise, as in PEFT; a shorter list is
    never repeated to fit); ``generate(..., num_beams=k)`` repeats each name k times, PEFT's rule, and nothing else
    expands them (``num_return_sequences`` without beams is refused, as by PEFT). The names and the batch of a call
    belong to the calling thread/context, so concurrent requests on one model do not mix. The hooks hold no
    reference to the model: ``copy.deepcopy`` gives a model that serves on its own, and ``torch.save`` pickles it.
    Encoder-decoder models are refused (their encoder and decoder see different token counts).

    Calling it again adds adapters (into the existing pools; new target layers reserve the earlier adapters' slots).
    ``max_adapters`` (default: the number of adapters, for a model without pools yet) and ``max_rank`` (default: the
    largest rank loaded) size new pools; ``dtype`` is the pool dtype (default: each base weight's); ``backend`` goes to
    :func:`lora_kernels.multi_lora_linear`. Everything is read and checked before the model is changed; adapters with
    settings that cannot be served exactly (DoRA and other variants, ``lora_bias``, trained biases or
    ``modules_to_save``, an adapter saved for a mutated base) are refused with ValueError.
    """
    from .modules import linear_refusal
    from .multi_modules import _check_backend, _check_pool_dtype, multi_lora_layers

    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapters: model must be an nn.Module, got {type(model).__name__}")
    if not hasattr(adapters, "items") or not adapters:
        raise TypeError("adapters must be a non-empty {name: path} mapping")
    _check_backend(backend)
    for arg, v in (("max_adapters", max_adapters), ("max_rank", max_rank)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ValueError(f"load_adapters: {arg} must be a positive int or None, got {v!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"load_adapters: dtype must be a torch.dtype or None, got {dtype!r}")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) is True:
        # One batch of per-token ids serves every layer of a forward; an encoder-decoder runs its encoder and its
        # decoder on different token counts, so the ids could not fit both.
        raise ValueError(f"load_adapters does not serve encoder-decoder models ({type(model).__name__} has "
                         "config.is_encoder_decoder=True); convert a PeftModel of it with from_peft instead")
    bad = [n for n in adapters if not isinstance(n, str) or not n or n == BASE or "." in n]
    if bad:
        raise ValueError(f"adapter names must be non-empty strings without '.', not {BASE!r}: got {bad!r}")
    existing = multi_lora_layers(model)
    loaded = {n for m in existing.values() for n in m.pool.names}
    clash = sorted(set(adapters) & loaded)
    if clash:
        raise ValueError(f"adapter(s) {clash} are already loaded in this model")
    parsed = {name: _read_peft_dir(name, path)[1] for name, path in adapters.items()}

    # ---- which layers: every module named by some adapter; new ones must be plain nn.Linear of matching shapes
    # remove_duplicate=False: a module shared under several names is one layer, served under every name.
    all_names = list(model.named_modules(remove_duplicate=False))
    modules = dict(all_names)
    canonical = {}
    for n, m in all_names:
        canonical.setdefault(id(m), n)
    targets: Dict[str, nn.Module] = {}
    problems = []
    for name, weights in parsed.items():
        seen = {}
        for mod_name, (A, B, _) in weights.items():
            mod = modules.get(mod_name)
            if mod is not None and seen.setdefault(id(mod), mod_name) != mod_name:
                problems.append(f"{name}: {mod_name} and {seen[id(mod)]} are one shared module, given twice")
                continue
            refusal = (linear_refusal(mod) if isinstance(mod, nn.Linear) and not isinstance(mod, MultiLoRALinear)
                       else None)
            if mod is None:
                problems.append(f"{name}: the model has no module {mod_name!r}")
            elif not isinstance(mod, (nn.Linear, MultiLoRALinear)) and not _is_conv1d(mod):
                problems.append(f"{name}: {mod_name} is a {type(mod).__name__}, not an nn.Linear or Conv1D")
            elif refusal:
                problems.append(f"{name}: {mod_name} cannot be served: {refusal}")
            elif dtype is not None and not isinstance(mod, MultiLoRALinear) and (
                    dtype not in (mod.weight.dtype, torch.float32)):
                problems.append(f"{name}: dtype={dtype} cannot serve {mod_name}, whose weight is "
                                f"{mod.weight.dtype}: the pool must be the weight's dtype or torch.float32")
            elif (B.shape[0], A.shape[1]) != _out_in(mod):
                problems.append(f"{name}: {mod_name} is [out, in] = {list(_out_in(mod))} but the adapter is "
                                f"lora_B {tuple(B.shape)} · lora_A {tuple(A.shape)}")
            elif isinstance(mod, MultiLoRALinear) and A.shape[0] > mod.pool.max_rank:
                problems.append(f"{name}: rank {A.shape[0]} exceeds the max_rank={mod.pool.max_rank} of {mod_name}")
            else:
                targets[canonical[id(mod)]] = mod
    if existing:
        L = next(iter(existing.values())).pool.max_adapters
        if max_adapters is not None and max_adapters != L:
            problems.append(f"max_adapters={max_adapters}, but the model's pools have {L} slots")
    else:
        L = max_adapters if max_adapters is not None else len(adapters)
    free = set(range(L))
    for m in existing.values():
        free &= set(m.pool.free_slots())
    if len(free) < len(adapters):
        problems.append(f"{len(adapters)} adapters to load but only {len(free)} of {L} slots are free in every layer")
    R = max(A.shape[0] for w in parsed.values() for A, _, _ in w.values())
    if max_rank is not None:
        if max_rank < R:
            problems.append(f"max_rank={max_rank} is below the largest adapter rank {R}")
        R = max_rank
    if problems:
        raise ValueError("load_adapters: nothing was loaded:\n  " + "\n  ".join(problems))

    # ---- inject new layers (built first), reserving the slots of adapters loaded earlier
    new_layers = {n: _multi_from(m, L, R, dtype, backend) for n, m in targets.items()
                  if not isinstance(m, MultiLoRALinear)}
    slots_before = {}
    for m in existing.values():
        slots_before.update(m.pool.names)
    for layer in new_layers.values():
        for prev, slot in slots_before.items():
            layer.pool.reserve(prev, slot=slot)
    replaced = []
    for n, layer in new_layers.items():
        original = modules[n]
        for alias in [a for a, m in all_names if m is original]:  # every name of a shared module
            replaced.append((alias, original))
            _set_child(model, alias, layer)
    layers = multi_lora_layers(model)
    # The weights by the name each layer is listed under (a shared layer's first name).
    parsed = {name: {canonical[id(modules[k])]: v for k, v in weights.items()} for name, weights in parsed.items()}

    # ---- load, all or nothing
    result: Dict[str, int] = {}
    try:
        for name, weights in parsed.items():
            slot = min(free)
            free.discard(slot)
            for lname, layer in layers.items():
                if lname in weights:
                    A, B, scale = weights[lname]
                    layer.pool.load(name, A, B, scale=scale, slot=slot)
                else:
                    layer.pool.reserve(name, slot=slot)
            result[name] = slot
    except Exception:
        for layer in layers.values():
            for name in adapters:
                if name in layer.pool:
                    layer.pool._unload(name)
        for n, original in replaced:
            _set_child(model, n, original)
        raise
    _install_serving_hooks(model)
    getattr(model, _SERVING_ATTR).layers = list(multi_lora_layers(model).values())
    return result


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and type(module) is conv1d


def _out_in(module: nn.Module) -> Tuple[int, int]:
    if _is_conv1d(module):
        return int(module.weight.shape[1]), int(module.weight.shape[0])  # Conv1D weight is [in, out]
    return int(module.out_features), int(module.in_features)


def _multi_from(module: nn.Module, L: int, R: int, dtype, backend):
    """A MultiLoRALinear for ``module`` (an nn.Linear, or a Conv1D served by :class:`_MultiLoRAConv1D`)."""
    if not _is_conv1d(module):
        return MultiLoRALinear.from_linear(module, L, R, dtype=dtype, backend=backend)
    # from_linear reads in/out features, weight and bias: hand it a bare nn.Linear holding the Conv1D's tensors.
    shim = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(shim)
    out_f, in_f = _out_in(module)
    shim.in_features, shim.out_features = in_f, out_f
    shim.weight, shim.bias = module.weight, module.bias
    layer = MultiLoRALinear.from_linear(shim, L, R, dtype=dtype, backend=backend)
    layer.__class__ = _MultiLoRAConv1D
    return layer


class _MultiLoRAConv1D(MultiLoRALinear):
    """A MultiLoRALinear over a transformers ``Conv1D``: ``weight`` stays the checkpoint's ``[in, out]`` tensor (the
    state dict is unchanged) and the op reads its transpose, a strided view."""

    def forward(self, x: torch.Tensor, batch=None) -> torch.Tensor:
        batch = batch if batch is not None else _active_batches().get(self)
        weight = self.weight.t()
        if batch is None:
            return F.linear(x, weight, self.bias)
        return multi_lora_linear(x, weight, self.bias, self.pool, batch, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", conv1d=True"


class _Serving:
    """Per-model state of the adapter_names hooks: the model's MultiLoRALinear layers (found once per load_adapters,
    not per forward). What a call in progress sets lives in the calling thread/context, never here."""

    def __init__(self):
        self.layers: list = []


# Per thread and contextvars context: model → adapter_names of the generate call in progress (expanded for beams),
# and the stack of the active batches each forward in progress replaced (the post hook restores them).
_GENERATE_NAMES: "contextvars.ContextVar[Optional[Dict[nn.Module, List[str]]]]" = contextvars.ContextVar(
    "lora_kernels_generate_adapter_names", default=None)
_FORWARD_SAVED: "contextvars.ContextVar[tuple]" = contextvars.ContextVar("lora_kernels_serving_saved", default=())
_NOTHING_SET = object()


def _install_serving_hooks(model: nn.Module) -> None:
    # Module-level hooks and a picklable generate wrapper: each reads the state of the module it is called on, so a
    # deepcopy serves with its own layers and torch.save can pickle the model.
    if getattr(model, _SERVING_ATTR, None) is not None:
        return
    object.__setattr__(model, _SERVING_ATTR, _Serving())
    model.register_forward_pre_hook(_serving_pre_hook, with_kwargs=True)
    model.register_forward_hook(_serving_post_hook, always_call=True)
    if callable(getattr(model, "generate", None)):
        model.generate = _ServingGenerate(model)


class _ServingGenerate:
    """``model.generate`` of a served model: takes ``adapter_names`` (transformers' generate refuses kwargs the
    forward does not declare) and hands them, expanded for beams, to the forward hook through the calling context."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.original = model.__dict__.get("generate")  # an instance-level generate already there, else the class's
        self.__doc__ = getattr(model.generate, "__doc__", None)

    def __call__(self, *args, adapter_names=None, **kwargs):
        model = self.model
        generate = self.original if self.original is not None else type(model).generate.__get__(model)
        if adapter_names is None:
            return generate(*args, **kwargs)
        names = _expand_for_beams(adapter_names, kwargs.get("num_beams", None))
        previous = _GENERATE_NAMES.get()
        _GENERATE_NAMES.set({**(previous or {}), model: names})
        try:
            return generate(*args, **kwargs)
        finally:
            _GENERATE_NAMES.set(previous)


def _slots_for(layers: list, names: Sequence[str], batch_size: int) -> List[int]:
    # Slots are model-wide (every layer holds or reserves every adapter at one slot): one pool tells them all.
    known = layers[0].pool.names if layers else {}
    names = _as_name_list(names)
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(f"adapter_names names adapter(s) {unknown} that are not loaded; loaded: {sorted(known)} "
                         f"(and {BASE!r} for none)")
    _check_names_length(names, batch_size)
    return [-1 if n == BASE else known[n] for n in names]


def _serving_pre_hook(module, args, kwargs):
    from .multi_modules import _swap_batches
    from .pool import IN_FLIGHT_LOCK, LoRABatch, hold_slots, release_slots

    saved = _FORWARD_SAVED.get()
    _FORWARD_SAVED.set(saved + (_NOTHING_SET,))  # first, so that the post hook (always called) pops this forward's
    names = kwargs.pop("adapter_names", None)
    if names is None:
        names = (_GENERATE_NAMES.get() or {}).get(module)
    if names is None:
        return args, kwargs
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None and args:
        x = args[0]
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("adapter_names needs input_ids or inputs_embeds [batch, seq, ...] to size the batch")
    seq = x.shape[1] if x.dim() >= 2 else 1
    layers = getattr(module, _SERVING_ATTR).layers
    with IN_FLIGHT_LOCK:  # names → slots and the hold at once: no unload can come in between
        slots = _slots_for(layers, names, x.shape[0])
        held = hold_slots([m.pool for m in layers], slots)
    try:
        device = layers[0].weight.device if layers else x.device
        ids = torch.tensor(slots, dtype=torch.int64).repeat_interleave(seq)  # row-major [batch, seq] tokens
        batch = LoRABatch.prepare(ids, device=device)
    except BaseException:
        release_slots(held)
        raise
    previous = _swap_batches({m: batch for m in layers})
    _FORWARD_SAVED.set(saved + ((previous, held),))
    return args, kwargs


def _serving_post_hook(module, args, output):
    from .multi_modules import _restore_batches
    from .pool import release_slots

    saved = _FORWARD_SAVED.get()
    if saved:
        _FORWARD_SAVED.set(saved[:-1])
        if saved[-1] is not _NOTHING_SET:
            previous, held = saved[-1]
            _restore_batches(previous)
            release_slots(held)
    return None
