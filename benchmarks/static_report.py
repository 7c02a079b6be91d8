"""Static performance report of the training path, made without a GPU.

    python benchmarks/static_report.py [--quick] [--json PATH] [--archs 90,80] [--all-configs]

For every case (lora_kernels with each base GEMM, the cuBLAS base, eager LoRA), mode (fwd, fwd+bwd, fwd+bwd with
dropout 0.1) and shape (the training and decode shapes of BENCHMARKS.md), the case's code runs on ``meta`` tensors:
the Triton launchers run for real but their kernels are swapped for recorders, and every torch op is recorded by a
dispatch mode. So the launches listed are exactly the ones a GPU would run, with the grids and tile configurations
the launchers and the autotuner's pruner choose (the first surviving config: what runs with
``LORA_KERNELS_AUTOTUNE=0``, and what autotuning tries first). Each recorded Triton launch is then compiled for sm_90
(and sm_80) with triton's compiler and ptxas, with the argument specialisation the JIT would use, and its machine
code is read: registers, spill bytes (ptxas -v), shared memory, wgmma (HGMMA) and TMA (UTMALDG) in the SASS, memory
barriers inside loops. For sm_80 the launches are recorded again as on an A100 (``GPUS``: its SM count, shared
memory and compute capability), so its rows show the tiles the pruner picks there, not the sm_90 ones.

Each launch also gets its HBM bytes (every operand read once and every output written once: L2 re-reads of tiles are
not counted, so this is a lower bound) and FLOPs, and a predicted time from the card's roofline (see ``Card``). The
predicted ratio of each case to the cuBLAS base of the same mode and shape is what the BENCHMARKS.md goals are
stated in. All predictions are UNMEASURED models; measured numbers replace them when a GPU run is made.

Other ops join by adding a case function to ``CASES`` (and, for new Triton kernels, a traffic model to ``TRAFFIC``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

# The kernels must be compiled, not interpreted: set before triton or lora_kernels are imported.
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default of the triton versions supported; no warning

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora_kernels.triton import lora_linear as LL  # noqa: E402
from lora_kernels.triton import lora_linear_tma as TMA  # noqa: E402

from benchmarks import static_serving  # noqa: E402
from benchmarks.card import CARD, Card  # noqa: E402, F401  (Card: the model's parameters, documented there)
from benchmarks.jit_signature import specialise  # noqa: E402

# The card (H100 SXM5: peaks, measured rates, assumed Triton slowdowns) lives in benchmarks/card.py, which imports
# no triton, so that the serving model can read it inside an interpreted test process.
GOALS = {"fwd": 1.06, "fwd+bwd": 1.10, "fwd+bwd dropout": 1.12}  # geo-mean over the six training shapes
PEFT_MEASURED = {"fwd": 1.26, "fwd+bwd": 1.32, "fwd+bwd dropout": 1.42}  # H100, 2026-11-25, geo-mean of the six

TRAINING_SHAPES = [(8192, k, n, r) for k, n in ((4096, 4096), (4096, 14336), (14336, 4096)) for r in (16, 64)]
DECODE_SHAPES = [(m, 4096, 4096, 16) for m in (1, 16, 64, 256)] + [(1, 8192, 8192, 16), (256, 8192, 8192, 16)]
QUICK_TRAINING = [(8192, 4096, 4096, 16)]
QUICK_DECODE = [(16, 4096, 4096, 16)]
TRAINING_MODES = ("fwd", "fwd+bwd", "fwd+bwd dropout")
DROPOUT_P = 0.1


# ------------------------------------------------------------------------------------------------ per-architecture
@dataclasses.dataclass(frozen=True)
class Gpu:
    """What the launchers and the GEMM pruner ask a device for: compute capability (the tile list), SM count (split
    factors of the skinny kernels) and the opt-in shared memory per block (pipeline stages, r-tiles)."""

    name: str
    capability: tuple[int, int]
    sms: int
    smem_per_block: int


# The card each compiled architecture is simulated as. SM counts: NVIDIA A100 Tensor Core GPU Architecture whitepaper
# (A100: 108 SMs) and the H100 datasheet (SXM5: 132 SMs); shared memory per block: CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability" (8.0: 163 KB, 9.0: 227 KB; what an A100 / H100 reports as
# sharedMemPerBlockOptin: 166912 / 232448 bytes).
GPUS = {
    90: Gpu("H100 SXM5", (9, 0), CARD.sms, 227 * 1024),
    80: Gpu("A100", (8, 0), 108, 163 * 1024),
}
# The launchers' own device queries, kept before the H100 stand-ins below replace them: ``on_gpu`` runs them with a
# card's facts in place of the device's.
_LL_DEVICE_QUERIES = {n: getattr(LL, n) for n in ("_target_programs", "_skinny_max_r", "_gemm_device")}


@contextlib.contextmanager
def on_gpu(gpu: Gpu):
    """The launchers and the GEMM pruner choose splits, tiles and stages as on ``gpu`` (the meta tensors' device is
    not CUDA: the device queries answer with the card's facts instead)."""
    cuda = torch.device("cuda", 0)
    stand_in = type("OnGpu", (), {"device": cuda})()
    patches = [
        (LL._utils, "sm_count", lambda index: gpu.sms),
        (LL._utils, "max_smem", lambda index: gpu.smem_per_block),
        (LL._utils, "capability", lambda index: gpu.capability),
        (LL, "_target_programs", lambda t: _LL_DEVICE_QUERIES["_target_programs"](stand_in)),
        (LL, "_skinny_max_r", lambda device: _LL_DEVICE_QUERIES["_skinny_max_r"](cuda)),
        (LL, "_gemm_device", lambda device: _LL_DEVICE_QUERIES["_gemm_device"](cuda)),
        (TMA, "_grid_stride", lambda device, max_programs: max_programs or gpu.sms),  # one program per SM
        (TMA, "_sms", lambda device: gpu.sms),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    for mod, name, value in patches:
        setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


# ------------------------------------------------------------------------------------------------------ recording
@dataclasses.dataclass
class Launch:
    kind: str  # "triton" | "torch"
    kernel: str
    grid: tuple = ()
    config: dict = dataclasses.field(default_factory=dict)  # tile constexprs of a Triton launch
    num_warps: int = 0
    num_stages: int = 0
    named: dict = dataclasses.field(default_factory=dict, repr=False)  # every argument of a Triton launch, by name
    jit: object = dataclasses.field(default=None, repr=False)
    all_configs: list = dataclasses.field(default_factory=list, repr=False)  # what autotuning would benchmark
    hbm_read: int = 0
    hbm_write: int = 0
    flops: int = 0
    # of which the LoRA epilogue's products on fp32 xa / dxa with 16-bit data: TF32 MMA (`HGMMA.*.TF32` in the sm_90
    # SASS), charged at the card's TF32 / BF16 peak ratio of the launch's rate (one half)
    tf32_flops: int = 0
    l2_atomic_bytes: int = 0
    main_loop_trips: int = 1
    tiles: int = 0  # output tiles of a persistent launch (each program walks several); 0: one tile per program
    gemm: bool = False  # a big product (cuBLAS or a Triton GEMM): timed at a GEMM rate


_LAUNCHES: list[Launch] = []


def _unwrap(kernel):
    """(autotuner or None, heuristics values, JITFunction) of a decorated Triton kernel."""
    tuner, heur = None, {}
    k = kernel
    while not isinstance(k, triton.runtime.jit.JITFunction):
        if isinstance(k, triton.runtime.autotuner.Autotuner):
            tuner = k
        elif isinstance(k, triton.runtime.autotuner.Heuristics):
            heur.update(k.values)
        k = k.fn
    return tuner, heur, k


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _LAUNCHES.append(_resolve(self.kernel, grid, args, dict(kwargs)))


def _resolve(kernel, grid, args, kwargs) -> Launch:
    tuner, heur, fn = _unwrap(kernel)
    warps, stages = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3)
    named = dict(zip(fn.arg_names, args), **kwargs)
    all_configs = []
    if tuner is not None:
        configs = tuner.configs
        if tuner.early_config_prune:
            with _env(LL.AUTOTUNE_ENV_VAR, "1"):  # every config autotuning would benchmark; the first is what runs
                configs = tuner.early_config_prune(configs, named)  # with autotuning off
        all_configs = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]
        first = configs[0]
        named.update(first.kwargs)
        warps, stages = first.num_warps, first.num_stages
    for name, rule in heur.items():
        named[name] = rule(named)
    g = grid(named) if callable(grid) else grid
    g = tuple(g) + (1,) * (3 - len(g))
    consts = {n: named[n] for i, n in enumerate(fn.arg_names) if i in fn.constexprs}
    shown = {
        k: v
        for k, v in consts.items()
        if k.startswith(("BLOCK", "SPLIT", "GROUP", "BASE", "HAS_DROPOUT", "FUSE_SHRINK", "BITS", "STORE_BITS"))
    }
    launch = Launch("triton", fn.__name__, g, shown, warps, stages, named, fn, all_configs)
    model = TRAFFIC.get(fn.__name__)
    if model is not None:
        model(launch, named)
    return launch


