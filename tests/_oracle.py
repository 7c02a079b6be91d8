"""The float64 oracle of the tests: the PyTorch reference run with ``acc_dtype=torch.float64, out_dtype=torch.float64``
(every input promoted, nothing rounded), with the leading dims the ops accept. It runs where its inputs are: float64
arithmetic is not affected by TF32 or reduced-precision settings on a GPU."""

from __future__ import annotations

import torch

from lora_kernels.reference import lora_linear as _ref_linear
from lora_kernels.reference import multi_lora as _ref_multi

F64 = {"acc_dtype": torch.float64, "out_dtype": torch.float64}


def _d(t):
    return None if t is None else t.detach()


def lora_linear_f64(x, weight, lora_A, lora_B, scale, bias=None, dropout_p=0.0, seed=0) -> torch.Tensor:
    """float64 ``y = x·Wᵀ + scale·(dropout(x)·Aᵀ)·Bᵀ (+ bias)``; ``x [..., K]`` keeps its leading dims."""
    x2 = _d(x).reshape(-1, x.shape[-1])
    y, _ = _ref_linear.lora_linear_forward(
        x2, _d(weight), _d(lora_A), _d(lora_B), scale, _d(bias), dropout_p, seed, **F64
    )
    return y.reshape(*x.shape[:-1], weight.shape[0])


def lora_linear_in_dtype(x, weight, lora_A, lora_B, scale, bias=None, dropout_p=0.0, seed=0) -> torch.Tensor:
    """The same layer computed by PyTorch in ``x``'s dtype (every product rounded to it): the baseline of the 2x rule
    of ``_tolerances.assert_close_to_oracle``."""
    x2 = _d(x).reshape(-1, x.shape[-1])
    y, _ = _ref_linear.lora_linear_forward(
        x2, _d(weight), _d(lora_A), _d(lora_B), scale, _d(bias), dropout_p, seed, acc_dtype=x.dtype
    )
    return y.reshape(*x.shape[:-1], weight.shape[0])


def multi_lora_f64(x, weight, bias, pool, ids, slices=None) -> torch.Tensor:
    """float64 batched multi-adapter layer from ``pool``'s stacks, on the CPU: token ``m`` takes slot ``ids[m]``
    (a list or tensor of ints; -1 or an unloaded slot gives the base output). ``slices`` default to the pool's."""
    return _ref_multi.multi_lora_linear(
        _d(x).cpu(),
        _d(weight).cpu(),
        None if bias is None else _d(bias).cpu(),
        pool.A_stack.cpu(),
        pool.B_stack.cpu(),
        pool.ranks.cpu(),
        pool.scales.cpu(),
        torch.as_tensor(ids),
        list(pool.slices) if slices is None else slices,
        **F64,
    )


def multi_lora_in_dtype(x, weight, bias, pool, token_slots, slices=None) -> torch.Tensor:
    """The batched multi-adapter layer computed by PyTorch in ``x``'s dtype from ``pool``'s stacks: the baseline of
    the 2x rule of ``_tolerances.assert_close_to_oracle``."""
    slots = torch.as_tensor(token_slots, device=x.device)
    return _ref_multi.multi_lora_linear(
        x, weight, bias, pool.A_stack, pool.B_stack, pool.ranks, pool.scales, slots, slices, acc_dtype=x.dtype
    )


def naive_multi_lora(x, weight, bias, adapters, ids, slices) -> torch.Tensor:
    """An oracle independent of the reference and of the pool: float64, token by token, from the adapters as given.

    ``adapters``: ``{slot: (A per slice, B per slice, scale per slice)}``; a token whose id is not a key gets the base
    output only. ``x [..., K]`` (leading dims flattened; ``ids`` index the flattened rows)."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    y = x2 @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    for m, slot in enumerate(ids):
        if slot not in adapters:
            continue
        a, b, scales = adapters[slot]
        off = 0
        for i, n in enumerate(slices):
            y[m, off : off + n] += scales[i] * (x2[m] @ a[i].double().t()) @ b[i].double().t()
            off += n
    return y.reshape(*x.shape[:-1], sum(slices))
