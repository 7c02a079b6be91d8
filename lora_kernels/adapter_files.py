"""Adapter files in PEFT's LoRA format (``adapter_model.safetensors`` + ``adapter_config.json``): ``save_adapter``,
``load_adapter`` and the checked readers ``read_config``, ``check_config``, ``read_tensors``.

Keys ``base_model.model.<module>.lora_A.weight [r, in]`` / ``lora_B.weight [out, r]``. After an init that changed W0
the default save is PEFT's rank-2r form on the original W0: ``B' = [B, −B0]``, ``A' = [A; A0]``, ``α' = 2α``.
A load checks everything before it copies anything. See docs/peft.md ("Adapter files").
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn

from . import _backend, distributed
from ._numerics import lora_scaling
from .init.pissa import INIT_RECORD
from .modules import LoRALinear, lora_layers
from .targets import check_replaceable, check_target_modules, named_linears, no_match_error, replace_module, select

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
_SUFFIX_A = ".lora_A.weight"
_SUFFIX_B = ".lora_B.weight"


# ------------------------------------------------------------------------------------------------------- saving
def _adapter_tensors(layer, convert: bool) -> tuple[torch.Tensor, torch.Tensor, int, float]:
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


def adapter_key(module: str, part: str) -> str:
    """The file's key of ``module``'s ``lora_A`` (``part="A"``) or ``lora_B`` (``part="B"``) weight."""
    if part not in ("A", "B"):
        raise ValueError(f"adapter_key: part must be 'A' or 'B', got {part!r}")
    return PREFIX + module + (_SUFFIX_A if part == "A" else _SUFFIX_B)


def tensors_by_module(state) -> tuple[OrderedDict[str, dict[str, torch.Tensor]], list[str]]:
    """The tensors of an adapter file (as :func:`read_tensors` returns them) by module: ``(modules, others)`` with
    ``modules`` = module name (the base model's, PEFT's prefix removed) → ``{"A": lora_A, "B": lora_B}`` in file
    order (a part the file lacks is absent), and ``others`` = the keys that are no lora_A / lora_B weight under
    PEFT's prefix (e.g. a trained bias or ``modules_to_save``), in file order."""
    modules: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
    others = []
    for key, t in state.items():
        for part, suffix in (("A", _SUFFIX_A), ("B", _SUFFIX_B)):
            # ">=": the root module's name is "" (key "base_model.model..lora_A.weight"); a shorter key would make
            # the prefix's "." and the suffix's overlap.
            if key.startswith(PREFIX) and key.endswith(suffix) and len(key) >= len(PREFIX) + len(suffix):
                modules.setdefault(key[len(PREFIX) : -len(suffix)], {})[part] = t
                break
        else:
            others.append(key)
    return modules, others


def pattern_matches(key: str, name: str) -> bool:
    """PEFT's rule for a ``rank_pattern`` / ``alpha_pattern`` key (``peft.utils.other.get_pattern_key``): the key is
    a regex matching the whole name or a suffix of it after a ".", so ``attn.q`` also matches ``block.attn.q``."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def exact_pattern_key(name: str, names) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key that selects the module ``name`` and no other of ``names`` under
    PEFT's rule: the name itself when that is unambiguous (the usual case), else the anchored regex ``^<name>``
    (after PEFT's optional prefix group, ``^`` only matches at the start of the name)."""
    try:
        if pattern_matches(name, name) and not any(pattern_matches(name, n) for n in names if n != name):
            return name
    except re.error:  # a module name that is no valid regex (ModuleDict keys may hold any character)
        pass
    return "^" + re.escape(name)


