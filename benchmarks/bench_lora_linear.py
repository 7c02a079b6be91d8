"""Single-adapter LoRA linear: lora_kernels against cuBLAS F.linear, eager LoRA, torch.compile, the cuBLAS addmm
trick and PEFT.

Training shapes (TARGETS.md): M = 8192 tokens, (K, N) ∈ {(4096, 4096), (4096, 14336), (14336, 4096)}, r ∈ {16, 64};
three modes, each a do_bench median:

- ``fwd``: the forward with autograd recording (x, A and B require grad, W0 frozen), as in a training step;
- ``fwd+bwd``: forward + ``y.backward(dY)``; the base is ``F.linear`` forward + backward with W0 frozen (dX only);
- ``fwd+bwd dropout 0.1``: the same with LoRA dropout p = 0.1 (base unchanged: it has no dropout).

Decode shapes: M ∈ {1, 16, 64, 256} at K = N = 4096 and M ∈ {1, 256} at K = N = 8192, r = 16, unmerged forward
without autograd, timed three ways: in a CUDA graph with the weights hot in L2, in a CUDA graph cycling several weight
sets (as the layers of a model do), and eagerly (do_bench, launch overhead included).

Each provider is checked against a float64 reference (output, and dX, dA, dB for fwd+bwd) before it is timed; one
that is wrong is reported and not timed. Targets (TARGETS.md; H100 bf16, geometric mean over the six training shapes):
forward ≤ 1.06× base, fwd+bwd ≤ 1.10×, with dropout ≤ 1.12×; decode M ≤ 256 in graphs ≤ 1.10× base.

Run: ``python benchmarks/bench_lora_linear.py [--quick] [--csv out.csv] [--plot out.png]`` (``--help`` for more).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` and the in-tree ``lora_kernels`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_kernels._progress import progress

from benchmarks import common
from benchmarks.common import ProviderUnavailable, Table

TRAIN_M = 8192
TRAIN_KN = [(4096, 4096), (4096, 14336), (14336, 4096)]
TRAIN_RANKS = [16, 64]
DECODE_SHAPES = [
    (1, 4096, 4096),
    (16, 4096, 4096),
    (64, 4096, 4096),
    (256, 4096, 4096),
    (1, 8192, 8192),
    (256, 8192, 8192),
]
DECODE_RANK = 16
SCALE = 2.0  # alpha = 2r: the LoRA delta is as large as the base output, so a wrong delta cannot hide in rounding
DROPOUT = 0.1
MODES = ("fwd", "fwd+bwd", "fwd+bwd dropout")
TARGETS = {"fwd": 1.06, "fwd+bwd": 1.10, "fwd+bwd dropout": 1.12, "decode": 1.10}

PROVIDERS = (
    "base",
    "eager",
    "compile",
    "addmm",
    "peft",
    "lora_kernels",
    "lk_cublas_base",
    "lk_triton_base",
    "lk_decode",
)
# lora_kernels: the library as a user gets it (backend from --backend, default auto). lk_cublas_base / lk_triton_base:
# the Triton backend with its BASE_GEMM switch forced to "cublas" / "triton" (one of them equals the default).
# lk_decode: the inference-only one-launch kernel lora_kernels.triton.lora_decode.lora_decode_linear (decode tables
# only; from 65 rows on Hopper it is the persistent TMA forward with the shrink inside).


# ----------------------------------------------------------------------------------------------------- providers
def _eager_lora(x, W, A, B, scale: float, p: float, training: bool):
    h = F.dropout(x, p, training) if p > 0.0 else x
    return F.linear(x, W) + scale * F.linear(F.linear(h, A), B)


def _addmm_lora(x, W, A, B, scale: float, p: float, training: bool):
    # The LoRA delta is formed first and the base product adds it in cuBLAS's epilogue (beta = 1): no separate add
    # pass over y, at the price of writing and reading one M×N temporary.
    h = F.dropout(x, p, training) if p > 0.0 else x
    delta = scale * F.linear(F.linear(h, A), B)
    lead = x.shape[:-1]
    y = torch.addmm(delta.reshape(-1, W.shape[0]), x.reshape(-1, W.shape[1]), W.t(), beta=1.0, alpha=1.0)
    return y.reshape(*lead, W.shape[0]) if len(lead) != 1 else y


_COMPILED = None


def _compiled():
    global _COMPILED
    if _COMPILED is None:
        import torch._dynamo as dynamo

        # Every shape and mode is one more specialisation of the same function; the default limit (8) would make
        # dynamo silently fall back to eager after a few shapes.
        for name in (
            "recompile_limit",
            "cache_size_limit",
            "accumulated_recompile_limit",
            "accumulated_cache_size_limit",
        ):
            if hasattr(dynamo.config, name):
                try:
                    setattr(dynamo.config, name, max(256, getattr(dynamo.config, name)))
                except Exception:
                    pass
        _COMPILED = torch.compile(_eager_lora, dynamic=False)
    return _COMPILED


class _BaseGemm:
    """Forces ``lora_kernels.triton.lora_linear.BASE_GEMM`` (``"triton"``: the fused Triton GEMM computes the base
    product too; ``"cublas"``: cuBLAS computes it and the Triton kernels add the LoRA term in place) for the duration of
    each call, so both variants run in one process. The module reads the switch on every call."""

    def __init__(self, value: str):
        try:
            from lora_kernels.triton import lora_linear as tri
        except Exception as exc:
            raise ProviderUnavailable(f"lora_kernels.triton.lora_linear does not import: {exc}") from exc
        if not isinstance(getattr(tri, "BASE_GEMM", None), str):
            raise ProviderUnavailable("lora_kernels.triton.lora_linear has no BASE_GEMM switch")
        self.module, self.value = tri, value

    def __enter__(self):
        self.saved = self.module.BASE_GEMM
        self.module.BASE_GEMM = self.value

    def __exit__(self, *exc):
        self.module.BASE_GEMM = self.saved


class _PeftWrapper(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _peft_layer(W, A, B, scale: float, p: float):
    """A PEFT LoRA layer around an nn.Linear holding W (frozen), adapter weights copied from A and B, in W's dtype."""
    try:
        from peft import LoraConfig, get_peft_model
    except Exception as exc:
        raise ProviderUnavailable(f"peft is not importable ({type(exc).__name__}: {exc})") from exc
    N, K = W.shape
    r = A.shape[0]
    lin = nn.Linear(K, N, bias=False, device=W.device, dtype=W.dtype)
    lin.weight = nn.Parameter(W.detach(), requires_grad=False)
    cfg = LoraConfig(r=r, lora_alpha=scale * r, lora_dropout=p, target_modules=["proj"], bias="none")
    try:
        # Keep the adapter in W's dtype like every other provider (PEFT's default upcasts bf16 adapters to fp32).
        model = get_peft_model(_PeftWrapper(lin), cfg, autocast_adapter_dtype=False)
    except TypeError:
        model = get_peft_model(_PeftWrapper(lin), cfg)
    layer = model.base_model.model.proj
    pa, pb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        pa.data = A.detach().clone().to(pa.dtype)
        pb.data = B.detach().clone().to(pb.dtype)
    if abs(layer.scaling["default"] - scale) > 1e-6 * scale:
        raise ProviderUnavailable(f"PEFT scaling {layer.scaling['default']} differs from {scale}")
    return model, (pa, pb)


