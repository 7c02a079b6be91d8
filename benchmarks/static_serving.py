"""Static launch model of the multi-adapter serving ops: per point of BENCHMARKS.md's multi-adapter grid, the launches
``multi_lora_linear`` makes on each path, with kernel name, grid, tile configuration, DRAM bytes read and written and
FLOPs, computed from the launchers' own configuration functions (no GPU, no kernel run).

Byte model ("compulsory" traffic): every distinct byte a launch touches crosses HBM once per launch (L2 catches the
re-reads of one launch: A/B of an adapter read by several tiles, x read by several output blocks). ``l2_read`` adds
those re-reads (what the programs request), an upper bound of the L2 traffic. FLOPs are those the MMA tiles issue
(masked rows and the rank padding to BLOCK_R included); ``useful_flops`` counts only the real products.

    from benchmarks.static_serving import grid_launches
    for point in grid_launches():            # 24 points: dist x L x T, K = N = 4096, r = 16, bf16
        print(point["dist"], point["L"], point["T"], point["chosen"], len(point["paths"][point["chosen"]]))

``predict_us`` turns a launch list into a rough time (max of bytes/bandwidth and flops/peak per launch, plus a fixed
cost per launch; a programmatic dependent launch overlaps the one before it); the ceilings default to the H100
numbers BENCHMARKS.md records (2.96 TB/s copy, 732 TFLOP/s bf16). :func:`report` is the serving section of
``benchmarks/static_report.py``: these models joined with the launches the real launchers make (recorded on meta
tensors) and the sm_90 machine code of every distinct kernel configuration.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton

from lora_kernels.ops import multi_lora as ops
from lora_kernels.ops._batch import BatchMeta, max_tiles
from lora_kernels.pool import auto_tile_m, mean_tile_adapters
from lora_kernels.triton import _utils as U
from lora_kernels.triton import multi_lora as ML

# The multi-adapter grid of BENCHMARKS.md / benchmarks/bench_multi_lora.py.
DISTS = ("uniform", "mix")
ADAPTERS = (16, 128)
TOKENS = (1, 16, 64, 256, 1024, 4096)
K_DEFAULT = N_DEFAULT = 4096
RANK = 16

H100_SMS = 132
H100_SMEM = 227 * 1024
COPY_BW = 2.96e12  # bytes/s, device-to-device copy (read + write)
PEAK_FLOPS = 732e12  # bf16 dense
LAUNCH_US = 2.0  # assumed cost of one extra kernel node in a CUDA graph (not measured here)
# Assumed cost of the gemm path's GEMM node, launched as a programmatic dependent of its shrink: the same as any other
# node until measured. PDL lets the GEMM's launch be processed while the shrink runs, so it may cost less; the `mix`
# points at 256 tokens meet the goal at <= 1.8 / 1.9 us (calibrate_serving.py --assumed), so it is a constant of its
# own, fitted apart from LAUNCH_US (from lk_gemm against lk_gemm_serial) by benchmarks/calibrate_serving.py.
PDL_LAUNCH_US = LAUNCH_US
# The paths the model prices: multi_lora_linear's, "sorted" (the gemm path with sorted row tiles, x read by TMA
# from the shrink's sorted copy: what a heavy-epilogue step runs with triton.multi_lora.SORTED_GATHER and SIDE_TERM
# off), "joined" (the gemm path's TMA step in one launch, triton.multi_lora.JOINED: opt-in) and "side" (the LoRA term
# whole into an fp32 buffer beside the TMA GEMM, which adds it in its epilogue: what a heavy-epilogue step runs with
# triton.multi_lora.SIDE_TERM).
MODEL_PATHS = (*ops.PATHS, "sorted", "joined", "side")
# The Triton GEMMs of the serving ops (a base GEMM: charged by the machine code they compile to, as the training report
# charges its GEMMs); every other Triton kernel of the model is a skinny one (small LoRA dots).
TRITON_GEMMS = (
    "_gemm_expand_kernel",
    "_gemm_tma_expand_kernel",
    "_gemm_lanes_kernel",
    "_gemm_tma_joined_kernel",
    "_decode_kernel",
    "_fwd_tma_kernel",
)


def card():
    """The training report's H100 card (``benchmarks.card.CARD``, which ``benchmarks/static_report.py`` uses): one
    source for the assumed rates of Triton kernels against cuBLAS in both reports. Reading it imports no triton."""
    from benchmarks.card import CARD

    return CARD


def guess_machine_code(config: dict, kernel: str = "") -> str:
    """What a Triton GEMM tile compiles to on sm_90 without compiling it: wgmma for tiles of >= 64 rows on whole
    warpgroups (4 warps each), fed by TMA in the TMA kernels (``_fwd_tma_kernel``), mma.sync otherwise (what the
    compiled serving kernels show: the report replaces the guess by the compiled machine code, and its test checks
    that they agree)."""
    if config["BLOCK_M"] >= 64 and config["num_warps"] % 4 == 0:
        return "tma" if "_tma_" in kernel or config.get("X_SORTED") else "wgmma"
    return "mma.sync"


def compute_rate(ln: dict, c=None) -> float:
    """FLOP/s a launch's FLOPs are charged at, as the training report (benchmarks/static_report.py, ``predict_us``)
    charges its launches: cuBLAS (torch ops) at the measured ``cublas_flops``; a Triton GEMM at that rate divided by
    the card's slowdown for its machine code (TMA + wgmma, wgmma: 1.35x, mma.sync: 2.7x); other Triton kernels (skinny
    LoRA dots) at half the dense TF32 peak."""
    c = c or card()
    if not ln["kernel"].startswith("_"):
        return c.cublas_flops
    if ln["kernel"] not in TRITON_GEMMS:
        return c.peak_tf32_flops * 0.5
    return c.gemm_rate(ln.get("machine_code") or guess_machine_code(ln["config"], ln["kernel"]))


def compute_s(ln: dict, rate: float, c=None) -> float:
    """Seconds of MMA work of a launch at ``rate`` FLOP/s: its ``tf32_flops`` (the LoRA epilogue dots on fp32
    operands, which compile to TF32 MMA: ``HGMMA.*.TF32`` in the sm_90 SASS) at the card's TF32 / BF16 peak ratio of
    that rate (one half on an H100), the rest at ``rate``."""
    return (c or card()).mma_seconds(ln["flops"], ln.get("tf32_flops", 0), rate)


def _ids(dist: str, L: int, T: int, seed: int) -> torch.Tensor:
    from benchmarks.bench_multi_lora import point_ids

    return point_ids(dist, L, T, seed)


def adapter_bound(dist: str, L: int, T: int) -> int:
    """The ``max_adapters_per_step`` the benchmark prepares its batches with (``bench_multi_lora.adapter_bound``)."""
    from benchmarks.bench_multi_lora import adapter_bound as bound

    return bound(dist, L, T)


def _launch(kernel, grid, config, read, written, flops, useful, l2_read=None, tf32_flops=0) -> dict:
    return {
        "kernel": kernel,
        "grid": tuple(int(g) for g in grid),
        "config": config,
        "bytes_read": int(read),
        "bytes_written": int(written),
        "l2_read": int(l2_read if l2_read is not None else read),
        "flops": int(flops),
        "useful_flops": int(useful),
        "tf32_flops": int(tf32_flops),
    }


def base_launch(T: int, K: int = K_DEFAULT, N: int = N_DEFAULT, elt: int = 2) -> dict:
    """The cuBLAS base ``F.linear`` of T tokens as a launch of the model: W0 and x read, y written."""
    flops = 2 * T * K * N
    return _launch("cublas_gemm (F.linear)", (0,), {}, (N * K + T * K) * elt, T * N * elt, flops, flops)


def launches(
    ids: torch.Tensor,
    L: int,
    K: int = K_DEFAULT,
    slices: Sequence[int] = (N_DEFAULT,),
    R: int = RANK,
    elt: int = 2,
    path: str | None = None,
    capacity: int | None = None,
    sm_count: int = H100_SMS,
    smem: int = H100_SMEM,
    pdl: bool = True,
    tma: bool = True,
    adapters: int | None = None,
) -> list[dict]:
    """The launches of one ``multi_lora_linear`` call (Triton backend) for token ids ``ids`` (slot per token, -1 =
    none) on a pool of L slots with every slot loaded at rank R, activations/weights/pool of ``elt`` bytes.
    ``path``: "fused" | "split" | "gemm" (default: the one :func:`lora_kernels.ops.multi_lora.choose_path` picks),
    or "sorted": the gemm path with sorted row tiles that a heavy-epilogue step takes with ``ML.SIDE_TERM`` off
    (``ML.SORTED_GATHER``: the shrink also writes x's rows in the sorted order, the GEMM waits for it and reads them
    by TMA), or "side": what it takes with ``ML.SIDE_TERM`` (:func:`_side_launches`), or "joined": the gemm path's TMA
    step in one launch (``ML.JOINED``; where it does not apply, the gemm path as chosen);
    ``capacity``: the batch's max_tokens (default the step's token count, as the benchmark prepares it); ``pdl``:
    the gemm path launches its GEMM as a programmatic dependent of its shrink (``ML.pdl_ok``: sm_90, as the H100
    this models), marked ``overlaps_previous``; ``tma``: the card has TMA (the H100), so above
    ``GEMM_TMA_MIN_TOKENS`` 16-bit tokens the gemm path's GEMM is ``_gemm_tma_expand_kernel`` (rows in the batch's
    own order) and the gemm path is the default there; ``adapters``: the batch's ``max_adapters_per_step`` promise
    (None: none), which makes the gemm path one launch (``_gemm_lanes_kernel``) where ``ML.lanes_for`` allows."""
    ids = ids.to(torch.int64).flatten()
    T = ids.numel()
    N = sum(int(n) for n in slices)
    S = len(slices)
    tma = tma and T > ML.GEMM_TMA_MIN_TOKENS and elt < 4
    lanes = ML.lanes_for(T, R, adapters)
    heavy = path is None and tma and not lanes and _heavy_epilogue(ids, L, K, slices, R, elt, smem, sm_count)
    variant = ML.heavy_variant(T, N)
    side = tma and ((heavy and variant == "side") or path == "side")
    sort_rows = tma and not side and ((heavy and variant == "sorted") or path == "sorted")
    forced = path == "joined"
    if path in ("sorted", "joined", "side"):
        path, lanes = "gemm", 0
    stays = sort_rows or side  # a heavy step that stays on the gemm path
    path = ops.choose_path(path, None, T, "triton", tma=tma, lanes=lanes > 0, heavy_epilogue=heavy and not stays)
    cap = capacity or T
    tile_m = ops.step_tile_m(auto_tile_m(cap), T)
    joined = not lanes and _joined_grid(T, L, slices, R, tile_m, cap, elt, tma, stays, forced, smem, sm_count)
    counts = Counter(int(i) for i in ids.tolist() if 0 <= i < L)
    active = len(counts)
    t_ad = sum(counts.values())  # tokens with an adapter
    real_tiles = sum(triton.cdiv(c, tile_m) for c in counts.values())
    br = U.block_r(R)
    a_bytes = active * S * R * K * elt
    b_bytes = active * N * R * elt
    useful_lora = 2 * t_ad * R * (S * K + N)
    base_flops = 2 * T * K * N
    out = []
    if path in ("fused", "split"):
        out.append(base_launch(T, K, N, elt))
    if path == "fused":
        block_n, block_k, stages = ML.fused_config(tile_m, R, elt, elt, elt, False, lambda: smem)
        blocks = ML._out_blocks(slices, block_n)
        grid = (max_tiles(T, L, tile_m, cap), blocks)
        # every output block of a tile recomputes the tile's shrink for its slice over the full K
        shrink_flops = real_tiles * blocks * 2 * tile_m * br * K
        expand_flops = real_tiles * 2 * tile_m * br * N
        l2 = real_tiles * blocks * (tile_m * K + br * K) * elt + real_tiles * (br * N + 2 * tile_m * N) * elt
        out.append(
            _launch(
                "_fused_kernel",
                grid,
                {
                    "BLOCK_M": tile_m,
                    "BLOCK_N": block_n,
                    "BLOCK_K": block_k,
                    "BLOCK_R": br,
                    "num_warps": 4,
                    "num_stages": stages,
                },
                t_ad * K * elt + a_bytes + b_bytes + t_ad * N * elt,
                t_ad * N * elt,
                shrink_flops + expand_flops,
                useful_lora,
                l2,
            )
        )
        return out
    # the gemm path's shrink beside an 8-warp TMA GEMM (PDL overlap) takes narrower K blocks, as linear_gemm does
    narrow = (
        path == "gemm"
        and not lanes
        and pdl
        and tma
        and not sort_rows
        and ML.gemm_tma_config(T, slices, elt, R, False, lambda: smem, lambda: sm_count)[3] == 8
    )
    n_tiles, block_k, stages, split = ML.shrink_config(
        T, K, L, R, S, tile_m, cap, elt, elt, False, lambda: smem, lambda: sm_count, narrow
    )
    shrink_cfg = {
        "BLOCK_M": tile_m,
        "BLOCK_R": br,
        "BLOCK_K": block_k,
        "SPLIT_K": split,
        "num_warps": 4,
        "num_stages": stages,
    }
    shrink_flops = real_tiles * S * 2 * tile_m * br * K
    shrink_useful = 2 * t_ad * R * S * K
    shrink_read = t_ad * K * elt + a_bytes
    shrink_l2 = real_tiles * S * (tile_m * K + br * K) * elt
    if path == "split":
        # shrink into per-split partials (no zero-fill launch, no atomics), then the expand sums the partials of its
        # rows (only rows of loaded adapters: split · t_ad · S·R fp32) and read-modify-writes those rows of y
        out.append(
            _launch(
                "_batched_shrink_kernel",
                (n_tiles, S, split),
                dict(shrink_cfg, ATOMIC=False, PDL=False),
                shrink_read,
                split * t_ad * S * R * 4,
                shrink_flops,
                shrink_useful,
                shrink_l2,
            )
        )
        block_n = ML.expand_block_n(False)
        blocks = ML._out_blocks(slices, block_n)
        out.append(
            _launch(
                "_expand_kernel",
                (max_tiles(T, L, tile_m, cap), blocks),
                {"BLOCK_M": tile_m, "BLOCK_R": br, "BLOCK_N": block_n, "NUM_SPLITS": split, "num_warps": 4},
                split * t_ad * S * R * 4 + b_bytes + t_ad * N * elt,
                t_ad * N * elt,
                real_tiles * 2 * tile_m * br * N,
                2 * t_ad * R * N,
                real_tiles * blocks * split * tile_m * br * 4 + real_tiles * (br * N + tile_m * N) * elt,
            )
        )
        return out
    if lanes:
        return [_lanes_launch(ids, L, K, slices, R, elt, lanes, smem, a_bytes, b_bytes, t_ad)]
    if side:
        return _side_launches(ids, L, K, slices, R, elt, cap, tile_m, pdl, a_bytes, b_bytes, t_ad, smem, sm_count)
    if joined:
        shrink_k = ML.shrink_config(T, K, L, R, S, tile_m, cap, elt, elt, False, lambda: smem, lambda: sm_count)[1]
        return [
            _joined_launch(
                ids, L, K, slices, R, elt, a_bytes, b_bytes, t_ad, tile_m, joined, shrink_k, shrink_flops, shrink_l2
            )
        ]
    # gemm: shrink into per-split partials, then the base GEMM with the expand in its epilogue. With sort_rows the
    # shrink also writes the rows of the tokens with an adapter to the sorted copy of x (GATHER), and the GEMM waits
    # for it before its K loop (no overlap; PDL still hides the launch).
    out.append(
        _launch(
            "_batched_shrink_kernel",
            (n_tiles, S, split),
            dict(shrink_cfg, ATOMIC=False, PDL=pdl, **({"GATHER": True} if sort_rows else {})),
            shrink_read,
            split * t_ad * S * R * 4 + (t_ad * K * elt if sort_rows else 0),
            shrink_flops,
            shrink_useful,
            shrink_l2,
        )
    )
    # _gemm_expand_kernel with W0 by TMA on the TMA kernel's tiles (x by row pointers, or by TMA from the sorted copy)
    w_tma = tma and (ML.SORTED_TMA_GEMM or sort_rows)
    if tma and not w_tma:
        bm, bn, bk, warps, gstages = ML.gemm_tma_config(T, slices, elt, R, False, lambda: smem, lambda: sm_count)
        order = range(T)  # row tiles of the batch's own order
        kernel = "_gemm_tma_expand_kernel"
    else:
        if w_tma:
            bm, bn, bk, warps, gstages = ML.gemm_tma_config(
                T, slices, elt, R, False, lambda: smem, lambda: sm_count, sort_rows
            )
        else:
            bm, bn, bk, warps, gstages = ML.gemm_config(T, elt, elt, R, False, lambda: smem)
        # row tiles of the sorted token list
        order = sorted(range(T), key=lambda i: (ids[i].item() if 0 <= ids[i].item() < L else 1 << 31, i))
        kernel = "_gemm_expand_kernel"
    blocks = ML._out_blocks(slices, bn)
    m_tiles = triton.cdiv(T, bm)
    segs = sum(_row_tile_adapters(ids, L, bm, order))  # one epilogue dot each
    epi_flops = segs * blocks * 2 * bm * br * bn
    read = (N * K + T * K) * elt + split * t_ad * S * R * 4 + b_bytes
    l2 = m_tiles * blocks * (bm + bn) * K * elt + segs * blocks * (split * bm * br * 4 + br * bn * elt)
    out.append(
        _launch(
            kernel,
            (m_tiles, blocks),
            {
                "BLOCK_M": bm,
                "BLOCK_N": bn,
                "BLOCK_K": bk,
                "BLOCK_R": br,
                "NUM_SPLITS": split,
                "PDL": pdl,
                **({"W_TMA": True} if w_tma else {}),
                **({"X_SORTED": True} if sort_rows else {}),
                "num_warps": warps,
                "num_stages": gstages,
            },
            read,
            T * N * elt,
            m_tiles * bm * 2 * K * N + epi_flops,
            base_flops + 2 * t_ad * R * N,
            l2,
            epi_flops,
        )
    )
    out[-1]["overlaps_previous"] = pdl and not sort_rows
    out[-1]["pdl_launch"] = pdl  # launched as a programmatic dependent of the shrink (costs PDL_LAUNCH_US)
    if tma and not w_tma:
        out[-1]["waves"] = _tma_waves(m_tiles * blocks, (bm, bn, bk, warps, gstages), R, elt, smem, sm_count)
    return out


def _side_launches(ids, L, K, slices, R, elt, cap, tile_m, pdl, a_bytes, b_bytes, t_ad, smem, sm_count) -> list[dict]:
    """The side path (``ML.SIDE_TERM``): ``_lora_side_kernel`` (each work item: its tile's x rows and A over the whole
    K, recomputed by every column part of the tile from L2, then B over its part's columns; the LoRA term of the
    tokens with an adapter written in fp32), then the TMA GEMM in the ids' own order, its programmatic dependent, which
    adds the fp32 buffer in its epilogue (one TMA load per tile: every row of it, 4 bytes per output element) and no
    dot per adapter. The GEMM overlaps the side kernel (their bytes and their compute summed) where a program of each
    fits on one SM (the report checks it on the compiled kernels)."""
    T = ids.numel()
    N = sum(int(n) for n in slices)
    S = len(slices)
    br = U.block_r(R)
    counts = Counter(int(i) for i in ids.tolist() if 0 <= i < L)
    real_tiles = sum(triton.cdiv(c, tile_m) for c in counts.values()) * S
    block_k, block_n, stages, parts, items, programs = ML.side_config(
        T, L, slices, tile_m, cap, False, lambda: sm_count
    )
    side = _launch(
        "_lora_side_kernel",
        (programs,),
        {
            "BLOCK_M": tile_m,
            "BLOCK_R": br,
            "BLOCK_K": block_k,
            "BLOCK_N": block_n,
            "PDL": pdl,
            "num_warps": 4,
            "num_stages": stages,
        },
        t_ad * K * elt + a_bytes + b_bytes,
        t_ad * N * 4,
        real_tiles * parts * 2 * tile_m * br * K + real_tiles * 2 * tile_m * br * N // S,
        2 * t_ad * R * (S * K + N),
        real_tiles * parts * (tile_m + br) * K * elt + real_tiles * br * (N // S) * elt,
    )
    bm, bn, bk, warps, gstages = ML.gemm_tma_config(T, slices, elt, R, False, lambda: smem, lambda: sm_count)
    blocks = ML._out_blocks(slices, bn)
    m_tiles = triton.cdiv(T, bm)
    gemm = _launch(
        "_gemm_tma_expand_kernel",
        (m_tiles, blocks),
        {
            "BLOCK_M": bm,
            "BLOCK_N": bn,
            "BLOCK_K": bk,
            "BLOCK_R": br,
            "NUM_SPLITS": 1,
            "PDL": pdl,
            "SIDE": True,
            "num_warps": warps,
            "num_stages": gstages,
        },
        (N * K + T * K) * elt + T * N * 4,
        T * N * elt,
        m_tiles * bm * 2 * K * N,
        2 * T * K * N,
        m_tiles * blocks * (bm + bn) * K * elt + T * N * 4,
    )
    gemm["overlaps_previous"] = pdl
    gemm["pdl_launch"] = pdl
    gemm["waves"] = _tma_waves(m_tiles * blocks, (bm, bn, bk, warps, gstages), R, elt, smem, sm_count)
    return [side, gemm]


def _tma_waves(tiles: int, cfg: tuple, R: int, elt: int, smem: int, sm_count: int) -> float:
    """Waves of a TMA GEMM's ``tiles`` programs on ``cfg`` (``ML.gemm_tma_config``'s tuple): the programs an SM
    holds by shared memory (``ML.tma_programs_per_sm``, as ``ML.joined_grid`` counts them) times the SMs, at least
    one."""
    return max(1.0, tiles / (max(1, ML.tma_programs_per_sm(cfg, R, elt, smem)) * sm_count))


def _heavy_epilogue(ids, L, K, slices, R, elt, smem=H100_SMEM, sm_count=H100_SMS) -> bool:
    """``ML.tma_epilogue_split`` for host ids on the modelled card: the TMA GEMM's row tiles (in the ids' own order)
    would hold so many adapters that the default leaves them (the sorted-row GEMM with ``ML.SORTED_GATHER``, else the
    split path)."""
    return ML.heavy_epilogue(
        ids.numel(),
        K,
        R,
        slices,
        elt,
        lambda rows: mean_tile_adapters(ids, L, rows),
        False,
        lambda: smem,
        lambda: sm_count,
        len({int(i) for i in ids.tolist() if 0 <= int(i) < L}),
    )


def _row_tile_adapters(ids, L: int, block_m: int, order=None) -> list[int]:
    """The distinct adapters (slots in [0, L)) of each row tile of ``block_m`` rows, rows taken in ``order`` (default:
    the batch's own order): the LoRA epilogue runs one dot per adapter of its tile."""
    ids = ids.tolist()
    keys = [ids[i] if 0 <= ids[i] < L else None for i in (order if order is not None else range(len(ids)))]
    return [len({k for k in keys[m : m + block_m] if k is not None}) for m in range(0, len(keys), block_m)]


def _joined_grid(T, L, slices, R, tile_m, cap, elt, tma, sort_rows, forced=False, smem=H100_SMEM, sm_count=H100_SMS):
    """(TMA tiles, item programs) of the one-launch TMA step on the modelled card (``ML.gemm_tma_config``,
    ``ML.joined_grid``) where ``ML.joined_for`` allows it; None where it does not, or where its programs could not all
    be resident at once."""
    if not ML.joined_for(T, tma, sort_rows, forced):
        return None
    tiles = ML.gemm_tma_config(T, slices, elt, R, False, lambda: smem, lambda: sm_count)
    grid = ML.joined_grid(T, L, slices, R, tile_m, cap, tiles, elt, False, lambda: smem, lambda: sm_count)
    return None if grid is None else (tiles, grid[1])


def _joined_launch(
    ids, L, K, slices, R, elt, a_bytes, b_bytes, t_ad, tile_m, joined, shrink_k, shrink_flops, shrink_l2
):
    """The gemm path's TMA step in one launch (``ML._gemm_tma_joined_kernel``, ``ML.JOINED``): up to
    ``ML.JOINED_ITEM_PROGRAMS`` programs running the shrink's work items (tiles of the sorted list × slices, the whole K
    each: the x rows of their tokens and their adapter's A rows) and the TMA GEMM's tiles (rows in the batch's own
    order, the epilogue as in :func:`launches`). One launch, so x crosses HBM once (the items' rows are the GEMM's) and
    xa is written once (read back from L2); the items' MMA is charged at the GEMM's rate (0.4 % of it at 256 tokens).
    Assumed: the item programs, first in launch order, run beside the tiles and finish before any tile's epilogue waits
    for them (at 256 tokens, 128 tiles of 64×128 run two per SM: the 32 item programs fit beside them). ``joined``:
    (TMA tiles, item programs) from :func:`_joined_grid`; ``shrink_k``, ``shrink_flops``, ``shrink_l2``: the shrink's
    K block, MMA FLOPs and L2 requests over the whole K, as :func:`launches` counts them for its own launch."""
    T = ids.numel()
    N = sum(int(n) for n in slices)
    S = len(slices)
    br = U.block_r(R)
    (bm, bn, bk, warps, stages), n_items = joined
    blocks = ML._out_blocks(slices, bn)
    m_tiles = triton.cdiv(T, bm)
    segs = sum(_row_tile_adapters(ids, L, bm))
    epi_flops = segs * blocks * 2 * bm * br * bn
    l2 = shrink_l2 + m_tiles * blocks * (bm + bn) * K * elt + segs * blocks * (bm * br * 4 + br * bn * elt)
    return _launch(
        "_gemm_tma_joined_kernel",
        (n_items + m_tiles * blocks,),
        {
            "BLOCK_M": bm,
            "BLOCK_N": bn,
            "BLOCK_K": bk,
            "BLOCK_R": br,
            "SHRINK_M": tile_m,
            "SHRINK_K": shrink_k,
            "NUM_SLICES": S,
            "num_warps": warps,
            "num_stages": stages,
        },
        (N * K + T * K) * elt + a_bytes + b_bytes,
        T * N * elt + t_ad * S * R * 4,
        shrink_flops + m_tiles * bm * 2 * K * N + epi_flops,
        2 * T * K * N + 2 * t_ad * R * (S * K + N),
        l2,
        epi_flops,
    )


def _lanes_launch(ids, L, K, slices, R, elt, lanes, smem, a_bytes, b_bytes, t_ad) -> dict:
    """The one launch of the gemm path for few adapters (``ML._gemm_lanes_kernel``): row tiles of the batch's own
    order; each program's K loop streams its W0 strip, the x tile and its lane group's stacked A rows (this slice);
    a tile holding more distinct adapters than lanes runs one more K loop over x and A per further group."""
    T = ids.numel()
    N = sum(int(n) for n in slices)
    bm, bn, bk, warps, stages = ML.lanes_config(T, R, lanes, elt, elt, False, lambda: smem)
    cols = lanes * U.block_r(R)
    blocks = ML._out_blocks(slices, bn)
    m_tiles = triton.cdiv(T, bm)
    # lane groups per row tile: the first rides along the base K loop (always runs), each further one re-reads x
    groups = [max(1, triton.cdiv(n, lanes)) for n in _row_tile_adapters(ids, L, bm)]
    g = sum(groups)
    epi_flops = g * blocks * 2 * bm * cols * bn  # the fp32 dot against the stacked B (TF32)
    flops = m_tiles * blocks * 2 * bm * bn * K + g * blocks * 2 * bm * cols * K + epi_flops
    l2 = m_tiles * blocks * (bm + bn) * K * elt + g * blocks * cols * (K + bn) * elt
    l2 += (g - m_tiles) * blocks * bm * K * elt
    return _launch(
        "_gemm_lanes_kernel",
        (m_tiles, blocks),
        {
            "BLOCK_M": bm,
            "BLOCK_N": bn,
            "BLOCK_K": bk,
            "BLOCK_R": U.block_r(R),
            "LANES": lanes,
            "num_warps": warps,
            "num_stages": stages,
        },
        (N * K + T * K) * elt + a_bytes + b_bytes,
        T * N * elt,
        flops,
        2 * T * K * N + 2 * t_ad * R * (len(slices) * K + N),
        l2,
        epi_flops,
    )


# BENCHMARKS.md's single-adapter decode grid: (M, K = N), r = 16.
DECODE_POINTS = ((1, 4096), (16, 4096), (64, 4096), (256, 4096), (1, 8192), (256, 8192))


def decode_launches(
    M: int, K: int, N: int, R: int = RANK, elt: int = 2, smem: int = H100_SMEM, tma: bool = True
) -> list[dict]:
    """The one launch of :func:`lora_kernels.triton.lora_decode.lora_decode_linear` (single adapter, bias-free):
    W0, x, A and B read once from DRAM; A re-read from L2 by every output block (``l2_read``). ``tma``: the card has
    TMA (an H100), so batches of more than ``FUSED_MIN_ROWS`` rows run the persistent TMA forward with the shrink
    inside (``lora_linear_tma._fwd_tma_kernel``, one program per SM walking the output tiles)."""
    from lora_kernels.triton import lora_decode as D
    from lora_kernels.triton import lora_linear_tma as TMA

    if tma and M > TMA.FUSED_MIN_ROWS and elt < 4:
        bm, bn, bk, _, _, _ = TMA.fused_tiles(triton.next_power_of_2(M), N, elt, H100_SMS, interp=False)[0]
        br, warps, stages = U.block_r(R, TMA.FUSED_MAX_R), 4, 0
        kernel = "_fwd_tma_kernel"
    else:
        bm, bn, bk, br, warps, stages = D.decode_config(M, R, elt, False, lambda: smem)
        kernel = "_decode_kernel"
    m_tiles, n_blocks = triton.cdiv(M, bm), triton.cdiv(N, bn)
    grid = (min(H100_SMS, m_tiles * n_blocks),) if kernel == "_fwd_tma_kernel" else (m_tiles, n_blocks)
    flops = m_tiles * n_blocks * 2 * bm * (K * (bn + br) + br * bn)
    epi_flops = m_tiles * n_blocks * 2 * bm * br * bn  # xa (fp32) · Bᵀ: TF32
    useful = 2 * M * K * N + 2 * M * R * (K + N)
    read = (N * K + M * K + R * K + N * R) * elt
    l2 = m_tiles * n_blocks * ((bm + bn + br) * K + br * bn) * elt
    return [
        _launch(
            kernel,
            grid,
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_R": br, "num_warps": warps, "num_stages": stages},
            read,
            M * N * elt,
            flops,
            useful,
            l2,
            epi_flops,
        )
    ]


def floor_us(
    T: int,
    active: int,
    K: int = K_DEFAULT,
    N: int = N_DEFAULT,
    R: int = RANK,
    elt: int = 2,
    bandwidth: float = COPY_BW,
    peak: float = PEAK_FLOPS,
) -> float:
    """The benchmark's floor: max(flops / peak, bytes / bandwidth), bytes = W0 + the adapters present + x + y."""
    flops = 2 * T * K * N + 2 * T * R * (K + N)
    nbytes = (N * K + active * R * (K + N) + T * K + T * N) * elt
    return max(flops / peak, nbytes / bandwidth) * 1e6


def predict_us(
    launch_list: Sequence[dict],
    bandwidth: float = COPY_BW,
    peak: float | None = None,
    launch_us: float = LAUNCH_US,
    base_kernels: int = 1,
    c=None,
    overlap: float = 1.0,
    l2_bandwidth: float = math.inf,
    pdl_launch_us: float = PDL_LAUNCH_US,
) -> float:
    """Sum over launches of max(DRAM bytes / bandwidth, flops / rate), plus ``launch_us`` per launch beyond
    ``base_kernels`` (the base layer's own), ``pdl_launch_us`` instead for one marked ``pdl_launch`` (launched as a
    programmatic dependent: the gemm path's GEMM). The rate is the training report's for that kind of launch
    (:func:`compute_rate`: cuBLAS at 732 TFLOP/s, a non-TMA wgmma Triton GEMM 1.35x slower, mma.sync 2.7x, skinny
    Triton kernels at 247 TFLOP/s), the TF32 epilogue dots at half of it (:func:`compute_s`); ``peak`` instead
    charges every launch at that one rate; ``c`` replaces the card (:func:`card`) and its rates. Serial launches,
    except that a launch marked ``overlaps_previous`` (a programmatic dependent launch) runs alongside the one before
    it: the pair takes max(summed bytes / bandwidth, summed compute time) where ``overlap`` is 1 (the default), the
    serial sum where it is 0, in between the mix (``benchmarks/calibrate_serving.py`` fits it). A dependent of more
    than one wave of programs (``waves``, resident at once: its programs wait at their epilogue, holding their SMs)
    takes at least the first launch beside its first wave, then its other waves alone. ``l2_bandwidth``
    also bounds a launch by its ``l2_read`` (the bytes its programs request, an upper bound of its L2 traffic); the
    default, infinite, is the model's assumption that L2 never binds. A rough, static estimate."""
    c = c or card()
    t = 0.0
    prev = None  # (DRAM s, L2 s, compute s) of the previous launch
    for ln in launch_list:
        rate = peak if peak is not None else compute_rate(ln, c)
        cur = (
            (ln["bytes_read"] + ln["bytes_written"]) / bandwidth,
            ln.get("l2_read", 0) / l2_bandwidth,
            compute_s(ln, rate, c),
        )
        if ln.get("overlaps_previous") and prev is not None:
            serial = max(prev) + max(cur)
            # the dependent's programs wait for the launch before it at their epilogue, holding their SMs: past one
            # wave of them, the later waves start only once it is done (it runs beside the first wave alone)
            waves = max(1.0, ln.get("waves", 1.0))
            first = max(p + c / waves for p, c in zip(prev, cur))
            stall = max(first, max(cur) / waves) + (waves - 1) * max(cur) / waves
            cur = tuple(a + b for a, b in zip(prev, cur))
            t += (overlap * max(max(cur), stall) + (1 - overlap) * serial - max(prev)) * 1e6
        else:
            t += max(cur) * 1e6
        prev = cur
    extra = max(0, len(launch_list) - base_kernels)
    pdl = min(extra, sum(1 for ln in launch_list[1:] if ln.get("pdl_launch")))
    return t + launch_us * (extra - pdl) + pdl_launch_us * pdl


def default_path(
    T: int,
    elt: int = 2,
    tma: bool = True,
    adapters: int | None = None,
    R: int = RANK,
    ids: torch.Tensor | None = None,
    L: int = 0,
    K: int = K_DEFAULT,
    slices: Sequence[int] = (N_DEFAULT,),
) -> str:
    """The path ``multi_lora_linear`` takes by default for T tokens on the Triton backend of the modelled card (with
    TMA: an H100), data of ``elt`` bytes that TMA can read, a batch promising at most ``adapters`` per step, and
    (when given) the host ``ids`` of the step on a pool of L slots (the heavy-epilogue rule): "fused", "split",
    "gemm", "side" or "sorted" (what a heavy-epilogue step takes: ``ML.heavy_variant``, see :func:`launches`), or
    "joined" (``ML.JOINED``)."""
    lanes = ML.lanes_for(T, R, adapters) > 0
    tma = tma and T > ML.GEMM_TMA_MIN_TOKENS and elt < 4
    heavy = ids is not None and tma and not lanes and _heavy_epilogue(ids, L, K, slices, R, elt)
    variant = ML.heavy_variant(T, sum(slices))
    if heavy and variant != "split":
        return variant  # the side path, or the gemm path with sorted row tiles (see launches)
    path = ops.choose_path(None, None, T, "triton", tma=tma, lanes=lanes, heavy_epilogue=heavy)
    if (
        path == "gemm"
        and not lanes
        and _joined_grid(T, L, slices, R, ops.step_tile_m(auto_tile_m(T), T), T, elt, tma, False)
    ):
        return "joined"
    return path


def grid_launches(
    paths: Sequence[str] = MODEL_PATHS,
    seed: int = 0,
    K: int = K_DEFAULT,
    N: int = N_DEFAULT,
    R: int = RANK,
    elt: int = 2,
) -> list[dict]:
    """One entry per point of the multi-adapter grid (dist, L, T): the token ids' ``active`` adapter count, the
    ``chosen`` default path, the ``floor_us``, and ``paths``: path name → list of launches (see :func:`launches`),
    for a batch prepared as the benchmark prepares it (``max_adapters_per_step`` = :func:`adapter_bound`)."""
    points = []
    for dist in DISTS:
        for L in ADAPTERS:
            for T in TOKENS:
                ids = _ids(dist, L, T, seed)
                active = len(set(int(i) for i in ids.tolist()))
                bound = adapter_bound(dist, L, T)
                points.append(
                    {
                        "dist": dist,
                        "L": L,
                        "T": T,
                        "active": active,
                        "K": K,
                        "N": N,
                        "r": R,
                        "chosen": default_path(T, elt, adapters=bound, R=R, ids=ids, L=L, K=K, slices=(N,)),
                        "floor_us": floor_us(T, active, K, N, R, elt),
                        "paths": {p: launches(ids, L, K, (N,), R, elt, path=p, adapters=bound) for p in paths},
                    }
                )
    return points


# ------------------------------------------------------------------------------- the serving section of static_report
# ``benchmarks/static_report.py`` prints this section after the training one (and writes its records under "serving"
# in --json). The launches come from the real launchers run on meta tensors with the kernels swapped for the report's
# recorders (so grids and tiles are exactly what a GPU would run); bytes, FLOPs and predicted µs from the model above;
# each distinct kernel configuration is compiled for sm_90 once and its machine code read (static_report's
# compile_and_read). Quick set: the decode shape M = 16 and one grid point per kind of gemm path: one launch, two
# with the plain GEMM, two with the TMA GEMM.
QUICK_DECODE_POINTS = ((16, 4096),)
QUICK_GRID_POINTS = (("uniform", 16, 1), ("uniform", 16, 16), ("mix", 16, 4096))


def base_us(T: int, K: int = K_DEFAULT, N: int = N_DEFAULT, elt: int = 2) -> float:
    """The cuBLAS base ``F.linear`` (no LoRA) by the same roofline as :func:`predict_us`: W0, x and y once."""
    return max((N * K + T * K + T * N) * elt / COPY_BW, 2 * T * K * N / PEAK_FLOPS) * 1e6


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _run_path(path: str, T: int, L: int, K: int, slices: Sequence[int], R: int, cap: int, lanes: int = 0) -> None:
    """What ``multi_lora_linear`` runs on the Triton backend for ``path`` (a :data:`MODEL_PATHS` name), on meta bf16
    tensors (its body after the checks: F.linear and the launchers of lora_kernels.triton.multi_lora with the step's
    tile)."""
    N, S = sum(slices), len(slices)
    x, w = _meta(T, K), _meta(N, K)
    A, B = _meta(L, S * R, K), _meta(L, N, R)
    ranks, scales = _meta(L, dtype=torch.int32), _meta(L, S, dtype=torch.float32)
    meta = BatchMeta(*(_meta(n, dtype=torch.int32) for n in (cap, cap, cap, cap + 1)))
    tile_m = ops.step_tile_m(auto_tile_m(cap), T)
    if path in ("gemm", "sorted", "joined", "side"):
        saved = ML.gemm_tma_ok, ML.JOINED, ML.SIDE_TERM
        ML.JOINED = path == "joined"
        ML.SIDE_TERM = path == "side"  # a heavy step (sort_rows) takes the side path, else the sorted-row GEMM
        # meta tensors have no addresses: TMA answers as on an H100 (the launch model's card) from the row count
        ML.gemm_tma_ok = lambda x, w, check_addresses=True: x.shape[0] > ML.GEMM_TMA_MIN_TOKENS
        heavy = path in ("sorted", "side")
        try:
            ML.linear_gemm(x, w, None, A, B, ranks, scales, meta, list(slices), tile_m, lanes, heavy)
        finally:
            ML.gemm_tma_ok, ML.JOINED, ML.SIDE_TERM = saved
        return
    y = F.linear(x, w)
    if path == "fused":
        ML.fused(x, A, B, ranks, scales, meta, y, list(slices), tile_m)
    else:
        ML.shrink_expand(x, A, B, ranks, scales, meta, y, list(slices), tile_m)


def _run_decode(M: int, K: int, N: int, R: int) -> None:
    from lora_kernels import _backend
    from lora_kernels.triton import lora_decode as D
    from lora_kernels.triton import lora_linear_tma as TMA

    saved = _backend.triton_device_reason, TMA.tma_supported
    _backend.triton_device_reason = lambda *t: None  # meta tensors: nothing runs, the launch is recorded
    # ... and TMA answers as on an H100 (alignment and dtype only)
    TMA.tma_supported = lambda *ts, **kw: all(TMA._tma_aligned(t) and TMA._dtype_ok(t.dtype, True) for t in ts)
    try:
        D.lora_decode_linear(_meta(M, K), _meta(N, K), None, _meta(R, K), _meta(N, R), 2.0)
    finally:
        _backend.triton_device_reason, TMA.tma_supported = saved


def _recorded(sr, run, *modules) -> list:
    """The launches ``run()`` makes, recorded by static_report (``sr``) with the H100's SM count and shared memory
    (persistent TMA grids: one program per SM)."""
    from lora_kernels.triton import lora_linear_tma as TMA

    saved = U.sm_count, U.max_smem, ML.pdl_ok, TMA._grid_stride, TMA._sms
    U.sm_count, U.max_smem = (lambda index: H100_SMS), (lambda index: H100_SMEM)
    ML.pdl_ok = lambda device: True  # an sm_90 device
    TMA._grid_stride = lambda device, max_programs: max_programs or H100_SMS
    TMA._sms = lambda device: H100_SMS
    try:
        with sr.recording(*modules) as rec:
            run()
            return list(rec)
    finally:
        U.sm_count, U.max_smem, ML.pdl_ok, TMA._grid_stride, TMA._sms = saved


def _same_launch(rec, ln) -> bool:
    """A recorded launch is the model's: the same Triton kernel with the same grid (a torch op: any)."""
    if rec.kind != "triton":
        return not ln["kernel"].startswith("_")
    grid = tuple(ln["grid"]) + (1,) * (3 - len(ln["grid"]))
    return rec.kernel == ln["kernel"] and tuple(rec.grid) == grid


def _machine_code(facts: dict, config: dict | None = None) -> str:
    """The kind of MMA a compiled kernel runs, in the terms of the training report's card. A GEMM that reads only W0
    by TMA (``W_TMA`` without ``X_SORTED``: x gathered by row pointers) counts as one without TMA until its rate is
    measured."""
    config = config or {}
    if facts["wgmma"]:
        return "tma" if facts["tma"] and (not config.get("W_TMA") or config.get("X_SORTED")) else "wgmma"
    return "mma.sync"


def co_resident(first: dict, second: dict, c=None) -> bool:
    """Whether one program of each of two compiled launches (``regs``, ``smem_bytes``, ``num_warps``) fits on one SM
    of the card at once: registers rounded up to 8 per thread, 1 KiB of shared memory reserved per program. A
    programmatic dependent launch overlaps the launch before it only then."""
    c = c or card()

    def regs(x):
        return -(-x["regs"] // 8) * 8 * 32 * x["num_warps"]

    smem = first["smem_bytes"] + second["smem_bytes"] + 2 * 1024
    return regs(first) + regs(second) <= c.regs_per_sm and smem <= c.smem_per_sm


def _records(arch, facts_of, recorded, model, point) -> list[dict]:
    """One record per launch of a point, with static_report's field names (plus the point's T, L, dist, ratios)."""
    if len(recorded) != len(model) or not all(_same_launch(r, m) for r, m in zip(recorded, model)):
        raise RuntimeError(
            f"the launch model disagrees with the launchers at {point}: model {[m['kernel'] for m in model]}, "
            f"recorded {[(r.kernel, r.grid) for r in recorded]}"
        )
    # the compiled machine code replaces the model's guess (it sets the rate of a Triton GEMM, as in the training
    # report); the guess is kept for the record (the compile test checks that they agree)
    all_facts = [facts_of(rl) if rl.kind == "triton" else None for rl in recorded]
    model = [
        dict(
            ln,
            machine_code=_machine_code(f, ln["config"]),
            guessed_machine_code=guess_machine_code(ln["config"], ln["kernel"]),
        )
        if ln["kernel"] in TRITON_GEMMS
        else ln
        for ln, f in zip(model, all_facts)
    ]
    # a PDL launch overlaps the one before only where a program of each fits on one SM (else: serial)
    together = [None] * len(model)
    for i, ln in enumerate(model):
        if i and ln.get("overlaps_previous") and all_facts[i] and all_facts[i - 1]:
            pair = [dict(all_facts[j], num_warps=recorded[j].num_warps) for j in (i - 1, i)]
            together[i] = co_resident(*pair)
            if not together[i]:
                model[i] = dict(ln, overlaps_previous=False)
    c = card()
    total = predict_us(model)
    out = []
    for i, (rl, ln) in enumerate(zip(recorded, model)):
        facts = all_facts[i]
        mem = (ln["bytes_read"] + ln["bytes_written"]) / COPY_BW * 1e6
        comp = compute_s(ln, compute_rate(ln, c), c) * 1e6
        # what this launch adds to the point's prediction (the launches add up to point_predicted_us; a launch that
        # overlaps the one before adds only what the pair takes beyond that one)
        added = predict_us(model[: i + 1]) - predict_us(model[:i])
        bound = "memory" if mem >= comp else "compute"
        if ln.get("overlaps_previous"):
            bound += ", overlaps the previous launch (PDL)"
        elif together[i] is False:
            bound += ", after the previous launch (PDL, but their programs cannot share an SM)"
        out.append(
            {
                "op": point["op"],
                "mode": point["path"],
                "shape_kind": point["kind"],
                "shape": {"M": point["T"], "K": point["K"], "N": point["N"], "r": point["r"]},
                "T": point["T"],
                "L": point["L"],
                "dist": point["dist"],
                "active": point["active"],
                "launch": i,
                "kernel": ln["kernel"] if rl.kind == "torch" else rl.kernel,
                "kind": rl.kind,
                "grid": list(rl.grid) if rl.kind == "triton" else [],
                "config": ln["config"],
                "num_warps": rl.num_warps or None,
                "num_stages": rl.num_stages or None,
                "arch": f"sm_{arch}" if facts else None,
                "regs": facts["regs"] if facts else None,
                "spill_bytes": facts["spill_bytes"] if facts else None,
                "smem_bytes": facts["smem_bytes"] if facts else None,
                "wgmma": facts["wgmma"] if facts else None,
                "tma": facts["tma"] if facts else None,
                "membar_in_loops": facts["membar_in_loops"] if facts else None,
                "hbm_read_bytes": ln["bytes_read"],
                "hbm_write_bytes": ln["bytes_written"],
                "l2_read_bytes": ln["l2_read"],
                "flops": ln["flops"],
                "useful_flops": ln["useful_flops"],
                "l2_atomic_bytes": 0,
                "gemm": ln["kernel"].startswith(("cublas", "_gemm", "_decode", "_fwd_tma")),
                "co_resident": together[i],
                "machine_code": ln.get("machine_code"),
                "guessed_machine_code": ln.get("guessed_machine_code"),
                "compute_tflops": compute_rate(ln, c) / 1e12,
                "predicted_us": added,
                "bound": bound,
                "point_predicted_us": total,
                "base_us": point["base_us"],
                "floor_us": point["floor_us"],
                "ratio_to_base": total / point["base_us"],
                "ratio_to_floor": total / point["floor_us"],
                "other_paths_to_floor": point.get("others", {}),
            }
        )
    return out


def report(
    sr,
    arch: int = 90,
    quick: bool = False,
    log=lambda m: None,
    decode_points: Sequence[tuple[int, int]] | None = None,
    grid_points: Sequence[tuple[str, int, int]] | None = None,
) -> tuple[list[dict], str]:
    """The serving section of the static report: (records, markdown). ``sr`` is the static_report module (its
    recorders and ``compile_and_read``); every Triton launch is compiled for sm_<arch>, once per distinct
    configuration. ``decode_points`` ((M, K = N) pairs) and ``grid_points`` ((dist, L, T) triples) default to all of
    BENCHMARKS.md's (``quick``: one decode shape and one grid point per default path). Needs TRITON_INTERPRET off
    (static_report sets it before importing triton)."""
    from lora_kernels import _backend
    from lora_kernels.triton import lora_decode as D
    from lora_kernels.triton import lora_linear_tma as TMA

    if _backend.interpreter_enabled():
        raise RuntimeError("the serving report compiles the kernels: run it with TRITON_INTERPRET unset or 0")
    cache: dict = {}

    def facts_of(launch):
        sig, consts, attrs = sr._signature(launch)
        key = repr(
            (
                launch.kernel,
                sorted(sig.items()),
                sorted(consts.items()),
                sorted(attrs),
                launch.num_warps,
                launch.num_stages,
            )
        )
        if key not in cache:
            log(f"compile sm_{arch} {launch.kernel} {launch.config} w{launch.num_warps}/s{launch.num_stages}")
            cache[key] = sr.compile_and_read(launch, arch)
        return cache[key]

    records = []
    if decode_points is None:
        decode_points = QUICK_DECODE_POINTS if quick else DECODE_POINTS
    if grid_points is None and quick:
        grid_points = QUICK_GRID_POINTS
    wanted = None if grid_points is None else set(grid_points)
    for M, K in decode_points:
        model = decode_launches(M, K, K)
        rec = _recorded(sr, lambda: _run_decode(M, K, K, RANK), D, TMA)
        point = {
            "op": "lora_decode_linear",
            "path": "fwd",
            "kind": "serving decode",
            "T": M,
            "L": 1,
            "dist": None,
            "active": 1,
            "K": K,
            "N": K,
            "r": RANK,
            "base_us": base_us(M, K, K),
            "floor_us": floor_us(M, 1, K, K),
        }
        records += _records(arch, facts_of, rec, model, point)
    for dist in DISTS:
        for L in ADAPTERS:
            for T in TOKENS:
                if wanted is not None and (dist, L, T) not in wanted:
                    continue
                ids = _ids(dist, L, T, 0)
                active = len(set(int(i) for i in ids.tolist()))
                bound = adapter_bound(dist, L, T)
                path = default_path(T, adapters=bound, ids=ids, L=L)
                lanes = ML.lanes_for(T, RANK, bound) if path == "gemm" else 0
                fl = floor_us(T, active)
                others = {p: predict_us(launches(ids, L, path=p, adapters=bound)) / fl for p in MODEL_PATHS}
                model = launches(ids, L, path=path, adapters=bound)
                rec = _recorded(sr, lambda: _run_path(path, T, L, K_DEFAULT, (N_DEFAULT,), RANK, T, lanes), ML)
                point = {
                    "op": "multi_lora_linear",
                    "path": path,
                    "kind": "serving",
                    "T": T,
                    "L": L,
                    "dist": dist,
                    "active": active,
                    "K": K_DEFAULT,
                    "N": N_DEFAULT,
                    "r": RANK,
                    "base_us": base_us(T),
                    "floor_us": fl,
                    "others": others,
                }
                records += _records(arch, facts_of, rec, model, point)
    return records, markdown(records)


def _other(others: dict, path: str, T: int) -> str:
    """A grid cell of the other paths' ratios: "-" where the path does not exist at T tokens (the sorted-row GEMM
    only where the GEMM is the TMA kernel, the side path too, the joined step there up to ``ML.JOINED_MAX_TOKENS``)."""
    tma_only = path in ("sorted", "joined", "side") and T <= ML.GEMM_TMA_MIN_TOKENS
    if path not in others or tma_only or (path == "joined" and T > ML.JOINED_MAX_TOKENS):
        return "-"
    return f"{others[path]:.2f}"


def _l2_tbps(point_records: Sequence[dict]) -> float:
    """The L2 bandwidth a point's prediction assumes: the bytes its launches request over its predicted time."""
    return sum(x["l2_read_bytes"] for x in point_records) / point_records[0]["point_predicted_us"] / 1e6


def markdown(records: Sequence[dict]) -> str:
    """The serving section's tables from its records (also for ``static_report.py --from-json``)."""
    lines = []
    w = lines.append
    c = card()
    points = {}
    for r in records:
        points.setdefault((r["op"], r["dist"], r["L"], r["T"], r["shape"]["K"]), []).append(r)
    w("## Serving ops (static launch model)\n")
    w(
        f"Model: per launch max(HBM bytes / {COPY_BW / 1e12:.2f} TB/s, FLOPs / rate), the rate as in the training "
        f"section: cuBLAS {c.cublas_flops / 1e12:.0f} TFLOP/s, a Triton GEMM by its compiled machine code (wgmma "
        f"without TMA {c.triton_wgmma_slowdown}x slower, mma.sync {c.triton_mma_sync_slowdown}x; its LoRA epilogue "
        f"in TF32 at {c.peak_tf32_flops / c.peak_bf16_flops:.2f} of that rate), other Triton "
        f"kernels {c.peak_tf32_flops * 0.5 / 1e12:.0f} TFLOP/s; a programmatic dependent launch overlaps the one "
        "before it (the pair: summed bytes against summed compute) where a program of each fits on one SM by their "
        "compiled registers and shared memory (past one wave of its programs, which wait at their epilogue holding "
        "their SMs, beside its first wave only); plus "
        f"{LAUNCH_US} µs per launch beyond the base layer's one, a programmatic dependent one too ({PDL_LAUNCH_US} µs; "
        "benchmarks/static_serving.py); base = cuBLAS F.linear "
        "by the same roofline; floor = W0, the adapters present, x and y once (or the FLOPs). K = N = 4096 (decode "
        "also 8192), r = 16, bf16, H100. Unmeasured. L2 TB/s: the bytes the launches' programs request (tile by "
        "tile, an upper bound of their L2 traffic; cuBLAS's: its HBM bytes) over the predicted time, the L2 bandwidth "
        "the prediction assumes (the model does not bound it).\n"
    )
    w("### Single-adapter decode (`lora_decode_linear`, goal ≤ 1.10 × base)\n")
    w("| M | K = N | launches | HBM MB | L2 TB/s | predicted µs | base µs | / base | / floor |")
    w("|" + "---|" * 9)
    for (op, *_), rs in points.items():
        if op != "lora_decode_linear":
            continue
        r = rs[0]
        mb = sum(x["hbm_read_bytes"] + x["hbm_write_bytes"] for x in rs) / 1e6
        w(
            f"| {r['T']} | {r['shape']['K']} | {len(rs)} | {mb:.1f} | {_l2_tbps(rs):.1f} | "
            f"{r['point_predicted_us']:.2f} | {r['base_us']:.2f} | {r['ratio_to_base']:.3f} | "
            f"{r['ratio_to_floor']:.3f} |"
        )
    w("\n### Multi-adapter grid (`multi_lora_linear`, default path; goal ≤ 1.2 × floor)\n")
    w(
        "| dist | L | T | active | path | launches | HBM MB | L2 TB/s | predicted µs | base µs | floor µs | / base | "
        "/ floor | " + " / ".join(MODEL_PATHS) + " ÷ floor |"
    )
    w("|" + "---|" * 14)
    for (op, dist, L, T, _), rs in points.items():
        if op != "multi_lora_linear":
            continue
        r = rs[0]
        mb = sum(x["hbm_read_bytes"] + x["hbm_write_bytes"] for x in rs) / 1e6
        o = r["other_paths_to_floor"]
        w(
            f"| {dist} | {L} | {T} | {r['active']} | {r['mode']} | {len(rs)} | {mb:.1f} | {_l2_tbps(rs):.1f} | "
            f"{r['point_predicted_us']:.2f} | {r['base_us']:.2f} | {r['floor_us']:.2f} | {r['ratio_to_base']:.2f} | "
            f"{r['ratio_to_floor']:.2f} | " + " / ".join(_other(o, p, T) for p in MODEL_PATHS) + " |"
        )
    w("\n### Serving launches\n")
    w(
        "| op | point | # | kernel | grid | tile | warps/stages | HBM read MB | HBM write MB | GFLOP | predicted µs "
        "| bound |"
    )
    w("|" + "---|" * 12)
    for (op, dist, L, T, _), rs in points.items():
        where = f"M={T}, K=N={rs[0]['shape']['K']}" if dist is None else f"{dist}, L={L}, T={T}"
        for x in rs:
            trit = x["kind"] == "triton"
            tile = ",".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in x["config"].items() if k.isupper())
            ws = f"{x['num_warps']}/{x['num_stages']}" if trit else ""
            w(
                f"| {op} | {where} | {x['launch']} | {x['kernel']} | {tuple(x['grid']) if trit else ''} | {tile} | "
                f"{ws} | {x['hbm_read_bytes'] / 1e6:.2f} | "
                f"{x['hbm_write_bytes'] / 1e6:.2f} | {x['flops'] / 1e9:.2f} | {x['predicted_us']:.2f} | {x['bound']} |"
            )
    w("\n### Compiled serving kernels (each distinct configuration)\n")
    w("| kernel | tile | warps/stages | arch | regs | spill B | smem KiB | wgmma | TMA | points |")
    w("|" + "---|" * 10)
    kernels = {}
    for x in records:
        if x["kind"] != "triton":
            continue
        key = (x["kernel"], json.dumps(x["config"], sort_keys=True), x["num_warps"], x["num_stages"], x["regs"])
        kernels.setdefault(key, (x, set()))[1].add((x["op"], x["dist"], x["L"], x["T"], x["shape"]["K"]))
    for (name, _, warps, stages, _), (x, used) in kernels.items():
        tile = ",".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in x["config"].items() if k.isupper())
        w(
            f"| {name} | {tile} | {warps}/{stages} | {x['arch']} | {x['regs']} | {x['spill_bytes']} | "
            f"{x['smem_bytes'] / 1024:.0f} | {'yes' if x['wgmma'] else 'no'} | {'yes' if x['tma'] else 'no'} | "
            f"{len(used)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print("| M | K = N | launches | DRAM MB | base-only DRAM MB | predicted µs / base floor |")
    print("|---|---|---|---|---|---|")
    for M, K in DECODE_POINTS:
        lst = decode_launches(M, K, K)
        mb = sum(ln["bytes_read"] + ln["bytes_written"] for ln in lst) / 2**20
        base_mb = (K * K + 2 * M * K) * 2 / 2**20
        base = max(2 * M * K * K / PEAK_FLOPS, base_mb * 2**20 / COPY_BW) * 1e6
        print(f"| {M} | {K} | {len(lst)} | {mb:.1f} | {base_mb:.1f} | {predict_us(lst) / base:.3f} |")
    print()
    rows = grid_launches()
    print("| dist | L | T | active | path | launches | DRAM MB | predicted µs / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for p in rows:
        for name, lst in p["paths"].items():
            mb = sum(ln["bytes_read"] + ln["bytes_written"] for ln in lst) / 2**20
            mark = " (default)" if name == p["chosen"] else ""
            print(
                f"| {p['dist']} | {p['L']} | {p['T']} | {p['active']} | {name}{mark} | {len(lst)} | {mb:.1f} | "
                f"{predict_us(lst) / p['floor_us']:.2f} |"
            )
