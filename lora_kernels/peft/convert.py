"""Model-level conversion between PEFT and lora_kernels: ``from_peft`` (every PEFT ``lora.Linear`` that converts
exactly becomes a :class:`PeftLoRALinear`; the others stay PEFT layers, named in one warning with the reason),
``to_peft`` (the PEFT layers back, holding the current tensors, and each ``LoraConfig`` made to describe them again),
``set_adapter`` and ``unsupported_peft_layers``. A converted model's state dict names adapter tensors
``<layer>.lora_adapters.<name>.lora_A``; for PEFT's names and files, ``to_peft`` then ``save_pretrained``.
See docs/peft.md ("Conversion").
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .. import _backend, adapter_files
from ..targets import replace_module
from .common import PeftConversionWarning, check_requires_grad, is_conv1d, peft_lora
from .layer import PeftLoRALinear
from .patches import install_disable_adapter, install_mixed_batch_hooks, remove_mixed_batch_hooks


def _unsupported_reason(layer, lora_layer_mod) -> str | None:
    """None when ``layer`` (a PEFT LoraLayer) converts exactly, else why not."""
    if type(layer) is not lora_layer_mod.Linear:
        return f"{type(layer).__module__}.{type(layer).__name__} is not a plain PEFT lora.Linear"
    base = layer.base_layer
    if type(base) is nn.Linear or (isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward):
        if layer.fan_in_fan_out:
            return "fan_in_fan_out=True on an nn.Linear base layer"
    elif is_conv1d(base):
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


def unsupported_peft_layers(model: nn.Module) -> dict[str, str]:
    """Qualified name → reason, for every PEFT LoRA layer of ``model`` that :func:`from_peft` would leave as is."""
    lora_layer_mod = peft_lora()
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, lora_layer_mod.LoraLayer):
            why = _unsupported_reason(module, lora_layer_mod)
            if why:
                out[name] = why
    return out


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
def from_peft(model: nn.Module, backend: str | None = None, warn: bool = True) -> nn.Module:
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
        _backend.requested_backend(backend)  # at the call, not at every later forward
    lora_layer_mod = peft_lora()
    skipped: dict[str, str] = {}
    chosen: list[tuple[str, nn.Module]] = []
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
        raise ValueError(
            f"from_peft: {type(model).__name__} holds no PEFT LoRA layer (wrap it with "
            "peft.get_peft_model first, or use lora_kernels.inject_lora for a plain model)"
        )
    built = [(name, PeftLoRALinear.from_peft_layer(module, backend)) for name, module in chosen]  # then replace
    for name, layer in built:
        replace_module(model, name, layer)
    tuner = _tuner(model)
    if tuner is not None and chosen:
        install_mixed_batch_hooks(tuner)
        if tuner is not model:
            install_disable_adapter(model)
    if skipped and warn:
        detail = "; ".join(f"{n}: {why}" for n, why in skipped.items())
        warnings.warn(
            f"from_peft left {len(skipped)} PEFT layer(s) unconverted (they still run through PEFT): {detail}",
            PeftConversionWarning,
            stacklevel=2,
        )
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
        replace_module(model, name, layer.to_peft_layer())
    tuner = _tuner(model)
    if tuner is not None:
        _sync_peft_config(tuner)
        remove_mixed_batch_hooks(tuner)
        model.__dict__.pop("disable_adapter", None)
    return model


def _sync_peft_config(tuner) -> None:
    """Make each adapter's ``LoraConfig`` describe its layers again, so that ``save_pretrained`` writes what the model
    computes: the layers may have changed since the conversion (``load_adapter`` with another alpha, dropout or
    rsLoRA flag). A layer whose r / alpha the config no longer gives gets a ``rank_pattern`` / ``alpha_pattern`` entry
    matching that layer only; ``use_rslora`` and ``lora_dropout`` (one value per adapter in PEFT's config) follow the
    layers when they agree, and a warning says when they do not."""
    lora_layer_mod = peft_lora()
    names = [n for n, _ in tuner.model.named_modules()]
    per_adapter: dict[str, dict[str, tuple]] = {}
    for n, m in tuner.model.named_modules():
        if isinstance(m, lora_layer_mod.LoraLayer):
            for ad in m.lora_A.keys():
                drop = m.lora_dropout[ad] if ad in m.lora_dropout else None
                per_adapter.setdefault(ad, {})[n] = (
                    int(m.r[ad]),
                    float(m.lora_alpha[ad]),
                    bool(m.use_rslora.get(ad, False)),
                    float(drop.p) if isinstance(drop, nn.Dropout) else 0.0,
                )
    for ad, layers in per_adapter.items():
        cfg = tuner.peft_config.get(ad)
        if cfg is None or not hasattr(cfg, "alpha_pattern"):
            continue
        for field, pattern_field, idx, kind in (
            ("r", "rank_pattern", 0, int),
            ("lora_alpha", "alpha_pattern", 1, float),
        ):
            glob, pattern = getattr(cfg, field), dict(getattr(cfg, pattern_field) or {})
            wrong = [n for n, v in layers.items() if kind(adapter_files.pattern_value(n, pattern, glob)) != v[idx]]
            if not wrong:
                continue  # the config already describes the layers: left as the user wrote it
            # Describe every layer again: the most common value in the plain field (the config's own on a tie), the
            # others under keys that each match one layer only.
            values = [v[idx] for v in layers.values()]
            top = max(values.count(v) for v in values)
            glob = kind(glob) if values.count(kind(glob)) == top else next(v for v in values if values.count(v) == top)
            setattr(cfg, field, _json_number(glob))
            setattr(
                cfg,
                pattern_field,
                {
                    adapter_files.exact_pattern_key(n, names): _json_number(v[idx])
                    for n, v in layers.items()
                    if v[idx] != glob
                },
            )
        for field, idx in (("use_rslora", 2), ("lora_dropout", 3)):
            values = {v[idx] for v in layers.values()}
            if len(values) == 1:
                setattr(cfg, field, values.pop())
            else:
                warnings.warn(
                    f"to_peft: the layers of adapter {ad!r} use several {field} values {sorted(values)}, "
                    f"but PEFT's config holds one; save_pretrained will not reproduce them all",
                    PeftConversionWarning,
                    stacklevel=3,
                )


def _json_number(v):
    return int(v) if float(v).is_integer() else float(v)


def set_adapter(model: nn.Module, name: str, requires_grad: bool | None = None) -> None:
    """Activate adapter ``name`` in every converted layer of ``model`` and, for a PeftModel, in PEFT's layers and
    records too. ``requires_grad``: as :meth:`PeftLoRALinear.set_adapter` (a PeftModel's own ``set_adapter`` makes
    the active adapter trainable, so pass ``True`` to get PEFT's behaviour on the converted layers)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_adapter: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"set_adapter: name must be a str (an adapter name), got {type(name).__name__} {name!r}")
    check_requires_grad(requires_grad)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PeftLoRALinear)]
    missing = [n for n, m in layers if name not in m.lora_adapters]
    if missing:
        raise ValueError(
            f"adapter {name!r} is missing from converted layer(s) {missing}; to_peft(model) and use "
            "PEFT's set_adapter, which leaves such layers without adapter"
        )
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        PeftModel = ()
    if not layers and not isinstance(model, PeftModel):
        raise ValueError(
            f"set_adapter: {type(model).__name__} has no converted PEFT layer (from_peft first); "
            "models served by load_adapters pick adapters per call with adapter_names=[...]"
        )
    blocked = [n for n, m in layers if m.merged and m.active_adapter != name]
    if blocked:  # checked for every layer before any is switched
        raise RuntimeError(
            f"set_adapter: converted layer(s) {blocked} are merged; unmerge() them before switching "
            f"the adapter (nothing was switched)"
        )
    if isinstance(model, PeftModel):
        model.set_adapter(name)  # PEFT layers that are left, and PeftModel.active_adapter
    for _, layer in layers:
        layer.set_adapter(name, requires_grad=requires_grad)
