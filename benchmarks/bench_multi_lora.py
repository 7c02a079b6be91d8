"""Many adapters in one batch: whole layers (base product + per-token LoRA) against their roofline floor.

Points: K = N = 4096, r = 16, L ∈ {16, 128} adapters loaded, T ∈ {1, 16, 64, 256, 1024, 4096} tokens, and two
distributions of adapters over tokens:

- ``uniform``: one random adapter (of the L) per token, so up to min(T, L) distinct adapters are present;
- ``mix``: a realistic serving mix, few adapters with many tokens each: the tokens form up to 8 requests (contiguous
  runs of random lengths), each request's adapter drawn from 4 of the L with Zipf weights 1, 1/2, 1/3, 1/4.

Providers (each a whole layer ``y = x·W0ᵀ (+ LoRA)``, checked against a float64 loop before timing):

- ``base``: cuBLAS ``F.linear`` alone (no LoRA);
- ``gather_bmm``: gather every token's A and B (``A_stack[ids]``) and two ``bmm``;
- ``loop``: PEFT's mixed-batch algorithm, one ``x[idx] → A → B → y[idx] +=`` per adapter present, with the index
  lists built once before timing (capturable in a CUDA graph);
- ``peft_mixed``: PEFT itself (``model(x, adapter_names=[...])`` on a ``get_peft_model`` wrapper holding the L
  adapters), which rebuilds the index lists in Python on every call: eager timing only (not capturable), and only
  when ``import peft`` works;
- ``lora_kernels``: :func:`lora_kernels.multi_lora_linear` (backend from ``--backend``, default auto; on Hopper,
  steps of at least 512 tokens whose ids put several adapters in each row tile run the side path: SIDE_TERM), with
  ``lk_fused`` / ``lk_split`` forcing its one-kernel (shrink+expand fused) or two-kernel path, ``lk_gemm`` its
  gemm path (the base GEMM with the expand in its epilogue; the TMA GEMM on Hopper above 64 tokens; one launch with
  the shrink inside for up to 64 tokens of few adapters), ``lk_gemm_plain`` the gemm path with the plain (non-TMA)
  Triton GEMM, ``lk_gemm_2l`` the gemm path in two launches (shrink, then the GEMM) where it would be one, and
  ``lk_gemm_sorted`` the gemm path whose GEMM takes its rows in the sorted token order and reads W0 by TMA
  (``SORTED_TMA_GEMM``: few adapters per row tile whatever the ids' order; off by default until timed here), and
  ``lk_gemm_serial`` the gemm path without programmatic dependent launch (``PDL = False``: the GEMM starts after the
  shrink, instead of overlapping it where their programs can share an SM), and ``lk_gemm_sorted_copy`` the gemm path
  on the sorted token list at every step where its GEMM is the TMA kernel (x's rows copied in that order by the
  shrink, read by TMA: what a heavy step ran before the side path, SIDE_TERM off), ``lk_side`` the side path at every
  step where the GEMM is the TMA kernel (the LoRA term in fp32 from a kernel beside the GEMM, added in its epilogue),
  and ``lk_joined`` the gemm path's TMA steps of at most ``JOINED_MAX_TOKENS`` tokens in one launch (shrink items and
  GEMM tiles in one grid: ``JOINED``, off by default until timed here);
- ``lk_cuda``: the same with ``backend="cuda"`` when the compiled extension is available.

Timings: in a CUDA graph with the weights hot in L2; in a CUDA graph cycling several weight sets (W0 and the adapter
stacks) so they come from DRAM; and eagerly (do_bench, launch overhead included). The batch metadata
(``LoRABatch.prepare``) is built once per point outside the timed region: one prepared batch serves every layer of
a step. Floor = max(flops / peak, bytes / bandwidth), bytes = W0 + A and B of the adapters present + x + y.
Target (TARGETS.md): lora_kernels within 1.2× its floor at every point, in graphs.

Run: ``python benchmarks/bench_multi_lora.py [--quick] [--csv out.csv] [--plot out.png]`` (``--help`` for more).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` and the in-tree ``lora_kernels`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from lora_kernels._progress import progress

from benchmarks import common
from benchmarks.common import ProviderUnavailable, Table

K_DEFAULT = N_DEFAULT = 4096
RANK = 16
ADAPTERS = [16, 128]
TOKENS = [1, 16, 64, 256, 1024, 4096]
DISTS = ("uniform", "mix")
SCALE = 2.0  # alpha = 2r
TARGET_FLOOR = 1.2
MIX_REQUESTS = 8
MIX_ADAPTERS = 4

# lk_gemm_t{BM}x{BN}: the gemm path's TMA GEMM forced to one tile (lora_kernels.triton.multi_lora.GEMM_TMA_TILE)
TILE_VARIANTS = ((128, 256), (128, 128), (64, 256), (64, 128))
PROVIDERS = (
    "base",
    "gather_bmm",
    "loop",
    "peft_mixed",
    "lora_kernels",
    "lk_fused",
    "lk_split",
    "lk_gemm",
    "lk_gemm_plain",
    "lk_gemm_2l",
    "lk_gemm_sorted",
    "lk_gemm_serial",
    "lk_gemm_sorted_copy",
    *(f"lk_gemm_t{bm}x{bn}" for bm, bn in TILE_VARIANTS),
    "lk_cuda",
)
EAGER_ONLY = {"peft_mixed": "eager only: PEFT builds its index lists on the host at every call (not capturable)"}


# ------------------------------------------------------------------------------------------------------- the data
def token_ids(dist: str, L: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Adapter slot per token (CPU int64 [T])."""
    if dist == "uniform":
        return torch.randint(0, L, (T,), generator=gen)
    if dist == "mix":
        n_req = min(T, MIX_REQUESTS)
        # Request lengths: a random composition of T into n_req positive parts.
        cuts = torch.randperm(T - 1, generator=gen)[: n_req - 1] + 1 if n_req > 1 else torch.empty(0, dtype=torch.long)
        bounds = [0] + sorted(cuts.tolist()) + [T]
        pool = torch.randperm(L, generator=gen)[: min(L, MIX_ADAPTERS)]
        weights = torch.tensor([1.0 / (i + 1) for i in range(pool.numel())])
        ids = torch.empty(T, dtype=torch.long)
        for i in range(n_req):
            pick = pool[torch.multinomial(weights, 1, generator=gen)].item()
            ids[bounds[i] : bounds[i + 1]] = pick
        return ids
    raise ValueError(f"unknown distribution {dist!r}; choose from {', '.join(DISTS)}")


