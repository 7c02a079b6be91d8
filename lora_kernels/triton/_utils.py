"""Host-side pieces shared by the Triton launchers (``lora_linear``, ``multi_lora``, ``lora_decode``): device queries
(SM count, shared memory per block, compute capability, the launch device), the rank tile, the K pipeline that fits
shared memory, and the two precision rules of the kernels.

Imported only by the kernel modules, so it may import triton; nothing here queries a device at import time. See
docs/lora_linear.md and docs/multi_lora.md.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager

import torch
import triton

from .. import _backend

# Smallest K (and M, N) extent of a tl.dot operand: the tensor-core MMA shapes need 16.
MIN_DOT = 16
# Shared memory a block may use when the device cannot be asked: the smallest of the GPUs this package targets
# (sm_86/sm_89: 99 KiB; A100 has 163 KiB, H100 227 KiB).
SMEM_FALLBACK = 99 * 1024

# Compute capability assumed when the device cannot be asked: pre-Hopper, whose register limits are the tighter
# (tiles chosen for it compile without spills on sm_90 as well).
CAPABILITY_FALLBACK = (8, 0)

# A callable that returns a device number only when asked (the launch models call it on a GPU only).
IntThunk = Callable[[], int]


def device_index(device: torch.device) -> int:
    """The CUDA device number of ``device`` (the current device when it names none). A CPU device gives 0: the
    launch models run the launchers on CPU tensors with the device queries replaced."""
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if device.type == "cuda" else 0


@functools.cache
def sm_count(index: int) -> int:
    """Streaming multiprocessors of GPU ``index`` (132 on an H100 SXM)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def max_smem(index: int) -> int:
    """Opt-in shared memory per block of GPU ``index``: the limit Triton checks at launch (OutOfResources above it);
    227 KiB on H100, 163 KiB on A100, 99 KiB on sm_86/89."""
    try:
        from triton.runtime import driver

        return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # pragma: no cover - driver API differences across triton versions
        optin = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0)
        return int(optin) or SMEM_FALLBACK


@functools.cache
def capability(index: int) -> tuple[int, int]:
    """Compute capability (major, minor) of GPU ``index``: (9, 0) on H100, (8, 0) on A100. Below 9 there is no wgmma:
    ``tl.dot`` lowers to mma.sync, whose accumulator and operand fragments all live in registers."""
    try:
        major, minor = torch.cuda.get_device_capability(index)
    except Exception:  # pragma: no cover - no CUDA runtime to ask (a stand-in device in a CPU-only process)
        return CAPABILITY_FALLBACK
    return int(major), int(minor)


def capability_of(device: torch.device) -> tuple[int, int]:
    """:func:`capability` of the GPU ``device`` names."""
    return capability(device_index(device))


def smem_of(device: torch.device) -> int:
    """:func:`max_smem` of the GPU ``device`` names."""
    return max_smem(device_index(device))


def sm_count_of(device: torch.device) -> int:
    """:func:`sm_count` of the GPU ``device`` names."""
    return sm_count(device_index(device))


def device_ctx(t: torch.Tensor) -> ContextManager:
    """Launch on the tensor's GPU, not on whichever GPU is current; nothing to do on the CPU (interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def block_r(rank: int, cap: int = 1 << 30) -> int:
    """Rank tile of a kernel: the next power of two of ``rank`` (tl.dot needs at least ``MIN_DOT``), at most
    ``cap`` (a kernel that walks r in chunks of ``cap`` then takes several steps)."""
    return max(MIN_DOT, min(triton.next_power_of_2(rank), cap))


def k_pipeline(
    block_m: int,
    block_k: int,
    block_n: int,
    x_bytes: int,
    w_bytes: int,
    reserve: int,
    smem: int,
    num_stages: int = 3,
) -> tuple[int, int]:
    """(BLOCK_K, num_stages) of a K loop that streams [BLOCK_M, BLOCK_K] x tiles and [BLOCK_K, ``block_n``] tiles
    of the other operand (A in a shrink: ``block_n`` = BLOCK_R; W0 in a GEMM).

    The software pipeline keeps up to ``num_stages`` such pairs in shared memory; with 64-128-row tiles, rank 64-128
    or fp32 operands the default BLOCK_K = 256 at 3 stages needs 260-420 KiB, over any GPU's limit (Triton then fails
    at launch with OutOfResources). So cut the stages' cost (fewer stages first, then a shorter BLOCK_K, never
    below 32) until ``num_stages · stage + reserve`` fits ``smem``; the estimate is an upper bound of what Triton
    3.6 allocates for these kernels on sm_80/sm_90 (checked by compiling, see tests/test_multi_lora.py)."""
    stages = num_stages
    while True:
        need = stages * (block_m * block_k * x_bytes + block_k * block_n * w_bytes) + reserve
        if need <= smem or (block_k <= 32 and stages <= 2):
            return block_k, stages
        if stages > 2:
            stages -= 1
        else:
            block_k //= 2


# ------------------------------------------------------------------------------------------------------ precision
# Two rules, on purpose. The training kernels (lora_linear) follow torch's TF32 policy for fp32 data, like the cuBLAS
# products they replace (``tf32_precisions``). The inference kernels (multi_lora, lora_decode) run fp32 data on exact
# IEEE fp32 products, as their float64 reference (``cast_to_fp32``). Both upcast bf16 in the interpreter.
def interpreter_bf16(*dtypes: torch.dtype) -> bool:
    """True when a bf16 operand meets the Triton interpreter, whose bf16 ``tl.dot`` is wrong (triton 3.6 and 3.9):
    the kernels then take their operands to fp32 first; on a GPU they do not."""
    return torch.bfloat16 in dtypes and _backend.interpreter_enabled()


def cast_to_fp32(*dtypes: torch.dtype) -> bool:
    """True when the MMA must run on exact fp32 operands: fp32 data (exact IEEE products, as the reference), mixed
    dtypes, or bf16 in the interpreter."""
    if any(d == torch.float32 for d in dtypes) or len(set(dtypes)) > 1:
        return True
    return interpreter_bf16(*dtypes)


def tf32_precisions(dtype: torch.dtype) -> tuple[bool, str, str]:
    """(UPCAST, PREC, LORA_PREC) of the training kernels for data of ``dtype``: UPCAST = bf16 in the interpreter;
    PREC (base product) and LORA_PREC (products on the fp32 xa / dxa) follow ``torch.backends.cuda.matmul.allow_tf32``
    for fp32 data; for 16-bit data the fp32 LoRA operands use TF32 (16-bit values are exact in TF32)."""
    fp32_prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    upcast = interpreter_bf16(dtype)
    if dtype == torch.float32:
        return upcast, fp32_prec, fp32_prec
    return upcast, "tf32", "tf32"  # PREC is unused by half-precision operands; LoRA fp32 operands use TF32