class Built:
    """A provider ready to call: ``fn(x) -> y``, the LoRA parameters whose gradients it produces, and a context that
    must be active around the forward AND the backward (the BASE_GEMM switch is read by both)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], params: Sequence[torch.Tensor] = (), ctx=None):
        self.fn = fn
        self.params = list(params)
        self.ctx = ctx if ctx is not None else contextlib.nullcontext()

    def forward(self, x):
        with self.ctx:
            return self.fn(x)

    def forward_backward(self, x, dy):
        with self.ctx:
            y = self.fn(x)
            y.backward(dy)
        return y


def build(provider: str, W, A, B, p: float, training: bool, backend: str | None) -> Built:
    """Provider ``provider`` on weights (W, A, B); A and B are leaf tensors shared by all but PEFT."""
    s = SCALE
    if provider == "base":
        return Built(lambda x: F.linear(x, W))
    if provider == "eager":
        return Built(lambda x: _eager_lora(x, W, A, B, s, p, training), (A, B))
    if provider == "addmm":
        return Built(lambda x: _addmm_lora(x, W, A, B, s, p, training), (A, B))
    if provider == "compile":
        if W.device.type == "cpu" and not _cpu_compile_ok():
            raise ProviderUnavailable("torch.compile on the CPU needs a C++ compiler")
        comp = _compiled()
        return Built(lambda x: comp(x, W, A, B, s, p, training), (A, B))
    if provider == "peft":
        model, params = _peft_layer(W, A, B, s, p)
        model.train(training)
        return Built(model, params)
    if provider in ("lora_kernels", "lk_cublas_base", "lk_triton_base"):
        try:
            import lora_kernels as lk
        except Exception as exc:
            raise ProviderUnavailable(f"lora_kernels is not importable: {exc}") from exc
        if provider == "lora_kernels":
            return Built(lambda x: lk.lora_linear(x, W, A, B, s, None, p, training, backend), (A, B))
        if W.device.type != "cuda" and backend != "triton":
            raise ProviderUnavailable(
                "a switch of the Triton backend; on the CPU pass --backend triton (with TRITON_INTERPRET=1)"
            )
        switch = _BaseGemm("cublas" if provider == "lk_cublas_base" else "triton")
        return Built(lambda x: lk.lora_linear(x, W, A, B, s, None, p, training, "triton"), (A, B), ctx=switch)
    if provider == "lk_decode":
        if training or p > 0.0:
            raise ProviderUnavailable("lora_decode_linear is inference only (no dropout, no autograd): decode tables")
        try:
            from lora_kernels import _backend
            from lora_kernels.triton.lora_decode import lora_decode_linear
        except Exception as exc:
            raise ProviderUnavailable(f"lora_kernels' decode kernel is not importable: {exc}") from exc
        why = _backend.triton_device_reason(W)
        if why:
            raise ProviderUnavailable(f"lora_decode_linear needs the Triton kernels: {why}")
        return Built(lambda x: lora_decode_linear(x, W, None, A, B, s))
    raise ValueError(provider)


def _cpu_compile_ok() -> bool:
    import shutil

    return any(shutil.which(c) for c in ("cc", "gcc", "clang", "g++"))


# ---------------------------------------------------------------------------------------------------- reference
def _reference(x, W, A, B, dy=None, lora: bool = True):
    """float64 forward (and dX, dA, dB when dy is given); ``lora=False``: the base layer alone (dX only).

    The PyTorch reference with float64 arithmetic and outputs, not float32: a TF32 setting left on by any library
    would otherwise blur the oracle."""
    from lora_kernels.reference import lora_linear as ref

    f64 = {"acc_dtype": torch.float64, "out_dtype": torch.float64}
    x, W, A, B = (t.detach() for t in (x, W, A, B))
    if not lora:
        A, B = A[:0], B[:, :0]  # rank 0: the base layer alone
    y, xa = ref.lora_linear_forward(x, W, A, B, SCALE, **f64)
    if dy is None:
        return y, None
    dx, d_a, d_b, _, _ = ref.lora_linear_backward(dy, x, W, A, B, xa, SCALE, **f64)
    return y, (dx, d_a, d_b) if lora else (dx,)


def _check(name: str, built: Built, x, W, A, B, dy, dtype) -> str | None:
    """None when the provider's output (and gradients, when dy is given) match the float64 reference."""
    try:
        for t in [x] + built.params:
            t.grad = None
        y = built.forward(x) if dy is None else built.forward_backward(x, dy)
        ref_y, ref_g = _reference(x, W, A, B, dy, lora=name != "base")
        bad = common.mismatch("output", y, ref_y, dtype)
        if bad is None and dy is not None:
            grads = [x.grad] + [q.grad for q in built.params]
            for gname, g, r in zip(("dX", "dA", "dB"), grads, ref_g):
                bad = common.mismatch(gname, g, r, dtype)
                if bad:
                    break
        for t in [x] + built.params:
            t.grad = None
        return None if bad is None else f"wrong result, not timed ({bad})"
    except ProviderUnavailable:
        raise
    except Exception as exc:
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