def _short_targets(model: nn.Module, names: list[str]):
    """PEFT ``target_modules`` selecting exactly ``names`` among the model's modules (PEFT adapts any module type it
    supports, an Embedding or a Conv as well as a Linear): the short names (last components) when they do, else the
    full qualified names when they do (PEFT matches a list entry equal to the name or a suffix of it, so ``attn.q``
    also selects ``block.attn.q``), else one regex PEFT matches against the whole name."""
    module_names = [n for n, _ in model.named_modules() if n]
    for candidate in (sorted({n.rsplit(".", 1)[-1] for n in names}), sorted(names)):
        selected = [n for n in module_names if any(n == s or n.endswith("." + s) for s in candidate)]
        if sorted(selected) == sorted(names):
            return candidate
    return "|".join(re.escape(n) for n in sorted(names))  # str target_modules: PEFT uses re.fullmatch


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The user's model inside a ``peft.PeftModel`` (kept at ``.base_model.model``): PEFT's keys already start with
    ``base_model.model.``, so writing from the wrapper would double that prefix."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    if inner is not None and type(model).__name__.startswith("PeftModel"):
        return inner
    return model


def _peft_lora_layers(model: nn.Module) -> list[str]:
    """Names of PEFT's own LoRA layers in ``model`` (none when PEFT was never imported: then there cannot be any)."""
    if "peft" not in sys.modules:
        return []
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - a broken peft install
        return []
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    convert_to_original: bool = True,
    base_model_name_or_path: str | os.PathLike | None = None,
) -> dict[str, object]:
    """Write every :class:`~lora_kernels.LoRALinear` adapter of ``model`` to the directory ``path`` (created) in
    PEFT's format; returns the config written. See the module docstring for ``convert_to_original``.

    The steps: :func:`_check_save_args`, :func:`_layers_to_save`, :func:`_saved_tensors`, :func:`_saved_config`,
    then :func:`_write_files` (both files under temporary names, then renamed, the config last; see there for what a
    crash in the middle leaves)."""
    if distributed.is_sharded(model):  # every rank calls: the adapters are gathered whole, rank 0 writes

        def check():
            _check_save_args(model, path, convert_to_original, base_model_name_or_path)
            return _layers_to_save(_unwrap_peft(model))

        return distributed.collective_save(
            model,
            check,
            lambda: save_adapter(
                model, path, convert_to_original=convert_to_original, base_model_name_or_path=base_model_name_or_path
            ),
            same={"save_adapter: convert_to_original": convert_to_original},
        )

    path, base_model_name_or_path = _check_save_args(model, path, convert_to_original, base_model_name_or_path)
    model = _unwrap_peft(model)
    layers = _layers_to_save(model)
    tensors, per_layer, mutated = _saved_tensors(layers, convert_to_original)
    config = _saved_config(model, per_layer, base_model_name_or_path)
    text = json.dumps(config, indent=2) + "\n"  # before anything is written: a value JSON refuses fails here
    metadata = {"format": "pt", "lora_kernels.base": "mutated" if mutated else "original"}
    _write_adapter(path, tensors, metadata, text)
    return dict(config)


def _check_save_args(model, path, convert_to_original, base_model_name_or_path) -> tuple[str, str | None]:
    """The arguments of :func:`save_adapter` checked (TypeError / NotADirectoryError); returns ``path`` and
    ``base_model_name_or_path`` as the str the files hold."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_adapter: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(convert_to_original, bool):  # "no" would be truthy
        raise TypeError(
            f"save_adapter: convert_to_original must be True or False, got "
            f"{type(convert_to_original).__name__} {convert_to_original!r}"
        )
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"save_adapter: path must be a str or os.PathLike (a directory), got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"save_adapter: {path} exists and is not a directory (an adapter is a directory)")
    if isinstance(base_model_name_or_path, os.PathLike):
        base_model_name_or_path = os.fspath(base_model_name_or_path)  # JSON holds the str (PEFT writes a str too)
    if isinstance(base_model_name_or_path, bytes) or not isinstance(base_model_name_or_path, (str, type(None))):
        raise TypeError(
            f"save_adapter: base_model_name_or_path must be a str, an os.PathLike or None, got "
            f"{type(base_model_name_or_path).__name__} {base_model_name_or_path!r}"
        )
    return path, base_model_name_or_path


def _layers_to_save(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRALinear layers of ``model`` (unwrapped) that the file will hold; ValueError when the file would miss
    adapters (PEFT layers left by ``from_peft``), when there is none, or when one is merged."""
    left = _peft_lora_layers(model)
    if left:  # from_peft leaves what it cannot convert: the file would silently lack those adapters
        raise ValueError(
            f"save_adapter: the model still holds PEFT LoRA layers this file would not contain "
            f"({', '.join(left[:5])}{' ...' if len(left) > 5 else ''}); use lora_kernels.to_peft(model) "
            f"and PEFT's save_pretrained for it"
        )
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRALinear layer (use inject_lora or lora_ga_init first)")
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"save_adapter: {name} is merged; unmerge() it first (its W0 holds the adapter)")
    return layers


