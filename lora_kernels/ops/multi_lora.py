"""Batched multi-adapter LoRA ops: ``lora_shrink``, ``lora_expand`` and ``multi_lora_linear`` (inference only).

Token m uses the adapter in its pool slot (-1 = none):
``y = x·W0ᵀ + bias;  y[m, slice i] += scales[slot_m, i]·(x[m]·A[slot_m, i]ᵀ)·B[slot_m, i]ᵀ``.
Input checks, the backend table (``BACKENDS``), the path choice (``choose_path``: "fused" / "gemm" / "split"), the
``torch.library`` custom ops with fakes, and the public functions. Layouts, paths, launches, the launcher contract
every backend implements, precision, CUDA graphs and isolation: docs/multi_lora.md.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import _autocast, _backend
from ..pool import AdapterPool, LoRABatch
from ..reference import multi_lora as _ref
from ._batch import BatchMeta
from ._validate import MAX_SLICES, check_same_device, check_scale, check_tensor, shape

# Default paths by the tokens of the step, from the static launch model (benchmarks/static_serving.py, with the
# training report's rates: cuBLAS at 732 TFLOP/s, a non-TMA wgmma Triton GEMM 1.35x slower, mma.sync 2.7x, skinny
# Triton kernels at 247 TFLOP/s, TF32 epilogue dots at half a GEMM's rate; K = N = 4096, r = 16, bf16; 16 / 128
# adapters, uniform / mixed ids; a GPU without TMA). Predicted µs / floor, geometric mean of those four points (worst
# in brackets), fused / split / gemm:
#   T = 1: 1.18 (1.18) / 1.35 (1.35) / 1.18 (1.18)     T = 8: 1.19 (1.20) / 1.34 (1.35) / 1.17 (1.17)
#   T = 16: 1.20 (1.22) / 1.34 (1.35) / 1.17 (1.18)    T = 64: 1.23 (1.29) / 1.35 (1.38) / 1.17 (1.18)
#   T = 256: 1.32 (1.36) / 1.41 (1.48) / 1.30 (1.40)   T = 288: 1.98 (3.46) / 1.44 (1.51) / 1.83 (1.98)
#   T = 1024: 1.66 (2.55) / 1.33 (1.50) / 1.46 (1.60)  T = 4096: 1.94 (2.49) / 1.21 (1.25) / 1.39 (1.42)
# A default changes only where the model predicts a gain of >= 2 % in the mean (finer differences are below what it
# resolves). All UNMEASURED, to be replaced by measurements (benchmarks/bench_multi_lora.py).
# Where a step of at most 64 tokens is known to name few adapters (host ids, or the batch's max_adapters_per_step),
# the gemm path is one launch (triton.multi_lora.lanes_for) and the default at every such step: predicted 1.00x the
# floor (1.008-1.031x the cuBLAS base) for the grid's one-token and `mix` points, against 1.17-1.18x above.
#
# At most this many tokens go through the fused shrink+expand kernel (one launch, no fp32 buffer; each output block
# recomputes its tile's shrink from L2): up to 8 tokens the gemm path is predicted within 1.9 % of it; from 12 tokens
# the recomputed shrink costs more (2.2 % at 12, 2.8 % at 16, where fused is 1.21-1.22x the floor for 12-15 adapters).
FUSED_MAX_TOKENS = 8
# Above FUSED_MAX_TOKENS and up to this many tokens, the Triton backend puts the expand inside the base GEMM ("gemm"
# path: shrink, then one Triton GEMM whose epilogue adds the LoRA term; 2 launches, y written once) instead of
# cuBLAS + shrink + expand (3 launches and a read-modify-write of y: 2·M·N·2 bytes). Past 256 tokens (128-row tiles)
# the GEMM is compute-bound and its 1.35x outweighs the y round trip: the split path is predicted faster from 288 on (in
# the mean: 288 tokens by 21 %, 384 by 3 %, 512-768 by 5-7 %, 1024 by 9 %, 4096 by 13 %).
# Where the GEMM is the TMA kernel (Hopper, 16-bit data TMA can read, > 64 tokens: triton.multi_lora.gemm_tma_ok),
# the model charges it cuBLAS's rate (its LoRA epilogue's TF32 dots at half of it), and the gemm path is the default
# at every token count above FUSED_MAX_TOKENS: 1.02-1.17x the floor at 1024 and 4096 tokens against the split path's
# 1.20-1.29x, except where a 128-row tile of the batch's own order holds ~80 adapters (128 adapters uniform over
# >= 1024 tokens: 1.66-1.72x). Such a step, when its ids are known on the host, takes the gemm path's side path
# instead (the LoRA term in fp32 from a kernel running beside the TMA GEMM, which adds it in its epilogue: 1.05-1.13x
# there; triton.multi_lora.SIDE_TERM / SIDE_MIN_TOKENS / SIDE_MAX_COST), or, with SIDE_TERM off, sorted row tiles
# (x read by TMA from a sorted copy that the shrink writes: 1.19-1.40x; SORTED_MIN_TOKENS / SORTED_MAX_COST /
# SORTED_MIN_TOKENS_PER_ADAPTER), or, with SORTED_GATHER off too, the split path (1.25-1.50x): ``heavy_epilogue``.
GEMM_MAX_TOKENS = 256
PATHS = ("fused", "split", "gemm")


# ----------------------------------------------------------------------------------------------------------- checks
def _in_graph_or_compile(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def step_tile_m(batch_tile_m: int, M: int) -> int:
    """Rows per kernel tile for a step of M tokens: the batch's ``tile_m`` (set by its capacity), but never more than
    the next power of two >= M (at least 16, the smallest tl.dot M). A decode step of 4 tokens in a batch built for
    4096 then runs 16-row tiles instead of 64-row ones that would be >= 75 % masked rows.

    Exact for any step: the batch cuts each slot's run of sorted tokens into tiles of ``batch_tile_m`` from its
    start, and the run lists that slot's tokens in ascending order (stable sort), so its tokens < M (at most M) are
    the first entries of the run's first tile, and a kernel tile of >= M rows read from the tile's start covers
    them. Depends on M only (a host int, the static shape): no sync, and a CUDA graph captured for one bucket of
    token counts (ids padded with -1 to the bucket's size, as engines capture per batch size) keeps its tiles
    across replays with new ids."""
    step = 16
    while step < M and step < batch_tile_m:
        step *= 2
    return min(step, batch_tile_m)


def check_ids(batch: LoRABatch, num_slots: int, valid: Sequence[bool] | None, M: int, what: str) -> None:
    """Raise ValueError naming every token id that is neither -1 nor a valid slot (``valid[slot]``; None = every slot
    in range), or when the batch's token count differs from M. Uses the host copy of the ids when there is one (no
    sync), else reads them back (syncs)."""
    if batch.num_tokens != M:
        raise ValueError(
            f"{what}: the batch was prepared for {batch.num_tokens} tokens but the input has {M} rows; prepare "
            "one id per token (pad with -1)"
        )
    if batch.host_unique is not None and all(
        u == -1 or (0 <= u < num_slots and (valid is None or valid[u])) for u in batch.host_unique
    ):
        return  # fast path (per layer and step in eager serving): a few distinct ids, no tensor work
    ids = batch.host_slots if batch.host_slots is not None else batch.token_slots[: batch.num_tokens].cpu()
    ids = ids.to(torch.int64)
    bad_range = (ids < -1) | (ids >= num_slots)
    if valid is not None:
        ok = torch.tensor([bool(v) for v in valid] + [True], dtype=torch.bool)  # index -1 → the appended True
        safe = torch.where(bad_range, torch.full_like(ids, -1), ids)
        bad_empty = ~bad_range & ~ok[safe]
    else:
        bad_empty = torch.zeros_like(bad_range)
    bad = bad_range | bad_empty
    if bool(bad.any()):
        pos = bad.nonzero().flatten().tolist()
        shown = ", ".join(f"token {p}: {int(ids[p])}" for p in pos[:20]) + (" ..." if len(pos) > 20 else "")
        parts = []
        if bool(bad_range.any()):
            parts.append(f"ids outside -1..{num_slots - 1}")
        if bool(bad_empty.any()):
            parts.append("ids of empty (unloaded) slots")
        raise ValueError(f"{what}: {' and '.join(parts)} ({shown}); use -1 for tokens without adapter")


def _check_batch(batch) -> None:
    if not isinstance(batch, LoRABatch):
        raise TypeError(f"batch must be a LoRABatch, got {type(batch).__name__}")


def _normalize_scales(scales, L: int, S: int, device) -> torch.Tensor:
    if isinstance(scales, torch.Tensor):
        if scales.shape not in ((L,), (L, S)):
            raise ValueError(f"scales must be [L={L}] or [L, S]={(L, S)}, got {shape(scales)}")
        if scales.dtype != torch.float32:
            raise TypeError(f"scales must be float32, got {scales.dtype}")
        if scales.requires_grad:  # the multi-adapter ops register no gradient: it would be lost without a word
            raise ValueError(
                "scales must not require grad: the multi-adapter ops are inference-only and take the "
                "scales as constants (pass scales.detach())"
            )
        return scales.reshape(L, 1).expand(L, S).contiguous() if scales.dim() == 1 and S > 1 else scales.reshape(L, S)
    if isinstance(scales, bool) or not isinstance(scales, numbers.Real):
        raise TypeError(f"scales must be a float32 tensor [L] or [L, S], or a float, got {type(scales).__name__}")
    return torch.full((L, S), check_scale("scales", scales), dtype=torch.float32, device=device)


def _normalize_ranks(ranks, L: int, R: int, device) -> torch.Tensor:
    if ranks is None:
        return torch.full((L,), R, dtype=torch.int32, device=device)
    check_tensor("ranks", ranks, ndim=1, dtypes=(torch.int32,))
    if ranks.shape[0] != L:
        raise ValueError(f"ranks must be [L={L}] int32, got {shape(ranks)}")
    return ranks


def _rank_flags(ranks: torch.Tensor, R: int, what: str) -> list[bool]:
    """Per slot: rank > 0. Raises ValueError on a rank outside 0..R (the kernels would read past the slot's rows of
    the stack). Reads the ranks on the host: only on the checked (eager) path."""
    values = ranks.tolist()
    bad = [(i, v) for i, v in enumerate(values) if not 0 <= v <= R]
    if bad:
        shown = ", ".join(f"slot {i}: {v}" for i, v in bad[:20])
        raise ValueError(f"{what}: ranks must be in 0..R={R} (the stack's rank dimension), got {shown}")
    return [v > 0 for v in values]


# ---------------------------------------------------------------------------------------------------------- backends
# Every backend offers the launchers of :mod:`lora_kernels.triton.multi_lora` by role, with their signatures: the batch
# comes as one :class:`BatchMeta` record. The reference needs only its token_slots.
def _ref_shrink(
    x: torch.Tensor,
    A_stack: torch.Tensor,
    ranks: torch.Tensor,
    meta: BatchMeta,
    out: torch.Tensor,
    num_slices: int,
    tile_m: int,
) -> torch.Tensor:
    return _ref.lora_shrink(x, A_stack, meta.token_slots, ranks, num_slices, out=out)


def _ref_expand(
    xa: torch.Tensor,
    B_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: BatchMeta,
    y: torch.Tensor,
    slices: list[int],
    tile_m: int,
) -> torch.Tensor:
    return _ref.lora_expand(xa, B_stack, meta.token_slots, ranks, scales, y, slices)


def _ref_fused(
    x: torch.Tensor,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: BatchMeta,
    y: torch.Tensor,
    slices: list[int],
    tile_m: int,
) -> torch.Tensor:
    xa = _ref.lora_shrink(x, A_stack, meta.token_slots, ranks, len(slices))
    return _ref.lora_expand(xa, B_stack, meta.token_slots, ranks, scales, y, slices)


def _ref_split(
    x: torch.Tensor,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: BatchMeta,
    y: torch.Tensor,
    slices: list[int],
    tile_m: int,
) -> torch.Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = _ref.lora_shrink(x, A_stack, meta.token_slots, ranks, len(slices), acc_dtype=acc)
    return _ref.lora_expand(xa, B_stack, meta.token_slots, ranks, scales, y, slices)


def _ref_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: BatchMeta,
    slices: list[int],
    tile_m: int,
    lanes: int = 0,
    sort_rows: bool = False,
) -> torch.Tensor:
    # the spec: base and LoRA in fp32 (float64), one rounding (``lanes``, ``sort_rows``: how the Triton kernels split
    # the work)
    return _ref.multi_lora_linear(
        x, weight, bias, A_stack, B_stack, ranks, scales, meta.token_slots[: x.shape[0]], slices
    )


def _torch_kernels():
    return {"shrink": _ref_shrink, "expand": _ref_expand, "fused": _ref_fused, "split": _ref_split, "gemm": _ref_gemm}


def _triton_kernels():
    from ..triton import multi_lora as tri

    return {
        "shrink": tri.shrink,
        "expand": tri.expand,
        "fused": tri.fused,
        "split": tri.shrink_expand,
        "gemm": tri.linear_gemm,
    }


def _cuda_reason(x: torch.Tensor, *tensors: torch.Tensor | None) -> str | None:
    if x.device.type != "cuda":
        return "tensors are not on a CUDA device"
    from .. import extension

    return extension.multi_lora_reason(x, *tensors)  # the extension's own load, device and dtype checks


def _cuda_kernels():
    from .. import extension  # no "gemm": choose_path refuses that path on this backend

    return {
        "shrink": extension.multi_lora_shrink,
        "expand": extension.multi_lora_expand,
        "fused": extension.multi_lora_fused,
        "split": extension.multi_lora_fused,  # shrink into a zeroed fp32 xa, then expand: already two launches
    }


# "auto" on CUDA prefers the Triton kernels and falls back to the CUDA extension when Triton is unavailable.
BACKENDS = _backend.BackendTable(
    name="multi_lora",
    checks={"torch": _backend.torch_reason, "triton": _backend.triton_reason, "cuda": _cuda_reason},
    loaders={"torch": _torch_kernels, "triton": _triton_kernels, "cuda": _cuda_kernels},
    auto_on_cuda=("triton", "cuda", "torch"),
)


# ------------------------------------------------------------------------------------------------------- custom ops
# Registered ops take tensors only: the public functions pass ``*batch.meta`` (the four batch tensors) and each op
# rebuilds the record for its backend. Each runs with autocast off: its dtypes are its inputs' (the fakes say so) in
# any autocast context; inside one, the reference's fp32 matmuls came back in the autocast dtype (an error writing
# them into the fp32 xa) while the Triton kernels ignored autocast.
# No op returns a new tensor but the gemm one, so the fakes have nothing to do.
@torch.library.custom_op("lora_kernels::lora_shrink", mutates_args=("out",))
def _shrink_op(
    x: torch.Tensor,
    A_stack: torch.Tensor,
    ranks: torch.Tensor,
    token_slots: torch.Tensor,
    sorted_tokens: torch.Tensor,
    sorted_slots: torch.Tensor,
    tile_starts: torch.Tensor,
    out: torch.Tensor,
    num_slices: int,
    tile_m: int,
    backend: str,
) -> None:
    meta = BatchMeta(token_slots, sorted_tokens, sorted_slots, tile_starts)
    with _autocast.autocast_off(x):
        BACKENDS.impl(backend)["shrink"](x, A_stack, ranks, meta, out, num_slices, tile_m)


@torch.library.custom_op("lora_kernels::lora_expand", mutates_args=("y",))
def _expand_op(
    xa: torch.Tensor,
    B_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    sorted_tokens: torch.Tensor,
    sorted_slots: torch.Tensor,
    tile_starts: torch.Tensor,
    y: torch.Tensor,
    slices: list[int],
    tile_m: int,
    backend: str,
) -> None:
    meta = BatchMeta(token_slots, sorted_tokens, sorted_slots, tile_starts)
    with _autocast.autocast_off(y):
        BACKENDS.impl(backend)["expand"](xa, B_stack, ranks, scales, meta, y, slices, tile_m)


def _add_lora_op(path: str):
    """Body of the ops that add the LoRA term into y after the base layer, by the backend's launcher of ``path``:
    "fused" (one kernel) or "split" (shrink into fp32 partials, then the expand)."""

    def op(
        x: torch.Tensor,
        A_stack: torch.Tensor,
        B_stack: torch.Tensor,
        ranks: torch.Tensor,
        scales: torch.Tensor,
        token_slots: torch.Tensor,
        sorted_tokens: torch.Tensor,
        sorted_slots: torch.Tensor,
        tile_starts: torch.Tensor,
        y: torch.Tensor,
        slices: list[int],
        tile_m: int,
        backend: str,
    ) -> None:
        meta = BatchMeta(token_slots, sorted_tokens, sorted_slots, tile_starts)
        with _autocast.autocast_off(x):
            BACKENDS.impl(backend)[path](x, A_stack, B_stack, ranks, scales, meta, y, slices, tile_m)

    return op


_fused_op = torch.library.custom_op("lora_kernels::lora_fused_expand", mutates_args=("y",))(_add_lora_op("fused"))
_split_op = torch.library.custom_op("lora_kernels::lora_split_expand", mutates_args=("y",))(_add_lora_op("split"))


@torch.library.custom_op("lora_kernels::multi_lora_gemm", mutates_args=())
def _gemm_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    sorted_tokens: torch.Tensor,
    sorted_slots: torch.Tensor,
    tile_starts: torch.Tensor,
    slices: list[int],
    tile_m: int,
    backend: str,
    lanes: int = 0,
    sort_rows: bool = False,
) -> torch.Tensor:
    meta = BatchMeta(token_slots, sorted_tokens, sorted_slots, tile_starts)
    with _autocast.autocast_off(x):
        return BACKENDS.impl(backend)["gemm"](
            x, weight, bias, A_stack, B_stack, ranks, scales, meta, slices, tile_m, lanes, sort_rows
        )


def _mutating_fake(*args) -> None:
    return None


_shrink_op.register_fake(_mutating_fake)
_expand_op.register_fake(_mutating_fake)
_fused_op.register_fake(_mutating_fake)
_split_op.register_fake(_mutating_fake)


@_gemm_op.register_fake
def _gemm_fake(x, weight, *rest):
    return x.new_empty(x.shape[0], weight.shape[0])


def _gemm_tma(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """The gemm path's GEMM would be the TMA kernel (judged from strides: x may be a traced tensor)."""
    from ..triton import multi_lora as ML

    return ML.gemm_tma_ok(x2, weight, check_addresses=False)