def point_ids(dist: str, L: int, T: int, seed: int = 0) -> torch.Tensor:
    """The adapter slots of grid point (dist, L, T): :func:`token_ids` from a generator seeded with ``seed`` for this
    point alone, so that a point's ids do not depend on which other points a run measures, and the static model
    (``benchmarks/static_serving.py``) and its calibration (``benchmarks/calibrate_serving.py``) price the very ids
    that were timed."""
    return token_ids(dist, L, T, torch.Generator().manual_seed(seed))


def adapter_bound(dist: str, L: int, T: int) -> int:
    """The most distinct adapters a step of ``dist`` can name: what a serving engine's per-batch LoRA bound would be
    set to, and the ``max_adapters_per_step`` promise the lora_kernels providers prepare their batch with (4 for
    ``mix``, fewer for fewer tokens or requests; at most T and L)."""
    if dist == "mix":
        return min(T, L, MIX_ADAPTERS, MIX_REQUESTS)
    return min(T, L)


class WeightSet:
    """One layer's weights: W0 [N, K] and an AdapterPool with L adapters of rank r (scale SCALE each)."""

    def __init__(self, L: int, K: int, N: int, r: int, dtype, device, gen: torch.Generator):
        AdapterPool = _lk_attr("AdapterPool", "lora_kernels.pool")
        self.W = (torch.randn(N, K, generator=gen, device=device) / K**0.5).to(dtype)
        self.pool = AdapterPool(L, r, K, N, dtype=dtype, device=device)
        for i in range(L):
            A = (torch.randn(r, K, generator=gen, device=device) / K**0.5).to(dtype)
            B = (torch.randn(N, r, generator=gen, device=device) / r**0.5).to(dtype)
            self.pool.load(f"adapter{i}", A, B, alpha=SCALE * r)
        self.A_stack = self.pool.A_stack  # [L, r, K]
        self.B_stack = self.pool.B_stack  # [L, N, r]
        self.scales = self.pool.scales[:, 0].contiguous()  # [L] fp32
        self.host_scales = self.scales.tolist()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.W, self.A_stack, self.B_stack))


def _lk_attr(name: str, module: str):
    """A public lora_kernels name, falling back to its defining module (in case ``__init__`` does not export it)."""
    try:
        import lora_kernels as lk
    except Exception as exc:
        raise ProviderUnavailable(f"lora_kernels is not importable: {exc}") from exc
    if hasattr(lk, name):
        return getattr(lk, name)
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except Exception as exc:
        raise ProviderUnavailable(f"lora_kernels has no {name} ({exc})") from exc