# ------------------------------------------------------------------------------------------------------ floors
def _floor(mode: str, M, K, N, r, elt: int, ceilings) -> float:
    """Roofline floor of the LoRA layer (the base's own floor drops the r terms).

    fwd: 2MKN + 2Mr(K+N) flops; bytes x, W0, A, B, y. fwd+bwd adds dX = dY·W0ᵀ + dS·A (2MKN + 2Mr(K+N)) and
    dA, dB (2Mr(K+N)); bytes add dY, W0 again, dX, x again (for dA), dA, dB."""
    lora = r * (K + N)
    flops = 2 * M * K * N + 2 * M * lora
    nbytes = (M * K + N * K + lora + M * N) * elt
    if mode != "fwd":
        flops += 2 * M * K * N + 4 * M * lora
        nbytes += (M * N + N * K + 2 * M * K + 2 * lora) * elt
    return common.floor_us(flops, nbytes, ceilings)


# ------------------------------------------------------------------------------------------------------- runs
def run_training(args, device, dtype, providers, ceilings, shapes) -> list[Table]:
    tables = {}
    for mode in args.modes:
        target = TARGETS[mode]
        tables[mode] = Table(
            f"training shapes, {mode}"
            + (f" (p = {DROPOUT})" if mode.endswith("dropout") else "")
            + ", do_bench median",
            ["M", "K", "N", "r"],
            providers,
            show_us=["lora_kernels"] if "lora_kernels" in providers else (),
            geomean_row=True,
            note=f"Ratios are time / base (base = F.linear{' fwd + bwd, W0 frozen (dX only)' if mode != 'fwd' else ''}"
            f"). Target for lora_kernels: geometric mean ≤ {target:.2f}.",
        )
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for M, K, N, r in progress(shapes, desc="training shapes", unit="shape"):
        key = {"M": M, "K": K, "N": N, "r": r}
        print(f"[train] M={M} K={K} N={N} r={r}", flush=True)
        x = torch.randn(M, K, generator=gen, device=device).to(dtype).requires_grad_(True)
        W = (torch.randn(N, K, generator=gen, device=device) / K**0.5).to(dtype)
        A = (torch.randn(r, K, generator=gen, device=device) / K**0.5).to(dtype).requires_grad_(True)
        B = (torch.randn(N, r, generator=gen, device=device) / r**0.5).to(dtype).requires_grad_(True)
        dy = torch.randn(M, N, generator=gen, device=device).to(dtype)
        broken: dict[str, str] = {}  # provider -> why it is not timed at this shape
        verified = set()  # providers whose output and gradients matched the reference at p = 0 at this shape
        for mode in args.modes:
            table = tables[mode]
            p = DROPOUT if mode.endswith("dropout") else 0.0
            backward = mode != "fwd"
            table.set_floor(key, _floor(mode, M, K, N, r, x.element_size(), ceilings))
            for prov in providers:
                if prov in broken:
                    table.add(key, prov, None, broken[prov])
                    continue
                try:
                    built = build(prov, W, A, B, p, True, args.backend)
                    if p == 0.0 or prov == "base":
                        bad = _check(prov, built, x, W, A, B, dy if backward else None, dtype)
                        if bad:
                            broken[prov] = bad
                        elif backward:
                            verified.add(prov)
                    else:
                        bad = None
                        if prov not in verified:  # exactness first, at p = 0 (the dropout check is only a sanity one)
                            bad = _check(prov, build(prov, W, A, B, 0.0, True, args.backend), x, W, A, B, dy, dtype)
                            if bad:
                                broken[prov] = bad
                            else:
                                verified.add(prov)
                        bad = bad or _check_dropout(built, x, W, A, B, dy, dtype)
                except ProviderUnavailable as exc:
                    broken[prov] = str(exc)
                    table.add(key, prov, None, str(exc))
                    continue
                if bad:
                    table.add(key, prov, None, bad)
                    print(f"  {prov}: {bad}", flush=True)
                    continue
                if backward:
                    timed = lambda b=built: b.forward_backward(x, dy)  # noqa: E731 (a one-line closure over the loop's values)
                    grads = [x] + built.params
                else:
                    timed = lambda b=built: b.forward(x)  # noqa: E731 (a one-line closure over the loop's values)
                    grads = None
                try:
                    us = common.time_eager(
                        timed, device, grad_to_none=grads, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms
                    )
                except Exception as exc:
                    table.add(key, prov, None, f"timing failed: {type(exc).__name__}: {exc}")
                    continue
                table.add(key, prov, us)
                print(f"  {mode:16s} {prov:22s} {us:10.1f} µs", flush=True)
                del built, timed
        del x, W, A, B, dy
        common.free_memory(device)
    return [tables[m] for m in args.modes]