def _lanes(M: int, pool: AdapterPool, adapters: int | None) -> int:
    """The one-launch gemm path's lane count for M tokens naming at most ``adapters`` adapters of ``pool`` (0: the
    two-launch path; see ``triton.multi_lora.lanes_for``)."""
    from ..triton import multi_lora as ML

    return ML.lanes_for(M, pool.max_rank, adapters)


def _stays_on_gemm(M: int, N: int) -> bool:
    """A heavy-epilogue step of M tokens and N outputs stays on the gemm path (its side path, or sorted row tiles:
    ``triton.multi_lora.heavy_variant``; the op's ``sort_rows``), not the split path."""
    from ..triton import multi_lora as ML

    return ML.heavy_variant(M, N) != "split"


def _heavy_epilogue(x2: torch.Tensor, pool: AdapterPool, batch: LoRABatch) -> bool:
    """The TMA GEMM's row tiles for this step would hold too many adapters (``triton.multi_lora.tma_epilogue_split``),
    judged from the ids the batch was last prepared with on the host (False when they were device ids, and while
    torch.compile traces: no host tensor work in its graph). Only the speed depends on it: every path is exact for
    any ids, so a CUDA graph captured with these ids stays right for later ones."""
    if batch.host_slots is None or batch.num_tokens != x2.shape[0] or torch.compiler.is_compiling():
        return False
    from ..triton import multi_lora as ML

    L = pool.max_adapters
    # the adapters the host ids name (ids past the pool, unchecked, count too: the rule only grows more cautious)
    return ML.tma_epilogue_split(
        x2, lambda rows: batch.tile_adapters(L, rows), pool.max_rank, pool.slices, adapters=batch.step_adapters
    )


