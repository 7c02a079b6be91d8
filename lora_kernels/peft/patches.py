"""Patches of PEFT objects for a converted ``PeftModel``: ``adapter_names=[...]`` (PEFT's mixed batch) in ``forward``
and ``generate`` reaches converted layers, and ``disable_adapter()`` switches them too. PEFT hooks and switches its
own ``LoraLayer`` instances only; these instance-level replacements serve both kinds. They are module-level objects
holding the tuner or model (no closures), so ``copy.deepcopy`` gives a copy its own and ``torch.save`` pickles them.
The names of a call belong to the calling thread/context. See docs/peft.md.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch.nn as nn

from .common import BASE, as_name_list, expand_for_beams, peft_lora
from .layer import PeftLoRALinear


def install_mixed_batch_hooks(tuner) -> None:
    """Make PeftModel.disable_adapter() reach converted layers (PEFT switches BaseTunerLayer instances only), and
    make ``adapter_names=[...]`` reach converted layers. PEFT's ``LoraModel._enable_peft_forward_hooks`` (used by
    PeftModel.forward and .generate) hooks ``LoraLayer`` instances only, so converted layers would silently apply
    the active adapter to every sequence; this instance-level replacement serves both kinds, with PEFT's checks.
    Both replacements are picklable objects holding the tuner (no closures), so ``copy.deepcopy`` gives the copy its
    own and ``torch.save`` works."""
    if "_enable_peft_forward_hooks" in tuner.__dict__:
        return
    tuner._enable_peft_forward_hooks = _MixedBatchHooks(tuner)
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


def remove_mixed_batch_hooks(tuner) -> None:
    """Undo :func:`install_mixed_batch_hooks` (``to_peft``: PEFT's own hooks serve PEFT layers)."""
    tuner.__dict__.pop("_enable_peft_forward_hooks", None)
    tuner.__dict__.pop("_enable_adapter_layers", None)
    for module in tuner.modules():
        for key in [k for k, h in module._forward_pre_hooks.items() if h is _mixed_names_pre_hook]:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


def install_disable_adapter(peft_model) -> None:
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
        if any(isinstance(m, peft_lora().LoraLayer) for m in peft_model.modules()):
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
_MIXED_NAMES: contextvars.ContextVar[dict[nn.Module, list[str]] | None] = contextvars.ContextVar(
    "lora_kernels_mixed_adapter_names", default=None
)


def _mixed_names_pre_hook(module, args, kwargs):
    """Permanent pre-hook of the layers of a converted model: hands them the calling context's adapter_names."""
    names = (_MIXED_NAMES.get() or {}).get(module)
    if names is None:
        return None
    kwargs["adapter_names"] = names
    return args, kwargs


class _MixedBatchHooks:
    """``tuner._enable_peft_forward_hooks`` of a converted model (see :func:`install_mixed_batch_hooks`)."""

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
    given = as_name_list(adapter_names)
    lora_layer_mod = peft_lora()
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
    names = expand_for_beams(given, kwargs.get("num_beams", None))
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
