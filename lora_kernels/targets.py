"""Finding the layers of a model that an adapter targets, and swapping them in place.

One set of rules for every function that replaces or re-initialises layers (``inject_lora``, ``inject_multi_lora``,
``lora_ga_init``, ``load_adapter``, ``from_peft``, ``load_adapters``), so that they agree on which layers a
``target_modules`` selects and on which ones they refuse. PEFT's matching rules: a string is a regex matched
against the whole qualified name, a list matches by name suffix on a ``.`` boundary, ``"all-linear"`` is every
Linear but the output layer. Depends on torch only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch.nn as nn

TargetModules = str | Sequence[str]

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every Linear except the output layer


def check_target_modules(target_modules, *, allow_all_linear: bool = False) -> str | list[str]:
    """``target_modules`` as :func:`matches` takes it: a str (a compiled-checked regex, or ``"all-linear"`` when
    ``allow_all_linear``) or a list of non-empty names. TypeError for another type or a non-str/empty name,
    ValueError for an empty list or an invalid regex."""
    if isinstance(target_modules, str):
        if allow_all_linear and target_modules == ALL_LINEAR:
            return target_modules
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regex: {exc}") from None
        return target_modules
    if not isinstance(target_modules, (list, tuple, set, frozenset)):
        raise TypeError(
            f"target_modules must be a regex str or a list of module names, "
            f"got {type(target_modules).__name__} {target_modules!r}"
        )
    names = list(target_modules)
    if not names:
        raise ValueError("target_modules is empty")
    bad = [t for t in names if not isinstance(t, str) or not t]
    if bad:
        raise TypeError(f"target_modules must be a regex str or a list of non-empty module names, got {bad!r}")
    return names


def matches(name: str, target_modules: TargetModules) -> bool:
    """Whether the qualified module name ``name`` is selected by ``target_modules`` (a regex str matched against
    the whole name, or names matched by suffix on a ``.`` boundary: ``"q_proj"`` matches ``"layers.0.attn.q_proj"``,
    not ``"layers.0.attn.xq_proj"``)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def output_layer(model: nn.Module) -> nn.Module | None:
    """The model's output layer as PEFT's ``"all-linear"`` leaves it out: ``get_output_embeddings()`` when the model
    has it, else None (a layer named ``lm_head`` is left out by name in :func:`select`)."""
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_out):
        return None
    try:
        return get_out()
    except Exception:  # models that declare it but do not implement it
        return None


def select(model: nn.Module, candidates: Mapping[str, nn.Module], target_modules: TargetModules) -> list[str]:
    """The names among ``candidates`` (qualified name → module of ``model``) that ``target_modules`` selects, in
    their order. ``"all-linear"`` selects every candidate except the output layer (:func:`output_layer`, or a module
    named ``lm_head``)."""
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        out = output_layer(model)
        return [n for n, m in candidates.items() if m is not out and n.split(".")[-1] != "lm_head"]
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    return [n for n in candidates if matches(n, target_modules)]


def named_linears(
    model: nn.Module, kind: type[nn.Module] = nn.Linear, *, exclude: tuple[type, ...] = (), duplicates: bool = True
) -> dict[str, nn.Module]:
    """Qualified name → module for every submodule of type ``kind`` (not ``exclude``) other than the model itself.
    With ``duplicates`` a module reachable under several names (shared, tied) is listed under each of them, so that
    a swap replaces it everywhere."""
    return {
        n: m
        for n, m in model.named_modules(remove_duplicate=not duplicates)
        if n and isinstance(m, kind) and not isinstance(m, exclude)
    }


def no_match_error(target_modules, candidates: Sequence[str], what: str = "nn.Linear", extra: str = "") -> ValueError:
    """The ValueError for a ``target_modules`` that selected nothing, listing (up to 50) candidates."""
    names = list(dict.fromkeys(candidates))
    shown = ", ".join(names[:50]) + (" ..." if len(names) > 50 else "")
    return ValueError(f"target_modules={target_modules!r} matched no {what}; candidates: {shown or '(none)'}{extra}")


def linear_refusal(linear: nn.Linear) -> str | None:
    """Why a LoRA layer built from ``linear`` would not compute what ``linear`` computes, or would drop part of its
    state, as a phrase ("a parametrized Linear (...): ..."); None when it can be wrapped. A subclass with its own
    ``forward`` (or a forward set on the instance) runs code the LoRA layer does not; a parametrized or weight-normed
    Linear computes its weight from other parameters, which would be frozen into a plain tensor and vanish from the
    state dict."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(linear):
        return (
            f"a parametrized Linear (parametrizations on {', '.join(linear.parametrizations.keys())}, e.g. "
            f"weight_norm or spectral_norm): wrapping it would freeze the computed weight into a plain tensor and "
            f"drop the parametrization's parameters from the state dict; remove the parametrization first "
            f"(torch.nn.utils.parametrize.remove_parametrizations) or leave the layer out"
        )
    if not isinstance(linear._parameters.get("weight"), nn.Parameter):
        return (
            "a Linear whose weight is not a parameter of the layer (old-style torch.nn.utils.weight_norm/"
            "spectral_norm recompute it from other parameters in a forward pre-hook): wrapping it would drop "
            "those; remove the reparametrization first (e.g. torch.nn.utils.remove_weight_norm) or leave the "
            "layer out"
        )
    if type(linear).forward is not nn.Linear.forward or "forward" in vars(linear):
        where = "on the instance" if "forward" in vars(linear) else f"in {type(linear).__qualname__}"
        return (
            f"an nn.Linear with its own forward ({where}): a LoRA layer computes nn.Linear's function and would "
            f"silently drop that behaviour; leave the layer out of target_modules or wrap its inner Linear"
        )
    return None


def check_replaceable(name: str, linear: nn.Linear) -> None:
    """ValueError naming ``name`` when :func:`linear_refusal` refuses ``linear``."""
    why = linear_refusal(linear)
    if why:
        raise ValueError(f"{name} is {why}")


def tied_names(model: nn.Module, linears: Sequence[nn.Module]) -> dict[int, tuple[str, ...]]:
    """id(linear) → qualified names of the parameters of *other* modules that are ``linear.weight`` itself (an
    lm_head tied to the input embedding); linears without such a tie are left out."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((f"{mname}.{pname}" if mname else pname, mod))
    out = {}
    for lin in linears:
        names = tuple(sorted({n for n, mod in owners.get(id(lin.weight), []) if mod is not lin}))
        if names:
            out[id(lin)] = names
    return out


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the submodule ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name`` (``""`` cannot be replaced: it is the model itself)."""
    if not name:
        raise ValueError("the model itself cannot be replaced in place")
    parent, child = parent_of(model, name)
    setattr(parent, child, new)