def choose_path(
    path: str | None,
    fused: bool | None,
    M: int,
    backend: str,
    tma: bool = False,
    lanes: bool = False,
    heavy_epilogue: bool = False,
) -> str:
    """The one place that picks how :func:`multi_lora_linear` runs (see the module docstring):

    - ``"fused"``: F.linear, then one kernel for shrink and expand (adds into y). Default for M <= FUSED_MAX_TOKENS.
    - ``"gemm"``: the shrink, then the base GEMM with the expand in its epilogue (y written once; Triton and torch
      backends). Default on the Triton backend for FUSED_MAX_TOKENS < M <= GEMM_MAX_TOKENS, and for every M above
      FUSED_MAX_TOKENS when ``tma`` (the GEMM is the TMA kernel: see GEMM_MAX_TOKENS). With ``lanes`` (the step's
      few adapters fit the one-launch GEMM's lanes: ``triton.multi_lora.lanes_for``) it is one launch, the default
      on the Triton backend at every M.
    - ``"split"``: F.linear, then the shrink into per-split fp32 partials and the expand, which sums them (adds
      into y; no zero-fill, no atomics). Default otherwise, and where the TMA GEMM's row tiles would hold so many
      adapters that its epilogue outweighs a round trip of y (``heavy_epilogue``: judged from host ids by
      ``triton.multi_lora.tma_epilogue_split``; :func:`multi_lora_linear` passes it only where
      ``triton.multi_lora.heavy_variant`` says "split", and otherwise runs such a step on the gemm path: its side
      path, or sorted row tiles).

    ``path`` forces one; ``fused`` (True/False) is the older way to force "fused"/"split"."""
    if path is not None:
        if path not in PATHS:
            raise ValueError(f"path must be one of {', '.join(map(repr, PATHS))} or None, got {path!r}")
        if fused is not None and path != ("fused" if fused else "split"):
            raise ValueError(f"fused={fused} contradicts path={path!r}; pass one of them")
        if path == "gemm" and backend == "cuda":
            raise ValueError(
                "path='gemm' has no CUDA-extension kernel; use backend='triton' or 'torch', or path 'fused' / 'split'"
            )
        return path
    if fused is not None:
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool or None, got {fused!r}")
        return "fused" if fused else "split"
    if backend == "triton" and lanes:
        return "gemm"
    if M <= FUSED_MAX_TOKENS:
        return "fused"
    if backend == "triton" and tma and heavy_epilogue:
        return "split"
    if backend == "triton" and (M <= GEMM_MAX_TOKENS or tma):
        return "gemm"
    return "split"