def _saved_tensors(layers: dict[str, nn.Module], convert: bool):
    """``(tensors, per_layer, mutated)``: the file's tensors by key, name → ``(r, alpha, use_rslora, dropout)`` as
    written, and whether the file holds an adapter for a mutated W0 (``convert=False`` after PiSSA / LoRA-GA)."""
    tensors: dict[str, torch.Tensor] = OrderedDict()
    per_layer = OrderedDict()
    mutated = False
    for name, layer in layers.items():
        A, B, r, alpha = _adapter_tensors(layer, convert)
        if getattr(layer, INIT_RECORD, None) is not None and not convert:
            mutated = True
        tensors[adapter_key(name, "A")] = A
        tensors[adapter_key(name, "B")] = B
        per_layer[name] = (r, alpha, bool(layer.use_rslora), float(layer.dropout))
    return tensors, per_layer, mutated


def _saved_config(model: nn.Module, per_layer, base_model_name_or_path: str | None) -> OrderedDict[str, object]:
    """PEFT's ``adapter_config.json`` for layers with ``per_layer`` = name → ``(r, alpha, use_rslora, dropout)``:
    the most common (r, alpha) as ``r`` / ``lora_alpha``, the others in ``rank_pattern`` / ``alpha_pattern``.
    ValueError when the layers differ in what PEFT's config holds once (``use_rslora``, ``lora_dropout``)."""
    rslora = {v[2] for v in per_layer.values()}
    if len(rslora) > 1:
        raise ValueError("save_adapter: PEFT's config has one use_rslora for all layers; these layers mix both")
    drops = {v[3] for v in per_layer.values()}
    if len(drops) > 1:
        raise ValueError(f"save_adapter: PEFT's config has one lora_dropout; these layers use {sorted(drops)}")
    # The most common (r, alpha) is the global one; the others go into rank_pattern / alpha_pattern.
    ranks = [v[0] for v in per_layer.values()]
    r_glob = max(set(ranks), key=ranks.count)
    alphas = [v[1] for v in per_layer.values() if v[0] == r_glob]
    a_glob = max(set(alphas), key=alphas.count)
    # Keys select exactly one module each: a plain "attn.q" would also give its value to "block.attn.q" on loading.
    module_names = [n for n, _ in model.named_modules()]
    rank_pattern = {exact_pattern_key(n, module_names): v[0] for n, v in per_layer.items() if v[0] != r_glob}
    alpha_pattern = {exact_pattern_key(n, module_names): v[1] for n, v in per_layer.items() if v[1] != a_glob}
    return OrderedDict(
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
        target_modules=_short_targets(model, list(per_layer)),
        task_type=None,
        use_dora=False,
        use_rslora=rslora.pop(),
    )


