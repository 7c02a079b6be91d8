"""What the GEMM launchers of ``lora_linear`` share between the plain kernels (``lora_linear.py``) and the persistent
TMA ones (``lora_linear_tma.py``): the autotuning switch and timing function, the config list, the M bucket of the
autotune key, and two jit helpers (the dot with an optional fp32 upcast, the grouped tile order)."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Environment variable: "0" turns benchmarking of the GEMM tile configurations off (first fitting config is used).
AUTOTUNE_ENV_VAR = "LORA_KERNELS_AUTOTUNE"
# The autotune key buckets M to a power of two (capped): training with varying sequence lengths must not re-tune on
# every new M.
M_BUCKET_CAP = 16384


def autotune_off() -> bool:
    """True when $LORA_KERNELS_AUTOTUNE is "0" (read on every call)."""
    return os.environ.get(AUTOTUNE_ENV_VAR, "1").strip() == "0"


def autotune_bench(kernel_call, quantiles):
    """Timing function of the autotuners. triton's Autotuner benchmarks whenever the kernel has more than one config
    in its list, even when the pruner leaves one, i.e. also with $LORA_KERNELS_AUTOTUNE=0: ~0.1 s of launches and
    device syncs per new key. With autotuning off nothing is launched here (the single config just runs), so no
    device sync happens on a new shape."""
    if autotune_off():
        return [0.0 for _ in quantiles]
    return triton.testing.do_bench(kernel_call, quantiles=quantiles)


def configs(col_key: str, red_key: str, tiles) -> list:
    """Autotune list of a GEMM whose output tile is BLOCK_M × ``col_key`` and whose reduction step is ``red_key``,
    from (BLOCK_M, BLOCK_col, BLOCK_red, GROUP_M, num_warps, num_stages) tuples."""
    return [
        triton.Config({"BLOCK_M": bm, col_key: bc, red_key: br, "GROUP_M": g}, num_warps=w, num_stages=st)
        for bm, bc, br, g, w, st in tiles
    ]


def m_bucket(M: int) -> int:
    """M's autotune bucket: the next power of two, at most M_BUCKET_CAP."""
    return min(triton.next_power_of_2(M), M_BUCKET_CAP)


@triton.jit
def dot(a, b, acc, F32: tl.constexpr, PREC: tl.constexpr):
    """acc + a·b, with both operands taken to fp32 first when F32 (mixed dtypes, fp32 operands, interpreter bf16)."""
    if F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def tile_of(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile number ``tile`` of a num_m × num_n grid of tiles, GROUP_M row-tiles walked
    together so that their column tiles share L2."""
    in_group = GROUP_M * num_n
    first_m = (tile // in_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % group_rows
    pid_n = (tile % in_group) // group_rows
    return pid_m, pid_n