@contextlib.contextmanager
def _env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


# aten ops that launch nothing on a GPU (views, allocation, metadata)
_NO_LAUNCH = {
    "t",
    "view",
    "_unsafe_view",
    "reshape",
    "transpose",
    "permute",
    "expand",
    "detach",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "as_strided",
    "alias",
    "select",
    "slice",
    "unsqueeze",
    "squeeze",
    "lift_fresh",
    "_reshape_alias",
    "split",
    "unbind",
    "set_",
    "ones_like_meta",
}
_GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm"}


class _TorchRecorder(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _NO_LAUNCH:
            return out
        ins = [a for a in args if isinstance(a, torch.Tensor)]
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        launch = Launch("torch", f"aten.{name}")
        if name in ("zeros", "zero_", "fill_", "full", "ones"):  # a memset: writes only
            launch.hbm_write = sum(_nbytes(o) for o in outs)
        else:
            launch.hbm_read = sum(_nbytes(a) for a in ins)
            launch.hbm_write = sum(_nbytes(o) for o in outs)
        if name in _GEMM_OPS:
            a, b = args[-2], args[-1]
            launch.flops = 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
            launch.gemm = True
        _LAUNCHES.append(launch)
        return out


@contextlib.contextmanager
def recording(*modules):
    """Record every Triton launch of the kernels defined in ``modules`` and every torch op, into a fresh list."""
    saved = []
    for mod in modules:
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.KernelInterface):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj))
    _LAUNCHES.clear()
    try:
        with _TorchRecorder():
            yield _LAUNCHES
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


# The launchers' device queries (SM count, shared memory, persistent grid size) answer with the simulated card's
# facts inside ``on_gpu`` only: importing this module changes nothing in lora_kernels (a test process that imports it
# keeps running the kernels as before).


# ------------------------------------------------------------------------------------------ traffic of Triton kernels
# Per kernel: HBM bytes (each operand once, outputs once), FLOPs, L2 atomic bytes and the trip count of the main loop
# (used for the instruction-issue bound), from the launch's named arguments. Add an entry for every new kernel.
def _el(named, ptr):
    return named[ptr].element_size()