def _write_adapter(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], text: str) -> None:
    """Write the two files of an adapter into the directory ``path``; the config goes last (see
    :func:`_write_files`)."""
    from safetensors.torch import save_file

    _write_files(
        path,
        [
            (WEIGHTS_NAME, lambda p: save_file(dict(tensors), p, metadata=metadata)),
            (CONFIG_NAME, lambda p: _write_text(p, text)),
        ],
    )


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _write_files(directory: str, writers) -> None:
    """Write each ``(name, write(path))`` of ``writers`` into ``directory`` (created), all or nothing.

    Every file is written to ``<name>.tmp`` first. Only then are the files already there under the final names
    moved aside to ``<name>.bak`` (the last one first) and the new ones renamed into place (the last one last), and
    the ``.bak`` files removed. An error at any step (in a write or in a rename) undoes the steps done: the
    directory is left as it was, the old files back under their names, the temporary files and the directories this
    call created removed.

    A crash (a killed process, a power cut) cannot run that undo. The order makes what it leaves detectable instead
    of silently wrong: from the first move to the last rename the last file of ``writers`` (the adapter's config) is
    absent under its name, so a reader finds no adapter rather than new weights paired with an old config; the old
    files are in the ``.bak`` files, the new ones in the ``.tmp`` files or already in place."""
    created = []
    head = os.path.abspath(directory)
    while not os.path.exists(head):
        created.append(head)
        head = os.path.dirname(head)
    finals = [os.path.join(directory, name) for name, _ in writers]
    tmps, moved, placed = [], [], []
    try:
        os.makedirs(directory, exist_ok=True)
        for (_, write), final in zip(writers, finals, strict=True):
            tmps.append(final + ".tmp")
            write(tmps[-1])
        for final in reversed(finals):  # the config first: from here until it is back, the directory holds no adapter
            if os.path.lexists(final):
                os.replace(final, final + ".bak")
                moved.append(final)
        for tmp, final in zip(tmps, finals, strict=True):  # the config last: once it is there, the adapter is whole
            os.replace(tmp, final)
            placed.append(final)
    except BaseException as exc:
        _undo_write(exc, tmps, placed, moved, created)
        raise
    for final in moved:
        with contextlib.suppress(OSError):  # the new files are in place; a stale .bak is only clutter
            os.remove(final + ".bak")


def _undo_write(exc: BaseException, tmps, placed, moved, created) -> None:
    """Undo what :func:`_write_files` did before ``exc``: remove the new files it renamed into place (``placed``)
    and its temporary files, move the old files back (``moved``), remove the directories it ``created``. A step
    that fails itself is noted on ``exc``, naming the file, so that nothing is lost without a word."""
    failed = []
    for final in placed:
        with contextlib.suppress(OSError):
            os.remove(final)
    for tmp in tmps:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    for final in reversed(moved):
        try:
            os.replace(final + ".bak", final)
        except OSError as undo_exc:
            failed.append(f"{final}.bak could not be moved back to {final} ({undo_exc})")
    for d in created:  # innermost first; only empty directories go (os.rmdir refuses the others)
        with contextlib.suppress(OSError):
            os.rmdir(d)
    if failed and hasattr(exc, "add_note"):
        exc.add_note("save_adapter: the previous files are kept: " + "; ".join(failed))


