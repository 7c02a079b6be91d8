"""``LoRALinear`` (an ``nn.Linear`` drop-in with one adapter: ``y = x·W0ᵀ + scale·(dropout(x)·Aᵀ)·Bᵀ + bias``),
``inject_lora``, ``lora_state_dict``, ``load_lora_state_dict``.

State only; the math is ``lora_kernels.lora_linear`` (docs/lora_linear.md). Parameters ``weight``/``bias`` (the base
layer's names), ``lora_A [r, in]``, ``lora_B [out, r]``. ``merge()`` keeps an exact W0 copy, so ``unmerge()`` is
lossless and ``state_dict()`` always holds the unmerged W0; layers whose weight is tied elsewhere refuse in-place
writes until ``untie_weight()``. Inits: docs/init.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _autocast, _backend, distributed
from ._numerics import acc_dtype, check_alpha, check_dropout, lora_scaling, merged_weight, real_number
from .init.pissa import INIT_RECORD, apply_pissa, pissa_factors, pissa_init, record_initial_adapter
from .ops.lora_linear import lora_linear
from .targets import (  # noqa: F401
    check_replaceable,
    check_target_modules,
    linear_refusal,
    matches,
    named_linears,
    no_match_error,
    parent_of,
    replace_module,
    tied_names,
)

__all__ = [
    "INITS",
    "LoRALinear",
    "LoraLoadResult",
    "check_replaceable",
    "inject_lora",
    "linear_refusal",
    "load_lora_state_dict",
    "lora_layers",
    "lora_scaling",
    "lora_state_dict",
]

INITS = ("default", "gaussian", "pissa", "zeros")
# State-dict keys (after the layer's prefix) of the initial adapter that PiSSA / LoRA-GA record: written only when the
# layer has one, so the state dict of any other layer is what it always was.
INITIAL_ADAPTER_KEYS = ("initial_adapter_A", "initial_adapter_B")
# Adapter dtypes the op accepts: the base dtype, or float32 (mixed-precision adapters, as LoRA-GA keeps them).
_LORA_EXTRA_DTYPES = (torch.float32,)


def _autocast_off(t: torch.Tensor):
    # merge and delta_weight are fp32/fp64 math: inside a torch.autocast block their matmul ran in bf16 (a merged
    # weight off by ~2e-3 in fp32) without this.
    return _autocast.autocast_off(t)


@torch.no_grad()
def _init_base(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    # nn.Linear's initialisation of the base layer, so a fresh LoRALinear behaves like a fresh nn.Linear.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1.0 / math.sqrt(weight.shape[1]) if weight.shape[1] > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


class LoRALinear(nn.Module):
    """``y = x·W0ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ + bias`` with W0 frozen; ``merge()`` folds s·BA into W0.

    Build one from an existing layer with :meth:`from_linear`, which shares (does not copy) the base weight and bias.
    ``alpha`` defaults to ``r`` (scaling 1). ``lora_dtype`` is the adapter's dtype: the base dtype (default) or
    float32. ``backend`` is passed to :func:`lora_kernels.lora_linear` (``None``: ``$LORA_KERNELS_BACKEND`` or auto).
    """

    _warned_merged_training = False  # set on the instance by the first training-mode forward while merged
    # Qualified names of other parameters that are this layer's base weight (an lm_head tied to the embedding), as
    # found by inject_lora. merge() and PiSSA write the weight in place and refuse while it is set; see untie_weight.
    tied_with: tuple[str, ...] = ()
    # The initial adapter (A0, B0), fp32 on the CPU, when an init (PiSSA, LoRA-GA) replaced W0 by the residual
    # W0 − s·B0·A0; None while W0 is the original weight. Named by init.pissa.INIT_RECORD; it follows the state dict
    # (INITIAL_ADAPTER_KEYS), deepcopy and pickling, never .to() (it stays exact and off the device).
    _lk_init_adapter: tuple[torch.Tensor, torch.Tensor] | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        bias: bool = True,
        init: str = "default",
        device=None,
        dtype=None,
        lora_dtype=None,
        backend: str | None = None,
    ):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        factory = {"device": device, "dtype": dtype}
        weight = torch.empty(out_features, in_features, **factory)
        bias_t = torch.empty(out_features, **factory) if bias else None
        if weight.device.type != "meta":
            _init_base(weight, bias_t)
        self._setup(
            nn.Parameter(weight, requires_grad=False),
            nn.Parameter(bias_t) if bias_t is not None else None,
            r,
            alpha,
            dropout,
            use_rslora,
            init,
            lora_dtype,
            backend,
        )
        self.reset_lora_parameters(init)

    def _setup(self, weight, bias, r, alpha, dropout, use_rslora, init, lora_dtype, backend) -> None:
        """Check every argument, then set the state. Nothing is modified before all checks have passed."""
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        alpha = check_alpha(r if alpha is None else alpha)
        dropout = check_dropout(dropout)
        if init not in INITS:
            raise ValueError(f"init={init!r} is not one of {', '.join(INITS)} (LoRA-GA: lora_kernels.lora_ga_init)")
        if backend is not None:
            _backend.requested_backend(backend)  # raises ValueError on an unknown name
        if weight.dim() != 2 or not weight.is_floating_point():
            raise TypeError(f"the base weight must be a 2-D floating tensor, got {weight.dtype} {tuple(weight.shape)}")
        lora_dtype = weight.dtype if lora_dtype is None else lora_dtype
        if not isinstance(lora_dtype, torch.dtype):
            raise TypeError(
                f"lora_dtype must be a torch.dtype (the base weight's, {weight.dtype}, or torch.float32), "
                f"got {type(lora_dtype).__name__} {lora_dtype!r}"
            )
        if lora_dtype != weight.dtype and lora_dtype not in _LORA_EXTRA_DTYPES:
            raise TypeError(
                f"lora_dtype must be the base weight's dtype ({weight.dtype}) or torch.float32, got {lora_dtype}"
            )

        out_features, in_features = weight.shape
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, alpha, self.use_rslora)
        self.dropout = dropout
        self.backend = backend
        self.init = init  # what reset_parameters() re-applies
        weight.requires_grad_(False)
        self.weight = weight
        self.bias = bias
        lora_factory = {"device": weight.device, "dtype": lora_dtype}
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, **lora_factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **lora_factory))
        # Exact copy of W0 while merged (None otherwise). A buffer so that .to()/.cuda() move it with the weight;
        # non-persistent because the state dict carries W0 under "weight" already (see _save_to_state_dict).
        self.register_buffer("_unmerged_weight", None, persistent=False)

    # ------------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        lora_dtype=None,
        backend: str | None = None,
    ) -> LoRALinear:
        """Wrap ``linear``: its weight (frozen here) and bias are shared, not copied; the adapter is created on the
        weight's device. With B = 0 (the default inits) the output is the ``nn.Linear``'s up to the backend's
        rounding (the reference accumulates in fp32 and rounds once). The bias keeps its ``requires_grad``
        (``inject_lora`` freezes it with the rest of the base model)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        check_replaceable("linear", linear)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        flag = linear.weight.requires_grad
        layer._setup(linear.weight, linear.bias, r, alpha, dropout, use_rslora, init, lora_dtype, backend)
        layer.train(linear.training)
        try:
            layer.reset_lora_parameters(init)  # PiSSA may refuse (r > min(out, in)) after _setup froze the weight
        except BaseException:
            linear.weight.requires_grad_(flag)
            raise
        return layer

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the layer as the constructor does: the base weight and bias as ``nn.Linear`` does, then the
        adapter with the layer's ``init``. This is what meta-device construction needs
        (``layer.to_empty(device=...)`` then ``layer.reset_parameters()``, as FSDP does for every module). Like
        ``nn.Linear.reset_parameters`` it overwrites the base weight in place: refused for a merged layer and for a
        weight tied to another parameter."""
        if self.merged:
            raise RuntimeError("unmerge() before reset_parameters()")
        self.check_untied("reset_parameters()")
        if self.weight.device.type == "meta":
            return
        _init_base(self.weight, self.bias)
        setattr(self, INIT_RECORD, None)  # the residual it described is gone
        self.reset_lora_parameters(self.init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        """``"default"``: PEFT's (A kaiming-uniform a=√5, B = 0); ``"gaussian"``: A ~ N(0, std=1/r) as PEFT's
        ``init_lora_weights="gaussian"``, B = 0; ``"pissa"``: principal singular directions of W0 (W0 adjusted so
        the output is unchanged); ``"zeros"``: A = B = 0."""
        if init not in INITS:
            raise ValueError(f"init={init!r} is not one of {', '.join(INITS)} (LoRA-GA: lora_kernels.lora_ga_init)")
        if self.lora_A.device.type == "meta":
            return
        if self.merged:
            raise RuntimeError("unmerge() before re-initialising the adapter of a merged layer")
        if init == "default":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B)
        elif init == "zeros":
            nn.init.zeros_(self.lora_A)
            nn.init.zeros_(self.lora_B)
        elif init == "pissa":
            pissa_init(self)

    # ------------------------------------------------------------------------------------------------------ merging
    @property
    def initial_adapter(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A0, B0)`` (fp32, CPU) when an init (PiSSA, LoRA-GA) replaced the base weight by the residual
        ``W0 − s·B0·A0``, else None. :func:`lora_kernels.save_adapter` uses it to write the adapter against the
        original W0. Kept in ``state_dict()`` (keys ``INITIAL_ADAPTER_KEYS``), deepcopy and pickling."""
        return getattr(self, INIT_RECORD, None)

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    def delta_weight(self) -> torch.Tensor:
        """s·B·A, shape ``[out, in]``, in float32 (float64 for a float64 base); no autograd."""
        acc = acc_dtype(self.weight.dtype)
        with _autocast_off(self.weight):
            return self.scaling * (self.lora_B.detach().to(acc) @ self.lora_A.detach().to(acc))

    def _merged_weight(self, w0: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        """``W0 + s·B·A`` rounded once to W0's dtype; raises ValueError (nothing changed) when not finite."""
        return merged_weight(w0, lora_A, lora_B, self.scaling)

    def check_untied(self, action: str) -> None:
        """ValueError naming the tie when the base weight is shared with other parameters (``tied_with``):
        ``action`` would write into the shared tensor and change those too."""
        if self.tied_with:
            raise ValueError(
                f"{action} refused: this layer's base weight is tied to {', '.join(self.tied_with)} (one tensor), "
                f"and {action} writes into it, which would change those too. Call untie_weight() first to give the "
                f"layer its own copy, or leave this layer out; nothing was changed"
            )

    @torch.no_grad()
    def untie_weight(self) -> None:
        """Give this layer its own copy of the base weight (same dtype, device and ``requires_grad``), so that
        :meth:`merge` and PiSSA change only this layer; the other owners in ``tied_with`` keep the old tensor."""
        if self.merged:
            raise RuntimeError("unmerge() before untie_weight()")
        w = self.weight
        self.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        self.tied_with = ()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·BA into the base weight, in place; forward becomes a plain ``F.linear``. Refuses with ValueError
        (nothing changed) when the merged weight would not be finite, or when the weight is tied to another
        parameter (``tied_with``). An exact copy of W0 is kept until :meth:`unmerge`, which restores it bit for
        bit."""
        self.check_untied("merge()")
        if distributed.is_sharded_layer(self):  # FSDP2 / tensor-parallel shards: each rank merges its own block
            return distributed.merge_layer(self, self._merged_weight)
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged")
        self.check_untied("merge()")
        merged = self._merged_weight(self.weight, self.lora_A, self.lora_B)
        self._unmerged_weight = self.weight.detach().clone()
        self.weight.copy_(merged)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight saved by :meth:`merge`, bit for bit."""
        if distributed.is_sharded_layer(self):  # FSDP2 / tensor-parallel shards: each rank restores its own block
            return distributed.unmerge_layer(self)
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged")
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None

    # ------------------------------------------------------------------------------------------------- state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged and prefix + "weight" in destination:
            # The checkpoint always carries W0, never W0 + s·BA: loading it must not apply the adapter twice.
            w0 = self._unmerged_weight
            destination[prefix + "weight"] = w0 if keep_vars else w0.detach()
        record = self.initial_adapter
        if record is not None:
            for key, t in zip(INITIAL_ADAPTER_KEYS, record):
                destination[prefix + key] = t

    def _load_initial_adapter(self, state_dict, prefix, unexpected_keys, error_msgs) -> None:
        """Take the initial adapter from ``state_dict`` when it has one. A state dict without it (written before it
        was saved, or by a layer without one) leaves the record as it is, so that older checkpoints load with
        ``strict=True``."""
        keys = [prefix + k for k in INITIAL_ADAPTER_KEYS]
        for k in keys:  # nn.Module reports keys it does not know as unexpected: these are this layer's
            if k in unexpected_keys:
                unexpected_keys.remove(k)
        present = [k for k in keys if k in state_dict]
        if not present:
            return
        where = prefix or f"{type(self).__name__}."
        if len(present) != len(keys):
            error_msgs.append(f"{where}initial adapter: {present[0]} without {(set(keys) - set(present)).pop()}")
            return
        A0, B0 = (state_dict[k] for k in keys)
        shapes = ((self.r, self.in_features), (self.out_features, self.r))
        for k, t, shape in zip(keys, (A0, B0), shapes):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != shape:
                error_msgs.append(
                    f"{k}: expected a floating tensor of shape {shape} (the layer's initial adapter), "
                    f"got {type(t).__name__} {tuple(getattr(t, 'shape', ()))}"
                )
                return
        record_initial_adapter(self, A0, B0)

    def _load_own_state(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """What ``nn.Module`` loads for this layer (its own parameters and buffers), plus the initial adapter."""
        nn.Module._load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._load_initial_adapter(state_dict, prefix, unexpected_keys, error_msgs)

    def _load_unless_merged(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> bool:
        """The start of every LoRA layer's ``_load_from_state_dict``: an unmerged layer loads as a module does, a
        merged one refuses ``assign=True`` (which would make the caller's tensor the weight, and merging again would
        write into it). True when that finished the load; False for a merged layer, which the caller loads."""
        if not self.merged:
            self._load_own_state(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
            return True
        if local_metadata.get("assign_to_params_buffers", False):
            error_msgs.append(
                f"{prefix or type(self).__name__}: is merged; unmerge() before load_state_dict(assign=True)"
            )
            return True
        return False

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if self._load_unless_merged(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        ):
            return
        # Merged: load into the unmerged state (the checkpoint holds W0, A, B), then merge again.
        self.unmerge()
        self._load_own_state(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        try:
            self.merge()
        except ValueError as exc:
            error_msgs.append(f"{prefix or 'LoRALinear'}: loaded but left unmerged: {exc}")

    def _warn_merged_training(self) -> None:
        """PEFT computes a merged layer with the merged weight in either mode; so do we, and say once per layer that
        the adapter learns nothing meanwhile."""
        if (
            self.training
            and torch.is_grad_enabled()
            and not self._warned_merged_training
            and (self.lora_A.requires_grad or self.lora_B.requires_grad)
        ):
            self._warned_merged_training = True
            warnings.warn(
                f"a merged {type(self).__name__} is run in training mode: it computes with the merged weight and its "
                "adapter gets no gradient until unmerge()",
                UserWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            self._warn_merged_training()
            return F.linear(x, self.weight, self.bias)
        if distributed.is_sharded_layer(self):  # tensor parallel (DTensor parameters): the op runs on the shards
            return distributed.tp_forward(self, *self._autocast(x), lora_linear)
        return self._fused_forward(x, self.weight, self.lora_A, self.lora_B)

    def _autocast(self, x: torch.Tensor):
        """The op's operands (x, W0, bias, A, B), cast as an autocast ``nn.Linear`` would inside ``torch.autocast``."""
        return _autocast.autocast_operands(x, self.weight, self.bias, self.lora_A, self.lora_B)

    def _fused_forward(self, x, weight, lora_A, lora_B, scaling: float | None = None, dropout: float | None = None):
        """The fused op on ``x`` with this layer's bias and backend, and its scaling and dropout unless given (an
        adapter of a multi-adapter subclass has its own); the autocast rule applied."""
        x, weight, bias, lora_A, lora_B = _autocast.autocast_operands(x, weight, self.bias, lora_A, lora_B)
        return lora_linear(
            x,
            weight,
            lora_A,
            lora_B,
            self.scaling if scaling is None else scaling,
            bias,
            dropout_p=self.dropout if dropout is None else dropout,
            training=self.training,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
            f"scaling={self.scaling:g}, dropout={self.dropout:g}, use_rslora={self.use_rslora}, "
            f"bias={self.bias is not None}, merged={self.merged}"
        )


# --------------------------------------------------------------------------------------------------- model helpers
def inject_lora(
    model: nn.Module,
    target_modules: str | Sequence[str],
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "default",
    lora_dtype=None,
    backend: str | None = None,
    freeze_base: bool = True,
) -> list[str]:
    """Replace, in place, every ``nn.Linear`` whose qualified name matches ``target_modules`` by a ``LoRALinear``.

    ``target_modules`` is PEFT's: a list of names matched by suffix (``"q_proj"`` matches ``"layers.0.attn.q_proj"``)
    or one string matched as a regex against the full name. With ``freeze_base`` every parameter of the model other
    than the LoRA adapters is frozen, as PEFT does. Returns the replaced names (a layer reachable under several
    names, e.g. tied, is wrapped once and every name points at the same ``LoRALinear``). Raises ValueError listing the
    candidates when nothing
    matches; on any error the model is left unchanged (weights, modules and ``requires_grad`` flags). Refused with
    ValueError: an ``nn.Linear`` subclass with its own ``forward`` (its behaviour would be lost), a parametrized or
    weight-normed Linear (its parametrization would be dropped), and with ``init="pissa"`` a weight tied to another
    parameter or an r above min(out, in) of any target. A tied target is otherwise wrapped and recorded in
    ``tied_with`` (see the module docstring).
    """
    target_modules = check_injection(model, target_modules)
    chosen = plan_injection(model, target_modules)
    targets: dict[int, tuple[str, nn.Linear]] = {}  # each layer once, under its first name
    for name, lin in chosen.items():
        targets.setdefault(id(lin), (name, lin))
    tied = tied_names(model, [lin for _, lin in targets.values()])
    if init == "pissa":
        _check_pissa_targets(targets, tied, r, alpha, use_rslora)
    built, factors = build_layers(
        model,
        targets,
        r=r,
        alpha=alpha,
        dropout=dropout,
        use_rslora=use_rslora,
        init=init,
        lora_dtype=lora_dtype,
        backend=backend,
    )
    install_layers(model, chosen, built, factors, tied, freeze_base)
    return list(chosen)


def check_injection(model: nn.Module, target_modules) -> str | list[str]:
    """``inject_lora``'s checks of ``model`` and ``target_modules``; returns ``target_modules`` as
    :func:`~lora_kernels.targets.matches` takes it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise TypeError(
            f"inject_lora replaces submodules in place and cannot replace the model itself, which is a "
            f"{type(model).__name__}; use LoRALinear.from_linear(model, ...) instead"
        )
    return check_target_modules(target_modules)


def plan_injection(model: nn.Module, target_modules: str | list[str]) -> dict[str, nn.Linear]:
    """Qualified name → ``nn.Linear`` for every layer ``inject_lora`` replaces, in module order; a layer reachable
    under several names is listed under each, so that every name gets the same LoRALinear. ValueError (listing the
    candidates) when nothing matches, or for a layer a LoRALinear cannot replace. Changes nothing."""
    candidates = named_linears(model)
    chosen = {n: lin for n, lin in candidates.items() if matches(n, target_modules)}
    if not chosen:
        wrapped = [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, LoRALinear)]
        extra = f"; already LoRALinear: {', '.join(wrapped[:20])}" if wrapped else ""
        raise no_match_error(target_modules, list(candidates), extra=extra)
    for name, linear in chosen.items():
        parent, child = parent_of(model, name)
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(
                f"{name}: nn.MultiheadAttention reads {child}.weight directly and would ignore the adapter; "
                f"target its parent's other Linear layers instead"
            )
        check_replaceable(name, linear)
    return chosen


def _check_pissa_targets(
    targets: dict[int, tuple[str, nn.Linear]], tied: dict[int, tuple[str, ...]], r, alpha, use_rslora
) -> None:
    """``init="pissa"`` writes every target's W0: refuse a tied weight, r > min(out, in) and a scaling ≤ 0 before
    anything is built."""
    if lora_scaling(r, real_number("alpha", r if alpha is None else alpha), bool(use_rslora)) <= 0:
        raise ValueError(f"init='pissa' needs a positive scaling (alpha > 0), got alpha={alpha!r}")
    for lid, (name, lin) in targets.items():
        if lid in tied:
            raise ValueError(
                f"init='pissa' writes the residual into {name}.weight, which is tied to {', '.join(tied[lid])} "
                f"(one tensor) and would change those too; untie it first ({name}.weight = "
                f"nn.Parameter({name}.weight.detach().clone())) or leave {name} out; nothing was changed"
            )
        if isinstance(r, int) and r > min(lin.weight.shape):
            raise ValueError(
                f"init='pissa' needs r ≤ min(out, in) for every target; {name} has weight "
                f"{tuple(lin.weight.shape)} and r={r}; nothing was changed"
            )


def build_layers(
    model: nn.Module, targets: dict[int, tuple[str, nn.Linear]], *, init: str = "default", **settings
) -> tuple[dict[int, LoRALinear], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """A LoRALinear for every target (keyed like ``targets``, by ``id`` of the ``nn.Linear``), not attached to the
    model, and with ``init="pissa"`` the PiSSA factors of each (every SVD before the first write; a meta-device
    layer gets PiSSA from ``reset_parameters()`` after ``to_empty()``). ``settings`` are
    :meth:`LoRALinear.from_linear`'s. On error every ``requires_grad`` flag of the model is restored."""
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    built: dict[int, LoRALinear] = {}
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for lid, (_, lin) in targets.items():
            built[lid] = LoRALinear.from_linear(lin, init="zeros" if init == "pissa" else init, **settings)
            built[lid].init = init  # what reset_parameters() re-applies
        if init == "pissa":
            for lid, layer in built.items():
                if not layer.weight.is_meta:
                    factors[lid] = pissa_factors(layer.weight, layer.r, layer.scaling)
    except BaseException:
        for p, flag in saved_flags:  # from_linear froze the weights it wrapped
            p.requires_grad_(flag)
        raise
    return built, factors


def install_layers(
    model: nn.Module,
    chosen: dict[str, nn.Linear],
    built: dict[int, LoRALinear],
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]],
    tied: dict[int, tuple[str, ...]],
    freeze_base: bool,
) -> None:
    """Put the built layers in place of their ``nn.Linear`` under every name, after recording ties, writing the
    PiSSA factors and (``freeze_base``) freezing everything but the adapters already in the model. Cannot fail on
    what :func:`plan_injection` and :func:`build_layers` accepted."""
    for lid, layer in built.items():
        layer.tied_with = tied.get(lid, ())
        if lid in factors:
            apply_pissa(layer, *factors[lid])
    if freeze_base:
        # Everything but the adapters already in the model (an earlier inject_lora call) stops training.
        keep = {id(p) for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)}
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
    # Deepest names first: a target inside another target's subtree is replaced while its path still resolves.
    for name in sorted(chosen, key=lambda n: n.count("."), reverse=True):
        replace_module(model, name, built[id(chosen[name])])


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name → LoRALinear, in module order (a shared layer appears once, under its first name)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed ``<module>.lora_A`` / ``<module>.lora_B`` as in ``model.state_dict()``.

    Like ``state_dict()`` the tensors are detached but share storage with the parameters: clone them to keep a
    snapshot across training steps."""
    if distributed.is_sharded(model):  # a sharded model: whole tensors on every rank (collective)
        return distributed.lora_state_dict(model)
    out = {}
    for name, layer in lora_layers(model).items():
        prefix = f"{name}." if name else ""
        out[prefix + "lora_A"] = layer.lora_A.detach()
        out[prefix + "lora_B"] = layer.lora_B.detach()
    return out


class LoraLoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


@torch.no_grad()
def load_lora_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> LoraLoadResult:
    """Load adapter tensors saved by :func:`lora_state_dict` into ``model``'s LoRALinear layers.

    Every key and shape is checked before anything is written; on error nothing is loaded. ``strict=True`` raises
    when a key is missing or unexpected (naming them all); ``strict=False`` loads the keys that match and returns
    them in the result. Values are cast to each parameter's dtype and device. A merged layer stays merged, with the
    new adapter folded in (refused, nothing loaded, if that weight would not be finite).
    """
    if distributed.is_sharded(model):  # a sharded model: every rank checks, then copies its own blocks
        return distributed.load_lora_state_dict(model, state_dict, strict, load=load_lora_state_dict)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of name -> tensor, got {type(state_dict).__name__}")
    expected: dict[str, tuple[LoRALinear, str]] = {}
    for name, layer in lora_layers(model).items():
        prefix = f"{name}." if name else ""
        expected[prefix + "lora_A"] = (layer, "lora_A")
        expected[prefix + "lora_B"] = (layer, "lora_B")
    if not expected:
        raise ValueError("the model has no LoRALinear layer to load into (call inject_lora first)")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    errors = []
    if strict and missing:
        errors.append(f"missing keys: {', '.join(missing)}")
    if strict and unexpected:
        errors.append(f"unexpected keys: {', '.join(map(str, unexpected))}")
    for key, (layer, attr) in expected.items():
        if key not in state_dict:
            continue
        value, param = state_dict[key], getattr(layer, attr)
        if not isinstance(value, torch.Tensor):
            errors.append(f"{key}: expected a tensor, got {type(value).__name__}")
        elif tuple(value.shape) != tuple(param.shape):
            errors.append(f"{key}: shape {tuple(value.shape)} in the state dict, {tuple(param.shape)} in the model")
        elif value.layout != torch.strided:
            errors.append(f"{key}: layout {value.layout} is not a dense tensor")
        elif value.device.type == "meta":
            errors.append(f"{key}: is on the meta device (it holds no values)")
        elif not value.is_floating_point():
            errors.append(f"{key}: dtype {value.dtype} is not a floating dtype")
        elif not bool(torch.isfinite(value).all()):
            errors.append(f"{key}: contains inf or NaN")
        elif not bool(torch.isfinite(value.to(param.dtype)).all()):
            errors.append(f"{key}: overflows the parameter's dtype {param.dtype}")
    if errors:
        raise ValueError("load_lora_state_dict: nothing was loaded. " + "; ".join(errors))

    # Merged layers: compute the new merged weight first, so a non-finite result refuses before anything is written.
    layers: dict[int, LoRALinear] = {}
    for key, (layer, _) in expected.items():
        if key in state_dict:
            layers[id(layer)] = layer
    new_merged = {}
    name_of = {id(m): n for n, m in lora_layers(model).items()}
    for lid, layer in layers.items():
        if not layer.merged:
            continue
        prefix = f"{name_of[lid]}." if name_of[lid] else ""
        a = state_dict.get(prefix + "lora_A", layer.lora_A).to(device=layer.lora_A.device, dtype=layer.lora_A.dtype)
        b = state_dict.get(prefix + "lora_B", layer.lora_B).to(device=layer.lora_B.device, dtype=layer.lora_B.dtype)
        try:
            new_merged[lid] = layer._merged_weight(layer._unmerged_weight, a, b)
        except ValueError as exc:
            raise ValueError(f"load_lora_state_dict: nothing was loaded. {name_of[lid]}: {exc}") from None
    for key, (layer, attr) in expected.items():
        if key in state_dict:
            getattr(layer, attr).copy_(state_dict[key])
    for lid, merged in new_merged.items():
        layers[lid].weight.copy_(merged)
    return LoraLoadResult(missing, unexpected)
