"""Shared pieces of the benchmark scripts: timers, measured ceilings, the floor, correctness checks and the
markdown / CSV / PNG writers.

Method (the same as the reference run of TARGETS.md, so numbers can be compared with it):

* Eager timings are medians of ``triton.testing.do_bench`` (it flushes L2 between calls and times each call with
  CUDA events). ``fwd+bwd`` calls ``y.backward(dy)`` and resets the listed ``.grad`` to None before every call.
* CUDA-graph timings capture ``inner`` back-to-back calls in one graph once, replay it ``n`` times between two CUDA
  events, and report the median over a few such batches of ``elapsed / (n · inner)``: host launch overhead is out of
  the number, which is what a serving engine that replays graphs sees. With one weight set the weights stay in L2
  between calls ("hot"); :func:`time_graph_cycled` makes every call of the graph use the next of several weight sets
  whose total exceeds L2 ("cycled"), as the layers of a real model do. Both are reported.
* Ceilings are measured at the start of every run (device-to-device copy bandwidth, read + write counted, and a big
  matmul's FLOP/s) and the floor of a point is ``max(flops / peak, bytes / bandwidth)``.
* On the CPU (smoke tests only: numbers mean nothing) ``do_bench`` and CUDA graphs do not exist; both timers fall back
  to a ``time.perf_counter`` loop.

Nothing here touches a device at import time.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}

# Relative tolerances of the correctness check, per output dtype: the error of one bf16 rounding is 2^-8 ≈ 0.4%
# of a value, fp16's 2^-11; fp32 allows TF32 inside Triton kernels (10-bit mantissa products).
_REL_TOL = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3, torch.float32: 4e-3, torch.float64: 1e-9}

# CPU fallback timer: seconds spent per measurement and the number of calls (smoke runs keep both tiny).
CPU_BUDGET_S = 0.02
CPU_MIN_CALLS = 3


class ProviderUnavailable(Exception):
    """A provider cannot run here (package missing, backend unavailable); the message says why."""


# ------------------------------------------------------------------------------------------------------ arguments
def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (smoke runs only)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="activation/weight dtype")
    parser.add_argument("--csv", metavar="PATH", default=None, help="also write every timing to PATH (long format)")
    parser.add_argument("--plot", metavar="PATH", default=None, help="also write a PNG of the ratios (matplotlib)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few shapes only; on the CPU tiny shapes and short timings (a smoke run of seconds)",
    )
    parser.add_argument(
        "--providers", default=None, help="comma-separated subset of the providers to run (the base always runs)"
    )
    parser.add_argument(
        "--backend", default=None, help="lora_kernels backend for the lora_kernels provider (auto|triton|cuda|torch)"
    )
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up time per point")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measuring time per point")
    parser.add_argument(
        "--cycle",
        type=int,
        default=None,
        help="weight sets cycled in the 'cycled' graph timing (default: enough to overflow L2 twice)",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="use this matmul peak for the floor instead of the measured one"
    )
    parser.add_argument(
        "--bandwidth-tbs",
        type=float,
        default=None,
        help="use this DRAM bandwidth (TB/s) for the floor instead of the measured copy bandwidth",
    )
    parser.add_argument("--seed", type=int, default=0)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    if dev.type not in ("cuda", "cpu"):
        raise SystemExit(f"--device {name}: only cuda and cpu are supported")
    return dev


def resolve_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def selected_providers(arg: str | None, available: Sequence[str]) -> list[str]:
    """The providers to run, in ``available``'s order; ``arg`` is a comma list (unknown names are an error)."""
    if not arg:
        return list(available)
    wanted = [p.strip() for p in arg.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in available]
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; choose from {', '.join(available)}")
    return [p for p in available if p in wanted or p == "base"]


# ------------------------------------------------------------------------------------------------------- header
def _version(dist_name: str) -> str | None:
    """Installed version from the package metadata (importing peft would pull in transformers: seconds)."""
    try:
        from importlib.metadata import version

        return version(dist_name)
    except Exception:
        module = sys.modules.get(dist_name)
        return getattr(module, "__version__", None) if module is not None else None