# ------------------------------------------------------------------------------------------------------ loading
# Adapter tensor dtypes the layers take (fp8 and integer tensors have no exact meaning for an fp16/bf16/fp32 layer).
ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Config fields lora_kernels cannot apply; each test says when a value asks for them.
_UNSUPPORTED = {
    "use_dora": lambda v: bool(v),
    "fan_in_fan_out": lambda v: bool(v),
    "lora_bias": lambda v: bool(v),
    "bias": lambda v: v not in (None, "none"),
    "layers_to_transform": lambda v: v is not None,
    "modules_to_save": lambda v: bool(v),
    "exclude_modules": lambda v: bool(v),
    "use_qalora": lambda v: bool(v),
}
# Flags that must be JSON booleans: bool("false") is True, so a string would silently mean the opposite.
_BOOL_FIELDS = ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "use_qalora")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_config(
    cfg: dict, source: str = CONFIG_NAME, *, caller: str = "load_adapter", allow: Sequence[str] = ()
) -> dict:
    """Check an ``adapter_config.json`` object (as read by ``json.load``) for what lora_kernels can load exactly;
    returns it unchanged, or raises ValueError naming ``source``, the key and what is accepted. ``allow``: fields of
    the unsupported list (e.g. ``"fan_in_fan_out"``) the caller handles itself. ``caller`` prefixes the messages."""
    where = f"{caller}: {source}"
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type={cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if not _is_number(v) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{where} needs a positive number {key!r} (finite), got {v!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ValueError(f"{where}: {key} must be an object, got {cfg[key]!r}")
        for k in cfg.get(key) or {}:
            try:
                re.compile(rf"(.*\.)?({k})$")  # PEFT's use of a key: a regex matched against module names
            except re.error as exc:
                raise ValueError(f"{where}: {key} key {k!r} is not a valid regex: {exc}") from None
    # Ranks are ints (r = 2.5 used to be truncated to 2 without a word); alphas finite positive numbers.
    ranks = {"r": cfg["r"], **{f"rank_pattern[{k!r}]": v for k, v in (cfg.get("rank_pattern") or {}).items()}}
    for key, v in ranks.items():
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())) or v <= 0:
            raise ValueError(f"{where}: {key} must be a positive int, got {v!r}")
    for k, v in (cfg.get("alpha_pattern") or {}).items():
        if not _is_number(v) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{where}: alpha_pattern[{k!r}] must be a positive number (finite), got {v!r}")
    drop = cfg.get("lora_dropout")
    if drop is not None and (not _is_number(drop) or not 0.0 <= drop < 1.0):  # NaN fails the range test too
        raise ValueError(f"{where}: lora_dropout must be a number in [0, 1) or null, got {drop!r}")
    for key in _BOOL_FIELDS:
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], bool):
            raise ValueError(
                f"{where}: {key} must be true or false (a JSON boolean), got {type(cfg[key]).__name__} {cfg[key]!r}"
            )
    tm = cfg.get("target_modules")
    if (
        tm is not None
        and not isinstance(tm, str)
        and not (isinstance(tm, list) and all(isinstance(t, str) and t for t in tm))
    ):
        raise ValueError(f"{where}: target_modules must be a regex string or a list of module names, got {tm!r}")
    if isinstance(tm, str):
        try:
            check_target_modules(tm, allow_all_linear=True)  # a valid regex, or "all-linear"
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    bad = [f"{k}={cfg[k]!r}" for k, test in _UNSUPPORTED.items() if k in cfg and k not in allow and test(cfg[k])]
    if bad:
        raise ValueError(f"{caller}: unsupported adapter_config.json settings: {', '.join(bad)}")
    return cfg


