"""Serving PEFT adapter directories by name: ``load_adapters(model, {name: path})`` fills
:class:`~lora_kernels.MultiLoRALinear` pools of a plain (e.g. transformers) model, after which
``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])`` run PEFT's mixed batch through
the multi-adapter kernels, the per-token slot ids prepared once per forward for all layers. One name per sequence;
the names and the batch of a call belong to the calling thread/context. See docs/peft.md ("Serving adapter
directories by name").
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from .. import _backend, adapter_files
from ..multi_modules import MultiLoRALinear, multi_lora_layers, restore_batches, swap_batches
from ..pool import IN_FLIGHT_LOCK, LoRABatch, hold_slots, release_slots
from ..targets import linear_refusal, replace_module
from .common import BASE, as_name_list, check_names_length, expand_for_beams, is_conv1d

_SERVING_ATTR = "_lora_kernels_serving"

# LoraConfig fields that change what an adapter computes beyond y += s·B·A·x: adapters using them are refused.
_VARIANT_FIELDS = (
    "use_dora",
    "lora_bias",
    "use_qalora",
    "alora_invocation_tokens",
    "arrow_config",
    "use_bdlora",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "use_mica",
    "mica",
)

Weights = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module name → (lora_A, lora_B, scale)


def load_adapters(
    model: nn.Module,
    adapters,
    *,
    max_adapters: int | None = None,
    max_rank: int | None = None,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> dict[str, int]:
    """Serve several PEFT adapter directories at once from one (e.g. transformers) model; returns name → slot.

    ``adapters``: ``{name: path}`` of directories in PEFT's format (``adapter_config.json`` +
    ``adapter_model.safetensors``). Every ``nn.Linear`` (or transformers ``Conv1D``, as in GPT-2) any adapter
    targets becomes a :class:`~lora_kernels.MultiLoRALinear` (base weights shared, state dict unchanged) whose pool
    holds every adapter at one model-wide slot (reserved, at no cost, in the layers an adapter does not target).
    Afterwards ``model(input_ids, adapter_names=[...])`` and ``model.generate(input_ids, adapter_names=[...])``
    take one name per sequence (``"__base__"``: no adapter), PEFT's mixed-batch argument; the per-token slot ids are
    prepared once per forward into one :class:`~lora_kernels.LoRABatch` shared by all layers. Without
    ``adapter_names`` a forward uses whatever batch is set (``use_batch``), by default none: the base model.

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
    _check_arguments(model, adapters, max_adapters, max_rank, dtype, backend)
    weights = {name: _read_adapter_dir(name, path) for name, path in adapters.items()}
    plan = _plan(model, weights, max_adapters, max_rank, dtype)
    replaced = _install_layers(model, plan, dtype, backend)
    try:
        slots = _load_weights(model, plan, weights)
    except BaseException:
        for alias, original in replaced:  # all or nothing: the model as it was
            replace_module(model, alias, original)
        raise
    _install_serving_hooks(model)
    getattr(model, _SERVING_ATTR).layers = list(multi_lora_layers(model).values())
    return slots