def _git_revision() -> str:
    """Short commit of the checkout the scripts run from (+ "-dirty" with uncommitted changes), or "unknown"."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not rev:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def environment(device: torch.device) -> dict[str, str]:
    """Card, versions, date and command line: what BENCHMARKS.md needs next to every table."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "torch": torch.__version__,
        "triton": _version("triton") or "not installed",
        "peft": _version("peft") or "not installed",
        "lora_kernels": (_version("lora_kernels") or "in-tree") + f" (git {_git_revision()})",
        "python": platform.python_version(),
        # Variables that change what runs (backend choice, autotuning, interpreter, allocator): part of the record.
        "env": ", ".join(
            f"{k}={v}"
            for k, v in sorted(os.environ.items())
            if k.startswith(("LORA_KERNELS_", "TRITON_", "PYTORCH_", "TORCHINDUCTOR_")) or k == "CUDA_VISIBLE_DEVICES"
        )
        or "no LORA_KERNELS_/TRITON_/PYTORCH_ variables set",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2 = getattr(props, "L2_cache_size", 0)
        info["card"] = (
            f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB, L2 {l2 / 2**20:.0f} MiB)"
        )
        info["cuda"] = str(torch.version.cuda)
    else:
        info["card"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores): smoke run only"
    return info


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 20
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20)


def cycle_count(requested: int | None, bytes_per_set: int, device: torch.device) -> int:
    """Weight sets to cycle so that one pass over them is at least twice L2 (a call never finds its weights there)."""
    if requested is not None:
        return max(1, requested)
    if device.type != "cuda":
        return 2  # smoke runs: the mechanics only
    return int(min(16, max(2, math.ceil(2 * l2_bytes(device) / max(1, bytes_per_set)) + 1)))


@dataclass
class Ceilings:
    bandwidth: float  # bytes/s used for the floor
    flops: float  # FLOP/s used for the floor
    measured_bandwidth: float
    measured_flops: float
    matmul_size: int

    def describe(self, dtype: torch.dtype) -> str:
        text = (
            f"measured ceilings: device-to-device copy {self.measured_bandwidth / 1e12:.3f} TB/s (read + write), "
            f"{_dtype_name(dtype)} matmul {self.matmul_size}³ {self.measured_flops / 1e12:.1f} TFLOP/s"
        )
        if self.bandwidth != self.measured_bandwidth or self.flops != self.measured_flops:
            text += (
                f"; floor uses {self.bandwidth / 1e12:.3f} TB/s and {self.flops / 1e12:.1f} TFLOP/s "
                "(given on the command line)"
            )
        return text