def read_raw_config(path: str | os.PathLike, *, caller: str = "load_adapter") -> dict:
    """The JSON object in the ``adapter_config.json`` of the adapter directory ``path``, not checked further (for a
    caller that looks at fields of its own first, then calls :func:`check_config`). NotADirectoryError when ``path``
    is a file, FileNotFoundError when the config is absent, ValueError when it is no JSON object."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(
            f"{caller}: {path} is a file; pass the adapter's directory (holding {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    cpath = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cpath):
        raise FileNotFoundError(f"{caller}: {cpath} does not exist")
    try:
        with open(cpath) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{caller}: {cpath} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{caller}: {cpath} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def read_config(path: str | os.PathLike, *, caller: str = "load_adapter", allow: Sequence[str] = ()) -> dict:
    """The ``adapter_config.json`` of the adapter directory ``path`` (:func:`read_raw_config`), checked by
    :func:`check_config`."""
    cfg = read_raw_config(path, caller=caller)
    return check_config(cfg, os.path.join(os.fspath(path), CONFIG_NAME), caller=caller, allow=allow)


def read_tensors(
    path: str | os.PathLike, *, caller: str = "load_adapter"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of the ``adapter_model.safetensors`` in the directory ``path``, on the CPU. A
    truncated or corrupt file raises ValueError; a tensor of a dtype other than :data:`ADAPTER_DTYPES` (fp8,
    integers) raises TypeError naming it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    wpath = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(wpath):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise ValueError(f"{caller}: {path} holds adapter_model.bin (pickle); only safetensors is supported")
        raise FileNotFoundError(f"{caller}: {wpath} does not exist")
    try:
        tensors = load_file(wpath, device="cpu")
        with safe_open(wpath, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises SafetensorError (and others) on truncated or corrupt files
        raise ValueError(f"{caller}: {wpath} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    bad = [f"{k} ({t.dtype})" for k, t in tensors.items() if t.dtype not in ADAPTER_DTYPES]
    if bad:
        raise TypeError(
            f"{caller}: {wpath}: adapter tensors must be one of "
            f"{', '.join(str(d) for d in ADAPTER_DTYPES)}; got {', '.join(bad[:5])}"
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        )
    return tensors, metadata


def pattern_value(name: str, pattern: dict | None, default):
    """The value ``rank_pattern`` / ``alpha_pattern`` (``pattern``) gives the module ``name``, PEFT's rule: the first
    key that matches the name (:func:`pattern_matches`), else ``default`` (the config's ``r`` / ``lora_alpha``)."""
    for key, value in (pattern or {}).items():
        if pattern_matches(key, name):
            return value
    return default


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    backend: str | None = None,
    lora_dtype: torch.dtype | None = None,
) -> dict[str, nn.Module]:
    """Load a PEFT-format LoRA adapter from the directory ``path`` into ``model``; returns ``{name: LoRALinear}``.

    If the model already has LoRALinear layers, the file must hold exactly those layers, with matching shapes (the
    layers take the file's alpha / use_rslora / dropout; they keep their backend and adapter dtype, and a
    ``lora_dtype`` other than theirs is refused). Otherwise the ``nn.Linear`` layers named by the config's
    ``target_modules`` are replaced by LoRALinear layers of the file's ranks (``backend``, ``lora_dtype`` passed on),
    each in the training mode of the layer it wraps.
    Every check runs before anything is changed; errors name the missing/unexpected keys and the mismatched shapes,
    and values that would not be finite in the adapter's dtype (e.g. 1e5 into float16) are refused.

    The steps: :func:`_check_load_args`, read (:func:`read_config`, :func:`read_tensors`), :func:`_load_targets`,
    :func:`_check_keys`, :func:`_load_plan` (every check), :func:`_build_layers`, :func:`_apply_plan`.
    """
    if distributed.is_sharded(model):  # every rank reads and checks, then copies its own blocks

        def check():
            _check_load_args(model, path, backend, lora_dtype)
            layers = lora_layers(_unwrap_peft(model))
            if not layers:
                raise ValueError(
                    "load_adapter: this sharded model has no LoRALinear layer; call inject_lora before "
                    "fully_shard / parallelize_module (a sharded nn.Linear cannot be wrapped afterwards)"
                )
            return layers

        return distributed.collective_load(
            model, check, lambda: load_adapter(model, path, backend=backend, lora_dtype=lora_dtype), from_current=False
        )

    path = _check_load_args(model, path, backend, lora_dtype)
    model = _unwrap_peft(model)
    cfg = read_config(path)
    state, metadata = read_tensors(path)
    base = (metadata or {}).get("lora_kernels.base")  # "original" / "mutated"; absent in PEFT's own files
    existing = lora_layers(model)
    modules = dict(model.named_modules())
    targets = _load_targets(model, cfg, existing, modules)
    _check_keys(path, targets, state)
    plan = _load_plan(targets, state, cfg, existing, modules, lora_dtype, base)
    if base == "mutated":
        _warn_mutated_base(path, plan, existing)
    built = {} if existing else _build_layers(plan, modules, cfg, lora_dtype, backend)
    return _apply_plan(plan, cfg, existing, built, model)