def _check_dropout(built: Built, x, W, A, B, dy, dtype) -> str | None:
    """With dropout the mask is the provider's own: check the output is finite, differs from the no-dropout output
    (dropout applied) and that the gradients exist and are finite. Exactness is checked at p = 0 and by the tests."""
    try:
        y = built.forward_backward(x, dy)
        ref_y, _ = _reference(x, W, A, B)
        if not torch.isfinite(y).all():
            return "wrong result, not timed (output contains NaN or inf)"
        if torch.equal(y.float(), ref_y.to(y.dtype).float()):
            return "wrong result, not timed (output equals the no-dropout output: dropout not applied)"
        for name, g in zip(("dX", "dA", "dB"), [x.grad] + [q.grad for q in built.params]):
            if g is None or not torch.isfinite(g).all():
                return f"wrong result, not timed ({name} missing or not finite)"
        return None
    except ProviderUnavailable:
        raise
    except Exception as exc:
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        for t in [x] + built.params:
            t.grad = None


# The decode table of each timing ("cycled": {n} = the weight sets cycled); benchmarks/calibrate_serving.py reads
# the CSV's "table" column by these titles.
DECODE_TITLES = {
    "graph": "decode, unmerged forward in a CUDA graph, weights hot in L2",
    "cycled": "decode, unmerged forward in a CUDA graph, {n} weight sets cycled (weights from DRAM)",
    "eager": "decode, unmerged forward, eager (do_bench, launch overhead included)",
}


