"""Adapter files in Hugging Face PEFT's LoRA format: ``adapter_model.safetensors`` + ``adapter_config.json``.

Tensor keys are PEFT's for a model wrapped without a task type: ``base_model.model.<module>.lora_A.weight`` ``[r, in]``
and ``base_model.model.<module>.lora_B.weight`` ``[out, r]``. The config carries the fields PEFT's ``LoraConfig``
reads (``peft_type="LORA"``, ``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``, ``lora_dropout``, per-module
``rank_pattern``/``alpha_pattern`` when layers differ, ...).

Inits that change W0 (PiSSA, LoRA-GA) leave the model with a *mutated* base ``W0' = W0 − s·B0·A0``. Such an adapter
only means something on top of W0'. By default :func:`save_adapter` therefore writes PEFT's converted form, valid on
top of the ORIGINAL W0 (what PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes):
``B' = [B, −B0]``, ``A' = [A; A0]``, rank ``2r`` and ``α' = 2α`` (``α·√2`` with rsLoRA) so that the scaling is
unchanged and ``W0 + s·B'·A' = W0' + s·B·A``. ``convert_to_original=False`` writes the rank-r adapter as it is
(only valid on the mutated base, which you then have to save yourself). The safetensors metadata records which
(``lora_kernels.base``: ``"original"`` or ``"mutated"``).

:func:`load_adapter` checks everything first (keys missing or unexpected, listed exactly; shapes; ranks against the
config) and only then copies, so a failed load changes nothing; a truncated or corrupt file raises ``ValueError``.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .init.pissa import INIT_RECORD

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
_SUFFIX_A = ".lora_A.weight"
_SUFFIX_B = ".lora_B.weight"


# ------------------------------------------------------------------------------------------------------- saving
def _adapter_tensors(layer, convert: bool) -> Tuple[torch.Tensor, torch.Tensor, int, float]:
    """(A, B, r, alpha) to write for one layer; the rank-2r form when ``convert`` and the layer's W0 was mutated."""
    A = layer.lora_A.detach()
    B = layer.lora_B.detach()
    r, alpha = int(layer.r), float(layer.alpha)
    record = getattr(layer, INIT_RECORD, None)
    if convert and record is not None:
        A0, B0 = record
        dt = A.dtype
        A = torch.cat([A.float().cpu(), A0], dim=0).to(dt)
        B = torch.cat([B.float().cpu(), -B0], dim=1).to(dt)
        alpha = alpha * (math.sqrt(2.0) if layer.use_rslora else 2.0)
        r = 2 * r
    return A.contiguous().cpu(), B.contiguous().cpu(), r, alpha


def _short_targets(model: nn.Module, names: List[str]) -> List[str]:
    """PEFT ``target_modules``: the short names (last components) when they select exactly ``names`` among the
    model's linear layers, else the full qualified names (PEFT matches an entry equal to the name or a suffix)."""
    from .modules import LoRALinear

    shorts = sorted({n.rsplit(".", 1)[-1] for n in names})
    linear_names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
    selected = [n for n in linear_names if any(n == s or n.endswith("." + s) for s in shorts)]
    return shorts if sorted(selected) == sorted(names) else sorted(names)


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The user's model inside a ``peft.PeftModel`` (kept at ``.base_model.model``): PEFT's keys already start with
    ``base_model.model.``, so writing from the wrapper would double that prefix."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    if inner is not None and type(model).__name__.startswith("PeftModel"):
        return inner
    return model


