"""Loader and Python wrappers of the optional CUDA extension ``lora_kernels._C_lora`` (sources in ``csrc/``):
BGMV-style shrink (``xa = x·Aᵀ`` per token's adapter) and expand (``y += scale·xa·Bᵀ``) for decode-time serving.

Lazy: importing loads nothing and queries no device; :func:`cuda_ops_available` / :func:`cuda_ops_unavailable_reason`
load it on first call (``LORA_KERNELS_NO_CUDA_EXT=1`` disables it), else the ops use Triton. Links only the CUDA
runtime, so tensors travel as pointers, strides and codes. See docs/extension.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .ops._batch import BatchMeta, max_tiles
from .ops._validate import MAX_SLICES

MODULE_NAME = "lora_kernels._C_lora"
DISABLE_ENV = "LORA_KERNELS_NO_CUDA_EXT"

# Must match enum DType / IndexType in csrc/lora_cuda.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
INDEX_CODES = {torch.int32: 0, torch.int64: 1}
TILE_TOKENS = 8  # kTileTokens in csrc/lora_cuda.h (tokens per pass of the tiled kernels)

_lock = threading.Lock()
_state: dict = {}  # "module", "load_reason", "device_reason", "warned"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _reset() -> None:
    """Forget the cached load and device results (tests use it after changing the environment)."""
    with _lock:
        _state.clear()


def _load():
    """(module, None) or (None, reason). Cached; warns once when the module exists but cannot be imported."""
    with _lock:
        if "load_reason" in _state:
            return _state.get("module"), _state["load_reason"]
        module, reason = None, None
        if _truthy(os.environ.get(DISABLE_ENV)):
            reason = f"the CUDA extension is disabled by {DISABLE_ENV}=1"
        else:
            try:
                spec = importlib.util.find_spec(MODULE_NAME)
            except (ImportError, ValueError):
                spec = None
            if spec is None:
                reason = (
                    f"the CUDA extension {MODULE_NAME} is not built (install with a CUDA toolkit present, or run "
                    "`python setup.py build_ext --inplace`; see csrc/README.md)"
                )
            else:
                try:
                    module = importlib.import_module(MODULE_NAME)
                except Exception as exc:  # a broken build: undefined symbol, wrong Python, missing libstdc++ ...
                    reason = f"the CUDA extension {MODULE_NAME} failed to load: {type(exc).__name__}: {exc}"
                    if not _state.get("warned"):
                        _state["warned"] = True
                        warnings.warn(reason + "; using the Triton kernels instead", RuntimeWarning, stacklevel=3)
        _state["module"], _state["load_reason"] = module, reason
        return module, reason


def extension():
    """The loaded extension module, or raise RuntimeError with the reason it is unavailable (no device check)."""
    module, reason = _load()
    if module is None:
        raise RuntimeError(reason)
    return module


def device_count() -> int:
    """Number of CUDA devices as the extension's own runtime sees them; raises the extension's ``CudaError`` (a
    RuntimeError whose message starts with "no CUDA device") when there is no GPU or no driver."""
    return extension().device_count()


def cuda_ops_available() -> bool:
    """True when the CUDA kernels can run here (the extension is built, loads, and sees a CUDA device); the reason
    when they cannot is :func:`cuda_ops_unavailable_reason`. Cached after the first call."""
    return cuda_ops_unavailable_reason() is None


def cuda_ops_unavailable_reason() -> str | None:
    """None when the CUDA kernels can run here, else why not: disabled, not built, failed to load (warned once), or no
    CUDA device. Cached after the first call."""
    module, reason = _load()
    if reason:
        return reason
    with _lock:
        if "device_reason" not in _state:
            try:
                n = module.device_count()
                why = None if n > 0 else "no CUDA device (cudaGetDeviceCount returned 0)"
            except RuntimeError as exc:
                why = str(exc) if "no CUDA device" in str(exc) else f"no CUDA device: {exc}"
            _state["device_reason"] = why
        return _state["device_reason"]


# ---------------------------------------------------------------------------------------------------------- checks
def _dtype_code(name: str, t: torch.Tensor) -> int:
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        names = ", ".join(str(d).replace("torch.", "") for d in DTYPE_CODES)
        raise TypeError(f"{name} has dtype {t.dtype}; the CUDA kernels support {names}")
    return code


def _index_code(name: str, t: torch.Tensor) -> int:
    code = INDEX_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    return code


def _check_cuda(**tensors: torch.Tensor | None) -> int:
    """All given tensors on one CUDA device; returns its index."""
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    for n, d in devices.items():
        if d.type != "cuda":
            raise ValueError(f"{n} is on {d}; the CUDA kernels need CUDA tensors")
    if len(set(devices.values())) > 1:
        raise ValueError("all tensors must be on one device: " + ", ".join(f"{n} on {d}" for n, d in devices.items()))
    dev = next(iter(devices.values()))
    return dev.index if dev.index is not None else torch.cuda.current_device()


def _stream(device: int) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def multi_lora_reason(x: torch.Tensor, *tensors: torch.Tensor | None) -> str | None:
    """Checker for ``ops.multi_lora``: None when the CUDA kernels can serve these tensors, else why not."""
    why = cuda_ops_unavailable_reason()
    if why:
        return why
    for t in (x,) + tensors:
        if t is None:
            continue
        if t.device.type != "cuda":
            return f"a tensor is on {t.device}; the CUDA kernels need CUDA tensors"
        if t.is_floating_point() and t.dtype not in DTYPE_CODES:
            return f"dtype {t.dtype} is not supported by the CUDA kernels (float32, float16, bfloat16)"
    return None


# ------------------------------------------------------------------------------------------- raw shrink / expand
def bgmv_shrink(
    x: torch.Tensor,
    A_slices: Sequence[torch.Tensor],
    token_slots: torch.Tensor,
    out: torch.Tensor,
    ranks: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    tiles: TileList | None = None,
) -> torch.Tensor:
    """``out[i, m, j] = scales[id, i] · x[m]·A_i[id, j]`` for ``j < ranks[id]``, 0 for the other ``j < R`` and for
    tokens whose ``id = token_slots[m]`` is -1, out of ``[0, L)`` or of rank 0 (nothing read for those).

    x ``[M, K]``; ``A_slices``: 1..MAX_SLICES (4) tensors ``[L, R, K]`` of x's dtype (any strides, e.g. views of one
    stack); token_slots ``[>= M]`` int32/int64; out ``[S, M, R]`` fp32/fp16/bf16 (any strides: a ``[M, S·R]`` buffer
    viewed as ``[S, M, R]`` works); ranks ``[L]`` int32/int64 (None: every slot has rank R); scales ``[L, S]`` fp32
    or None.
    ``tiles``: a :class:`TileList` selects the tiled kernel (A read once per pass of up to 8 same-adapter tokens);
    it writes only tokens of valid slots, so ``out`` is zeroed here first.
    """
    if not 1 <= len(A_slices) <= MAX_SLICES:
        raise ValueError(f"A_slices must hold 1..{MAX_SLICES} tensors, got {len(A_slices)}")
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got {tuple(x.shape)}")
    M, K = x.shape
    a0 = A_slices[0]
    if a0.dim() != 3 or a0.shape[2] != K:
        raise ValueError(f"A_slices[0] must be [L, R, K={K}], got {tuple(a0.shape)}")
    L, R, _ = a0.shape
    S = len(A_slices)
    for i, a in enumerate(A_slices):
        if a.shape != a0.shape or a.dtype != x.dtype:
            raise ValueError(
                f"A_slices[{i}] must be {tuple(a0.shape)} {x.dtype} like A_slices[0] and x, got {tuple(a.shape)} "
                f"{a.dtype}"
            )
    if out.shape != (S, M, R):
        raise ValueError(f"out must be [S={S}, M={M}, R={R}], got {tuple(out.shape)}")
    _check_ids(token_slots, M, ranks, L, scales, S)
    device = _check_cuda(
        x=x,
        out=out,
        token_slots=token_slots,
        ranks=ranks,
        scales=scales,
        **{f"A_slices[{i}]": a for i, a in enumerate(A_slices)},
    )
    dtype = _dtype_code("x", x)
    out_dtype = _dtype_code("out", out)
    tile_kw = _tile_kwargs(tiles, M)
    if tiles is not None:
        out.zero_()
    extension().shrink(
        x=x.data_ptr(),
        x_strides=tuple(x.stride()),
        M=M,
        K=K,
        dtype=dtype,
        a_slices=[(a.data_ptr(), *a.stride()) for a in A_slices],
        L=L,
        r_max=R,
        out=out.data_ptr(),
        out_strides=tuple(out.stride()),
        out_dtype=out_dtype,
        **_slot_kwargs(token_slots, ranks, scales, device),
        **tile_kw,
    )
    return out


def bgmv_expand(
    buf: torch.Tensor,
    B_slices: Sequence[torch.Tensor],
    token_slots: torch.Tensor,
    y: torch.Tensor,
    y_offsets: Sequence[int] | None = None,
    ranks: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    tiles: TileList | None = None,
) -> torch.Tensor:
    """``y[m, off_i + n] += scales[id, i] · buf[i, m, :rank]·B_i[id, n, :rank]`` in place for every slice i; tokens
    whose id is -1, out of ``[0, L)`` or of rank 0 are left untouched.

    buf ``[S, M, R]`` fp32/fp16/bf16 (any strides): the shrink output xa, per slice; ``B_slices``: S tensors
    ``[L, N_i, R]`` of y's dtype (any strides); y ``[M, N]``; ``y_offsets``: first column of each slice in y
    (default: consecutive from 0); the slices must not overlap. ranks, scales, tiles as in :func:`bgmv_shrink`.
    """
    if not 1 <= len(B_slices) <= MAX_SLICES:
        raise ValueError(f"B_slices must hold 1..{MAX_SLICES} tensors, got {len(B_slices)}")
    if y.dim() != 2 or buf.dim() != 3:
        raise ValueError(f"y must be [M, N] and buf [S, M, R], got y {tuple(y.shape)}, buf {tuple(buf.shape)}")
    M, N = y.shape
    S = len(B_slices)
    b0 = B_slices[0]
    if b0.dim() != 3:
        raise ValueError(f"B_slices[0] must be [L, N_0, R], got {tuple(b0.shape)}")
    L, _, R = b0.shape
    if buf.shape != (S, M, R):
        raise ValueError(f"buf must be [S={S}, M={M}, R={R}], got {tuple(buf.shape)}")
    widths = []
    for i, b in enumerate(B_slices):
        if b.dim() != 3 or b.shape[0] != L or b.shape[2] != R or b.dtype != y.dtype:
            raise ValueError(
                f"B_slices[{i}] must be [L={L}, N_{i}, R={R}] of y's dtype {y.dtype}, got {tuple(b.shape)} {b.dtype}"
            )
        widths.append(b.shape[1])
    if y_offsets is None:
        y_offsets = [sum(widths[:i]) for i in range(S)]
    y_offsets = [int(o) for o in y_offsets]
    if len(y_offsets) != S:
        raise ValueError(f"y_offsets must have one entry per slice ({S}), got {y_offsets}")
    spans = sorted(zip(y_offsets, widths))
    for o, w in spans:
        if o < 0 or o + w > N:
            raise ValueError(f"slice columns [{o}, {o + w}) fall outside y's {N} columns")
    for (o1, w1), (o2, _) in zip(spans, spans[1:]):
        if o1 + w1 > o2:
            raise ValueError(f"output slices overlap: y_offsets={y_offsets}, widths={widths}")
    _check_ids(token_slots, M, ranks, L, scales, S)
    device = _check_cuda(
        buf=buf,
        y=y,
        token_slots=token_slots,
        ranks=ranks,
        scales=scales,
        **{f"B_slices[{i}]": b for i, b in enumerate(B_slices)},
    )
    extension().expand(
        buf=buf.data_ptr(),
        buf_strides=tuple(buf.stride()),
        buf_dtype=_dtype_code("buf", buf),
        M=M,
        r_max=R,
        b_slices=[(b.data_ptr(), *b.stride(), w, o) for b, w, o in zip(B_slices, widths, y_offsets)],
        y=y.data_ptr(),
        y_strides=tuple(y.stride()),
        dtype=_dtype_code("y", y),
        L=L,
        **_slot_kwargs(token_slots, ranks, scales, device),
        **_tile_kwargs(tiles, M),
    )
    return y


class TileList(NamedTuple):
    """A :class:`lora_kernels.LoRABatch` work list: ``sorted_tokens``, ``sorted_slots``, ``tile_starts`` (int32,
    on the tensors' device), ``num_tiles`` (grid bound: tiles past the last one are -1 and skipped), ``tile_m``."""

    sorted_tokens: torch.Tensor
    sorted_slots: torch.Tensor
    tile_starts: torch.Tensor
    num_tiles: int
    tile_m: int


def _tile_kwargs(tiles: TileList | None, M: int) -> dict:
    if tiles is None:
        return {}
    st, ss, ts = tiles.sorted_tokens, tiles.sorted_slots, tiles.tile_starts
    for name, t in (("sorted_tokens", st), ("sorted_slots", ss), ("tile_starts", ts)):
        if t.dtype != torch.int32 or t.dim() != 1 or (t.numel() > 1 and t.stride(0) != 1):
            raise ValueError(f"tiles.{name} must be a contiguous 1-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    cap = st.shape[0]
    if ss.shape[0] != cap or ts.shape[0] < min(tiles.num_tiles, cap):
        raise ValueError(
            f"tile list sizes disagree: sorted_tokens {cap}, sorted_slots {ss.shape[0]}, "
            f"tile_starts {ts.shape[0]}, num_tiles {tiles.num_tiles}"
        )
    num_tiles = max(0, min(int(tiles.num_tiles), ts.shape[0]))
    if int(tiles.tile_m) < 1:
        raise ValueError(f"tile_m must be positive, got {tiles.tile_m}")
    _check_cuda(sorted_tokens=st, sorted_slots=ss, tile_starts=ts)
    return {
        "sorted_tokens": st.data_ptr(),
        "sorted_slots": ss.data_ptr(),
        "tile_starts": ts.data_ptr(),
        "cap": cap,
        "num_tiles": num_tiles,
        "tile_m": int(tiles.tile_m),
    }


def _slot_kwargs(
    token_slots: torch.Tensor, ranks: torch.Tensor | None, scales: torch.Tensor | None, device: int
) -> dict:
    """The per-slot arguments both extension calls take: ids, ranks and scales (pointer, strides, index type), and the
    device and its current stream."""
    return {
        "ids": token_slots.data_ptr(),
        "stride_id": token_slots.stride(0),
        "ids_type": _index_code("token_slots", token_slots),
        "ranks": _ptr(ranks),
        "ranks_type": _index_code("ranks", ranks) if ranks is not None else 0,
        "scales": _ptr(scales),
        "scale_strides": tuple(scales.stride()) if scales is not None else (0, 0),
        "device": device,
        "stream": _stream(device),
    }


def _check_ids(
    token_slots: torch.Tensor, M: int, ranks: torch.Tensor | None, L: int, scales: torch.Tensor | None, S: int
) -> None:
    if token_slots.dim() != 1 or token_slots.shape[0] < M:
        raise ValueError(f"token_slots must be 1-D with at least M={M} entries, got {tuple(token_slots.shape)}")
    _index_code("token_slots", token_slots)
    if ranks is not None:
        if ranks.shape != (L,):
            raise ValueError(f"ranks must be [L={L}], got {tuple(ranks.shape)}")
        _index_code("ranks", ranks)
    if scales is not None and (scales.shape != (L, S) or scales.dtype != torch.float32):
        raise ValueError(f"scales must be [L={L}, S={S}] float32, got {tuple(scales.shape)} {scales.dtype}")


# ------------------------------------------------------------------------------ the backend of ops.multi_lora
def _a_slices(A_stack: torch.Tensor, num_slices: int):
    R = A_stack.shape[1] // num_slices
    return [A_stack[:, i * R : (i + 1) * R] for i in range(num_slices)], R


def _b_slices(B_stack: torch.Tensor, slices: Sequence[int]):
    offs = [0]
    for n in slices:
        offs.append(offs[-1] + int(n))
    return [B_stack[:, offs[i] : offs[i + 1]] for i in range(len(slices))], offs[:-1]


def _as_slices_view(xa: torch.Tensor, num_slices: int) -> torch.Tensor:
    """``[M, S·R]`` → the ``[S, M, R]`` view the kernels index (no copy)."""
    M, SR = xa.shape
    R = SR // num_slices
    return xa.as_strided((num_slices, M, R), (R * xa.stride(1), xa.stride(0), xa.stride(1)), xa.storage_offset())


# Per-token or tiled kernels. The tiled ones read each adapter's weights once per pass of up to 8 of its tokens, at
# the price of walking the work list and zeroing the shrink output; they can only win when adapters repeat. Chosen
# when there are at least this many tokens per pool slot on average (M >= this * L): a guess, NOT yet measured on a
# GPU (csrc/bench_bgmv.py times both per shape; benchmarks/bench_multi_lora.py, provider lk_cuda, the whole layer).
TILED_MIN_TOKENS_PER_SLOT = 2.0
_TILE_SMEM_LIMIT = 48 * 1024  # bytes of dynamic shared memory the tiled expand may use without opting in


def _tiles_for(M: int, L: int, R: int, meta: BatchMeta, tile_m: int) -> TileList | None:
    if meta.sorted_tokens is None or meta.sorted_slots is None or meta.tile_starts is None or M == 0:
        return None
    if M < TILED_MIN_TOKENS_PER_SLOT * L or R * 4 * TILE_TOKENS > _TILE_SMEM_LIMIT:
        return None
    bound = max_tiles(M, L, tile_m, meta.sorted_tokens.shape[0])  # the Triton launchers' grid bound
    return TileList(meta.sorted_tokens, meta.sorted_slots, meta.tile_starts, bound, int(tile_m))


def multi_lora_shrink(
    x: torch.Tensor,
    A_stack: torch.Tensor,
    ranks: torch.Tensor,
    meta: BatchMeta,
    out: torch.Tensor,
    num_slices: int,
    tile_m: int,
) -> torch.Tensor:
    """``out[M, S·R]`` ← per-token ``xa = x·Aᵀ`` at the adapter's own rank, zeros elsewhere (signature of the Triton
    launcher). Per-token kernel, or the tiled one over the batch's work list when adapters repeat enough."""
    if x.dtype != A_stack.dtype:
        # The kernel reads x and A in one dtype. Widen whichever is narrower (exact): x for a float32 pool with half
        # activations (cheap: M×K), the pool for float32 activations with a half pool (rare: a copy of A).
        if A_stack.dtype == torch.float32:
            x = x.to(torch.float32)
        else:
            A_stack = A_stack.to(torch.float32)
            x = x.to(torch.float32)
    A_list, R = _a_slices(A_stack, num_slices)
    tiles = _tiles_for(x.shape[0], A_stack.shape[0], R, meta, tile_m)
    bgmv_shrink(x, A_list, meta.token_slots, _as_slices_view(out, num_slices), ranks=ranks, tiles=tiles)
    return out


def multi_lora_expand(
    xa: torch.Tensor,
    B_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: BatchMeta,
    y: torch.Tensor,
    slices: Sequence[int],
    tile_m: int,
) -> torch.Tensor:
    """``y[M, N] += scale · xa·Bᵀ`` per token's adapter and output slice, in place (signature of the Triton
    launcher)."""
    S = len(slices)
    B_list, offs = _b_slices(B_stack, slices)
    target = y
    if y.dtype != B_stack.dtype:
        # The kernel adds in B's dtype. Mixed dtypes go through float32 (exact widening, one rounding into y, as the
        # reference): y widened for a float32 pool with half activations, B widened for a half pool with float32 y.
        target = y.to(torch.float32)
        if B_stack.dtype != torch.float32:
            B_list = [b.to(torch.float32) for b in B_list]
    tiles = _tiles_for(y.shape[0], B_stack.shape[0], B_stack.shape[2], meta, tile_m)
    bgmv_expand(_as_slices_view(xa, S), B_list, meta.token_slots, target, offs, ranks=ranks, scales=scales, tiles=tiles)
    if target is not y:
        y.copy_(target)
    return y


def multi_lora_fused(
    x: torch.Tensor,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: BatchMeta,
    y: torch.Tensor,
    slices: Sequence[int],
    tile_m: int,
) -> torch.Tensor:
    """Shrink then expand (two launches through an fp32 xa buffer of ``M × S·R``: a few KiB at decode sizes)."""
    S = len(slices)
    R = B_stack.shape[2]
    xa = torch.empty(x.shape[0], S * R, dtype=torch.float32, device=x.device)
    multi_lora_shrink(x, A_stack, ranks, meta, xa, S, tile_m)
    return multi_lora_expand(xa, B_stack, ranks, scales, meta, y, slices, tile_m)


def _info() -> tuple[str | None, dict]:
    """(availability reason, build facts) for bug reports and the benchmark's header."""
    module, _ = _load()
    facts = {}
    if module is not None:
        facts = {
            "cuda_archs": module.CUDA_ARCHS,
            "runtime_version": module.runtime_version(),
            "driver_version": module.driver_version(),
        }
    return cuda_ops_unavailable_reason(), facts