def _check_load_args(model, path, backend, lora_dtype) -> str:
    """The arguments of :func:`load_adapter` checked (TypeError / ValueError naming them); returns ``path`` as str."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapter: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_adapter: path must be a str or os.PathLike (a directory), got {type(path).__name__}")
    if backend is not None:
        _backend.requested_backend(backend)  # TypeError / ValueError naming backend and the accepted names
    if lora_dtype is not None and not isinstance(lora_dtype, torch.dtype):
        raise TypeError(
            f"load_adapter: lora_dtype must be a torch.dtype (the base weight's or torch.float32) or "
            f"None, got {type(lora_dtype).__name__} {lora_dtype!r}"
        )
    return os.fspath(path)


def _load_targets(model: nn.Module, cfg: dict, existing, modules) -> OrderedDict[str, tuple[int, int]]:
    """Name → ``(out_features, in_features)`` of the layers the file must hold: the model's LoRALinear layers when
    it has some (``existing``), else the ``nn.Linear`` layers the config's ``target_modules`` selects (ValueError
    when none, or when one cannot be wrapped: inject_lora's rules)."""
    if existing:
        return OrderedDict((n, (m.out_features, m.in_features)) for n, m in existing.items())
    tm = cfg.get("target_modules")
    if not tm:
        raise ValueError("load_adapter: the config has no target_modules and the model has no LoRALinear layer")
    # Not the model itself (a bare nn.Linear): it cannot be replaced in place (inject_lora's rule too).
    linears = named_linears(model, duplicates=False)
    chosen = select(model, linears, tm)
    if not chosen and tm == "all-linear":
        raise no_match_error(tm, list(linears))
    if not chosen:
        raise ValueError(f"load_adapter: target_modules={tm!r} matched no nn.Linear of the model")
    for n in chosen:
        parent_name, _, child = n.rpartition(".")
        if isinstance(modules[parent_name], nn.MultiheadAttention):  # the same refusal as inject_lora
            raise ValueError(
                f"load_adapter: {n}: nn.MultiheadAttention reads {child}.weight directly and would "
                f"ignore the adapter; lora_kernels cannot load an adapter for it"
            )
        check_replaceable(f"load_adapter: {n}", modules[n])  # inject_lora's rule
    return OrderedDict((n, (linears[n].out_features, linears[n].in_features)) for n in chosen)


def _check_keys(path: str, targets, state) -> None:
    """ValueError listing every key the file lacks for ``targets`` and every key it holds beyond them."""
    expected = {adapter_key(n, part) for n in targets for part in ("A", "B")}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"load_adapter: {path} does not match the model's adapted layers.\n"
            f"  missing keys ({len(missing)}): {missing}\n  unexpected keys ({len(unexpected)}): {unexpected}"
        )


def _load_plan(targets, state, cfg: dict, existing, modules, lora_dtype, base) -> OrderedDict[str, tuple]:
    """Name → ``(A, B, r, alpha)`` to load, after every per-layer check (:func:`_layer_problem`); ValueError listing
    all the problems, so that nothing is changed."""
    problems = []
    plan = OrderedDict()
    for n, shape in targets.items():
        A, B = state[adapter_key(n, "A")], state[adapter_key(n, "B")]
        r = int(pattern_value(n, cfg.get("rank_pattern") or {}, int(cfg["r"])))
        alpha = float(pattern_value(n, cfg.get("alpha_pattern") or {}, float(cfg["lora_alpha"])))
        problem = _layer_problem(n, shape, A, B, r, existing.get(n), modules[n], lora_dtype, base)
        if problem:
            problems.append(f"{n}: {problem}")
        else:
            plan[n] = (A, B, r, alpha)
    if problems:
        raise ValueError("load_adapter: nothing was loaded:\n  " + "\n  ".join(problems))
    return plan


