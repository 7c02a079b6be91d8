"""The fused single-adapter LoRA op, ``lora_linear``: ``y = x·W0ᵀ + scale·(dropout(x)·Aᵀ)·Bᵀ (+ bias)``.

Input checks, the backend table (``BACKENDS``), the custom ops ``lora_kernels::lora_linear_fwd`` / ``lora_linear_bwd``
(fakes, ``register_autograd``) and the public function. Dropout is PEFT's (LoRA branch only, kept elements scaled by
1/(1-p)); its mask is a function of a device-side seed: the Triton forward draws it once and saves it packed (1 bit
per element) for backward, other backends regenerate it from the seed. Math, saved tensors, backends and CUDA-graph
rules: docs/lora_linear.md.
"""

from __future__ import annotations

import torch

from .. import _autocast, _backend
from ..reference import lora_linear as _ref
from ..reference.dropout import keep_bits_shape
from ._validate import check_same_device, check_scale, check_tensor, shape

_LORA_DTYPES = (torch.float32,)  # A and B may be fp32 while x and W are half precision (LoRA-GA keeps them fp32)


# ----------------------------------------------------------------------------------------------------------- checks
def validate(x, weight, lora_A, lora_B, scale, bias, dropout_p) -> tuple[float, float]:
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension [..., in_features], got shape {shape(x)}")
    check_tensor("weight", weight, ndim=2)
    check_tensor("lora_A", lora_A, ndim=2)
    check_tensor("lora_B", lora_B, ndim=2)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
    K = x.shape[-1]
    N = weight.shape[0]
    r = lora_A.shape[0]
    if weight.shape[1] != K:
        raise ValueError(
            f"weight has in_features {weight.shape[1]} but x has {K}: weight {shape(weight)}, x {shape(x)}"
        )
    if r == 0:
        raise ValueError(f"lora_A has rank 0 (shape {shape(lora_A)}); use F.linear for a layer without adapter")
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A must be [r, in_features={K}], got lora_A {shape(lora_A)} with x {shape(x)}")
    if lora_B.shape != (N, r):
        raise ValueError(
            f"lora_B must be [out_features, r] = {(N, r)}, got lora_B {shape(lora_B)} "
            f"(weight {shape(weight)}, lora_A {shape(lora_A)})"
        )
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias must be [out_features={N}], got bias {shape(bias)} with weight {shape(weight)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A dtype {lora_A.dtype} differs from lora_B dtype {lora_B.dtype}")
    if lora_A.dtype != x.dtype and lora_A.dtype not in _LORA_DTYPES:
        raise TypeError(f"lora_A/lora_B dtype {lora_A.dtype} must be x's dtype {x.dtype} or float32")
    check_same_device(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias)
    scale = check_scale("scale", scale)
    dropout_p = check_scale("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return scale, dropout_p


# ---------------------------------------------------------------------------------------------------------- backends
def _triton_kernels():
    from ..triton import lora_linear as tri

    return tri


# Both implementations are modules with ``lora_linear_forward`` / ``lora_linear_backward`` of one contract.
BACKENDS = _backend.BackendTable(
    name="lora_linear",
    checks={"torch": _backend.torch_reason, "triton": _backend.triton_reason},
    loaders={"torch": lambda: _ref, "triton": _triton_kernels},
    auto_on_cuda=("triton", "torch"),
)


# ------------------------------------------------------------------------------------------------------------ seeds
# Placeholder seed without dropout on the CPU (never read). On CUDA an uninitialised device scalar is used instead, so
# a compiled graph holds no CPU tensor (that would keep torch.compile's CUDA graphs off).
_NO_SEED = torch.zeros((), dtype=torch.int64)


def _draw_seed(x: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """The dropout seed, a 0-dim int64 tensor in [0, 2^62).

    x on CUDA: drawn on x's device by its CUDA generator (``torch.manual_seed`` seeds it too): no host sync, and a
    CUDA-graph capture records the draw, so each replay gets a new seed. Elsewhere: drawn by the CPU generator.
    p = 0 draws nothing (the generators' states are untouched)."""
    on_cuda = x.device.type == "cuda"
    if dropout_p > 0.0:
        return torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device if on_cuda else None)
    return torch.empty((), dtype=torch.int64, device=x.device) if on_cuda else _NO_SEED


def _seed_arg(backend: str, seed: torch.Tensor, dropout_p: float):
    """What the backend takes: the Triton kernels read the tensor on the device; the torch reference needs an int,
    read with ``.item()`` (a host sync; only with dropout, so p = 0 stays sync-free and graph-capturable)."""
    if backend == "triton":
        return seed
    return int(seed.item()) if dropout_p > 0.0 else 0


# ------------------------------------------------------------------------------------------------------- custom ops
def _no_autocast(t: torch.Tensor):
    """Autocast off for the real implementations: the op's dtypes are its inputs' (the fakes say so), whatever
    autocast context it is called or differentiated in. Without this the torch backend's fp32 matmuls ran in the
    autocast dtype (xa came back bf16 where the fake says fp32) while the Triton kernels ignored autocast.
    ``LoRALinear`` applies autocast's casts to the inputs before the call."""
    return _autocast.autocast_off(t)


@torch.library.custom_op("lora_kernels::lora_linear_fwd", mutates_args=())
def _fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, xa, keep_bits): keep_bits is the packed dropout mask the Triton kernels drew (int32 [M, ceil(K/32)]),
    empty without dropout or on a backend that regenerates the mask from the seed in backward."""
    impl = BACKENDS.impl(backend)
    seed_arg = _seed_arg(backend, seed, dropout_p)
    with _no_autocast(x):
        if _draws_bits(backend, dropout_p):
            y, xa, bits = impl.lora_linear_forward(
                x, weight, lora_A, lora_B, scale, bias, dropout_p, seed_arg, return_keep_bits=True
            )
        else:
            y, xa = impl.lora_linear_forward(x, weight, lora_A, lora_B, scale, bias, dropout_p, seed_arg)
            bits = x.new_empty(0, dtype=torch.int32)
    # The fake promises row-major outputs whatever the input layouts; .contiguous() is free when they already are.
    return y.contiguous(), xa.contiguous(), bits.contiguous()


def _draws_bits(backend: str, dropout_p: float) -> bool:
    """Whether the forward returns the packed mask: the Triton kernels with dropout (the torch reference does not)."""
    return backend == "triton" and dropout_p > 0.0


@_fwd.register_fake
def _fwd_fake(x, weight, lora_A, lora_B, bias, scale, dropout_p, seed, backend):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    bits = keep_bits_shape(x.shape[0], x.shape[1]) if _draws_bits(backend, dropout_p) else (0,)
    return (
        x.new_empty(x.shape[0], weight.shape[0]),
        x.new_empty(x.shape[0], lora_A.shape[0], dtype=acc),
        x.new_empty(bits, dtype=torch.int32),
    )


@torch.library.custom_op("lora_kernels::lora_linear_bwd", mutates_args=())
def _bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor,
    backend: str,
    needs_dx: bool,
    needs_dweight: bool,
    needs_dbias: bool,
    keep_bits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``keep_bits``: the forward's packed mask; None or empty (and on the torch backend): regenerated from the
    seed, the same mask bit for bit."""
    impl = BACKENDS.impl(backend)
    args = [dy, x, weight, lora_A, lora_B, xa, scale, dropout_p, _seed_arg(backend, seed, dropout_p)]
    args += [needs_dx, needs_dweight, needs_dbias]
    if keep_bits is not None and keep_bits.numel() > 0 and _draws_bits(backend, dropout_p):
        args.append(keep_bits)
    with _no_autocast(dy):
        dx, d_a, d_b, dw, dbias = impl.lora_linear_backward(*args)
    # Custom ops cannot return None: gradients not asked for come back as empty tensors and become None in backward.
    # Every gradient is row-major whatever the layout of its input (a transposed trainable weight gave dW the
    # weight's strides in the fake but not in the kernels, and inductor then read dW with the wrong strides).
    return (
        dx.contiguous() if dx is not None else dy.new_empty(0),
        d_a.contiguous(),
        d_b.contiguous(),
        dw.contiguous() if dw is not None else dy.new_empty(0),
        dbias.to(dy.dtype) if dbias is not None else dy.new_empty(0),
    )


@_bwd.register_fake
def _bwd_fake(
    dy,
    x,
    weight,
    lora_A,
    lora_B,
    xa,
    scale,
    dropout_p,
    seed,
    backend,
    needs_dx,
    needs_dweight,
    needs_dbias,
    keep_bits=None,
):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if needs_dx else dy.new_empty(0),
        torch.empty_like(lora_A, memory_format=torch.contiguous_format),
        torch.empty_like(lora_B, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if needs_dweight else dy.new_empty(0),
        dy.new_empty(weight.shape[0]) if needs_dbias else dy.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, scale, dropout_p, seed, backend = inputs
    _, xa, keep_bits = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed, keep_bits)
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dxa, _dbits):
    x, weight, lora_A, lora_B, xa, seed, keep_bits = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, d_a, d_b, dw, dbias = _bwd(
        dy.contiguous(),
        x,
        weight,
        lora_A,
        lora_B,
        xa,
        ctx.scale,
        ctx.dropout_p,
        seed,
        ctx.backend,
        bool(needs[0]),
        bool(needs[1]),
        bool(ctx.has_bias and needs[4]),
        keep_bits,
    )
    return (
        dx if needs[0] else None,
        dw if needs[1] else None,
        d_a if needs[2] else None,
        d_b if needs[3] else None,
        dbias if (ctx.has_bias and needs[4]) else None,
        None,
        None,
        None,
        None,
    )


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------------------ public
def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scale · F.linear(F.linear(dropout(x), lora_A), lora_B)``, fused.

    Shapes: x ``[..., K]`` (any leading dims, any strides), weight ``[N, K]``, lora_A ``[r, K]``, lora_B ``[N, r]``,
    bias ``[N]``; returns ``[..., N]`` in x's dtype. x, weight and bias share a dtype (fp16, bf16, fp32); lora_A and
    lora_B are that dtype or fp32. Dropout applies only when ``training`` and ``dropout_p > 0``; its mask comes from a
    seed drawn from torch's generator of x's device when that is CUDA (CPU generator otherwise), so
    ``torch.manual_seed`` fixes it. ``backend``: ``"auto" | "triton" | "torch"`` (default: ``$LORA_KERNELS_BACKEND``
    or ``"auto"``). With the Triton backend a training step with dropout can be captured in a CUDA graph (each replay
    draws a fresh mask); the torch backend reads the seed on the host and cannot be captured with dropout.
    """
    scale, dropout_p = validate(x, weight, lora_A, lora_B, scale, bias, dropout_p)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__} {training!r}")
    if not training:
        dropout_p = 0.0
    name = BACKENDS.resolve(backend, x, weight, lora_A, lora_B, bias)
    lead = x.shape[:-1]
    x2d = x.reshape(lead.numel(), x.shape[-1])  # not reshape(-1, K): that fails for K = 0
    seed = _draw_seed(x, dropout_p)
    y, _, _ = _fwd(x2d, weight, lora_A, lora_B, bias, scale, dropout_p, seed, name)
    # y is the op's own fresh [M, N] buffer: return it reshaped without marking the result a view of it. A view
    # output makes FSDP2 warn (an in-place op on it, e.g. ``out += r``, would drop FSDP's pre-backward hook and
    # skip the all-gather); torch.matmul returns its reshaped result the same way.
    return torch.ops.aten._unsafe_view(y, (*lead, weight.shape[0]))
