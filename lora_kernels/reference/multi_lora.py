"""Pure PyTorch reference of batched multi-adapter LoRA: the spec for the Triton kernels and the CPU path.

Every token (row m of x) names a pool slot ``token_slots[m]``; ``-1`` means "no adapter". A slot is *active* when
``0 <= slot < L`` and ``ranks[slot] > 0``; every other id (negative, ``>= L``, or an unloaded slot whose rank is 0) is
treated exactly like ``-1``: the token gets the base output only and nothing outside the pool is read.

Shapes (2-D at this level; the op flattens leading dims). ``L`` slots, ``R`` = max rank, ``S`` output slices of widths
``N_0 .. N_{S-1}`` (``N = ΣN_i``), ``M`` tokens:

- ``x [M, K]``; ``A_stack [L, S·R, K]``: rows ``i·R .. i·R + rank - 1`` of slot ``l`` hold slice ``i``'s ``lora_A``;
  rows from ``rank`` to ``R-1`` of each slice are padding and are never read.
- ``B_stack [L, N, R]``: rows ``off_i .. off_i + N_i - 1`` hold slice ``i``'s ``lora_B`` (``[N_i, rank]``, padded
  to ``R`` columns); ``off_i = N_0 + … + N_{i-1}``.
- ``ranks [L]`` int32 (0 = empty slot), ``scales [L, S]`` float32.
- shrink output ``xa [M, S·R]`` in the accumulation dtype: ``xa[m, i·R + j] = x[m]·A[slot, i·R + j]`` for
  ``j < rank``, zero elsewhere (padding columns, and rows whose token has no adapter).
- expand: ``y[m, off_i:off_i+N_i] += scales[slot, i] · xa[m, i·R : i·R+rank] · B[slot, off_i:off_i+N_i, :rank]ᵀ``.

The implementation is the obvious loop over the adapters present in the batch (host-side ``unique``: it syncs, which
is fine for a spec and for the CPU path). Arithmetic is in the accumulation dtype, one cast at the end: float32
(float64 for float64 inputs) by default; every function takes ``acc_dtype=`` (float32 or float64) to choose it, and
the float64 oracle of tests and benchmarks is ``acc_dtype=torch.float64`` (``out_dtype=torch.float64`` too for
``multi_lora_linear``; a float64 ``y`` for ``lora_expand``, which writes in place).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dtypes import accumulation_dtype, check_out_dtype


def active_slots(token_slots: torch.Tensor, ranks: torch.Tensor) -> list[int]:
    """Sorted list of the slots that hold an adapter and are used by at least one token."""
    L = ranks.shape[0]
    slots = token_slots.to(torch.int64)
    present = torch.unique(slots[(slots >= 0) & (slots < L)]).tolist()
    ranks_host = ranks.tolist()
    return [int(l) for l in present if ranks_host[l] > 0]


def lora_shrink(
    x: torch.Tensor,
    A_stack: torch.Tensor,
    token_slots: torch.Tensor,
    ranks: torch.Tensor,
    num_slices: int = 1,
    out: torch.Tensor | None = None,
    *,
    acc_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``xa[M, S·R] = x · A[slot]ᵀ`` per token at the adapter's own rank (see the module docstring).

    Writes ``out`` when given (every element: zeros where no adapter applies) and returns it; otherwise returns a new
    tensor in the accumulation dtype. ``acc_dtype``: float32 or float64; ``None`` (default) is float32, float64 for
    float64 ``x``."""
    acc = accumulation_dtype(x, acc_dtype=acc_dtype)
    M = x.shape[0]
    L, SR, _ = A_stack.shape
    R = SR // num_slices
    result = torch.zeros(M, SR, dtype=acc, device=x.device)
    slots = token_slots[:M].to(torch.int64)
    for l in active_slots(slots, ranks):
        r = min(int(ranks[l]), R)
        rows = (slots == l).nonzero().flatten()
        xl = x[rows].to(acc)
        for i in range(num_slices):
            a = A_stack[l, i * R : i * R + r].to(acc)
            result[rows, i * R : i * R + r] = xl @ a.t()
    if out is None:
        return result
    out.copy_(result)
    return out


def lora_expand(
    xa: torch.Tensor,
    B_stack: torch.Tensor,
    token_slots: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    y: torch.Tensor,
    slices: Sequence[int] | None = None,
    *,
    acc_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``y[m, slice i] += scales[slot, i] · xa[m, i·R:i·R+rank] · B[slot, slice i, :rank]ᵀ`` in place; returns y.

    ``y [M, N]`` any float dtype: the update is computed in the accumulation dtype and added to y's values, one
    rounding to y's dtype. ``acc_dtype``: float32 or float64; ``None`` (default) is float64 when ``y`` or ``xa`` is
    float64, else float32.
    """
    M = y.shape[0]
    L, N, R = B_stack.shape
    slices = [N] if slices is None else [int(n) for n in slices]
    acc = accumulation_dtype(y, xa, acc_dtype=acc_dtype)
    slots = token_slots[:M].to(torch.int64)
    scales2 = scales.reshape(L, -1)
    for l in active_slots(slots, ranks):
        r = min(int(ranks[l]), R)
        rows = (slots == l).nonzero().flatten()
        upd = y[rows].to(acc)
        off = 0
        for si, width in enumerate(slices):
            sl = xa[rows, si * R : si * R + r].to(acc)
            b = B_stack[l, off : off + width, :r].to(acc)
            upd[:, off : off + width] += float(scales2[l, si]) * (sl @ b.t())
            off += width
        y[rows] = upd.to(y.dtype)
    return y


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    slices: Sequence[int] | None = None,
    *,
    acc_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``y = x·Wᵀ + bias + Σ_i scale_i·(x·A_iᵀ)·B_iᵀ`` per token, all in the accumulation dtype, cast once at the end.

    ``x [..., K]`` (leading dims flattened, ``token_slots`` indexes the flattened rows), ``weight [N, K]``.
    ``acc_dtype``: float32 or float64; ``None`` (default) is float32, float64 for float64 ``x``. ``out_dtype``: the
    dtype of ``y``; ``None`` (default) is ``x.dtype``. The float64 oracle is
    ``acc_dtype=torch.float64, out_dtype=torch.float64``."""
    check_out_dtype(out_dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    acc = accumulation_dtype(x2, acc_dtype=acc_dtype)
    N = weight.shape[0]
    slices = [N] if slices is None else [int(n) for n in slices]
    y = x2.to(acc) @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    xa = lora_shrink(x2.to(acc), A_stack, token_slots, ranks, len(slices), acc_dtype=acc)
    lora_expand(xa, B_stack, token_slots, ranks, scales, y, slices, acc_dtype=acc)
    return y.to(x.dtype if out_dtype is None else out_dtype).reshape(*lead, N)