def _cdiv(a, b):
    return -(-a // b)


def _bits_bytes(a) -> int:
    """Bytes of the packed dropout mask: 1 bit per element of x (int32 words of 32 columns), 1/16 of a bf16 x."""
    return a["M"] * _cdiv(a["K"], 32) * 4


def _tf32(a, out_ptr, flops) -> int:
    """``flops`` of a GEMM's LoRA epilogue (fp32 xa or dxa times B or A) when they run in TF32: 16-bit data
    (``_utils.tf32_precisions``); fp32 data runs the whole kernel at one precision."""
    return flops if _el(a, out_ptr) < 4 else 0


def _t_shrink(l: Launch, a):
    M, K, R = a["M"], a["K"], a["R"]
    l.hbm_read = M * K * _el(a, "x_ptr") + R * K * _el(a, "a_ptr")
    l.hbm_write = M * R * 4 * a["SPLIT_K"] + (_bits_bytes(a) if a["STORE_BITS"] else 0)  # partial sums: S·M·r
    l.flops = 2 * M * K * R
    l.main_loop_trips = _cdiv(_cdiv(K, a["BLOCK_K"]), a["SPLIT_K"])


def _t_shrink_expand(l: Launch, a):
    M, N, K, R = a["M"], a["N"], a["K"], a["R"]
    e = _el(a, "y_ptr")
    # x once, y read and written once; A and B from L2 after the first program's read.
    l.hbm_read = M * K * _el(a, "x_ptr") + R * K * _el(a, "a_ptr") + N * R * _el(a, "b_ptr") + M * N * e
    l.hbm_write = M * N * e + M * R * 4 + (_bits_bytes(a) if a["STORE_BITS"] else 0)
    l.flops = 2 * M * K * R + 2 * M * N * R
    # Two loops (K, then N); the issue model multiplies the largest loop body (the K loop: Philox with dropout) by
    # one trip count: the longer loop's, an upper bound on both bodies together when K and N are alike.
    l.main_loop_trips = max(_cdiv(K, a["BLOCK_K"]), _cdiv(N, a["BLOCK_N"]))


def _t_fwd(l: Launch, a):
    M, N, K, R = a["M"], a["N"], a["K"], a["R"]
    e = _el(a, "y_ptr")
    lora = M * R * 4 * a["xa_splits"] + N * R * _el(a, "b_ptr")
    if a["XA_PARTIAL"]:  # the summed xa written by the first column of tiles
        l.hbm_write += M * R * 4
    if a["BASE"]:
        l.hbm_read = M * K * _el(a, "x_ptr") + N * K * _el(a, "w_ptr") + lora + (N * e if a["HAS_BIAS"] else 0)
        l.flops = 2 * M * N * K + 2 * M * N * R
        l.tf32_flops = _tf32(a, "y_ptr", 2 * M * N * R)
        if a["FUSE_SHRINK"]:  # S = x·Aᵀ recomputed by every column of tiles, A read (S written) instead of S read
            l.hbm_read += R * K * _el(a, "a_ptr") - M * R * 4
            l.hbm_write += M * R * 4
            l.flops += 2 * M * K * R * _cdiv(N, a["BLOCK_N"])
        l.main_loop_trips = _cdiv(K, a["BLOCK_K"])
        l.gemm = True
    else:
        l.hbm_read = M * N * e + lora
        l.flops = 2 * M * N * R
        l.main_loop_trips = _cdiv(R, a["BLOCK_R"])
    l.hbm_write += M * N * e


def _t_dxa(l: Launch, a):
    M, N, R = a["M"], a["N"], a["R"]
    l.hbm_read = M * N * _el(a, "dy_ptr") + N * R * _el(a, "b_ptr")
    l.hbm_write = M * R * 4
    l.flops = 2 * M * N * R
    l.main_loop_trips = _cdiv(N, a["BLOCK_N"])


def _t_dy_pass(l: Launch, a):
    M, N, R = a["M"], a["N"], a["R"]
    # dY once; B and xa (xa re-read by each column split, from L2); both sets of partial sums written once.
    m_tiles = _cdiv(M, a["BLOCK_M"])
    l.hbm_read = M * N * _el(a, "dy_ptr") + N * R * _el(a, "b_ptr") + M * R * 4
    l.hbm_write = (a["N_SPLITS"] * M + m_tiles * N) * R * 4
    l.flops = 4 * M * N * R
    l.main_loop_trips = _cdiv(_cdiv(N, a["BLOCK_N"]), a["N_SPLITS"])


def _t_grad_ab(l: Launch, a):
    M, K, N, R = a["M"], a["K"], a["N"], a["R"]
    # dA programs: x (or x and the mask bits) and dxa; dB programs: dY and xa, or the one-pass kernel's dB partial
    # sums. Outputs once, in the adapter dtype.
    if a["DB_PARTS"]:
        l.hbm_read = M * K * _el(a, "x_ptr") + M * R * 4 + a["DB_PARTS"] * N * R * 4
    else:
        l.hbm_read = M * K * _el(a, "x_ptr") + M * N * _el(a, "dy_ptr") + 2 * M * R * 4
    l.hbm_read += _bits_bytes(a) if a["BITS"] else 0
    l.hbm_write = R * K * _el(a, "da_ptr") + N * R * _el(a, "db_ptr")
    l.flops = 2 * M * K * R + 2 * M * N * R
    l.main_loop_trips = _cdiv(M, a["BLOCK_M"])
    if a["DB_PARTS"]:  # the dB programs add DB_PARTS partials instead of walking M: the programs' mean trip count
        k_tiles, n_tiles = _cdiv(K, a["BLOCK_C"]), _cdiv(N, a["BLOCK_C"])
        l.main_loop_trips = _cdiv(k_tiles * l.main_loop_trips + n_tiles * a["DB_PARTS"], k_tiles + n_tiles)


def _ds_splits_bytes(a) -> int:
    """dX kernels given the one-pass kernel's dxa partials: read them all, write their sum once (first tile column)."""
    splits = a["DS_SPLITS"]
    return (splits - 1) * a["M"] * a["R"] * 4 if splits > 1 else 0


def _t_dx(l: Launch, a):
    M, N, K, R = a["M"], a["N"], a["K"], a["R"]
    e = _el(a, "dx_ptr")
    lora = M * R * 4 + R * K * _el(a, "a_ptr") + (_bits_bytes(a) if a["BITS"] else 0) + _ds_splits_bytes(a)
    l.hbm_write += M * R * 4 if a["DS_SPLITS"] > 1 else 0
    if a["BASE"]:
        l.hbm_read = M * N * _el(a, "dy_ptr") + N * K * _el(a, "w_ptr") + lora
        l.flops = 2 * M * N * K + 2 * M * K * R
        l.tf32_flops = _tf32(a, "dx_ptr", 2 * M * K * R)
        l.main_loop_trips = _cdiv(N, a["BLOCK_N"])
        l.gemm = True
    else:
        l.hbm_read = M * K * e + lora
        l.flops = 2 * M * K * R
        l.main_loop_trips = _cdiv(R, a["BLOCK_R"])
    l.hbm_write += M * K * e


def _persistent(l: Launch, tiles: int, trips_per_tile: int):
    """A persistent launch: its output tiles (each program walks several) and the K-loop trips of one tile."""
    l.tiles = tiles
    l.main_loop_trips = trips_per_tile


def _t_fwd_tma(l: Launch, a):
    M, N, K, R = a["M"], a["N"], a["K"], a["R"]
    e = _el(a, "y_ptr")
    l.hbm_read = M * K * _el(a, "x_ptr") + N * K * _el(a, "w_ptr") + M * R * 4 + N * R * _el(a, "b_ptr")
    l.hbm_read += N * e if a["HAS_BIAS"] else 0
    l.hbm_write = M * N * e
    l.flops = 2 * M * N * K + 2 * M * N * R
    l.tf32_flops = _tf32(a, "y_ptr", 2 * M * N * R)
    if a["FUSE_SHRINK"]:  # xa = x·Aᵀ recomputed by every column of tiles: A read instead of xa, xa written if stored
        l.hbm_read += R * K * _el(a, "a_ptr") - M * R * 4
        l.hbm_write += M * R * 4 if a["STORE_XA"] else 0
        l.flops += 2 * M * K * R * _cdiv(N, a["BLOCK_N"])
    l.gemm = True
    _persistent(l, _cdiv(M, a["BLOCK_M"]) * _cdiv(N, a["BLOCK_N"]), _cdiv(K, a["BLOCK_K"]))


def _t_dx_tma(l: Launch, a):
    M, N, K, R = a["M"], a["N"], a["K"], a["R"]
    e = _el(a, "dx_ptr")
    l.hbm_read = M * N * _el(a, "dy_ptr") + N * K * _el(a, "w_ptr") + M * R * 4 + R * K * _el(a, "a_ptr")
    l.hbm_read += M * _cdiv(K, 32) * 4 if a["HAS_DROPOUT"] else 0  # the packed keep mask, 1 bit per element
    l.hbm_read += _ds_splits_bytes(a)
    l.hbm_write = M * K * e + (M * R * 4 if a["DS_SPLITS"] > 1 else 0)
    l.flops = 2 * M * N * K + 2 * M * K * R
    l.tf32_flops = _tf32(a, "dx_ptr", 2 * M * K * R)
    l.gemm = True
    _persistent(l, _cdiv(M, a["BLOCK_M"]) * _cdiv(K, a["BLOCK_K"]), _cdiv(N, a["BLOCK_N"]))


TRAFFIC: dict[str, Callable[[Launch, dict], None]] = {
    "_dropout_shrink_kernel": _t_shrink,
    "_shrink_expand_kernel": _t_shrink_expand,
    "_fwd_kernel": _t_fwd,
    "_dxa_kernel": _t_dxa,
    "_dy_pass_kernel": _t_dy_pass,
    "_grad_ab_kernel": _t_grad_ab,
    "_dx_kernel": _t_dx,
    "_fwd_tma_kernel": _t_fwd_tma,
    "_dx_tma_kernel": _t_dx_tma,
}


# -------------------------------------------------------------------------------------------------------- cases
# A case runs one op's forward (and backward) on meta tensors inside ``recording``; it returns nothing. Signature:
# case(M, K, N, r, mode) -> None. The first case is the base every ratio is taken to.
def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _base_case(M, K, N, r, mode):
    """cuBLAS F.linear, forward and (W0 frozen) backward dX: the goals' denominator."""
    x, w = _meta(M, K), _meta(N, K)
    F.linear(x, w)
    if mode != "fwd":
        torch.mm(_meta(M, N), w)


def _lk_case(base_gemm: str | None):
    def case(M, K, N, r, mode):
        x, w, a, b = _meta(M, K), _meta(N, K), _meta(r, K), _meta(N, r)
        p = DROPOUT_P if "dropout" in mode else 0.0
        seed = torch.empty((), dtype=torch.int64, device="meta")
        saved = LL.BASE_GEMM
        LL.BASE_GEMM = base_gemm or saved
        try:
            y, s, bits = LL.lora_linear_forward(x, w, a, b, 2.0, None, p, seed, return_keep_bits=True)
            if mode != "fwd":
                LL.lora_linear_backward(_meta(M, N), x, w, a, b, s, 2.0, p, seed, True, False, False, bits)
        finally:
            LL.BASE_GEMM = saved

    return case


def _eager_case(M, K, N, r, mode):
    """F.linear(x, W0) + s·F.linear(F.linear(dropout(x), A), B), autograd, W0 frozen (PEFT's LoraLayer computes the
    same ops)."""
    grad = mode != "fwd"
    x = _meta(M, K).requires_grad_(grad)
    w = _meta(N, K)
    a, b = _meta(r, K).requires_grad_(grad), _meta(N, r).requires_grad_(grad)
    xd = F.dropout(x, DROPOUT_P) if "dropout" in mode else x
    y = F.linear(x, w) + 2.0 * F.linear(F.linear(xd, a), b)
    if grad:
        y.backward(_meta(M, N))


def _lk_tma_case(M, K, N, r, mode):
    """lora_kernels with the Triton base GEMM where the launchers take the persistent TMA kernels (lora_linear_tma):
    on meta tensors ``tma_supported`` answers as on the simulated card (alignment, and TMA only from sm_90 on: an
    A100 falls back to the other kernels)."""
    saved = TMA.tma_supported
    hopper = LL._utils.capability(0) >= (TMA._TMA_MIN_CAPABILITY, 0)
    TMA.tma_supported = lambda *ts, **kw: (
        hopper and all(TMA._tma_aligned(t) and TMA._dtype_ok(t.dtype, True) for t in ts)
    )
    try:
        _lk_case("triton")(M, K, N, r, mode)
    finally:
        TMA.tma_supported = saved


# (name, case function, modes it runs, shapes it runs: "training" / "decode")
CASES = [
    ("cublas", _base_case, TRAINING_MODES, ("training", "decode")),
    ("lora_kernels", _lk_case(None), TRAINING_MODES, ("training", "decode")),
    ("lk_triton_base", _lk_case("triton"), TRAINING_MODES, ("training", "decode")),
    ("lk_cublas_base", _lk_case("cublas"), TRAINING_MODES, ("training", "decode")),
    ("eager", _eager_case, TRAINING_MODES, ("training", "decode")),
    ("lk_tma_base", _lk_tma_case, TRAINING_MODES, ("training", "decode")),
]


# ---------------------------------------------------------------------------------------------- compile + machine code
_NV_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_CACHE_DIR = Path(os.environ.get("LORA_KERNELS_REPORT_CACHE", Path.home() / ".cache" / "lora_kernels_static_report"))


def _tool(name):
    for cand in (_NV_BIN / name, Path("/usr/local/cuda/bin") / name, Path("/usr/local/cuda-13.0/bin") / name):
        if cand.exists():
            return str(cand)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found (looked in triton's bundled tools and CUDA's bin)")
    return found


def _signature(l: Launch):
    """Signature, constexprs and attributes as the JIT specialises this launch (:func:`jit_signature.specialise`)."""
    fn = l.jit
    return specialise(fn.arg_names, l.named, {fn.arg_names[i] for i in fn.constexprs})


def _sass_facts(sass: str) -> dict:
    """wgmma / TMA / mma.sync use, memory barriers inside loops (a loop: a backward branch and its target), the
    static instruction count and the instruction count of the main loop's body (the loop with the most MMAs)."""
    instrs = []  # (address, text)
    labels = {}
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$", line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(2)))
            continue
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = (instrs[-1][0] + 16) if instrs else 0
    loops = []
    for addr, text in instrs:
        m = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", text)
        if m and m.group(1) in labels and labels[m.group(1)] <= addr:
            loops.append((labels[m.group(1)], addr))
    ops = [t for _, t in instrs]

    def in_loop(addr):
        return any(lo <= addr <= hi for lo, hi in loops)

    def size_and_mma(lo, hi):
        body = [t for a, t in instrs if lo <= a <= hi]
        return sum(1 for t in body if re.search(r"\b(HGMMA|HMMA)\b", t)), len(body)

    # The main loop: the one issuing the most MMAs (then the largest). A prologue loop that runs once per tile (the
    # K = r LoRA product, the sum of split partials) can be longer than the K loop without being the one that repeats.
    biggest = max((size_and_mma(lo, hi) for lo, hi in loops), default=(0, 0))[1]
    # The K loop of a persistent TMA kernel: the smallest loop issuing TMA loads (the tile loop around it holds the
    # epilogue too).
    tma_loop = min(
        (
            sum(1 for a, _ in instrs if lo <= a <= hi)
            for lo, hi in loops
            if any(lo <= a <= hi and "UTMALDG" in t for a, t in instrs)
        ),
        default=0,
    )
    return {
        "wgmma": any("HGMMA" in t for t in ops),
        "tma": any("UTMALDG" in t for t in ops),
        "mma_sync": any(re.search(r"\bHMMA\b", t) for t in ops),
        # GPU- or system-scope fences (MEMBAR.ALL.GPU: what an acq_rel atomic costs); the CTA-scope MEMBAR next to
        # FENCE.VIEW.ASYNC belongs to the cp.async / wgmma pipeline and is not counted.
        "membar": sum(1 for t in ops if re.search(r"MEMBAR\S*\.(GPU|SYS)", t)),
        "membar_in_loops": sum(1 for a, t in instrs if re.search(r"MEMBAR\S*\.(GPU|SYS)", t) and in_loop(a)),
        "atomics": sum(1 for t in ops if re.search(r"\b(ATOMG|REDG|RED)\b", t)),
        "sass_instrs": len(instrs),
        "loop_instrs": biggest,
        "tma_loop_instrs": tma_loop,
    }


def _ptxas_spills(log: str):
    st = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    ld = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    return st, ld


def compile_and_read(l: Launch, arch: int) -> dict:
    """Compile the launch for sm_<arch> and read its machine code. What ptxas and the disassembler print is cached on
    disk (keyed by triton's cache key of the kernel, which covers the source of every @triton.jit helper it calls, its
    specialisation and the triton version), so the analysis can change without recompiling."""
    sig, consts, attrs = _signature(l)
    opts = {"num_warps": l.num_warps, "num_stages": l.num_stages}
    key_src = repr(
        (
            l.kernel,
            sorted(sig.items()),
            sorted(consts.items()),
            sorted(attrs),
            opts,
            arch,
            triton.__version__,
            l.jit.cache_key,  # the kernel's and its jit helpers' sources (a changed helper recompiles)
        )
    )
    cached = _CACHE_DIR / f"{hashlib.sha1(key_src.encode()).hexdigest()}.json"
    raw = json.loads(cached.read_text()) if cached.exists() else {}
    if "sass_z" not in raw:
        raw = _compile_raw(l, sig, consts, attrs, opts, arch)
        _CACHE_DIR.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(raw))
    sass = zlib.decompress(base64.b64decode(raw["sass_z"])).decode()
    st, ld = _ptxas_spills(raw["ptxas_log"])
    return dict(
        _sass_facts(sass),
        regs=int(re.search(r"REG:(\d+)", raw["usage"]).group(1)),
        stack_bytes=int(re.search(r"STACK:(\d+)", raw["usage"]).group(1)),
        spill_store_bytes=st,
        spill_load_bytes=ld,
        spill_bytes=st + ld,
        smem_bytes=raw["smem"],
    )


