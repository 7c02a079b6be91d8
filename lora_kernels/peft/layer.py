"""``PeftLoRALinear``: a :class:`~lora_kernels.LoRALinear` holding every adapter of the PEFT ``lora.Linear`` layer it
was converted from (``lora_adapters[name]``), one of them active. ``lora_A``, ``lora_B``, ``r``, ``alpha``,
``scaling``, ``dropout`` and ``use_rslora`` read and write the active adapter's, so the layer is a ``LoRALinear`` for
the rest of lora_kernels. The tensors are the PEFT layer's own parameters (shared, never copied). A transformers
``Conv1D`` base keeps its ``[in, out]`` weight and the op reads its transpose. Under ``torch.autocast`` the layer
computes like an autocast ``nn.Linear`` (an fp32 adapter is kept), as PEFT's does. Dropout keeps PEFT's probability
with lora_kernels' mask (equal in distribution, not sample for sample). See docs/peft.md ("Conversion").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules import LoRALinear
from .common import BASE, as_name_list, check_names_length, check_requires_grad


class _Adapter(nn.Module):
    """One adapter of a :class:`PeftLoRALinear`: its two factors and the numbers that scale them."""

    def __init__(
        self,
        lora_A: nn.Parameter,
        lora_B: nn.Parameter,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float,
        use_rslora: bool,
    ):
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
    def from_peft_layer(cls, layer, backend: str | None) -> PeftLoRALinear:
        """The converted layer of ``layer`` (a PEFT ``lora.Linear`` that :func:`~lora_kernels.from_peft` found
        convertible), sharing its tensors."""
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
                layer.lora_A[name].weight,
                layer.lora_B[name].weight,
                r=layer.r[name],
                alpha=layer.lora_alpha[name],
                scaling=layer.scaling[name],
                dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
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

    def to_peft_layer(self) -> nn.Module:
        """The PEFT layer this layer was converted from, made to hold this layer's current tensors (base weight and
        bias, each adapter's factors, scaling, dropout probability), active adapter, trainable flags and mode."""
        peft_layer = self._peft_layer
        base = peft_layer.base_layer
        base.weight = self.weight
        base.bias = self.bias
        flags = {}
        for ad_name, ad in self.lora_adapters.items():
            peft_layer.lora_A[ad_name].weight = ad.lora_A
            peft_layer.lora_B[ad_name].weight = ad.lora_B
            peft_layer.r[ad_name] = ad.r
            peft_layer.lora_alpha[ad_name] = ad.alpha
            peft_layer.scaling[ad_name] = ad.scaling
            peft_layer.use_rslora[ad_name] = ad.use_rslora
            peft_layer.lora_dropout[ad_name] = nn.Dropout(p=ad.dropout) if ad.dropout > 0 else nn.Identity()
            flags[ad_name] = (ad.lora_A.requires_grad, ad.lora_B.requires_grad)
        peft_layer.set_adapter(self.active_adapter)  # PEFT's bookkeeping; it also resets requires_grad ...
        peft_layer.enable_adapters(not self.disable_adapters)
        for ad_name, (ga, gb) in flags.items():  # ... which the converted layer's flags override
            peft_layer.lora_A[ad_name].weight.requires_grad_(ga)
            peft_layer.lora_B[ad_name].weight.requires_grad_(gb)
        peft_layer.train(self.training)
        return peft_layer

    # ------------------------------------------------------------------------------------------------ adapters
    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_adapters.keys())

    def set_adapter(self, name: str, requires_grad: bool | None = None) -> None:
        """Make ``name`` the active adapter. ``requires_grad`` (default: leave as is) sets the adapters' trainable
        flags the way PEFT's ``set_adapter`` does: the active one ``requires_grad``, the others not."""
        check_requires_grad(requires_grad)
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

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The adapters are child modules, loaded after this method returns: LoRALinear's "unmerge, load, merge again"
        # would merge the OLD adapter. Merge with the active adapter's tensors from the checkpoint instead.
        if self._load_unless_merged(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        ):
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
        self._load_own_state(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        try:
            merged = self._merged_weight(self.weight, *factors)
        except ValueError as exc:
            error_msgs.append(f"{prefix or 'PeftLoRALinear'}: loaded but left unmerged: {exc}")
            return
        with torch.no_grad():
            self._unmerged_weight = self.weight.detach().clone()
            self.weight.copy_(merged)

    def forward(self, x: torch.Tensor, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
        if self._disable_adapters:
            # The base layer alone: while merged, W0 is the exact copy kept by merge(), not the merged weight.
            w0 = self._unmerged_weight if self.merged else self.weight
            return F.linear(x, w0.t() if self.fan_in_fan_out else w0, self.bias)
        weight = self._base_weight()
        if adapter_names is not None:
            return self._mixed_forward(x, weight, adapter_names)
        if self.merged:
            self._warn_merged_training()
            return F.linear(x, weight, self.bias)
        return self._fused_forward(x, weight, self.lora_A, self.lora_B)

    def _mixed_forward(self, x: torch.Tensor, weight: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        """Row ``i`` of ``x`` (a sequence) gets adapter ``adapter_names[i]``; ``"__base__"`` and adapters this layer
        does not hold get the base layer only, as in PEFT."""
        adapter_names = as_name_list(adapter_names)
        check_names_length(adapter_names, x.shape[0], f" (x shape {tuple(x.shape)})")
        if self.merged:
            raise ValueError("cannot pass adapter_names to a merged layer; unmerge() first")
        if len(set(adapter_names)) == 1:  # one adapter for the whole batch: no gather/scatter
            name = adapter_names[0]
            if name == BASE or name not in self.lora_adapters:
                return F.linear(x, weight, self.bias)
            return self._adapter_forward(x, weight, self.lora_adapters[name])
        # Each group of rows goes through the base product once, fused with its adapter (PEFT computes the base for
        # every row and then the adapter per group: twice the base reads for the adapted rows).
        groups: dict[str, list[int]] = {}
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
        return self._fused_forward(x, weight, ad.lora_A, ad.lora_B, ad.scaling, ad.dropout)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, active_adapter={self.active_adapter!r}, "
            f"adapters={self.adapter_names}, fan_in_fan_out={self.fan_in_fan_out}"
        )