def run_decode(args, device, dtype, providers, ceilings, shapes) -> list[Table]:
    timings = [t for t in ("graph", "cycled", "eager") if t in args.decode_timings]
    tables = {
        t: Table(
            DECODE_TITLES[t],
            ["M", "K", "N", "r"],
            providers,
            show_floor=True,
            show_us=["lora_kernels"] if "lora_kernels" in providers else (),
            note="Ratios are time / base (time / floor in brackets). Floor = max(flops / peak, bytes / "
            "bandwidth), bytes = W0 + A + B + x + y. Target for lora_kernels in graphs: ≤ 1.10 × base.",
        )
        for t in timings
    }
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    cycles_used = set()
    with torch.no_grad():
        for M, K, N, r in progress(shapes, desc="decode shapes", unit="shape"):
            key = {"M": M, "K": K, "N": N, "r": r}
            print(f"[decode] M={M} K={K} N={N} r={r}", flush=True)
            elt = torch.empty((), dtype=dtype).element_size()
            per_set = (N * K + r * (K + N)) * elt
            n_sets = common.cycle_count(args.cycle, per_set, device) if "cycled" in timings else 1
            cycles_used.add(n_sets)
            x = torch.randn(M, K, generator=gen, device=device).to(dtype)
            sets = []
            for _ in range(n_sets):
                sets.append(
                    (
                        (torch.randn(N, K, generator=gen, device=device) / K**0.5).to(dtype),
                        (torch.randn(r, K, generator=gen, device=device) / K**0.5).to(dtype),
                        (torch.randn(N, r, generator=gen, device=device) / r**0.5).to(dtype),
                    )
                )
            floor = common.floor_us(
                2 * M * K * N + 2 * M * r * (K + N), (N * K + r * (K + N) + M * K + M * N) * elt, ceilings
            )
            for t in tables.values():
                t.set_floor(key, floor)
            W, A, B = sets[0]
            for prov in providers:
                try:
                    built = [build(prov, Wi, Ai, Bi, 0.0, False, args.backend) for (Wi, Ai, Bi) in sets]
                    y = built[0].forward(x)
                    bad = common.mismatch("output", y, _reference(x, W, A, B, lora=prov != "base")[0], dtype)
                    if bad:
                        raise ProviderUnavailable(f"wrong result, not timed ({bad})")
                except ProviderUnavailable as exc:
                    for t in tables.values():
                        t.add(key, prov, None, str(exc))
                    continue
                except Exception as exc:
                    for t in tables.values():
                        t.add(key, prov, None, f"failed: {type(exc).__name__}: {exc}")
                    continue
                common.time_into_tables(
                    tables, key, prov, [(lambda b=b: b.forward(x)) for b in built], device, args, width=22
                )
                del built
            del x, sets
            common.free_memory(device)
    common.name_cycled_table(tables, DECODE_TITLES, cycles_used)
    return [tables[t] for t in timings]