def _compile_raw(l: Launch, sig, consts, attrs, opts, arch) -> dict:
    triton.knobs.nvidia.dump_ptxas_log = True
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        compiled = triton.compile(
            ASTSource(l.jit, sig, consts, attrs), target=GPUTarget("cuda", arch, 32), options=opts
        )
    log = buf.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        if "spill" not in log:  # compiled from triton's cache: run ptxas -v on the PTX for the spill counts
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(compiled.asm["ptx"])
            arch_name = "sm_90a" if arch == 90 else f"sm_{arch}"
            log = subprocess.run(
                [
                    _tool("ptxas"),
                    "-lineinfo",
                    "-v",
                    "--regAllocOptLevel=2",
                    f"--gpu-name={arch_name}",
                    str(ptx),
                    "-o",
                    str(Path(tmp) / "v.o"),
                ],
                capture_output=True,
                text=True,
            ).stderr
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True
        ).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
    return {
        "ptxas_log": log,
        "usage": usage,
        "smem": int(compiled.metadata.shared),
        "sass_z": base64.b64encode(zlib.compress(sass.encode(), 6)).decode(),
    }


# ------------------------------------------------------------------------------------------------------ prediction
def _occupancy(facts, warps) -> int:
    """Programs resident per SM, by shared memory and registers."""
    by_smem = CARD.smem_per_sm // max(1, facts["smem_bytes"] + 1024)
    by_regs = CARD.regs_per_sm // max(1, facts["regs"] * 32 * warps)
    return max(1, min(by_smem, by_regs, 32))