def save_adapter(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    convert_to_original: bool = True,
    base_model_name_or_path: Optional[str] = None,
) -> Dict[str, object]:
    """Write every :class:`~lora_kernels.LoRALinear` adapter of ``model`` to the directory ``path`` (created) in
    PEFT's format; returns the config written. See the module docstring for ``convert_to_original``."""
    from safetensors.torch import save_file

    from .modules import lora_layers
    from . import distributed  # a sharded model: every rank calls, rank 0 writes
    if distributed.is_sharded(model):
        return distributed.save_adapter(model, path, convert_to_original=convert_to_original,
                                        base_model_name_or_path=base_model_name_or_path)

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_adapter: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"save_adapter: path must be a str or os.PathLike (a directory), got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"save_adapter: {path} exists and is not a directory (an adapter is a directory)")
    model = _unwrap_peft(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRALinear layer (use inject_lora or lora_ga_init first)")
    tensors: Dict[str, torch.Tensor] = OrderedDict()
    per_layer = {}
    mutated = False
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"save_adapter: {name} is merged; unmerge() it first (its W0 holds the adapter)")
        A, B, r, alpha = _adapter_tensors(layer, convert_to_original)
        if getattr(layer, INIT_RECORD, None) is not None and not convert_to_original:
            mutated = True
        tensors[PREFIX + name + _SUFFIX_A] = A
        tensors[PREFIX + name + _SUFFIX_B] = B
        per_layer[name] = (r, alpha, bool(layer.use_rslora), float(layer.dropout))
    rslora = {v[2] for v in per_layer.values()}
    if len(rslora) > 1:
        raise ValueError("save_adapter: PEFT's config has one use_rslora for all layers; these layers mix both")
    drops = {v[3] for v in per_layer.values()}
    if len(drops) > 1:
        raise ValueError(f"save_adapter: PEFT's config has one lora_dropout; these layers use {sorted(drops)}")
    # The most common (r, alpha) is the global one; the others go into rank_pattern / alpha_pattern by full name.
    ranks = [v[0] for v in per_layer.values()]
    r_glob = max(set(ranks), key=ranks.count)
    alphas = [v[1] for v in per_layer.values() if v[0] == r_glob]
    a_glob = max(set(alphas), key=alphas.count)
    rank_pattern = {n: v[0] for n, v in per_layer.items() if v[0] != r_glob}
    alpha_pattern = {n: v[1] for n, v in per_layer.items() if v[1] != a_glob}
    config = OrderedDict(
        alpha_pattern=alpha_pattern,
        auto_mapping=None,
        base_model_name_or_path=base_model_name_or_path,
        bias="none",
        fan_in_fan_out=False,
        inference_mode=True,
        init_lora_weights=True,  # the file holds the trained weights; loading must not re-run an init
        layers_pattern=None,
        layers_to_transform=None,
        lora_alpha=int(a_glob) if float(a_glob).is_integer() else a_glob,
        lora_dropout=drops.pop(),
        modules_to_save=None,
        peft_type="LORA",
        r=r_glob,
        rank_pattern=rank_pattern,
        revision=None,
        target_modules=_short_targets(model, list(layers)),
        task_type=None,
        use_dora=False,
        use_rslora=rslora.pop(),
    )
    os.makedirs(path, exist_ok=True)
    metadata = {"format": "pt", "lora_kernels.base": "mutated" if mutated else "original"}
    # Write to temporary names, then rename: a crash never leaves a half-written adapter under the final names.
    wpath, cpath = os.path.join(path, WEIGHTS_NAME), os.path.join(path, CONFIG_NAME)
    save_file(dict(tensors), wpath + ".tmp", metadata=metadata)
    with open(cpath + ".tmp", "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    os.replace(wpath + ".tmp", wpath)
    os.replace(cpath + ".tmp", cpath)
    return dict(config)


# ------------------------------------------------------------------------------------------------------ loading
def _read_config(path) -> dict:
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"load_adapter: {path} is a file; pass the adapter's directory (holding "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    cpath = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cpath):
        raise FileNotFoundError(f"load_adapter: {cpath} does not exist")
    try:
        with open(cpath) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"load_adapter: {cpath} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"load_adapter: {cpath} must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load_adapter: peft_type={cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise ValueError(f"load_adapter: {cpath} needs a positive number {key!r}, got {cfg.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ValueError(f"load_adapter: {cpath}: {key} must be an object, got {cfg[key]!r}")
    # Ranks are ints (r = 2.5 used to be truncated to 2 without a word); alphas finite positive numbers.
    ranks = {"r": cfg["r"], **{f"rank_pattern[{k!r}]": v for k, v in (cfg.get("rank_pattern") or {}).items()}}
    for key, v in ranks.items():
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())) or v <= 0:
            raise ValueError(f"load_adapter: {cpath}: {key} must be a positive int, got {v!r}")
    for k, v in (cfg.get("alpha_pattern") or {}).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"load_adapter: {cpath}: alpha_pattern[{k!r}] must be a positive number, got {v!r}")
    tm = cfg.get("target_modules")
    if tm is not None and not isinstance(tm, str) and not (
        isinstance(tm, list) and all(isinstance(t, str) and t for t in tm)
    ):
        raise ValueError(f"load_adapter: {cpath}: target_modules must be a regex string or a list of module names, "
                         f"got {tm!r}")
    unsupported = {
        "use_dora": lambda v: bool(v),
        "fan_in_fan_out": lambda v: bool(v),
        "lora_bias": lambda v: bool(v),
        "bias": lambda v: v not in (None, "none"),
        "layers_to_transform": lambda v: v is not None,
        "modules_to_save": lambda v: bool(v),
        "exclude_modules": lambda v: bool(v),
        "use_qalora": lambda v: bool(v),
    }
    bad = [f"{k}={cfg[k]!r}" for k, test in unsupported.items() if k in cfg and test(cfg[k])]
    if bad:
        raise ValueError(f"load_adapter: unsupported adapter_config.json settings: {', '.join(bad)}")
    return cfg