# ----------------------------------------------------------------------------------------------------- providers
def _gather_bmm(x, ws: WeightSet, ids):
    y = F.linear(x, ws.W)
    s = torch.bmm(x.unsqueeze(1), ws.A_stack[ids].transpose(1, 2))  # [T, 1, r]
    delta = torch.bmm(s, ws.B_stack[ids].transpose(1, 2)).squeeze(1)  # [T, N]
    y += delta * ws.scales[ids].to(delta.dtype).unsqueeze(1)
    return y


def _groups(ids: torch.Tensor, device) -> list[tuple[int, torch.Tensor]]:
    """(slot, token indices on the device) per adapter present, in the order PEFT visits them (first appearance)."""
    order = []
    for i in ids.tolist():
        if i >= 0 and i not in order:
            order.append(i)
    return [(l, (ids == l).nonzero().flatten().to(device)) for l in order]


def _loop(x, ws: WeightSet, groups):
    y = F.linear(x, ws.W)
    for l, idx in groups:
        sub = x[idx]
        y[idx] += ws.host_scales[l] * F.linear(F.linear(sub, ws.A_stack[l]), ws.B_stack[l])
    return y


class _PeftWrapper(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _peft_mixed(ws: WeightSet, ids_host: torch.Tensor) -> Callable:
    """PEFT's own mixed-batch forward over the L adapters of ``ws`` (copied into PEFT layers, base dtype)."""
    try:
        from peft import LoraConfig, get_peft_model
    except Exception as exc:
        raise ProviderUnavailable(f"peft is not importable ({type(exc).__name__}: {exc})") from exc
    L, r, K = ws.A_stack.shape
    N = ws.W.shape[0]
    lin = torch.nn.Linear(K, N, bias=False, device=ws.W.device, dtype=ws.W.dtype)
    lin.weight = torch.nn.Parameter(ws.W, requires_grad=False)
    cfg = LoraConfig(r=r, lora_alpha=SCALE * r, lora_dropout=0.0, target_modules=["proj"], bias="none")
    try:
        model = get_peft_model(_PeftWrapper(lin), cfg, adapter_name="adapter0", autocast_adapter_dtype=False)
    except TypeError:
        model = get_peft_model(_PeftWrapper(lin), cfg, adapter_name="adapter0")
    for i in range(1, L):
        model.add_adapter(f"adapter{i}", cfg)
    layer = model.base_model.model.proj
    for i in range(L):
        a, b = layer.lora_A[f"adapter{i}"].weight, layer.lora_B[f"adapter{i}"].weight
        a.data = ws.A_stack[i].detach().clone().to(a.dtype)
        b.data = ws.B_stack[i].detach().clone().to(b.dtype)
        if abs(layer.scaling[f"adapter{i}"] - ws.host_scales[i]) > 1e-6 * abs(ws.host_scales[i]):
            raise ProviderUnavailable(f"PEFT scaling {layer.scaling[f'adapter{i}']} differs from {ws.host_scales[i]}")
    model.eval()
    names = [f"adapter{i}" for i in ids_host.tolist()]
    return lambda x: model(x, adapter_names=names)


# Gemm-path variants: the module flags of lora_kernels.triton.multi_lora each sets while it runs (and while captured),
# and the path it asks for (None: the default, so that the heavy-epilogue rule decides).
GEMM_VARIANTS = {
    "lk_gemm_plain": ({"TMA_GEMM": False}, "gemm"),
    "lk_gemm_2l": ({"LANES_GEMM": False}, "gemm"),
    "lk_gemm_sorted": ({"SORTED_TMA_GEMM": True}, "gemm"),
    "lk_gemm_serial": ({"PDL": False}, "gemm"),
    # the gemm path's TMA steps (up to JOINED_MAX_TOKENS tokens, where joined_grid fits) in one launch: shrink items
    # and GEMM tiles in one grid (JOINED, opt-in); elsewhere the gemm path as chosen
    "lk_joined": ({"JOINED": True}, "gemm"),
    # the rule's thresholds at nothing: every step whose GEMM is the TMA kernel takes the sorted-row GEMM fed by the
    # shrink's sorted copy of x (where the rule would not: 16 adapters at 1024 tokens, requests kept together)
    "lk_gemm_sorted_copy": (
        {
            "SIDE_TERM": False,
            "SORTED_GATHER": True,
            "SORTED_MIN_TOKENS": 0,
            "SORTED_MAX_COST": -1.0,
            "SORTED_MIN_TOKENS_PER_ADAPTER": 0,
        },
        None,
    ),
    # the side path's thresholds at nothing: every step whose GEMM is the TMA kernel (and whose ids are on the host)
    # runs the side kernel beside the TMA GEMM, which adds its fp32 buffer (what the default runs only where the
    # ids put several adapters in each row tile: SIDE_MAX_COST)
    "lk_side": ({"SIDE_TERM": True, "SIDE_MIN_TOKENS": 0, "SIDE_MAX_COST": -1.0}, None),
    # the gemm path's TMA GEMM on one tile (GEMM_TMA_TILE): fewer, larger tiles re-read less of x and W0 from L2 but
    # keep fewer SMs busy; at most 64 tokens (no TMA GEMM) they are the gemm path as chosen
    **{f"lk_gemm_t{bm}x{bn}": ({"GEMM_TMA_TILE": (bm, bn)}, "gemm") for bm, bn in TILE_VARIANTS},
}


@contextlib.contextmanager
def module_flags(module, values: dict):
    """Set module-level flags (``GEMM_VARIANTS``' on lora_kernels.triton.multi_lora) for the duration, then restore
    them: what a gemm-path variant runs (and is captured) under, and what the calibration prices it with."""
    saved = {name: getattr(module, name) for name in values}
    try:
        for name, value in values.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def build(
    provider: str, ws: WeightSet, ids_host: torch.Tensor, device, backend: str | None, bound: int | None = None
) -> Callable:
    """``fn(x) -> y`` for one weight set; the per-batch metadata is prepared here, outside the timed calls, with
    ``bound`` as its ``max_adapters_per_step`` (see :func:`adapter_bound`)."""
    if provider == "base":
        return lambda x: F.linear(x, ws.W)
    if provider == "gather_bmm":
        ids = ids_host.to(device)
        return lambda x: _gather_bmm(x, ws, ids)
    if provider == "loop":
        groups = _groups(ids_host, device)
        return lambda x: _loop(x, ws, groups)
    if provider == "peft_mixed":
        return _peft_mixed(ws, ids_host)
    multi = _lk_attr("multi_lora_linear", "lora_kernels.ops.multi_lora")
    LoRABatch = _lk_attr("LoRABatch", "lora_kernels.pool")
    fused = {"lk_fused": True, "lk_split": False}.get(provider)
    if provider == "lk_cuda":
        try:
            from lora_kernels import cuda as cuda_ext
        except Exception as exc:
            raise ProviderUnavailable(f"lora_kernels.cuda is not importable: {exc}") from exc
        why = cuda_ext.cuda_ops_unavailable_reason()
        if why:
            raise ProviderUnavailable(f"CUDA extension unavailable: {why}")
        backend = "cuda"
    elif provider in ("lk_fused", "lk_split") and device.type != "cuda" and backend in (None, "auto", "torch"):
        raise ProviderUnavailable("the fused/split choice only exists in the Triton and CUDA backends")
    elif (provider == "lk_gemm" or provider in GEMM_VARIANTS) and backend == "cuda":
        raise ProviderUnavailable("the gemm path has no CUDA-extension kernel")
    batch = LoRABatch.prepare(
        ids_host.to(torch.int32), max_tokens=ids_host.numel(), device=device, max_adapters_per_step=bound
    )
    if provider == "lk_gemm":
        return lambda x: multi(x, ws.W, None, ws.pool, batch, backend=backend, path="gemm")
    if provider in GEMM_VARIANTS:
        try:
            ML = importlib.import_module("lora_kernels.triton.multi_lora")
        except ImportError as exc:
            raise ProviderUnavailable(f"lora_kernels' Triton kernels are not importable: {exc}") from exc
        flags, path = GEMM_VARIANTS[provider]

        def flagged(x):
            with module_flags(ML, flags):
                return multi(x, ws.W, None, ws.pool, batch, backend=backend, path=path)

        return flagged
    if fused is None:
        return lambda x: multi(x, ws.W, None, ws.pool, batch, backend=backend)
    return lambda x: multi(x, ws.W, None, ws.pool, batch, backend=backend, fused=fused)


def reference(x, ws: WeightSet, ids_host: torch.Tensor) -> torch.Tensor:
    """The PyTorch reference with float64 arithmetic and output (float64: immune to any TF32 setting)."""
    from lora_kernels.reference import multi_lora as ref

    pool = ws.pool
    return ref.multi_lora_linear(
        x,
        ws.W,
        None,
        pool.A_stack,
        pool.B_stack,
        pool.ranks,
        pool.scales,
        ids_host.to(x.device),
        acc_dtype=torch.float64,
        out_dtype=torch.float64,
    )


def floor_of(T: int, K: int, N: int, r: int, n_active: int, elt: int, ceilings) -> float:
    flops = 2 * T * K * N + 2 * T * r * (K + N)
    nbytes = (N * K + n_active * r * (K + N) + T * K + T * N) * elt
    return common.floor_us(flops, nbytes, ceilings)


# ------------------------------------------------------------------------------------------------------------ run
# The table of each timing ("cycled": {n} = the weight sets cycled); benchmarks/calibrate_serving.py reads the CSV's
# "table" column by these titles (a CUDA graph: "CUDA graph"; weights from DRAM: "cycled").
TITLES = {
    "graph": "whole layer in a CUDA graph, weights hot in L2",
    "cycled": "whole layer in a CUDA graph, {n} weight sets cycled (weights from DRAM)",
    "eager": "whole layer, eager (do_bench, launch overhead included)",
}


def run(args, device, dtype, providers, ceilings) -> list[Table]:
    timings = [t for t in ("graph", "cycled", "eager") if t in args.timings]
    note = (
        f"K = {args.k}, N = {args.n}, r = {args.r}. Cells: time / base (time / floor). Floor = max(flops / peak, "
        "bytes / bandwidth), bytes = W0 + A and B of the adapters present + x + y. Target for lora_kernels: "
        f"≤ {TARGET_FLOOR} × floor at every point (graphs)."
    )
    tables = {
        t: Table(
            TITLES[t],
            ["dist", "L", "T", "active"],
            providers,
            show_floor=True,
            show_us=[p for p in ("lora_kernels",) if p in providers],
            note=note,
        )
        for t in timings
    }
    wgen = torch.Generator(device=device).manual_seed(args.seed + 1)
    elt = torch.empty((), dtype=dtype).element_size()
    cycles_used = set()
    with torch.no_grad():
        for L in args.adapters:
            print(f"[multi] loading {L} adapters", flush=True)
            sets = [WeightSet(L, args.k, args.n, args.r, dtype, device, wgen)]
            n_sets = common.cycle_count(args.cycle, sets[0].nbytes, device) if "cycled" in timings else 1
            sets += [WeightSet(L, args.k, args.n, args.r, dtype, device, wgen) for _ in range(n_sets - 1)]
            cycles_used.add(n_sets)
            for dist in args.dists:
                for T in progress(args.tokens, desc=f"L={L} {dist}", unit="point"):
                    ids = point_ids(dist, L, T, args.seed)
                    n_active = int(torch.unique(ids).numel())
                    key = {"dist": dist, "L": L, "T": T, "active": n_active}
                    print(f"[multi] dist={dist} L={L} T={T} active={n_active}", flush=True)
                    x = torch.randn(T, args.k, generator=wgen, device=device).to(dtype)
                    floor = floor_of(T, args.k, args.n, args.r, n_active, elt, ceilings)
                    for t in tables.values():
                        t.set_floor(key, floor)
                    ref = reference(x, sets[0], ids)
                    for prov in providers:
                        try:
                            use = sets[:1] if prov in EAGER_ONLY else sets
                            bound = adapter_bound(dist, L, T)
                            fns = [build(prov, ws, ids, device, args.backend, bound) for ws in use]
                            expected = F.linear(x.double(), sets[0].W.double()) if prov == "base" else ref
                            bad = common.mismatch("output", fns[0](x), expected, dtype)
                            if bad:
                                raise ProviderUnavailable(f"wrong result, not timed ({bad})")
                        except ProviderUnavailable as exc:
                            for t in tables.values():
                                t.add(key, prov, None, str(exc))
                            print(f"  {prov}: {exc}", flush=True)
                            continue
                        except Exception as exc:
                            msg = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                            for t in tables.values():
                                t.add(key, prov, None, msg)
                            print(f"  {prov}: {msg}", flush=True)
                            continue
                        not_timed = (
                            {t: EAGER_ONLY[prov] for t in tables if t != "eager"} if prov in EAGER_ONLY else None
                        )
                        common.time_into_tables(
                            tables,
                            key,
                            prov,
                            [(lambda f=f: f(x)) for f in fns],
                            device,
                            args,
                            width=14,
                            not_timed=not_timed,
                        )
                        del fns
                    del x, ref
            del sets
            common.free_memory(device)
    common.name_cycled_table(tables, TITLES, cycles_used)
    return [tables[t] for t in timings]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(parser)
    parser.add_argument("--k", type=int, default=K_DEFAULT, help="in_features")
    parser.add_argument("--n", type=int, default=N_DEFAULT, help="out_features")
    parser.add_argument("--r", type=int, default=RANK, help="rank of every adapter")
    parser.add_argument("--adapters", type=int, nargs="+", default=None, help="L values (default 16 128)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="T values (default 1 16 64 256 1024 4096)")
    parser.add_argument("--dists", default=",".join(DISTS), help="comma list among uniform, mix")
    parser.add_argument("--timings", default="graph,cycled,eager", help="comma list among graph, cycled, eager")
    args = parser.parse_args(argv)
    args.dists = [d.strip() for d in args.dists.split(",") if d.strip()]
    for d in args.dists:
        if d not in DISTS:
            parser.error(f"--dists: {d!r} is not one of {', '.join(DISTS)}")
    args.timings = [t.strip() for t in args.timings.split(",") if t.strip()]
    args.adapters = args.adapters or ([128] if args.quick else ADAPTERS)
    args.tokens = args.tokens or ([1, 256, 4096] if args.quick else TOKENS)
    args.cpu_quick_defaults = {
        "k": args.k == K_DEFAULT,
        "n": args.n == N_DEFAULT,
        "r": args.r == RANK,
        "adapters": args.adapters == [128],
        "tokens": args.tokens == [1, 256, 4096],
    }
    return args


def _cpu_quick(args, device) -> None:
    """--quick on the CPU: tiny layers for what the command line left at its default (a smoke run of seconds)."""
    if not (args.quick and device.type == "cpu"):
        return
    tiny = {"k": 64, "n": 96, "r": 8, "adapters": [4], "tokens": [1, 16]}
    for name, value in tiny.items():
        if args.cpu_quick_defaults[name]:
            setattr(args, name, value)


def main(argv=None) -> list[Table]:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype)
    common.seed_all(args.seed)
    providers = common.selected_providers(args.providers, PROVIDERS)
    _cpu_quick(args, device)
    ceilings = common.measure_ceilings(device, dtype, args)
    info = common.print_header(
        "Multi-adapter LoRA layer",
        device,
        dtype,
        ceilings,
        notes=[
            f"providers: {', '.join(providers)}; lora_kernels backend: {args.backend or 'auto'}",
            f"K = {args.k}, N = {args.n}, r = {args.r}, scale = {SCALE}; batch metadata prepared outside the "
            "timed region",
        ],
    )
    # the shape and the seed of the ids in every row: benchmarks/calibrate_serving.py prices each row by them
    shape = {"K": args.k, "N": args.n, "r": args.r, "seed": args.seed}
    common.begin_csv(args, info, dtype, shape)
    tables = run(args, device, dtype, providers, ceilings)
    common.finish(
        args, tables, info, dtype, "multi-adapter layer: time / base", summarize(tables, providers), run=shape
    )
    return tables


LK_PROVIDERS = tuple(p for p in PROVIDERS if p == "lora_kernels" or p.startswith("lk_"))
PEERS = ("gather_bmm", "loop")


def summarize(tables: Sequence[Table], providers: Sequence[str]) -> list[str]:
    """The targets of TARGETS.md, per graph table: the worst time / floor of each lora_kernels variant over all points,
    and
    the points where it is not faster than every peer."""
    lines = []
    for t in tables:
        if "CUDA graph" not in t.title:
            continue
        kind = "hot" if "hot" in t.title else "cycled"
        for p in (p for p in LK_PROVIDERS if p in providers):
            ratios = [t.ratio(k, p, "floor") for k in t.keys]
            if not ratios or all(r is None for r in ratios):
                continue
            worst = None if any(r is None for r in ratios) else max(ratios)
            lines.append(common.verdict(f"graphs ({kind}), {p} worst time / floor", worst, TARGET_FLOOR))
            slower = [
                k
                for k in t.keys
                for q in PEERS
                if t.times[k].get(q) is not None and t.times[k].get(p) is not None and t.times[k][p] >= t.times[k][q]
            ]
            if slower:
                shown = ", ".join(f"{k[0]} L={k[1]} T={k[2]}" for k in dict.fromkeys(slower))
                lines.append(f"  - {p} is not faster than every peer at: {shown}")
    return lines


if __name__ == "__main__":
    main()