def predict_us(l: Launch, facts: dict | None) -> dict:
    """Predicted time of one launch: the largest of memory (bytes / reached copy bandwidth), compute (flops / a GEMM
    rate by kind of machine code) and instruction issue (warp instructions / (4 schedulers · SMs · clock)), never
    below the shortest launch. Triton GEMMs also pay wave quantisation (the last wave of tiles partly idle), relative
    to the partial wave inside the measured cuBLAS rate (``Card.cublas_wave_efficiency``)."""
    mem = (l.hbm_read + l.hbm_write) / CARD.copy_bps
    if l.kind == "torch":
        compute = l.flops / CARD.cublas_flops
        issue = 0.0
        why = "cuBLAS" if l.gemm else "memory"
    else:
        if l.gemm:  # by machine code; its TF32 epilogue products at the card's TF32 / BF16 ratio of that rate
            code = ("tma" if facts["tma"] else "wgmma") if facts["wgmma"] else "mma.sync"
            rate = CARD.gemm_rate(code)
            compute = CARD.mma_seconds(l.flops, l.tf32_flops, rate)
        else:
            rate = CARD.peak_tf32_flops * 0.5  # skinny kernels: small TF32/bf16 dots, never the limit in practice
            compute = l.flops / rate
        programs = l.grid[0] * l.grid[1] * l.grid[2]
        per_warp = facts["sass_instrs"] + facts["loop_instrs"] * max(0, l.main_loop_trips - 1)
        if l.tiles:  # persistent: each program runs `rounds` tiles, each a K loop of main_loop_trips trips
            rounds = math.ceil(l.tiles / programs)
            inner = facts["tma_loop_instrs"] or facts["loop_instrs"]
            per_warp = (
                facts["sass_instrs"]
                + inner * max(0, rounds * l.main_loop_trips - 1)
                + max(0, facts["loop_instrs"] - inner) * (rounds - 1)
            )
        issue = programs * l.num_warps * per_warp / (4 * CARD.sms * CARD.clock_hz)
        if l.gemm:  # tiles are not free: a grid smaller than the SMs leaves SMs idle, a partial last wave too
            compute *= CARD.cublas_wave_efficiency  # relative to the measured rate's own partial wave (Card)
            if l.tiles:  # persistent: the programs' last round of tiles is partly idle
                rounds = l.tiles / programs
                compute *= math.ceil(rounds) / rounds * (CARD.sms / programs if programs < CARD.sms else 1.0)
            elif programs < CARD.sms:
                compute *= CARD.sms / programs
            else:
                waves = programs / (CARD.sms * _occupancy(facts, l.num_warps))
                compute *= math.ceil(waves) / waves
        why = max((("memory", mem), ("compute", compute), ("issue", issue)), key=lambda kv: kv[1])[0]
    t = max(mem, compute, issue) * 1e6
    if t < CARD.min_launch_us:
        t, why = CARD.min_launch_us, "launch"
    return {"predicted_us": t, "bound": why}


