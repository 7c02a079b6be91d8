"""Serving PEFT adapter directories by name: ``load_adapters(model, {name: path})`` fills
:class:`~lora_kernels.MultiLoRALinear` pools of a plain (e.g. transformers) model, after which
``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])`` run PEFT's mixed batch through
the multi-adapter kernels, the per-token slot ids prepared once per forward for all layers. One name per sequence;
the names and the batch of a call belong to the calling thread/context. See docs/peft.md ("Serving adapter
directories by name").
"""

from __future__ import annotations

import contextvars
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import io as lk_io
from .. import _backend
from ..multi_modules import MultiLoRALinear, multi_lora_layers, restore_batches, swap_batches
from ..pool import IN_FLIGHT_LOCK, LoRABatch, hold_slots, release_slots
from ..targets import linear_refusal, replace_module
from .common import BASE, as_name_list, check_names_length, expand_for_beams, is_conv1d


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
            elif not isinstance(mod, (nn.Linear, MultiLoRALinear)) and not is_conv1d(mod):
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
            replace_module(model, alias, layer)
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
            replace_module(model, n, original)
        raise
    _install_serving_hooks(model)
    getattr(model, _SERVING_ATTR).layers = list(multi_lora_layers(model).values())
    return result


def _out_in(module: nn.Module) -> Tuple[int, int]:
    if is_conv1d(module):
        return int(module.weight.shape[1]), int(module.weight.shape[0])  # Conv1D weight is [in, out]
    return int(module.out_features), int(module.in_features)


def _multi_from(module: nn.Module, L: int, R: int, dtype, backend) -> MultiLoRALinear:
    """A MultiLoRALinear over ``module``'s weight and bias (an nn.Linear, or a Conv1D whose ``[in, out]`` weight the
    layer reads through its transpose)."""
    if is_conv1d(module):
        return MultiLoRALinear.from_weight(module.weight, module.bias, L, R, weight_layout="in_out", dtype=dtype,
                                           backend=backend)
    return MultiLoRALinear.from_linear(module, L, R, dtype=dtype, backend=backend)


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
        names = expand_for_beams(adapter_names, kwargs.get("num_beams", None))
        previous = _GENERATE_NAMES.get()
        _GENERATE_NAMES.set({**(previous or {}), model: names})
        try:
            return generate(*args, **kwargs)
        finally:
            _GENERATE_NAMES.set(previous)


def _slots_for(layers: list, names: Sequence[str], batch_size: int) -> List[int]:
    # Slots are model-wide (every layer holds or reserves every adapter at one slot): one pool tells them all.
    known = layers[0].pool.names if layers else {}
    names = as_name_list(names)
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(f"adapter_names names adapter(s) {unknown} that are not loaded; loaded: {sorted(known)} "
                         f"(and {BASE!r} for none)")
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