def _cat_slices(name: str, parts, num_slices):
    """A list of per-slice stacks (vLLM style) → one tensor, concatenated along dim 1 (a copy: pass the pool's
    ``A_stack`` / ``B_stack`` to avoid it)."""
    parts = list(parts)
    if not parts:
        raise ValueError(f"{name} is an empty list")
    for i, t in enumerate(parts):
        check_tensor(f"{name}[{i}]", t, ndim=3)
    if num_slices not in (None, 1, len(parts)):
        raise ValueError(f"num_slices={num_slices} but {name} is a list of {len(parts)} slices")
    dims = {(t.shape[0], t.shape[2]) if name == "B_stack" else (t.shape[0], t.shape[1], t.shape[2]) for t in parts}
    if len(dims) != 1:
        raise ValueError(
            f"the slices of {name} must agree in every dimension but dim 1 (B) or in all (A): "
            f"{[tuple(t.shape) for t in parts]}"
        )
    return torch.cat(parts, dim=1), len(parts)


def _view_2d(name: str, t: torch.Tensor, cols: int) -> torch.Tensor:
    """[..., cols] → a [M, cols] *view* (the ops write through it)."""
    if t.shape[-1] != cols:
        raise ValueError(f"{name} must be [..., {cols}], got {shape(t)}")
    try:
        return t.view(-1, cols)
    except RuntimeError:
        raise ValueError(
            f"{name} {shape(t)} with strides {t.stride()} cannot be viewed as 2-D; pass a contiguous tensor"
        ) from None