# ------------------------------------------------------------------------------------------------------------ run
def shapes_for(kind, quick):
    if kind == "training":
        return QUICK_TRAINING if quick else TRAINING_SHAPES
    return QUICK_DECODE if quick else DECODE_SHAPES


def modes_for(kind, modes):
    return modes if kind == "training" else ("fwd",)


def _record(case, shape, mode, gpu: Gpu) -> list[Launch]:
    """The launches of one case at one shape and mode, with the splits and tiles chosen as on ``gpu``."""
    M, K, N, r = shape
    with on_gpu(gpu), recording(LL, TMA):
        case(M, K, N, r, mode)
        return list(_LAUNCHES)


def _compile_row(l: Launch, facts: dict, arch: int, which: str, where: dict) -> dict:
    """One row of the compile tables: a Triton launch's config and what its sm_<arch> machine code shows."""
    return {
        **where,
        "kernel": l.kernel,
        "config": l.config,
        "arch": f"sm_{arch}",
        "num_warps": l.num_warps,
        "num_stages": l.num_stages,
        **{k: facts[k] for k in ("regs", "spill_bytes", "smem_bytes", "wgmma", "tma", "membar_in_loops")},
        "which": which,
    }


def _candidates(l: Launch) -> list[Launch]:
    """The launch with each config autotuning would also try (after the first, which runs with autotuning off)."""
    out = []
    _, heur, _ = _unwrap(getattr(LL, l.kernel, None) or getattr(TMA, l.kernel))
    for kw, w, st in l.all_configs[1:]:
        alt = dataclasses.replace(l, named=dict(l.named, **kw), num_warps=w, num_stages=st, config=dict(l.config, **kw))
        for name, rule in heur.items():
            alt.named[name] = rule(alt.named)
        out.append(alt)
    return out


def collect(quick: bool, archs, all_configs: bool, log=print, ops=None, kinds_wanted=("training", "decode")):
    """(records, other compiles). Records: one per launch as on the first architecture's card (``GPUS``), compiled
    for it and predicted. Other compiles: for every further architecture the launches as the launchers and the pruner
    choose them on that architecture's card (its own tiles, stages and splits, not the first one's), compiled for it;
    with ``all_configs`` also every config autotuning would try, per architecture. ``ops``: the providers to run (None:
    all; the base, "cublas", always runs); ``kinds_wanted``: "training" and/or "decode" shapes."""
    records, extra = [], []
    for case_name, case, modes, kinds in CASES:
        if ops is not None and case_name not in ops and case_name != CASES[0][0]:
            continue
        for kind in (k for k in kinds if k in kinds_wanted):
            for M, K, N, r in shapes_for(kind, quick):
                for mode in modes_for(kind, modes):
                    where = {
                        "op": case_name,
                        "mode": mode,
                        "shape_kind": kind,
                        "shape": {"M": M, "K": K, "N": N, "r": r},
                    }
                    for arch in archs:
                        launches = _record(case, (M, K, N, r), mode, GPUS[arch])
                        for i, l in enumerate(launches):
                            facts = None
                            if l.kind == "triton":
                                log(f"compile sm_{arch} {l.kernel} {l.config} w{l.num_warps}/s{l.num_stages}")
                                facts = compile_and_read(l, arch)
                                if arch != archs[0]:
                                    extra.append(_compile_row(l, facts, arch, "first config", dict(where, launch=i)))
                                for alt in _candidates(l) if all_configs else []:
                                    log(f"compile sm_{arch} {l.kernel} {alt.config} w{alt.num_warps}/s{alt.num_stages}")
                                    row = _compile_row(
                                        alt, compile_and_read(alt, arch), arch, "autotune candidate", where
                                    )
                                    extra.append(dict(row, launch=i))
                            if arch != archs[0]:
                                continue
                            records.append(
                                {
                                    **where,
                                    "launch": i,
                                    "kernel": l.kernel,
                                    "kind": l.kind,
                                    "grid": list(l.grid),
                                    "config": l.config,
                                    "num_warps": l.num_warps or None,
                                    "num_stages": l.num_stages or None,
                                    "arch": f"sm_{arch}" if facts else None,
                                    "regs": facts["regs"] if facts else None,
                                    "spill_bytes": facts["spill_bytes"] if facts else None,
                                    "smem_bytes": facts["smem_bytes"] if facts else None,
                                    "wgmma": facts["wgmma"] if facts else None,
                                    "tma": facts["tma"] if facts else None,
                                    "membar_in_loops": facts["membar_in_loops"] if facts else None,
                                    "hbm_read_bytes": l.hbm_read,
                                    "hbm_write_bytes": l.hbm_write,
                                    "flops": l.flops,
                                    "tf32_flops": l.tf32_flops,
                                    "l2_atomic_bytes": l.l2_atomic_bytes,
                                    "gemm": l.gemm,
                                    **predict_us(l, facts),
                                }
                            )
    return records, extra


