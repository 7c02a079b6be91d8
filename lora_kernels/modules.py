"""``LoRALinear``: an ``nn.Linear`` drop-in with a LoRA adapter, plus ``inject_lora`` and ``lora_state_dict``.

State only; the math is :func:`lora_kernels.lora_linear`. Parameter names: ``weight`` and ``bias`` are the base
layer's (so a model's original state dict still loads), ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]`` are the
adapter (PEFT's ``lora_A.weight`` / ``lora_B.weight``).
"""

from __future__ import annotations

import math
import re
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops.lora_linear import lora_linear

INITS = ("default", "gaussian", "pissa", "zeros")


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: α/r, or α/√r with rsLoRA."""
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


class LoRALinear(nn.Module):
    """``y = x·W0ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ + bias`` with W0 frozen; ``merge()`` folds s·BA into W0.

    Build one from an existing layer with :meth:`from_linear`, which shares (does not copy) the base weight and bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        bias: bool = True,
        init: str = "default",
        device=None,
        dtype=None,
        lora_dtype=None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, self.alpha, self.use_rslora)
        self.dropout = float(dropout)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        lora_factory = {"device": device, "dtype": lora_dtype if lora_dtype is not None else dtype}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **lora_factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **lora_factory))
        self._merged_from: Optional[torch.Tensor] = None  # exact copy of W0 while merged, so unmerge is lossless
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters(init)

    # ------------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        lora_dtype=None,
        backend: Optional[str] = None,
    ) -> "LoRALinear":
        """Wrap ``linear``: its weight (frozen here) and bias are shared, not copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, r=r, alpha=alpha, dropout=dropout,
                        use_rslora=use_rslora, bias=False, init="zeros", dtype=w.dtype)
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        layer.bias = linear.bias
        lora_dtype = lora_dtype if lora_dtype is not None else w.dtype
        layer.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=lora_dtype))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, r, device=w.device, dtype=lora_dtype))
        layer.backend = backend
        layer.reset_lora_parameters(init)
        return layer

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        """``"default"``: PEFT's (A kaiming-uniform a=√5, B = 0); ``"gaussian"``: A ~ N(0, 1/r), B = 0;
        ``"pissa"``: principal singular directions of W0 (W0 adjusted so the output is unchanged); ``"zeros"``."""
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
            from .init import pissa_init

            pissa_init(self)
        else:
            raise ValueError(f"init={init!r} is not one of {', '.join(INITS)} (LoRA-GA: lora_kernels.lora_ga_init)")

    # ------------------------------------------------------------------------------------------------------ merging
    @property
    def merged(self) -> bool:
        return self._merged_from is not None

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in float32, shape ``[out, in]``."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·BA into the base weight; forward becomes a plain F.linear. Refuses (nothing changed) when the
        merged weight would not be finite. The original W0 is kept so that :meth:`unmerge` restores it exactly."""
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged")
        merged = self.weight.float() + self.delta_weight()
        if not torch.isfinite(merged).all():
            raise ValueError("merge refused: the merged weight would contain inf or NaN; nothing was changed")
        merged = merged.to(self.weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(f"merge refused: the merged weight overflows {self.weight.dtype}; nothing was changed")
        self._merged_from = self.weight.detach().clone()
        self.weight.copy_(merged)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight saved by :meth:`merge`, bit for bit."""
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged")
        self.weight.copy_(self._merged_from)
        self._merged_from = None

    # ------------------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(
            x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias,
            dropout_p=self.dropout, training=self.training, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
            f"scaling={self.scaling:g}, dropout={self.dropout:g}, use_rslora={self.use_rslora}, "
            f"bias={self.bias is not None}, merged={self.merged}"
        )


# --------------------------------------------------------------------------------------------------- model helpers
def _matches(name: str, target_modules: Union[str, Sequence[str]]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def inject_lora(
    model: nn.Module,
    target_modules: Union[str, Sequence[str]],
    r: int = 8,
    alpha: Optional[float] = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "default",
    lora_dtype=None,
    backend: Optional[str] = None,
    freeze_base: bool = True,
) -> List[str]:
    """Replace, in place, every ``nn.Linear`` whose qualified name matches ``target_modules`` by a ``LoRALinear``.

    ``target_modules`` is PEFT's: a list of names matched by suffix (``"q_proj"`` matches ``"layers.0.attn.q_proj"``)
    or one string matched as a regex against the full name. With ``freeze_base`` every other parameter of the model is
    frozen, as PEFT does. Returns the replaced names; raises listing the candidates when nothing matches.
    """
    if isinstance(target_modules, (list, tuple, set)) and len(target_modules) == 0:
        raise ValueError("target_modules is empty")
    candidates = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)]
    chosen = [n for n in candidates if _matches(n, target_modules)]
    if not chosen:
        shown = ", ".join(candidates[:50]) + (" ..." if len(candidates) > 50 else "")
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear; candidates: {shown or '(none)'}")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear.from_linear(getattr(parent, child), r=r, alpha=alpha, dropout=dropout,
                                       use_rslora=use_rslora, init=init, lora_dtype=lora_dtype, backend=backend)
        setattr(parent, child, layer)
    return chosen


def lora_layers(model: nn.Module) -> Dict[str, LoRALinear]:
    """Qualified name → LoRALinear, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Only the adapter tensors (``<module>.lora_A`` and ``<module>.lora_B``), detached."""
    out = {}
    for name, layer in lora_layers(model).items():
        prefix = f"{name}." if name else ""
        out[prefix + "lora_A"] = layer.lora_A.detach()
        out[prefix + "lora_B"] = layer.lora_B.detach()
    return out