# --------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(parser)
    parser.add_argument("--m", type=int, default=TRAIN_M, help="tokens of the training shapes")
    parser.add_argument(
        "--kn", default=None, help="training (K, N) list as K:N,K:N (default: the three shapes of TARGETS.md)"
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="training ranks (default 16 64)")
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma list of training modes among {', '.join(MODES)}"
    )
    parser.add_argument(
        "--decode",
        default=None,
        help="decode shapes as M:K:N,... (default M ∈ 1,16,64,256 at 4096² and 1,256 at 8192²)",
    )
    parser.add_argument("--decode-rank", type=int, default=DECODE_RANK)
    parser.add_argument("--decode-timings", default="graph,cycled,eager", help="comma list among graph, cycled, eager")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in MODES:
            parser.error(f"--modes: {m!r} is not one of {', '.join(MODES)}")
    args.decode_timings = [t.strip() for t in args.decode_timings.split(",") if t.strip()]
    return args


def shapes_from_args(args, device: torch.device | None = None) -> tuple[list[tuple], list[tuple]]:
    if args.quick and device is not None and device.type == "cpu":
        # --quick on the CPU: tiny shapes for what the command line left at its default (the numbers mean nothing
        # there; a smoke run of seconds rather than minutes of 8192 x 14336 products).
        args.m = 64 if args.m == TRAIN_M else args.m
        args.kn = "64:96" if args.kn is None else args.kn
        args.ranks = args.ranks or [8]
        args.decode = "1:64:96,16:64:96" if args.decode is None else args.decode
        args.decode_rank = 8 if args.decode_rank == DECODE_RANK else args.decode_rank
    kn = TRAIN_KN if args.kn is None else [tuple(int(v) for v in s.split(":")) for s in args.kn.split(",")]
    ranks = args.ranks or TRAIN_RANKS
    if args.decode is None:
        decode = DECODE_SHAPES
    else:
        decode = [tuple(int(v) for v in s.split(":")) for s in args.decode.split(",")]
    if args.quick:
        kn, ranks = kn[:1], ranks[:1]
        decode = [d for d in decode if d[0] in (1, 256)][:2] or decode[:2]
    train = [(args.m, K, N, r) for (K, N) in kn for r in ranks]
    decode = [(M, K, N, args.decode_rank) for (M, K, N) in decode]
    return train, decode


def main(argv=None) -> list[Table]:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype)
    common.seed_all(args.seed)
    providers = common.selected_providers(args.providers, PROVIDERS)
    train, decode = shapes_from_args(args, device)
    ceilings = common.measure_ceilings(device, dtype, args)
    info = common.print_header(
        "LoRA linear, one adapter",
        device,
        dtype,
        ceilings,
        notes=[
            f"providers: {', '.join(providers)}; lora_kernels backend: {args.backend or 'auto'}",
            f"scale = {SCALE}, W0 frozen; fwd+bwd base = F.linear fwd + bwd with W0 frozen (dX only)",
        ],
    )
    common.begin_csv(args, info, dtype)
    tables: list[Table] = []
    if not args.skip_train and args.modes:
        tables += run_training(args, device, dtype, providers, ceilings, train)
    if not args.skip_decode and args.decode_timings:
        tables += run_decode(args, device, dtype, providers, ceilings, decode)
    common.finish(args, tables, info, dtype, "lora_linear: time / base", summarize(tables, providers))
    return tables


LK_PROVIDERS = ("lora_kernels", "lk_cublas_base", "lk_triton_base", "lk_decode")


def summarize(tables: Sequence[Table], providers: Sequence[str]) -> list[str]:
    """The targets of TARGETS.md: geomean over the training shapes per mode; the worst decode point (M ≤ 256) in
    graphs."""
    lines = []
    for t in tables:
        lk = [p for p in LK_PROVIDERS if p in providers]
        if t.title.startswith("training shapes"):
            mode = next(m for m in sorted(MODES, key=len, reverse=True) if f", {m}" in t.title)
            for p in lk:
                g = common.geomean(t.ratio(k, p) for k in t.keys)
                lines.append(common.verdict(f"{mode}, {p} geomean / base", g, TARGETS[mode]))
        elif "CUDA graph" in t.title:
            kind = "hot" if "hot" in t.title else "cycled"
            for p in lk:
                ratios = [t.ratio(k, p) for k in t.keys if k[0] <= 256]
                worst = None if not ratios or any(r is None for r in ratios) else max(ratios)
                lines.append(
                    common.verdict(f"decode M ≤ 256 in graphs ({kind}), {p} worst / base", worst, TARGETS["decode"])
                )
    return lines


if __name__ == "__main__":
    main()