def _layer_problem(n, shape, A, B, r, layer, linear, lora_dtype, base) -> str | None:
    """Why the file's ``A``, ``B`` (rank ``r`` by the config) cannot be loaded into the LoRALinear ``layer`` (None:
    a new layer wrapping ``linear``) of ``shape`` = (out, in); None when they can."""
    out_f, in_f = shape
    if tuple(A.shape) != (r, in_f) or tuple(B.shape) != (out_f, r):
        return (
            f"expected lora_A {(r, in_f)} and lora_B {(out_f, r)} (r={r} from the config), "
            f"file has {tuple(A.shape)} and {tuple(B.shape)}"
        )
    record = None if layer is None else getattr(layer, INIT_RECORD, None)
    if layer is not None and layer.r != r:
        hint = ""
        if r == 2 * layer.r and record is not None:
            hint = (
                " (this looks like PiSSA/LoRA-GA's rank-2r form, which applies to the original W0: load it "
                "into a model without adapters built from the original weights)"
            )
        return f"the model's layer has r={layer.r}, the file r={r}{hint}"
    if layer is not None:
        dt = layer.lora_A.dtype
        if lora_dtype is not None and lora_dtype != dt:
            return (
                f"lora_dtype={lora_dtype}, but the model's layer holds its adapter in {dt} "
                f"(existing layers keep their dtype)"
            )
    else:
        w_dt = linear.weight.dtype
        dt = w_dt if lora_dtype is None else lora_dtype
        if dt != w_dt and dt != torch.float32:  # LoRALinear's rule, checked for every layer before any is built
            return f"lora_dtype must be the base weight's dtype ({w_dt}) or torch.float32, got {lora_dtype}"
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        return "the file's tensors contain inf or NaN"
    # load_lora_state_dict's rule: values that are finite in the file but not in the adapter's dtype are refused.
    if not (torch.isfinite(A.to(dt)).all() and torch.isfinite(B.to(dt)).all()):
        return f"the file's values overflow the adapter's dtype {dt}"
    if layer is not None and layer.merged:
        return "the model's layer is merged; unmerge() it first"
    if record is not None and base != "mutated":
        # The layer's W0 was replaced by a PiSSA / LoRA-GA residual; the file's adapter applies to the original W0
        # (a PEFT file, or one saved with convert_to_original=True): loaded here it would compute another function.
        return (
            "the model's base weight was changed by a PiSSA / LoRA-GA init, but the file's adapter applies to "
            "the original weight; load it into a model built from the original weights"
        )
    return None


def _warn_mutated_base(path: str, plan, existing) -> None:
    """The file holds an adapter for a W0 mutated by PiSSA / LoRA-GA: warn when a layer does not look mutated."""
    fresh_base = [n for n in plan if not (existing and getattr(existing[n], INIT_RECORD, None) is not None)]
    if fresh_base:
        warnings.warn(
            f"load_adapter: {path} was saved with convert_to_original=False after an init that changed W0 "
            f"(PiSSA / LoRA-GA); it is only correct on top of that changed (residual) W0, which layers such as "
            f"{fresh_base[0]} do not appear to have. Save with convert_to_original=True for the original base.",
            stacklevel=3,
        )


def _build_layers(plan, modules, cfg: dict, lora_dtype, backend) -> OrderedDict[str, nn.Module]:
    """New LoRALinear layers (zero adapters) wrapping the planned ``nn.Linear`` layers, not yet in the model;
    ``from_linear`` freezes the wrapped weight, which is undone when a later layer fails."""
    built = OrderedDict()
    flags = {n: modules[n].weight.requires_grad for n in plan}
    try:
        for n, (_, _, r, alpha) in plan.items():
            lin = modules[n]
            layer = LoRALinear.from_linear(
                lin,
                r=r,
                alpha=alpha,
                dropout=float(cfg.get("lora_dropout") or 0.0),
                use_rslora=bool(cfg.get("use_rslora") or False),
                init="zeros",
                lora_dtype=lora_dtype,
                backend=backend,
            )
            layer.train(lin.training)  # an eval() model stays in eval: no dropout at inference
            built[n] = layer
    except BaseException:
        for n, flag in flags.items():
            modules[n].weight.requires_grad_(flag)
        raise
    return built


@torch.no_grad()
def _apply_plan(plan, cfg: dict, existing, built, model: nn.Module) -> OrderedDict[str, nn.Module]:
    """Copy the planned tensors into the existing layers (which take the file's alpha, rsLoRA flag and dropout) or
    into the ``built`` ones, which replace their ``nn.Linear``; returns name → layer."""
    use_rslora = bool(cfg.get("use_rslora") or False)
    dropout = float(cfg.get("lora_dropout") or 0.0)
    out = OrderedDict()
    for n, (A, B, r, alpha) in plan.items():
        if existing:
            layer = existing[n]
            layer.alpha, layer.use_rslora, layer.dropout = alpha, use_rslora, dropout
            layer.scaling = lora_scaling(r, alpha, use_rslora)
        else:
            layer = built[n]
            replace_module(model, n, layer)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        out[n] = layer
    return out