def _read_tensors(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    wpath = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(wpath):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise ValueError(f"load_adapter: {path} holds adapter_model.bin (pickle); only safetensors is supported")
        raise FileNotFoundError(f"load_adapter: {wpath} does not exist")
    try:
        tensors = load_file(wpath, device="cpu")
        with safe_open(wpath, framework="pt") as f:
            metadata = f.metadata() or {}
        return tensors, metadata
    except Exception as exc:  # safetensors raises SafetensorError (and others) on truncated or corrupt files
        raise ValueError(f"load_adapter: {wpath} is truncated or corrupt ({type(exc).__name__}: {exc})") from None


def _pattern_value(name: str, pattern: dict, default):
    # PEFT: a pattern key matches a module whose name is the key or ends with "." + key (keys may be regexes).
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_adapter(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    backend: Optional[str] = None,
    lora_dtype: Optional[torch.dtype] = None,
) -> Dict[str, nn.Module]:
    """Load a PEFT-format LoRA adapter from the directory ``path`` into ``model``; returns ``{name: LoRALinear}``.

    If the model already has LoRALinear layers, the file must hold exactly those layers, with matching shapes (the
    layers take the file's alpha / use_rslora / dropout). Otherwise the ``nn.Linear`` layers named by the config's
    ``target_modules`` are replaced by LoRALinear layers of the file's ranks (``backend``, ``lora_dtype`` passed on).
    Every check runs before anything is changed; errors name the missing/unexpected keys and the mismatched shapes.
    """
    from .modules import LoRALinear, lora_layers, lora_scaling
    from .modules import _matches
    from . import distributed  # a sharded model: every rank checks, then copies its own blocks
    if distributed.is_sharded(model):
        return distributed.load_adapter(model, path, backend=backend, lora_dtype=lora_dtype)

    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapter: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_adapter: path must be a str or os.PathLike (a directory), got {type(path).__name__}")
    model = _unwrap_peft(model)
    path = os.fspath(path)
    cfg = _read_config(path)
    state, metadata = _read_tensors(path)
    r_glob, a_glob = int(cfg["r"]), float(cfg["lora_alpha"])
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    use_rslora = bool(cfg.get("use_rslora", False))
    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)

    existing = lora_layers(model)
    if existing:
        targets = OrderedDict((n, (m.out_features, m.in_features)) for n, m in existing.items())
    else:
        tm = cfg.get("target_modules")
        if not tm:
            raise ValueError("load_adapter: the config has no target_modules and the model has no LoRALinear layer")
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if tm == "all-linear":
            from .init.lora_ga import resolve_targets

            chosen = set(resolve_targets(model, "all-linear"))
            targets = OrderedDict((n, (m.out_features, m.in_features)) for n, m in linears if n in chosen)
        else:
            targets = OrderedDict((n, (m.out_features, m.in_features)) for n, m in linears if _matches(n, tm))
        if not targets:
            raise ValueError(f"load_adapter: target_modules={tm!r} matched no nn.Linear of the model")

    # ---- every check before any change
    expected = set()
    for n in targets:
        expected.add(PREFIX + n + _SUFFIX_A)
        expected.add(PREFIX + n + _SUFFIX_B)
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"load_adapter: {path} does not match the model's adapted layers.\n"
            f"  missing keys ({len(missing)}): {missing}\n  unexpected keys ({len(unexpected)}): {unexpected}"
        )
    problems = []
    plan = OrderedDict()
    for n, (out_f, in_f) in targets.items():
        A, B = state[PREFIX + n + _SUFFIX_A], state[PREFIX + n + _SUFFIX_B]
        r = int(_pattern_value(n, rank_pattern, r_glob))
        alpha = float(_pattern_value(n, alpha_pattern, a_glob))
        if not (A.is_floating_point() and B.is_floating_point()):
            problems.append(f"{n}: lora_A/lora_B must be floating point, got {A.dtype}/{B.dtype}")
            continue
        if tuple(A.shape) != (r, in_f) or tuple(B.shape) != (out_f, r):
            problems.append(f"{n}: expected lora_A {(r, in_f)} and lora_B {(out_f, r)} (r={r} from the config), "
                            f"file has {tuple(A.shape)} and {tuple(B.shape)}")
            continue
        if existing and existing[n].r != r:
            hint = ""
            if r == 2 * existing[n].r and getattr(existing[n], INIT_RECORD, None) is not None:
                hint = (" (this looks like PiSSA/LoRA-GA's rank-2r form, which applies to the original W0: load it "
                        "into a model without adapters built from the original weights)")
            problems.append(f"{n}: the model's layer has r={existing[n].r}, the file r={r}{hint}")
            continue
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            problems.append(f"{n}: the file's tensors contain inf or NaN")
            continue
        if existing and existing[n].merged:
            problems.append(f"{n}: the model's layer is merged; unmerge() it first")
            continue
        plan[n] = (A, B, r, alpha)
    if problems:
        raise ValueError("load_adapter: nothing was loaded:\n  " + "\n  ".join(problems))

    if metadata.get("lora_kernels.base") == "mutated":
        fresh_base = [n for n in plan if not (existing and getattr(existing[n], INIT_RECORD, None) is not None)]
        if fresh_base:
            warnings.warn(
                f"load_adapter: {path} was saved with convert_to_original=False after an init that changed W0 "
                f"(PiSSA / LoRA-GA); it is only correct on top of that changed (residual) W0, which layers such as "
                f"{fresh_base[0]} do not appear to have. Save with convert_to_original=True for the original base.",
                stacklevel=2,
            )

    # ---- apply
    out = OrderedDict()
    with torch.no_grad():
        for n, (A, B, r, alpha) in plan.items():
            if existing:
                layer = existing[n]
                layer.alpha, layer.use_rslora, layer.dropout = alpha, use_rslora, dropout
                layer.scaling = lora_scaling(r, alpha, use_rslora)
            else:
                parent_name, _, child = n.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                lin = getattr(parent, child)
                layer = LoRALinear.from_linear(lin, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                               init="zeros", lora_dtype=lora_dtype, backend=backend)
                layer.train(lin.training)
                setattr(parent, child, layer)
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            out[n] = layer
    return out