# ----------------------------------------------------------------------------------------------- 1. the call
def _check_arguments(model, adapters, max_adapters, max_rank, dtype, backend) -> None:
    """Refuse bad arguments, encoder-decoder models and names already loaded, before anything is read."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapters: model must be an nn.Module, got {type(model).__name__}")
    if not hasattr(adapters, "items") or not adapters:
        raise TypeError("adapters must be a non-empty {name: path} mapping")
    if backend is not None:
        _backend.requested_backend(backend)  # at the call, not at every later forward
    for arg, v in (("max_adapters", max_adapters), ("max_rank", max_rank)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ValueError(f"load_adapters: {arg} must be a positive int or None, got {v!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"load_adapters: dtype must be a torch.dtype or None, got {dtype!r}")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) is True:
        # One batch of per-token ids serves every layer of a forward; an encoder-decoder runs its encoder and its
        # decoder on different token counts, so the ids could not fit both.
        raise ValueError(
            f"load_adapters does not serve encoder-decoder models ({type(model).__name__} has "
            "config.is_encoder_decoder=True); convert a PeftModel of it with from_peft instead"
        )
    bad = [n for n in adapters if not isinstance(n, str) or not n or n == BASE or "." in n]
    if bad:
        raise ValueError(f"adapter names must be non-empty strings without '.', not {BASE!r}: got {bad!r}")
    loaded = {n for m in multi_lora_layers(model).values() for n in m.pool.names}
    clash = sorted(set(adapters) & loaded)
    if clash:
        raise ValueError(f"adapter(s) {clash} are already loaded in this model")


# ------------------------------------------------------------------------------------ 2. each adapter directory
def _read_adapter_dir(name: str, path) -> Weights:
    """Module name → (A, B, scale) of the PEFT adapter directory ``path``; raises on anything it cannot serve
    exactly. Module names are the base model's (PEFT's ``base_model.model.`` prefix removed)."""
    cfg = _read_serving_config(path)
    state, metadata = adapter_files.read_tensors(path, caller="load_adapters")
    if metadata.get("lora_kernels.base") == "mutated":
        raise ValueError(
            f"load_adapters: adapter {name!r} ({path}) was saved for a mutated base weight "
            "(PiSSA/LoRA-GA, convert_to_original=False); a served model shares one original base"
        )
    found, others = adapter_files.tensors_by_module(state)
    if others:
        raise ValueError(
            f"load_adapters: adapter {name!r} ({path}) holds {others[0]!r}, which is not a LoRA "
            f"lora_A/lora_B weight under {adapter_files.PREFIX!r}"
        )
    if not found:
        raise ValueError(f"load_adapters: adapter {name!r} ({path}) holds no LoRA weights")
    use_rslora = bool(cfg.get("use_rslora", False))
    out = {}
    for module, parts in found.items():
        if set(parts) != {"A", "B"}:
            raise ValueError(
                f"load_adapters: adapter {name!r} has lora_{'A' if 'A' not in parts else 'B'} missing for {module}"
            )
        A, B = parts["A"], parts["B"]
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r:
            raise ValueError(
                f"load_adapters: adapter {name!r}, {module}: lora_A {tuple(A.shape)} and lora_B "
                f"{tuple(B.shape)} are not [r, in] and [out, r]"
            )
        r_cfg = int(adapter_files.pattern_value(module, cfg.get("rank_pattern"), cfg["r"]))
        if r != r_cfg:
            raise ValueError(f"load_adapters: adapter {name!r}, {module}: rank {r} in the file, {r_cfg} in the config")
        alpha = float(adapter_files.pattern_value(module, cfg.get("alpha_pattern"), cfg["lora_alpha"]))
        out[module] = (A, B, alpha / (r**0.5 if use_rslora else r))
    return out


def _read_serving_config(path) -> dict:
    """``adapter_config.json`` with lora_kernels' checks, LoRA variants refused by name, and ``fan_in_fan_out``
    allowed: it only says how PEFT merges into a Conv1D weight; lora_A/lora_B are ``[r, in]``/``[out, r]`` whatever
    it says, and the served layer follows its base module (nn.Linear or Conv1D)."""
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
    # The variant fields pass the general check, to be refused below under their own name.
    cfg = adapter_files.read_config(path, caller="load_adapters", allow=("fan_in_fan_out", *sorted(fields)))
    variants = [f"{k}={cfg[k]!r}" for k in sorted(fields) if cfg.get(k)]
    if isinstance(cfg.get("init_lora_weights"), str) and cfg["init_lora_weights"] in inits:
        variants.append(f"init_lora_weights={cfg['init_lora_weights']!r}")
    if variants:
        cpath = os.path.join(os.fspath(path), adapter_files.CONFIG_NAME)
        raise ValueError(f"load_adapters: {cpath}: LoRA variant settings cannot be served: {', '.join(variants)}")
    return cfg


class _Plan(NamedTuple):
    """What load_adapters changes, decided before anything is changed."""

    targets: dict[str, nn.Module]  # layer to serve (a shared module under its first name) → module
    aliases: dict[str, str]  # every name of a module the weights name → the name it is planned under
    max_adapters: int  # slots of new pools
    max_rank: int  # rank of new pools
    slots: list[int]  # the slot of each adapter, in the order given


def _plan(model: nn.Module, weights: dict[str, Weights], max_adapters, max_rank, dtype) -> _Plan:
    """The layers to serve and the slots, or ValueError listing every problem found."""
    # remove_duplicate=False: a module shared under several names is one layer, served under every name.
    all_names = list(model.named_modules(remove_duplicate=False))
    modules = dict(all_names)
    canonical: dict[int, str] = {}
    for n, m in all_names:
        canonical.setdefault(id(m), n)
    targets: dict[str, nn.Module] = {}
    problems = []
    for name, layers in weights.items():
        seen: dict[int, str] = {}
        for mod_name, (A, B, _) in layers.items():
            mod = modules.get(mod_name)
            if mod is not None and seen.setdefault(id(mod), mod_name) != mod_name:
                problems.append(f"{name}: {mod_name} and {seen[id(mod)]} are one shared module, given twice")
                continue
            why = _target_problem(mod, mod_name, A, B, dtype)
            if why:
                problems.append(f"{name}: {why}")
            else:
                targets[canonical[id(mod)]] = mod
    existing = multi_lora_layers(model)
    if existing:
        L = next(iter(existing.values())).pool.max_adapters
        if max_adapters is not None and max_adapters != L:
            problems.append(f"max_adapters={max_adapters}, but the model's pools have {L} slots")
    else:
        L = max_adapters if max_adapters is not None else len(weights)
    free = set(range(L))
    for m in existing.values():
        free &= set(m.pool.free_slots())
    if len(free) < len(weights):
        problems.append(f"{len(weights)} adapters to load but only {len(free)} of {L} slots are free in every layer")
    R = max(A.shape[0] for layers in weights.values() for A, _, _ in layers.values())
    if max_rank is not None:
        if max_rank < R:
            problems.append(f"max_rank={max_rank} is below the largest adapter rank {R}")
        R = max_rank
    if problems:
        raise ValueError("load_adapters: nothing was loaded:\n  " + "\n  ".join(problems))
    aliases = {n: canonical[id(modules[n])] for layers in weights.values() for n in layers}
    return _Plan(targets, aliases, L, R, sorted(free)[: len(weights)])


def _target_problem(mod: nn.Module | None, mod_name: str, A: torch.Tensor, B: torch.Tensor, dtype) -> str | None:
    """Why the module ``mod_name`` cannot serve the adapter ``(A, B)``, None when it can."""
    if mod is None:
        return f"the model has no module {mod_name!r}"
    served = isinstance(mod, MultiLoRALinear)  # by an earlier call: its pool is there
    if not served and not isinstance(mod, nn.Linear) and not is_conv1d(mod):
        return f"{mod_name} is a {type(mod).__name__}, not an nn.Linear or Conv1D"
    refusal = linear_refusal(mod) if isinstance(mod, nn.Linear) else None
    if refusal:
        return f"{mod_name} cannot be served: {refusal}"
    if dtype is not None and not served and dtype not in (mod.weight.dtype, torch.float32):
        return (
            f"dtype={dtype} cannot serve {mod_name}, whose weight is {mod.weight.dtype}: the pool must be the "
            f"weight's dtype or torch.float32"
        )
    if (B.shape[0], A.shape[1]) != _out_in(mod):
        return (
            f"{mod_name} is [out, in] = {list(_out_in(mod))} but the adapter is lora_B {tuple(B.shape)} · "
            f"lora_A {tuple(A.shape)}"
        )
    if served and A.shape[0] > mod.pool.max_rank:
        return f"rank {A.shape[0]} exceeds the max_rank={mod.pool.max_rank} of {mod_name}"
    return None


def _out_in(module: nn.Module) -> tuple[int, int]:
    if is_conv1d(module):
        return int(module.weight.shape[1]), int(module.weight.shape[0])  # Conv1D weight is [in, out]
    return int(module.out_features), int(module.in_features)


# ------------------------------------------------------------------------------------------ 4. change the model
def _install_layers(model: nn.Module, plan: _Plan, dtype, backend) -> list[tuple[str, nn.Module]]:
    """Replace each planned layer that is no MultiLoRALinear yet by one (built first, reserving the slots of the
    adapters loaded earlier), under every name of the module; returns (name, original) to undo it."""
    loaded_before: dict[str, int] = {}
    for m in multi_lora_layers(model).values():
        loaded_before.update(m.pool.names)
    new_layers = {
        n: _multi_from(m, plan.max_adapters, plan.max_rank, dtype, backend)
        for n, m in plan.targets.items()
        if not isinstance(m, MultiLoRALinear)
    }
    for layer in new_layers.values():
        for prev, slot in loaded_before.items():
            layer.pool.reserve(prev, slot=slot)
    replaced = []
    all_names = list(model.named_modules(remove_duplicate=False))
    for n, layer in new_layers.items():
        original = plan.targets[n]
        for alias in [a for a, m in all_names if m is original]:  # every name of a shared module
            replaced.append((alias, original))
            replace_module(model, alias, layer)
    return replaced


def _multi_from(module: nn.Module, L: int, R: int, dtype, backend) -> MultiLoRALinear:
    """A MultiLoRALinear over ``module``'s weight and bias (an nn.Linear, or a Conv1D whose ``[in, out]`` weight the
    layer reads through its transpose)."""
    if is_conv1d(module):
        return MultiLoRALinear.from_weight(
            module.weight, module.bias, L, R, weight_layout="in_out", dtype=dtype, backend=backend
        )
    return MultiLoRALinear.from_linear(module, L, R, dtype=dtype, backend=backend)


def _load_weights(model: nn.Module, plan: _Plan, weights: dict[str, Weights]) -> dict[str, int]:
    """Copy each adapter into its slot of every layer (reserved where it has no weights); all or nothing: on an
    error no layer keeps any of them. Returns name → slot."""
    layers = multi_lora_layers(model)  # each layer under its first name, as the plan names it
    result: dict[str, int] = {}
    try:
        for (name, by_module), slot in zip(weights.items(), plan.slots):
            by_layer = {plan.aliases[k]: v for k, v in by_module.items()}
            for lname, layer in layers.items():
                if lname in by_layer:
                    A, B, scale = by_layer[lname]
                    layer.pool.load(name, A, B, scale=scale, slot=slot)
                else:
                    layer.pool.reserve(name, slot=slot)
            result[name] = slot
    except BaseException:
        for layer in layers.values():
            for name in weights:
                if name in layer.pool:
                    layer.pool._unload(name)  # unchecked: undoes a load that has not served yet
        raise
    return result


# ---------------------------------------------------------------------------------- the adapter_names hooks
class _Serving:
    """Per-model state of the adapter_names hooks: the model's MultiLoRALinear layers (found once per load_adapters,
    not per forward). What a call in progress sets lives in the calling thread/context, never here."""

    def __init__(self):
        self.layers: list = []


# Per thread and contextvars context: model → adapter_names of the generate call in progress (expanded for beams),
# and the stack of the active batches each forward in progress replaced (the post hook restores them).
_GENERATE_NAMES: contextvars.ContextVar[dict[nn.Module, list[str]] | None] = contextvars.ContextVar(
    "lora_kernels_generate_adapter_names", default=None
)
_FORWARD_SAVED: contextvars.ContextVar[tuple] = contextvars.ContextVar("lora_kernels_serving_saved", default=())
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
        names = expand_for_beams(adapter_names, kwargs.get("num_beams", None))
        previous = _GENERATE_NAMES.get()
        _GENERATE_NAMES.set({**(previous or {}), model: names})
        try:
            return generate(*args, **kwargs)
        finally:
            _GENERATE_NAMES.set(previous)


def _slots_for(layers: list, names: Sequence[str], batch_size: int) -> list[int]:
    # Slots are model-wide (every layer holds or reserves every adapter at one slot): one pool tells them all.
    known = layers[0].pool.names if layers else {}
    names = as_name_list(names)
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(
            f"adapter_names names adapter(s) {unknown} that are not loaded; loaded: {sorted(known)} "
            f"(and {BASE!r} for none)"
        )
    check_names_length(names, batch_size)
    return [-1 if n == BASE else known[n] for n in names]


def _serving_pre_hook(module, args, kwargs):
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
    previous = swap_batches({m: batch for m in layers})
    _FORWARD_SAVED.set(saved + ((previous, held),))
    return args, kwargs


def _serving_post_hook(module, args, output):
    saved = _FORWARD_SAVED.get()
    if saved:
        _FORWARD_SAVED.set(saved[:-1])
        if saved[-1] is not _NOTHING_SET:
            previous, held = saved[-1]
            restore_batches(previous)
            release_slots(held)
    return None