# ------------------------------------------------------------------------------------------------------------ public
def lora_shrink(
    x: torch.Tensor,
    A_stack: torch.Tensor,
    batch: LoRABatch,
    out: torch.Tensor,
    ranks: torch.Tensor | None = None,
    num_slices: int = 1,
    backend: str | None = None,
    check: bool | None = None,
) -> torch.Tensor:
    """``out[m, s·R + j] = x[m]·A_stack[slot_m, s·R + j]`` for ``j < ranks[slot_m]``, zero elsewhere; returns out.

    x ``[..., K]``; A_stack ``[L, S·R, K]`` (``AdapterPool.A_stack``; a list of S per-slice ``[L, R, K]`` stacks is
    accepted and concatenated, a copy); out ``[..., S·R]`` float32 (float64 for
    float64 x with the torch backend), fully overwritten; ranks ``[L]`` int32 (default: R for every slot, i.e. no
    empty slots); ``num_slices`` = S. ``check`` (default: on in eager mode, off while compiling or capturing) raises on
    ids outside ``-1..L-1`` or naming an empty slot; the kernels ignore such ids either way.
    """
    _check_batch(batch)
    check_tensor("x", x)
    if isinstance(A_stack, (list, tuple)):
        A_stack, num_slices = _cat_slices("A_stack", A_stack, num_slices)
    check_tensor("A_stack", A_stack, ndim=3)
    check_tensor("out", out, dtypes=(torch.float32, torch.float64))
    bad_type = not isinstance(num_slices, int) or isinstance(num_slices, bool)
    if bad_type or num_slices <= 0 or A_stack.shape[1] % num_slices:
        raise ValueError(
            f"num_slices={num_slices!r} must be a positive int dividing A_stack.shape[1] ({shape(A_stack)})"
        )
    L, SR, K = A_stack.shape
    if x.shape[-1] != K:
        raise ValueError(f"x must be [..., K={K}] to match A_stack {shape(A_stack)}, got {shape(x)}")
    x2 = x.reshape(-1, K)
    out2 = _view_2d("out", out, SR)
    if out2.shape[0] != x2.shape[0]:
        raise ValueError(f"out must have one row per token of x: out {shape(out)}, x {shape(x)}")
    ranks = _normalize_ranks(ranks, L, SR // num_slices, A_stack.device)
    check_same_device(x=x, A_stack=A_stack, out=out, ranks=ranks, batch=batch.token_slots)
    if check is None:
        check = not _in_graph_or_compile(x)
    if check:
        check_ids(batch, L, _rank_flags(ranks, SR // num_slices, "lora_shrink"), x2.shape[0], "lora_shrink")
    name = BACKENDS.resolve(backend, x2, A_stack, out, op="lora_shrink")
    _shrink_op(x2, A_stack, ranks, *batch.meta, out2, num_slices, step_tile_m(batch.tile_m, x2.shape[0]), name)
    return out


def lora_expand(
    xa: torch.Tensor,
    B_stack: torch.Tensor,
    batch: LoRABatch,
    y: torch.Tensor,
    scales,
    slices: Sequence[int] | None = None,
    ranks: torch.Tensor | None = None,
    backend: str | None = None,
    check: bool | None = None,
) -> torch.Tensor:
    """``y[m, slice i] += scales[slot_m, i] · xa[m, i·R : i·R+rank]·B_stack[slot_m, slice i, :rank]ᵀ`` in place;
    returns y.

    xa ``[..., S·R]`` float32 (the shrink output ``x·Aᵀ``); B_stack ``[L, N, R]`` (``AdapterPool.B_stack``: the
    per-slice B stacks concatenated along N; a list of per-slice ``[L, N_s, R]`` stacks is accepted, concatenated (a
    copy), and gives ``slices``); y ``[..., N]``; scales float32 ``[L]`` or ``[L, S]`` or a float; ``slices``: the
    widths ``N_0..N_{S-1}`` (sum N, at most ``MAX_SLICES`` = 4; default one slice of N); ranks as in
    :func:`lora_shrink`.
    """
    _check_batch(batch)
    check_tensor("xa", xa, dtypes=(torch.float32, torch.float64))
    if isinstance(B_stack, (list, tuple)):
        widths = [b.shape[1] if isinstance(b, torch.Tensor) and b.dim() == 3 else -1 for b in B_stack]
        if slices is not None and [int(n) for n in slices] != widths:
            raise ValueError(f"slices={list(slices)} differ from the widths of the B_stack list {widths}")
        B_stack, _ = _cat_slices("B_stack", B_stack, None)
        slices = widths
    check_tensor("B_stack", B_stack, ndim=3)
    check_tensor("y", y)
    L, N, R = B_stack.shape
    slices = [N] if slices is None else [int(n) for n in slices]
    if not 1 <= len(slices) <= MAX_SLICES or any(n <= 0 for n in slices) or sum(slices) != N:
        raise ValueError(f"slices={slices} must be 1 to {MAX_SLICES} positive widths summing to B_stack.shape[1]={N}")
    S = len(slices)
    if xa.shape[-1] != S * R:
        raise ValueError(f"xa must be [..., S·R={S * R}] (S={S} slices, R={R}), got {shape(xa)}")
    xa2 = xa.reshape(-1, S * R)
    y2 = _view_2d("y", y, N)
    if xa2.shape[0] != y2.shape[0]:
        raise ValueError(f"xa and y must have the same tokens: xa {shape(xa)}, y {shape(y)}")
    ranks = _normalize_ranks(ranks, L, R, B_stack.device)
    scales = _normalize_scales(scales, L, S, B_stack.device)
    check_same_device(xa=xa, B_stack=B_stack, y=y, ranks=ranks, scales=scales, batch=batch.token_slots)
    if check is None:
        check = not _in_graph_or_compile(y)
    if check:
        check_ids(batch, L, _rank_flags(ranks, R, "lora_expand"), y2.shape[0], "lora_expand")
    name = BACKENDS.resolve(backend, y2, xa2, B_stack, op="lora_expand")
    _expand_op(xa2, B_stack, ranks, scales, *batch.meta, y2, slices, step_tile_m(batch.tile_m, y2.shape[0]), name)
    return y


def validate_linear(x, weight, bias, pool: AdapterPool) -> None:
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
    if not isinstance(pool, AdapterPool):
        raise TypeError(f"pool must be an AdapterPool, got {type(pool).__name__}")
    N, K = pool.out_features, pool.in_features
    if weight.shape != (N, K):
        raise ValueError(f"weight must be [out_features={N}, in_features={K}] to match {pool!r}, got {shape(weight)}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must be [..., in_features={K}], got {shape(x)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {shape(bias)}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"x ({x.dtype}), weight ({weight.dtype}) and bias must share a dtype")
    if pool.dtype != x.dtype and pool.dtype != torch.float32:
        raise TypeError(f"the pool's dtype {pool.dtype} must be x's dtype {x.dtype} or float32")
    check_same_device(x=x, weight=weight, bias=bias, pool=pool.A_stack)


@torch.no_grad()
def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pool: AdapterPool,
    batch: LoRABatch,
    backend: str | None = None,
    check: bool | None = None,
    fused: bool | None = None,
    path: str | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` plus, for every token, the LoRA of its pool slot (none for -1).

    x ``[..., K]`` with one batch id per flattened row; weight ``[N, K]`` and bias ``[N]`` in x's dtype; the pool in
    x's dtype or float32. Returns ``[..., N]``. Runs under ``torch.no_grad()`` (inference). ``check`` as in
    :func:`lora_shrink`, against the pool's slots in use (loaded or reserved). ``path`` ("fused" | "split" |
    "gemm", default chosen by :func:`choose_path` from the token count and backend) or ``fused`` (True = "fused",
    False = "split") forces how the LoRA term is computed. On the Triton backend the gemm path is one launch for up
    to 64 tokens whose adapters are known to be few (``batch.step_adapters`` eagerly, ``batch.max_adapters_per_step``
    while capturing or compiling; docs/multi_lora.md, "One launch for few adapters"). The "gemm" path needs the
    batch prepared for exactly the rows of x (always checked: host ints, no sync); where it would be the default for
    a batch prepared for another token count, the split path runs. An eager call whose ids (given on the host) name
    no adapter runs only F.linear.
    """
    _check_batch(batch)
    validate_linear(x, weight, bias, pool)
    K, N = pool.in_features, pool.out_features
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    check_same_device(x=x, batch=batch.token_slots)
    traced = _in_graph_or_compile(x)
    if check is None:
        check = not traced
    if check:
        check_ids(batch, pool.max_adapters, pool.slots_in_use, M, "multi_lora_linear")
    name = BACKENDS.resolve(backend, x2, weight, pool.A_stack, op="multi_lora_linear")
    # The step's adapters, known from host ids (eager) or the batch's promise (a captured graph or compiled code
    # keeps its launch for later ids: only the promise holds for those).
    adapters = batch.max_adapters_per_step if traced else batch.step_adapters
    lanes = _lanes(M, pool, adapters) if name == "triton" and batch.num_tokens == M else 0
    tma = name == "triton" and _gemm_tma(x2, weight)
    heavy = tma and path is None and fused is None and not lanes and _heavy_epilogue(x2, pool, batch)
    # a heavy epilogue: the gemm path's side path or sorted row tiles where on (heavy_variant), else the split path
    sort_rows = heavy and _stays_on_gemm(M, N)
    chosen = choose_path(path, fused, M, name, tma=tma, lanes=lanes > 0, heavy_epilogue=heavy and not sort_rows)
    if chosen == "gemm" and path is None and batch.num_tokens != M:
        chosen = "split"  # a default never refuses a batch prepared for another token count (path="gemm" does)
    # Autocast off for the base too: the result is in x's dtype on every path, as the gemm op computes it (inside
    # torch.autocast the F.linear of the fused and split paths ran in the autocast dtype: a bf16 result there, an fp32
    # one on the gemm path). Cast x, weight and bias first for autocast-dtype math.
    with _autocast.autocast_off(x2):
        if not traced and batch.has_adapter is False:
            return F.linear(x2, weight, bias).reshape(*x.shape[:-1], N)
        slices = list(pool.slices)
        meta = batch.meta
        tile_m = step_tile_m(batch.tile_m, M)
        if chosen == "gemm":
            if batch.num_tokens != M:  # its row tiles walk sorted positions 0..M-1: they must be exactly the M tokens
                raise ValueError(
                    f"multi_lora_linear: the batch was prepared for {batch.num_tokens} tokens but the input "
                    f"has {M} rows; prepare one id per token (pad with -1)"
                )
            A, B = pool.A_stack, pool.B_stack
            y = _gemm_op(x2, weight, bias, A, B, pool.ranks, pool.scales, *meta, slices, tile_m, name, lanes, sort_rows)
            return y.reshape(*x.shape[:-1], N)
        y = F.linear(x2, weight, bias)
        if chosen == "fused":
            _fused_op(x2, pool.A_stack, pool.B_stack, pool.ranks, pool.scales, *meta, y, slices, tile_m, name)
        else:
            _split_op(x2, pool.A_stack, pool.B_stack, pool.ranks, pool.scales, *meta, y, slices, tile_m, name)
        return y.reshape(*x.shape[:-1], N)