def first_gemm_compiles(arch: int, shapes=None, log=lambda m: None) -> list[dict]:
    """The first config of every Triton training launch (the GEMMs with and without the base product and dropout,
    and the skinny kernels around them) as the launchers and the pruner choose it on ``arch``'s card, compiled for
    ``arch``: one row per distinct kernel specialisation. For a CI check that is quicker than the whole report."""
    rows, seen = [], set()
    for case_name, case, modes, _ in CASES:
        if not case_name.startswith("lk_"):
            continue
        # r = 16 takes the one-pass dY backward, r = 64 the two-pass one: both are compiled
        for M, K, N, r in shapes or QUICK_TRAINING + [(8192, 4096, 4096, 64)]:
            for mode in modes:
                where = {
                    "op": case_name,
                    "mode": mode,
                    "shape_kind": "training",
                    "shape": {"M": M, "K": K, "N": N, "r": r},
                }
                for i, l in enumerate(_record(case, (M, K, N, r), mode, GPUS[arch])):
                    if l.kind != "triton":
                        continue
                    key = (l.kernel, repr(sorted(_signature(l)[1].items())), l.num_warps, l.num_stages)
                    if key in seen:
                        continue
                    seen.add(key)
                    log(f"compile sm_{arch} {l.kernel} {l.config} w{l.num_warps}/s{l.num_stages}")
                    rows.append(_compile_row(l, compile_and_read(l, arch), arch, "first config", dict(where, launch=i)))
    return rows


def summarise(records):
    """{(op, mode, kind, shape tuple): (total predicted µs, launches)}."""
    tot = {}
    for r in records:
        s = r["shape"]
        k = (r["op"], r["mode"], r["shape_kind"], (s["M"], s["K"], s["N"], s["r"]))
        t, n = tot.get(k, (0.0, 0))
        tot[k] = (t + r["predicted_us"], n + 1)
    return tot


def ratios(records):
    tot = summarise(records)
    out = {}
    for (op, mode, kind, shape), (t, n) in tot.items():
        base = tot.get(("cublas", mode, kind, shape))
        out[(op, mode, kind, shape)] = (t, n, t / base[0] if base else float("nan"))
    return out


def shape_ratios(records, kind: str = "decode") -> dict:
    """{(op, mode, shape): the op's predicted time / the cuBLAS base's} for the shapes of ``kind`` ("decode": the
    goal there holds for each shape)."""
    total = {}
    for r in records:
        if r["shape_kind"] == kind:
            key = (r["op"], r["mode"], tuple(r["shape"].values()))
            total[key] = total.get(key, 0.0) + r["predicted_us"]
    return {(op, mode, shape): t / total[(CASES[0][0], mode, shape)] for (op, mode, shape), t in total.items()}


def training_geomeans(records) -> dict:
    """{(op, mode): geo-mean over the training shapes of the op's predicted time / the cuBLAS base's}: the numbers
    the goals are stated in."""
    out = {}
    for (op, mode, _), ratio in shape_ratios(records, "training").items():
        out.setdefault((op, mode), []).append(ratio)
    return {k: _geo(v) for k, v in out.items()}


def _geo(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def _fmt_bytes(b):
    return f"{b / 1e6:.1f}" if b else "0"


def compile_table(rows) -> list[str]:
    """Markdown lines of one architecture's compile table: one row per distinct kernel config and machine code, with
    how many op/mode pairs launch it."""
    out = [
        "| kernel | tile | warps/stages | arch | regs | spill B | smem KiB | wgmma | TMA | GPU membar in loops "
        "| used by |",
        "|" + "---|" * 11,
    ]
    kernels = {}
    for x in rows:
        key = (
            x["kernel"],
            json.dumps(x["config"], sort_keys=True),
            x["num_warps"],
            x["num_stages"],
            x["regs"],
            x["spill_bytes"],
            x["smem_bytes"],
        )
        kernels.setdefault(key, (x, set()))[1].add(
            f"{x['op']} {x['mode']}" if x.get("shape_kind", "training") == "training" else f"{x['op']} decode"
        )
    for (name, _, warps, stages, regs, spill, smem), (x, users) in kernels.items():
        tile = ",".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in x["config"].items())
        membar = x.get("membar_in_loops", "")
        out.append(
            f"| {name} | {tile} | {warps}/{stages} | {x['arch']} | {regs} | {spill} | {smem / 1024:.0f} | "
            f"{'yes' if x['wgmma'] else 'no'} | {'yes' if x['tma'] else 'no'} | {membar} | "
            f"{len(users)} op/mode pairs |"
        )
    return out