def measure_ceilings(device: torch.device, dtype: torch.dtype, args=None) -> Ceilings:
    """Copy bandwidth (1 GiB buffer on CUDA) and matmul FLOP/s (8192³ on CUDA), both as do_bench medians."""
    on_cuda = device.type == "cuda"
    nbytes = (1 << 30) if on_cuda else (8 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t_copy = time_eager(lambda: dst.copy_(src), device) * 1e-6
    bandwidth = 2 * nbytes / t_copy
    del src, dst
    size = 8192 if on_cuda else 256
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    t_mm = time_eager(lambda: torch.mm(a, b), device) * 1e-6
    flops = 2 * size**3 / t_mm
    del a, b
    use_bw, use_flops = bandwidth, flops
    if args is not None and args.bandwidth_tbs:
        use_bw = args.bandwidth_tbs * 1e12
    if args is not None and args.peak_tflops:
        use_flops = args.peak_tflops * 1e12
    return Ceilings(use_bw, use_flops, bandwidth, flops, size)


def floor_us(flops: float, nbytes: float, ceilings: Ceilings) -> float:
    """The roofline floor: max(flops / peak, bytes / bandwidth), in µs."""
    return max(flops / ceilings.flops, nbytes / ceilings.bandwidth) * 1e6


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def print_header(title: str, device: torch.device, dtype: torch.dtype, ceilings: Ceilings, notes=()) -> dict:
    info = environment(device)
    lines = [
        f"## {title}",
        "",
        f"- date: {info['date']}",
        f"- card: {info['card']}" + (f", CUDA {info['cuda']}" if "cuda" in info else ""),
        f"- versions: torch {info['torch']}, triton {info['triton']}, peft {info['peft']}, "
        f"lora_kernels {info['lora_kernels']}, python {info['python']}",
        f"- command: `{info['command']}`",
        f"- environment: {info['env']}",
        f"- dtype: {_dtype_name(dtype)}",
        f"- {ceilings.describe(dtype)}",
    ]
    lines += [f"- {n}" for n in notes]
    print("\n".join(lines) + "\n", flush=True)
    return info


# ------------------------------------------------------------------------------------------------------- timers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_cpu(fn: Callable[[], object], grad_to_none: Iterable[torch.Tensor] | None = None) -> float:
    """Median µs of a perf_counter loop; the CPU stand-in for do_bench and graph replays."""
    grads = list(grad_to_none or ())

    def call():
        for t in grads:
            t.grad = None
        fn()

    call()  # warm-up (first-call caches, lazy imports)
    times = []
    deadline = time.perf_counter() + CPU_BUDGET_S
    while len(times) < CPU_MIN_CALLS or (time.perf_counter() < deadline and len(times) < 1000):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def time_eager(
    fn: Callable[[], object], device: torch.device, grad_to_none=None, warmup_ms: float = 25.0, rep_ms: float = 100.0
) -> float:
    """Median µs per call: ``triton.testing.do_bench`` on CUDA, a perf_counter loop on the CPU."""
    if device.type != "cuda":
        return _time_cpu(fn, grad_to_none)
    from triton.testing import do_bench

    ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")
    return float(ms) * 1e3


class GraphCaptureError(RuntimeError):
    pass


def capture_graph(fn: Callable[[], object], device: torch.device, inner: int = 1):
    """A CUDA graph holding ``inner`` back-to-back calls of ``fn``, after a warm-up on a side stream (autotuning and
    lazy initialisation must happen outside the capture). Raises :class:`GraphCaptureError` when ``fn`` cannot be
    captured (a host synchronisation, a CPU tensor, ...)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
    except Exception as exc:  # capture failures surface as many different exception types
        try:
            torch.cuda.synchronize(device)
        except Exception:
            pass
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise GraphCaptureError(f"CUDA graph capture failed: {type(exc).__name__}: {first}") from exc
    return graph


def time_graph(
    fn: Callable[[], object], device: torch.device, inner: int = 10, batches: int = 5, batch_ms: float = 20.0
) -> float:
    """Median µs per call of ``fn`` replayed from a CUDA graph holding ``inner`` back-to-back calls.

    The graph (see :func:`capture_graph`) is replayed in batches of about ``batch_ms`` each, timed with CUDA events;
    the median over ``batches`` batches divided by the calls per batch is returned. On the CPU: a perf_counter loop.
    """
    if device.type != "cuda":
        return _time_cpu(fn)
    graph = capture_graph(fn, device, inner)
    try:
        graph.replay()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            graph.replay()
        end.record()
        end.synchronize()
        per_replay_ms = max(start.elapsed_time(end) / 3, 1e-4)
        n = int(min(10000, max(3, batch_ms / per_replay_ms)))
        samples = []
        for _ in range(batches):
            start.record()
            for _ in range(n):
                graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / (n * inner))
        return statistics.median(samples) * 1e3
    finally:
        del graph
        torch.cuda.synchronize(device)


def time_graph_cycled(fns: Sequence[Callable[[], object]], device: torch.device, **kw) -> float:
    """Median µs per call when one graph calls each of ``fns`` (one per weight set) in turn: weights come from DRAM."""
    fns = list(fns)

    def all_sets():
        for f in fns:
            f()

    return time_graph(all_sets, device, inner=max(1, 10 // len(fns)) if len(fns) < 10 else 1, **kw) / len(fns)


def time_calls(timing: str, calls: Sequence[Callable[[], object]], device: torch.device, args) -> float:
    """Median µs per call of one provider under ``timing``: ``"graph"`` replays ``calls[0]`` in a CUDA graph,
    ``"cycled"`` one graph over every call (one per weight set), ``"eager"`` do_bench of ``calls[0]``."""
    if timing == "graph":
        return time_graph(calls[0], device)
    if timing == "cycled":
        return time_graph_cycled(calls, device)
    return time_eager(calls[0], device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)


def time_into_tables(
    tables: dict[str, Table],
    key,
    prov: str,
    calls: Sequence[Callable[[], object]],
    device: torch.device,
    args,
    width: int,
    not_timed: dict[str, str] | None = None,
) -> None:
    """Time one provider under each timing of ``tables`` (``time_calls``) and add the µs, or the error, to that
    timing's table; ``not_timed``: timings skipped, with the reason the table shows."""
    for timing, table in tables.items():
        if not_timed and timing in not_timed:
            table.add(key, prov, None, not_timed[timing])
            continue
        try:
            us = time_calls(timing, calls, device, args)
        except Exception as exc:
            table.add(key, prov, None, f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
            print(f"  {timing:7s} {prov}: {exc}", flush=True)
            continue
        table.add(key, prov, us)
        print(f"  {timing:7s} {prov:{width}s} {us:10.2f} µs", flush=True)


def name_cycled_table(tables: dict[str, Table], titles: dict[str, str], cycles_used) -> None:
    """Put the weight-set counts that were cycled through into the "cycled" table's title."""
    if "cycled" in tables:
        tables["cycled"].title = titles["cycled"].format(n="/".join(str(n) for n in sorted(cycles_used)))


def free_memory(device: torch.device) -> None:
    """Drop what the last shape left behind before the next one allocates (peak memory stays one shape's)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------- correctness
def mismatch(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> str | None:
    """None when ``actual`` matches the fp32/fp64 ``expected`` within ``dtype``'s tolerance, else what is wrong.

    Two checks: relative Frobenius error ≤ tol, and every element within 8·tol·rms(expected) + tol·|expected|
    (so a few wild elements fail even when the norm hides them). NaN and inf always fail.
    """
    if actual is None:
        return f"{name}: missing"
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if not torch.isfinite(a).all():
        return f"{name}: contains NaN or inf"
    tol = _REL_TOL.get(dtype, 1e-2)
    rms = e.pow(2).mean().sqrt().item() if e.numel() else 0.0
    scale = max(rms, 1e-30)
    rel = (a - e).norm().item() / max(e.norm().item(), 1e-30)
    worst = ((a - e).abs() - tol * e.abs()).max().item() if e.numel() else 0.0
    if rel > tol or worst > 8 * tol * scale:
        return f"{name}: relative error {rel:.2e}, worst element off by {worst / scale:.2e}·rms (tolerance {tol:.1e})"
    return None


# ------------------------------------------------------------------------------------------------------- tables
def geomean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def _fmt_us(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _fmt_ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


class Table:
    """One markdown table: rows are points (shape keys), columns the base time, the floor and each provider's ratio.

    ``add(key, provider, us)`` records a time (µs) or an error; ``markdown()`` prints ``provider / base`` per provider
    (and ``/ floor`` when ``show_floor``), with absolute µs for the providers in ``show_us``; ``geomean=True`` adds a
    geometric-mean row. ``long_rows()`` gives every timing for the CSV.
    """

    def __init__(
        self,
        title: str,
        key_cols: Sequence[str],
        providers: Sequence[str],
        base: str = "base",
        show_floor: bool = False,
        show_us: Sequence[str] = (),
        geomean_row: bool = False,
        note: str | None = None,
    ):
        self.title = title
        self.key_cols = list(key_cols)
        self.providers = [p for p in providers if p != base]
        self.base = base
        self.show_floor = show_floor
        self.show_us = list(show_us)
        self.geomean_row = geomean_row
        self.note = note
        self.keys: list[tuple] = []
        self.times: dict[tuple, dict[str, float | None]] = {}
        self.floors: dict[tuple, float] = {}
        self.extra: dict[tuple, dict[str, object]] = {}
        self.errors: dict[str, list[str]] = {}
        self.error_count: dict[str, int] = {}
        self.live = _LIVE  # the run's CSV, rewritten after every point (see begin_csv)
        if self.live is not None:
            self.live.tables.append(self)

    def _row(self, key: dict) -> tuple:
        k = tuple(key[c] for c in self.key_cols)
        if k not in self.times:
            self.keys.append(k)
            self.times[k] = {}
            self.extra[k] = {}
        return k

    def add(self, key: dict, provider: str, us: float | None, error: str | None = None) -> None:
        k = self._row(key)
        self.times[k][provider] = us
        if error:
            msgs = self.errors.setdefault(provider, [])
            if error not in msgs:
                msgs.append(error)
            self.error_count[provider] = self.error_count.get(provider, 0) + 1
        if self.live is not None:
            self.live.flush()

    def set_floor(self, key: dict, us: float) -> None:
        self.floors[self._row(key)] = us

    def set_extra(self, key: dict, name: str, value) -> None:
        self.extra[self._row(key)][name] = value

    def ratio(self, k: tuple, provider: str, to: str = "base") -> float | None:
        t = self.times[k].get(provider)
        ref = self.times[k].get(self.base) if to == "base" else self.floors.get(k)
        if t is None or not ref:
            return None
        return t / ref

    def markdown(self) -> str:
        extra_cols = sorted({c for k in self.keys for c in self.extra[k]})
        head = list(self.key_cols) + extra_cols + [f"{self.base} µs"]
        if self.show_floor:
            head.append("floor µs (floor/base)")
        for p in self.providers:
            head.append(f"{p} / base" + (" (/ floor)" if self.show_floor else ""))
        for p in self.show_us:
            head.append(f"{p} µs")
        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k in self.keys:
            cells = [str(v) for v in k] + [str(self.extra[k].get(c, "")) for c in extra_cols]
            base_us = self.times[k].get(self.base)
            cells.append(_fmt_us(base_us))
            if self.show_floor:
                fl = self.floors.get(k)
                cells.append(f"{_fmt_us(fl)} ({_fmt_ratio(fl / base_us if fl and base_us else None)})")
            for p in self.providers:
                cell = _fmt_ratio(self.ratio(k, p))
                if self.show_floor:
                    cell += f" ({_fmt_ratio(self.ratio(k, p, 'floor'))})"
                cells.append(cell)
            for p in self.show_us:
                cells.append(_fmt_us(self.times[k].get(p)))
            lines.append("| " + " | ".join(cells) + " |")
        if self.geomean_row and self.keys:
            cells = ["**geomean**"] + [""] * (len(self.key_cols) - 1 + len(extra_cols)) + [""]
            if self.show_floor:
                cells.append("")
            for p in self.providers:
                g = geomean(self.ratio(k, p) for k in self.keys)
                cell = f"**{_fmt_ratio(g)}**"
                if self.show_floor:
                    cell += f" ({_fmt_ratio(geomean(self.ratio(k, p, 'floor') for k in self.keys))})"
                cells.append(cell)
            cells += [""] * len(self.show_us)
            lines.append("| " + " | ".join(cells) + " |")
        if self.errors:
            lines.append("")
        for p, msgs in self.errors.items():
            more = self.error_count[p] - 1
            if more and len(msgs) > 1:
                tail = f" (and {more} more point(s), e.g. {msgs[-1]})"
            else:
                tail = f" (at {more + 1} point(s))" if more else ""
            lines.append(f"- {p}: {msgs[0]}{tail}")
        return "\n".join(lines) + "\n"

    def long_rows(self, meta: dict[str, str]) -> list[dict[str, object]]:
        rows = []
        for k in self.keys:
            for p in [self.base] + self.providers:
                if p not in self.times[k]:
                    continue
                us = self.times[k][p]
                row = {
                    "table": self.title,
                    **dict(zip(self.key_cols, k)),
                    **self.extra[k],
                    "provider": p,
                    "us": None if us is None else round(us, 3),
                    "base_us": _round(self.times[k].get(self.base)),
                    "floor_us": _round(self.floors.get(k)),
                    "ratio_base": _round(self.ratio(k, p), 4),
                    "ratio_floor": _round(self.ratio(k, p, "floor"), 4),
                }
                row.update(meta)
                rows.append(row)
        return rows


def _round(v, nd=3):
    return None if v is None else round(v, nd)


class LiveCsv:
    """The CSV of a run in progress: rewritten (whole, atomically) after every recorded point, so that a run that is
    interrupted or times out keeps everything it measured. Tables created while it is active register with it."""

    def __init__(self, path: str, meta: dict[str, str]):
        self.path, self.meta, self.tables = path, meta, []

    def flush(self) -> None:
        write_csv(self.path, self.tables, self.meta, quiet=True)


_LIVE: LiveCsv | None = None


def begin_csv(args, info: dict[str, str], dtype: torch.dtype, run: dict[str, object] | None = None) -> None:
    """Start writing ``args.csv`` (if given) point by point; call after print_header, before creating the tables.
    ``run``: columns of every row that describe the whole run (its shape, its seed), as ``finish`` takes them."""
    global _LIVE
    _LIVE = LiveCsv(args.csv, _meta(info, dtype, run)) if getattr(args, "csv", None) else None


def _meta(info: dict[str, str], dtype: torch.dtype, run: dict[str, object] | None = None) -> dict[str, object]:
    return {
        "device": info["card"],
        "dtype": _dtype_name(dtype),
        "date": info["date"],
        "torch": info["torch"],
        "triton": info["triton"],
        **(run or {}),
    }


def write_csv(path: str, tables: Sequence[Table], meta: dict[str, str], quiet: bool = False) -> None:
    rows = [r for t in tables for r in t.long_rows(meta)]
    cols: list[str] = []
    for r in rows:
        for c in r:
            if c not in cols:
                cols.append(c)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    os.replace(tmp, path)  # readers never see a half-written file
    if not quiet:
        print(f"wrote {len(rows)} rows to {path}")


def write_plot(path: str, tables: Sequence[Table], title: str) -> bool:
    """One panel per table: grouped bars of each provider's time / base per point, a line at 1.0."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"--plot: matplotlib unavailable ({exc}); no PNG written")
        return False
    tables = [t for t in tables if t.keys]
    if not tables:
        return False
    fig, axes = plt.subplots(
        len(tables), 1, figsize=(max(8, 0.9 * max(len(t.keys) for t in tables) + 4), 3.2 * len(tables)), squeeze=False
    )
    for ax, t in zip(axes[:, 0], tables):
        shown = [p for p in t.providers if any(t.ratio(k, p) for k in t.keys)]
        width = 0.8 / max(1, len(shown))
        for i, p in enumerate(shown):
            ys = [t.ratio(k, p) or float("nan") for k in t.keys]
            ax.bar([j + i * width for j in range(len(t.keys))], ys, width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")  # ratios span 1.0x (fused kernels) to 1000x (eager per-adapter loops)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(t.keys))])
        ax.set_xticklabels([",".join(str(v) for v in k) for k in t.keys], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("time / base")
        ax.set_title(t.title, fontsize=9)
        if shown:
            ax.legend(fontsize=7, ncol=min(6, len(shown)))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return True


def verdict(what: str, value: float | None, target: float) -> str:
    """One line of the summary: ``what: 1.04 (target ≤ 1.06): met``."""
    if value is None:
        return f"- {what}: not measured (target ≤ {target:.2f})"
    return f"- {what}: {value:.2f} (target ≤ {target:.2f}): {'met' if value <= target else 'NOT met'}"


def finish(
    args,
    tables: Sequence[Table],
    info: dict[str, str],
    dtype: torch.dtype,
    title: str,
    summary: Sequence[str] = (),
    run: dict[str, object] | None = None,
) -> None:
    """Print every table and the summary against the targets, then write the CSV (with ``run``'s columns, as
    ``begin_csv``) and the PNG when asked."""
    for t in tables:
        print(t.markdown(), flush=True)
    if summary:
        print("### Against the targets\n\n" + "\n".join(summary) + "\n", flush=True)
    global _LIVE
    _LIVE = None
    for t in tables:
        t.live = None
    if args.csv:
        write_csv(args.csv, tables, _meta(info, dtype, run))
    if args.plot:
        write_plot(args.plot, tables, title)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