def markdown(records, extra, quick) -> str:
    lines = []
    w = lines.append
    r = ratios(records)
    ops = [c[0] for c in CASES]
    w("## Predicted ratios to the cuBLAS base (static report)\n")
    w(
        f"Card model: {CARD.name}; cuBLAS GEMM at {CARD.cublas_flops / 1e12:.0f} TFLOP/s, memory at "
        f"{CARD.copy_bps / 1e12:.2f} TB/s (both measured on an H100, 2026-11-25); Triton GEMM with wgmma + TMA: "
        f"{CARD.triton_tma_slowdown}x cuBLAS's time (assumed); with wgmma, no TMA: "
        f"{CARD.triton_wgmma_slowdown}x cuBLAS's time; every launch ≥ {CARD.min_launch_us} µs. Unmeasured.\n"
    )
    for kind in ("training", "decode"):
        shapes = shapes_for(kind, quick)
        for mode in modes_for(kind, TRAINING_MODES):
            w(f"### {kind}, {mode}\n")
            w("| M | K | N | r | cublas µs | " + " | ".join(f"{o} / base (launches)" for o in ops[1:]) + " |")
            w("|" + "---|" * (5 + len(ops) - 1))
            per_op = {o: [] for o in ops}
            for shape in shapes:
                base = r.get(("cublas", mode, kind, shape))
                if base is None:
                    continue
                cells = []
                for o in ops[1:]:
                    v = r.get((o, mode, kind, shape))
                    if v is None:
                        cells.append("—")
                        continue
                    per_op[o].append(v[2])
                    cells.append(f"{v[2]:.3f} ({v[1]})")
                w(f"| {shape[0]} | {shape[1]} | {shape[2]} | {shape[3]} | {base[0]:.1f} | " + " | ".join(cells) + " |")
            goal = GOALS.get(mode) if kind == "training" else 1.10
            w("| **geo-mean** | | | | | " + " | ".join(f"**{_geo(per_op[o]):.3f}**" for o in ops[1:]) + " |")
            extra_line = f"; PEFT measured {PEFT_MEASURED[mode]}" if kind == "training" else ""
            w(f"\nGoal: ≤ {goal}{extra_line}.\n")
    w("## Compiled Triton kernels (first config of each launch)\n")
    firsts = [x for x in records if x["kind"] == "triton"] + [x for x in extra if x["which"] == "first config"]
    for arch in dict.fromkeys(x["arch"] for x in firsts):
        gpu = GPUS.get(int(arch.removeprefix("sm_")))
        w(f"### {arch}" + (f": tiles, stages and splits as chosen on an {gpu.name}" if gpu else "") + "\n")
        lines.extend(compile_table([x for x in firsts if x["arch"] == arch]))
        w("")
    w("## Launches (per op, mode, shape)\n")
    w(
        "| op | mode | M×K×N r | # | kernel | grid | tile | warps/stages | regs | spill B | smem KiB | wgmma | TMA | "
        "GPU membar in loops | HBM read MB | HBM write MB | L2 atomics MB | GFLOP | predicted µs | bound |"
    )
    w("|" + "---|" * 20)
    for x in records:
        s = x["shape"]
        tile = ",".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in x["config"].items())
        trit = x["kind"] == "triton"
        ws = f"{x['num_warps']}/{x['num_stages']}" if trit else ""
        smem = f"{x['smem_bytes'] / 1024:.0f}" if trit else ""
        w(
            f"| {x['op']} | {x['mode']} | {s['M']}×{s['K']}×{s['N']} r{s['r']} | {x['launch']} | {x['kernel']} | "
            f"{tuple(x['grid']) if trit else ''} | {tile} | {ws} | "
            f"{x['regs'] if trit else ''} | {x['spill_bytes'] if trit else ''} | "
            f"{smem} | "
            f"{('yes' if x['wgmma'] else 'no') if trit else ''} | {('yes' if x['tma'] else 'no') if trit else ''} | "
            f"{x['membar_in_loops'] if trit else ''} | {_fmt_bytes(x['hbm_read_bytes'])} | "
            f"{_fmt_bytes(x['hbm_write_bytes'])} | {_fmt_bytes(x['l2_atomic_bytes'])} | {x['flops'] / 1e9:.2f} | "
            f"{x['predicted_us']:.1f} | {x['bound']} |"
        )
    candidates = [x for x in extra if x["which"] != "first config"]
    if candidates:
        w("\n## Autotune candidates (the configs autotuning tries after the first)\n")
        w("| kernel | tile | arch | warps/stages | regs | spill B | smem KiB | wgmma | TMA | which |")
        w("|" + "---|" * 10)
        seen = set()
        for x in candidates:
            key = (
                x["kernel"],
                json.dumps(x["config"], sort_keys=True),
                x["arch"],
                x["num_warps"],
                x["num_stages"],
                x["regs"],
                x["spill_bytes"],
            )
            if key in seen:
                continue
            seen.add(key)
            tile = ",".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in x["config"].items())
            w(
                f"| {x['kernel']} | {tile} | {x['arch']} | {x['num_warps']}/{x['num_stages']} | {x['regs']} | "
                f"{x['spill_bytes']} | {x['smem_bytes'] / 1024:.0f} | {'yes' if x['wgmma'] else 'no'} | "
                f"{'yes' if x['tma'] else 'no'} | {x['which']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one training shape (8192×4096×4096, r=16), one decode (M=16)")
    ap.add_argument("--json", metavar="PATH", help="write one record per (op, mode, shape, launch)")
    ap.add_argument(
        "--archs",
        default=None,
        help="compute capabilities to compile for, each with the tiles chosen on its card (GPUS: 90 = H100, "
        "80 = A100); the first one is predicted (default 90,80; --quick: 90)",
    )
    ap.add_argument("--all-configs", action="store_true", help="also compile every config autotuning would try")
    ap.add_argument("--verbose", action="store_true", help="print each compile to stderr")
    ap.add_argument("--from-json", metavar="PATH", help="print the markdown of an earlier --json run (no compiling)")
    args = ap.parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        quick = {tuple(r["shape"].values()) for r in data["records"]} <= set(QUICK_TRAINING + QUICK_DECODE)
        sys.stdout.write(markdown(data["records"], data["other_compiles"], quick))
        if "serving" in data:
            sys.stdout.write("\n" + static_serving.markdown(data["serving"]))
        return 0
    archs = [int(a) for a in (args.archs or ("90" if args.quick else "90,80")).split(",")]
    if not archs or any(a not in GPUS for a in archs):
        ap.error(f"--archs takes compute capabilities among {', '.join(map(str, GPUS))}, got {args.archs!r}")
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else (lambda m: None)
    records, extra = collect(args.quick, archs, args.all_configs, log)
    sys.stdout.write(markdown(records, extra, args.quick))
    # the serving ops (single-adapter decode, the multi-adapter grid): benchmarks/static_serving.py
    serving, serving_md = static_serving.report(sys.modules[__name__], archs[0], args.quick, log)
    sys.stdout.write("\n" + serving_md)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"card": dataclasses.asdict(CARD), "records": records, "other_compiles": extra, "serving": serving},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
