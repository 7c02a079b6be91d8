"""Calibrate the static serving model against measured times: read the CSVs of ``benchmarks/bench_multi_lora.py``
(CUDA-graph tables), price every timed lora_kernels variant and the cuBLAS base with the launches the model gives
for the very ids that were timed, and fit the model's few constants to the measurements:

- ``bandwidth``: DRAM bytes/s of a launch (the model's ``COPY_BW``),
- ``cublas_flops``: the cuBLAS base GEMM's rate,
- ``tma_slowdown`` / ``wgmma_slowdown`` / ``mma_sync_slowdown``: a Triton GEMM's time against cuBLAS's by the
  machine code it compiles to (the card's ``triton_*_slowdown``),
- ``launch_us``: the cost of each launch beyond the base layer's one (``LAUNCH_US``),
- ``pdl_launch_us``: that cost for the gemm path's GEMM, launched as a programmatic dependent of its shrink
  (``PDL_LAUNCH_US``; told from ``launch_us`` by ``lk_gemm`` against ``lk_gemm_serial`` and ``lk_split``),
- ``overlap``: how much of a programmatic dependent launch runs alongside the launch before it (1: fully, the
  model's assumption; 0: not at all),
- ``l2_bandwidth``: the L2 read bandwidth that bounds a launch by the bytes its programs request (infinite: the
  model's assumption that L2 never binds; the one-launch gemm kernel for few adapters re-reads its adapters' A rows
  from L2, twice the W0 strip it streams).

The fit is a coordinate descent over a grid of values per constant (no SciPy), minimising the mean squared log of
measured / predicted over the rows of one table (hot weights and cycled weights are fitted apart: with W0 hot in
L2 the fitted bandwidth is an effective one, not DRAM's). A constant that no row's prediction depends on, or that
the rows cannot tell from its assumed value, keeps that value. Then the grid of BENCHMARKS.md is predicted again
with the fitted constants: the default path's predicted time / floor per point, every point where the path rules
(``lora_kernels.ops.multi_lora.choose_path``, ``triton.multi_lora.heavy_epilogue``) pick a path the fitted model
predicts slower than another one (a threshold to move), and for each point near the goal the value of each constant
at which it would cross it.

``--assumed`` prints that grid section for the model's assumed constants, without measurements. Run on the CPU
after a GPU run, from the repository root::

    python benchmarks/calibrate_serving.py out/multi_*.csv out/decode_*.csv [--markdown out/calibrate.md]

``bench_lora_linear.py``'s decode CSVs add the one-launch single-adapter decode kernel (``lk_decode``) and the base
at their shapes.

Prints markdown (constants, per-variant errors, the grid again, the rules to revisit) and can write the fitted
constants as JSON (``--json``). Only lora_kernels' Triton variants and the base are priced (the peers, eager PEFT
and the CUDA extension have no launch model)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
from collections import Counter
from collections.abc import Iterable, Sequence

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lora_kernels.triton import multi_lora as ML

from benchmarks import static_serving as SS
from benchmarks.bench_multi_lora import GEMM_VARIANTS, TARGET_FLOOR, adapter_bound, module_flags, point_ids

# Provider of bench_multi_lora.py -> the path it forces (None: the default), for the variants that set no flags.
_PATH_OF = {"lora_kernels": None, "lk_fused": "fused", "lk_split": "split", "lk_gemm": "gemm"}
PRICED = ("base", *_PATH_OF, *GEMM_VARIANTS)
DECODE_PRICED = ("base", "lk_decode")  # of bench_lora_linear.py's decode tables
_ELT = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}


@dataclasses.dataclass(frozen=True)
class Constants:
    """The model's constants a measurement can correct (see the module docstring)."""

    bandwidth: float = SS.COPY_BW
    cublas_flops: float = SS.card().cublas_flops
    tma_slowdown: float = SS.card().triton_tma_slowdown
    wgmma_slowdown: float = SS.card().triton_wgmma_slowdown
    mma_sync_slowdown: float = SS.card().triton_mma_sync_slowdown
    launch_us: float = SS.LAUNCH_US
    pdl_launch_us: float = SS.PDL_LAUNCH_US
    overlap: float = 1.0
    l2_bandwidth: float = math.inf

    def card(self):
        return dataclasses.replace(
            SS.card(),
            cublas_flops=self.cublas_flops,
            triton_tma_slowdown=self.tma_slowdown,
            triton_wgmma_slowdown=self.wgmma_slowdown,
            triton_mma_sync_slowdown=self.mma_sync_slowdown,
        )


def _steps(lo: float, hi: float, n: int) -> tuple[float, ...]:
    return tuple(lo + (hi - lo) * i / (n - 1) for i in range(n))


# The values each constant may take: wide enough for any card the model could describe, fine enough that one step
# moves a prediction by less than a CUDA-graph timing's run-to-run noise (1-2 %) near the H100's values.
GRIDS = {
    "bandwidth": _steps(1.0e12, 8.0e12, 351),  # 20 GB/s steps; up to 8 TB/s: W0 hot in L2 reads faster than DRAM
    "cublas_flops": _steps(300e12, 1000e12, 141),  # 5 TFLOP/s steps, up to the H100's dense peak
    "tma_slowdown": _steps(0.8, 3.0, 221),
    "wgmma_slowdown": _steps(0.8, 3.0, 221),
    "mma_sync_slowdown": _steps(1.0, 6.0, 101),
    "launch_us": _steps(0.0, 6.0, 121),  # 0.05 µs steps
    "pdl_launch_us": _steps(0.0, 6.0, 121),
    "overlap": _steps(0.0, 1.0, 51),
    "l2_bandwidth": (*_steps(2.0e12, 40.0e12, 153), math.inf),  # 0.25 TB/s steps, and "never binds"
}


MISFITS = 10  # rows listed under "largest misfits"
LOSS_TOLERANCE = 1e-3  # a move must lower the loss by 0.1 % of it (a 1-2 % timing noise makes it ~1e-4)


@dataclasses.dataclass
class Row:
    """One measured time of one provider at one point, with the model's launches for it."""

    timing: str  # "hot" | "cycled"
    dist: str
    L: int
    T: int
    provider: str
    us: float
    floor_us: float | None
    launches: list[dict]

    @property
    def point(self) -> tuple[str, int, int]:
        return (self.dist, self.L, self.T)


def model_launches(
    provider: str, ids, L: int, K: int, N: int, R: int, elt: int, bound: int | None
) -> list[dict] | None:
    """The model's launches for ``provider`` of bench_multi_lora.py on token ids ``ids`` (None: not priced)."""
    T = ids.numel()
    if provider == "base":
        return [SS.base_launch(T, K, N, elt)]
    if provider in _PATH_OF:
        return SS.launches(ids, L, K, (N,), R, elt, path=_PATH_OF[provider], adapters=bound)
    if provider in GEMM_VARIANTS:
        flags, path = GEMM_VARIANTS[provider]
        with module_flags(ML, flags):
            return SS.launches(
                ids,
                L,
                K,
                (N,),
                R,
                elt,
                path=path,
                adapters=bound,
                pdl=ML.PDL,
                tma=ML.TMA_GEMM,
            )
    return None


def _timing(table: str) -> str | None:
    if "CUDA graph" not in table:
        return None  # eager timings include the host's launch overhead, which the model does not price
    return "cycled" if "cycled" in table else "hot"


def _num(v: str | None) -> float | None:
    try:
        x = float(v) if v not in (None, "") else None
    except ValueError:
        return None
    return x if x is not None and math.isfinite(x) and x > 0 else None


_RUN_COLUMNS = (("K", "--k"), ("N", "--n"), ("r", "--r"), ("seed", "--seed"))


def _run_of(rec: dict, given: dict[str, int | None], path: str) -> tuple[int, int, int, int]:
    """(K, N, R, seed) of a multi-adapter row: its own columns (bench_multi_lora.py writes them), else the values
    given, else the benchmark's defaults. A given value that a row contradicts is an error: that row was not timed
    at the shape (or on the ids) asked for."""
    default = {"K": SS.K_DEFAULT, "N": SS.N_DEFAULT, "r": SS.RANK, "seed": 0}
    out = []
    for col, flag in _RUN_COLUMNS:
        raw = rec.get(col)
        own = int(float(raw)) if raw not in (None, "") else None
        if own is not None and given[col] is not None and own != given[col]:
            raise ValueError(
                f"{path}: a row of {rec.get('table', '?')!r} was timed with {col} = {own}, not {flag} {given[col]}; "
                f"drop {flag} (the CSV's rows name their shape and seed) or give the CSV of that run"
            )
        out.append(own if own is not None else given[col] if given[col] is not None else default[col])
    return out[0], out[1], out[2], out[3]


def read_rows(
    paths: Iterable[str], K: int | None = None, N: int | None = None, R: int | None = None, seed: int | None = None
) -> tuple[list[Row], list[str]]:
    """The priced rows of the CSVs and a list of notes (rows skipped and why). A multi-adapter row is priced at its
    own K, N, rank and seed (columns of bench_multi_lora.py's CSVs; for CSVs without them, the values given, else
    4096, 4096, 16, 0; a given value that a row contradicts raises ValueError). Each point's ids are rebuilt as the
    benchmark draws them (``bench_multi_lora.point_ids`` with that seed); a point whose ``active`` count differs
    from them was timed on other ids (another seed, an older script) and is skipped."""
    rows = []
    skipped: Counter[str] = Counter()
    ids_of: dict[tuple, object] = {}
    given = {"K": K, "N": N, "r": R, "seed": seed}
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for rec in csv.DictReader(f):
                timing = _timing(rec.get("table", ""))
                provider = rec.get("provider", "")
                decode = rec.get("table", "").startswith("decode")
                if timing is None or provider not in (DECODE_PRICED if decode else PRICED):
                    continue
                us = _num(rec.get("us"))
                if us is None:
                    skipped["no time (failed or not run)"] += 1
                    continue
                if decode:
                    row = _decode_row(rec, timing, provider, us)
                    if row is None:
                        skipped["not a decode row"] += 1
                    else:
                        rows.append(row)
                    continue
                try:
                    dist, L, T = rec["dist"], int(rec["L"]), int(rec["T"])
                except (KeyError, ValueError):
                    skipped["not a multi-adapter row"] += 1
                    continue
                elt = _ELT.get(rec.get("dtype", "bf16"))
                if elt is None:
                    skipped[f"dtype {rec.get('dtype')!r}"] += 1
                    continue
                k, n, r, row_seed = _run_of(rec, given, path)
                key = (dist, L, T, row_seed)
                if key not in ids_of:
                    ids_of[key] = point_ids(dist, L, T, row_seed)
                ids = ids_of[key]
                active = rec.get("active")
                if active not in (None, "") and int(float(active)) != len(set(ids.tolist())):
                    skipped["ids differ from the timed ones (active count)"] += 1
                    continue
                lns = model_launches(provider, ids, L, k, n, r, elt, adapter_bound(dist, L, T))
                rows.append(Row(timing, dist, L, T, provider, us, _num(rec.get("floor_us")), lns))
    return rows, [f"skipped {n} row(s): {why}" for why, n in skipped.items()]


def _decode_row(rec: dict, timing: str, provider: str, us: float) -> Row | None:
    """A row of bench_lora_linear.py's decode tables: ``lk_decode`` (lora_decode_linear, one launch) or the base."""
    try:
        M, K, N, R = (int(rec[c]) for c in ("M", "K", "N", "r"))
    except (KeyError, ValueError):
        return None
    elt = _ELT.get(rec.get("dtype", "bf16"))
    if elt is None:
        return None
    lns = [SS.base_launch(M, K, N, elt)] if provider == "base" else SS.decode_launches(M, K, N, R, elt)
    return Row(timing, f"decode {K}x{N}", 0, M, provider, us, _num(rec.get("floor_us")), lns)


def predict(row_launches: Sequence[dict], k: Constants, c=None) -> float:
    return SS.predict_us(
        row_launches,
        bandwidth=k.bandwidth,
        launch_us=k.launch_us,
        pdl_launch_us=k.pdl_launch_us,
        c=c or k.card(),
        overlap=k.overlap,
        l2_bandwidth=k.l2_bandwidth,
    )


def loss(rows: Sequence[Row], k: Constants) -> float:
    """Mean squared natural log of measured / predicted."""
    c = k.card()
    return sum(math.log(r.us / predict(r.launches, k, c)) ** 2 for r in rows) / max(1, len(rows))


def _probes(name: str, v: float) -> tuple[float, ...]:
    """Values a quarter of the (finite) grid's span either side of ``v``, within the grid; from infinity (L2 never
    binding), the grid's lowest finite value and the one a quarter above it."""
    finite = [g for g in GRIDS[name] if math.isfinite(g)]
    lo, hi = finite[0], finite[-1]
    step = (hi - lo) / 4
    if not math.isfinite(v):
        return (lo, lo + step)
    return (max(v - step, lo), min(v + step, hi))


def informing(rows: Sequence[Row], k: Constants, name: str) -> int:
    """How many rows' predictions move by more than 1 % when constant ``name`` moves by a quarter of its grid's
    span (either way, :func:`_probes`): the rows that determine it."""
    base = [predict(r.launches, k) for r in rows]
    count = 0
    for i, r in enumerate(rows):
        for v in _probes(name, getattr(k, name)):
            if abs(predict(r.launches, dataclasses.replace(k, **{name: v})) / base[i] - 1) > 0.01:
                count += 1
                break
    return count


def _distance(a: float, b: float) -> float:
    return 0.0 if a == b else abs(a - b)  # (inf - inf is nan)


def _better(cost: float, than: float) -> bool:
    """A move must lower the loss by more than :data:`LOSS_TOLERANCE` of it: a timing's rounding must not move a
    constant the rows do not pin."""
    return cost < than - LOSS_TOLERANCE * than - 1e-15


def _search(grid: Sequence[float], f, current: float, stride: int = 10) -> float:
    """The grid value minimising ``f``: every ``stride``-th value first, then every value within a stride of the
    best of those (and of ``current``); values no better (:func:`_better`) than the best go to the one nearest
    ``current``."""
    cost = {}

    def best_of(values):
        for v in values:
            if v not in cost:
                cost[v] = f(v)
        low = min(cost[v] for v in values)
        return min((v for v in values if not _better(low, cost[v])), key=lambda v: _distance(v, current))

    coarse = list(dict.fromkeys([*grid[::stride], grid[-1]]))
    i = grid.index(best_of(coarse))
    near = min(range(len(grid)), key=lambda j: _distance(grid[j], current))
    fine = {grid[j] for c in (i, near) for j in range(max(0, c - stride), min(len(grid), c + stride + 1))}
    return best_of(list(fine | set(coarse)))


def _nudge(k: Constants, name: str, steps: int) -> Constants:
    """``k`` with constant ``name`` moved ``steps`` values along its grid (clamped to the grid)."""
    grid = GRIDS[name]
    i = min(range(len(grid)), key=lambda j: _distance(grid[j], getattr(k, name)))
    return dataclasses.replace(k, **{name: grid[min(max(i + steps, 0), len(grid) - 1)]})


def fit(rows: Sequence[Row], start: Constants | None = None, sweeps: int = 30) -> tuple[Constants, dict[str, int]]:
    """Coordinate descent of :func:`loss` over :data:`GRIDS`; returns the fitted constants and, per constant, the
    number of rows that determine it (0: kept at its start value)."""
    start = k = start or Constants()
    if not rows:
        return k, {name: 0 for name in GRIDS}
    moved = {name: informing(rows, k, name) for name in GRIDS}
    free = [name for name in GRIDS if moved[name]]
    for _ in range(sweeps):
        changed = False
        for name in free:
            best = _search(GRIDS[name], lambda v: loss(rows, dataclasses.replace(k, **{name: v})), getattr(k, name))
            if best != getattr(k, name):
                k, changed = dataclasses.replace(k, **{name: best}), True
        # constants the rows pin only together (a Triton GEMM's rate is cuBLAS's over its slowdown): try moving two
        # at once by one grid step each, which coordinate moves alone cannot
        current = loss(rows, k)
        for i, a in enumerate(free):
            for b in free[i + 1 :]:
                for da in (-1, 1):
                    for db in (-1, 1):
                        trial = _nudge(_nudge(k, a, da), b, db)
                        cost = loss(rows, trial)
                        if _better(cost, current):
                            k, current, changed = trial, cost, True
        if not changed:
            break
    # a constant the rows cannot tell from its starting value (its loss no worse within the tolerance) goes back to
    # it: measurements move a constant only where they pin it
    for name in free:
        trial = dataclasses.replace(k, **{name: getattr(start, name)})
        if not _better(loss(rows, k), loss(rows, trial)):
            k = trial
    return k, {name: informing(rows, k, name) if moved[name] else 0 for name in GRIDS}


# ------------------------------------------------------------------------------------------------------ the report
def _fmt(name: str, v: float) -> str:
    if name == "bandwidth":
        return f"{v / 1e12:.2f} TB/s"
    if name == "cublas_flops":
        return f"{v / 1e12:.0f} TFLOP/s"
    if name in ("launch_us", "pdl_launch_us"):
        return f"{v:.2f} µs"
    if name == "l2_bandwidth":
        return f"{v / 1e12:.2f} TB/s" if math.isfinite(v) else "unbounded"
    return f"{v:.2f}"


def grid_against_rules(k: Constants, paths_of_point=None, margin: float = 0.02) -> list[dict]:
    """The grid of BENCHMARKS.md priced with constants ``k``: per point the default path's predicted µs and ratio to
    the floor (at ``k``'s bandwidth and cuBLAS rate), the fastest path, and ``revisit`` where the default is more
    than ``margin`` slower than it."""
    c = k.card()
    out = []
    for p in paths_of_point or SS.grid_launches():
        times = {name: predict(lns, k, c) for name, lns in p["paths"].items()}
        chosen = p["chosen"]
        best = min(times, key=times.get)
        floor = SS.floor_us(p["T"], p["active"], p["K"], p["N"], p["r"], 2, k.bandwidth, k.cublas_flops)
        out.append(
            {
                "dist": p["dist"],
                "L": p["L"],
                "T": p["T"],
                "chosen": chosen,
                "us": times[chosen],
                "floor_us": floor,
                "ratio": times[chosen] / floor,
                "best": best,
                "best_us": times[best],
                "revisit": times[chosen] > (1 + margin) * times[best],
            }
        )
    return out


# The constants whose crossing values the grid section lists (cuBLAS's rate moves the compute-bound floors with the
# GEMMs: it hardly moves a ratio).
CROSSING_CONSTANTS = (
    "launch_us",
    "pdl_launch_us",
    "overlap",
    "tma_slowdown",
    "wgmma_slowdown",
    "bandwidth",
    "l2_bandwidth",
)
CROSSING_BAND = 0.05  # points within 5 % under the goal are listed too: what would make them miss it


def _nearest_first(grid: Sequence[float], cur: float) -> list[float]:
    """The grid's values by distance from ``cur``; from infinity (L2 never binding), the largest first."""
    if not math.isfinite(cur):
        return sorted(grid, reverse=True)
    return sorted(grid, key=lambda v: _distance(v, cur))


def crossings(k: Constants, points=None, band: float = CROSSING_BAND) -> list[dict]:
    """For every grid point over the goal, or within ``band`` under it, with constants ``k``: per constant of
    :data:`CROSSING_CONSTANTS`, the grid value nearest ``k``'s at which the point's default path crosses the goal
    (meets it when over, misses it when under), None where no value of the grid does, holding the others."""
    out = []
    for p in points or SS.grid_launches():
        lns = p["paths"][p["chosen"]]

        def ratio(kk):
            floor = SS.floor_us(p["T"], p["active"], p["K"], p["N"], p["r"], 2, kk.bandwidth, kk.cublas_flops)
            return predict(lns, kk) / floor

        now = ratio(k)
        if now <= TARGET_FLOOR * (1 - band):
            continue
        over = now > TARGET_FLOOR
        cross = {}
        for name in CROSSING_CONSTANTS:
            cur = getattr(k, name)
            flips = (
                v
                for v in _nearest_first(GRIDS[name], cur)
                if (ratio(dataclasses.replace(k, **{name: v})) <= TARGET_FLOOR) == over
            )
            cross[name] = next(flips, None)
        out.append({"dist": p["dist"], "L": p["L"], "T": p["T"], "ratio": now, "over": over, "crossing": cross})
    return out


def grid_section(k: Constants, label: str, measured: dict | None = None) -> tuple[list[str], dict]:
    """Markdown lines and JSON of the grid priced with constants ``k`` (see :func:`grid_against_rules`,
    :func:`crossings`); ``measured``: (dist, L, T) → the measured lora_kernels row."""
    points = SS.grid_launches()
    grid = grid_against_rules(k, points)
    measured = measured or {}
    lines = [
        "",
        f"### The grid with the {label} constants",
        "",
        "| dist | L | T | default path | predicted µs | ÷ floor | fastest path (µs) | measured lora_kernels ÷ floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in grid:
        m = measured.get((g["dist"], g["L"], g["T"]))
        meas = f"{m.us / m.floor_us:.2f}" if m and m.floor_us else "-"
        best = f"{g['best']} ({g['best_us']:.2f})" + (" **revisit**" if g["revisit"] else "")
        lines.append(
            f"| {g['dist']} | {g['L']} | {g['T']} | {g['chosen']} | {g['us']:.2f} | {g['ratio']:.2f} | {best} | "
            f"{meas} |"
        )
    misses = [g for g in grid if g["ratio"] > TARGET_FLOOR]
    revisit = [g for g in grid if g["revisit"]]
    lines += [
        "",
        f"- predicted over {TARGET_FLOOR} × the floor: {len(misses)} of {len(grid)} points"
        + (": " + ", ".join(f"{_at(g)} ({g['ratio']:.2f})" for g in misses) if misses else ""),
        f"- default path more than 2 % slower than the fastest: {len(revisit)} point(s)"
        + (": " + ", ".join(f"{_at(g)} {g['chosen']} → {g['best']}" for g in revisit) if revisit else ""),
    ]
    cross = crossings(k, points)
    if cross:
        lines += [
            "",
            f"Where each point over {TARGET_FLOOR}x would meet it, and each point within "
            f"{CROSSING_BAND:.0%} under it would miss it: the value of one constant, nearest the {label} one, at "
            "which its default path crosses the goal, the others held (-: none on the fit's grid).",
            "",
            "| dist | L | T | ÷ floor | " + " | ".join(f"`{n}`" for n in CROSSING_CONSTANTS) + " |",
            "|" + "---|" * (4 + len(CROSSING_CONSTANTS)),
        ]
        for x in cross:
            cells = []
            for name in CROSSING_CONSTANTS:
                v, cur = x["crossing"][name], getattr(k, name)
                cells.append("-" if v is None else f"{'≤' if v < cur else '≥'} {_fmt(name, v)}")
            lines.append(f"| {x['dist']} | {x['L']} | {x['T']} | {x['ratio']:.3f} | " + " | ".join(cells) + " |")
    return lines, {"grid": grid, "crossings": cross}


def report(rows: Sequence[Row], notes: Sequence[str] = ()) -> tuple[str, dict]:
    """Markdown and the JSON-able result of fitting each table's rows."""
    assumed = Constants()
    lines = ["## Calibration of the static serving model", ""]
    result: dict = {"assumed": dataclasses.asdict(assumed), "fits": {}}
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    timings = [t for t in ("cycled", "hot") if any(r.timing == t for r in rows)]
    if not timings:
        lines.append("No priced rows (CUDA-graph tables of lora_kernels variants or the base) in the input.")
        return "\n".join(lines) + "\n", result
    fits = {}
    for t in timings:
        sub = [r for r in rows if r.timing == t]
        fits[t] = fit(sub)
        k, used = fits[t]
        result["fits"][t] = {
            "constants": dataclasses.asdict(k),
            "rows": len(sub),
            "informing": used,
            "rms_log_error_assumed": math.sqrt(loss(sub, assumed)),
            "rms_log_error_fitted": math.sqrt(loss(sub, k)),
        }
    head = ["constant", "assumed"] + [f"fitted ({t}, rows informing)" for t in timings]
    lines += ["### Constants", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in GRIDS:
        cells = [f"`{name}`", _fmt(name, getattr(assumed, name))]
        for t in timings:
            k, used = fits[t]
            n = used[name]
            cells.append(f"{_fmt(name, getattr(k, name))} ({n})" if n else "not determined (0)")
        lines.append("| " + " | ".join(cells) + " |")
    for t in timings:
        fit_t = result["fits"][t]
        lines.append(
            f"\n{t}: {fit_t['rows']} rows, rms log error {fit_t['rms_log_error_assumed']:.3f} with the assumed "
            f"constants, {fit_t['rms_log_error_fitted']:.3f} fitted."
        )
    lines += ["", "### Measured / predicted, per variant (median over points)", ""]
    head = ["variant"] + [f"{t}: assumed / fitted (points)" for t in timings]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for provider in dict.fromkeys((*PRICED, *DECODE_PRICED)):
        cells = [provider]
        for t in timings:
            sub = [r for r in rows if r.timing == t and r.provider == provider]
            if not sub:
                cells.append("-")
                continue
            a = _median([r.us / predict(r.launches, assumed) for r in sub])
            f = _median([r.us / predict(r.launches, fits[t][0]) for r in sub])
            cells.append(f"{a:.2f} / {f:.2f} ({len(sub)})")
        if any(c != "-" for c in cells[1:]):
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Largest misfits with the fitted constants (what the model does not capture)",
        "",
        "| table | dist | L | T (decode: M) | variant | launches | measured µs | predicted µs | measured / predicted |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    worst = sorted(
        ((r, predict(r.launches, fits[r.timing][0])) for r in rows), key=lambda rp: -abs(math.log(rp[0].us / rp[1]))
    )
    result["misfits"] = []
    for r, p in worst[:MISFITS]:
        kernels = " + ".join(ln["kernel"] for ln in r.launches)
        lines.append(
            f"| {r.timing} | {r.dist} | {r.L or '-'} | {r.T} | {r.provider} | {kernels} | {r.us:.2f} | {p:.2f} | "
            f"{r.us / p:.2f} |"
        )
        result["misfits"].append({**dataclasses.asdict(r), "launches": kernels, "predicted_us": p})
    t = timings[0]
    measured = {r.point: r for r in rows if r.timing == t and r.provider == "lora_kernels"}
    section, result_grid = grid_section(fits[t][0], f"fitted ({t})", measured)
    lines += section
    result.update(result_grid)
    lines += [
        "",
        "To adopt the fitted constants: `COPY_BW` and `LAUNCH_US` in benchmarks/static_serving.py, the rates in "
        "benchmarks/card.py (with the run's card, date and command in BENCHMARKS.md), then re-run "
        "benchmarks/static_report.py.",
    ]
    return "\n".join(lines) + "\n", result


def _at(g: dict) -> str:
    return f"{g['dist']}/{g['L']}/{g['T']}"


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="*", help="CSV files written by bench_multi_lora.py / bench_lora_linear.py --csv")
    parser.add_argument(
        "--assumed",
        action="store_true",
        help="no measurements: the grid and its crossing values with the model's assumed constants",
    )
    run_note = "for CSVs whose rows do not name it (older runs; default %s); a row that names another fails"
    parser.add_argument("--k", type=int, default=None, help="in_features of the run, " + run_note % SS.K_DEFAULT)
    parser.add_argument("--n", type=int, default=None, help="out_features of the run, " + run_note % SS.N_DEFAULT)
    parser.add_argument("--r", type=int, default=None, help="rank of the run, " + run_note % SS.RANK)
    parser.add_argument("--seed", type=int, default=None, help="the run's --seed, " + run_note % 0)
    parser.add_argument("--markdown", metavar="PATH", help="also write the report to PATH")
    parser.add_argument("--json", metavar="PATH", help="write the fitted constants and the grid to PATH")
    args = parser.parse_args(argv)
    if args.assumed:
        if args.csv:
            parser.error("--assumed takes no CSV files")
        section, result = grid_section(Constants(), "assumed")
        result["assumed"] = dataclasses.asdict(Constants())
        text = "\n".join(["## The static serving model with its assumed constants", *section]) + "\n"
    elif not args.csv:
        parser.error("give CSV files of a GPU run, or --assumed")
    else:
        try:
            rows, notes = read_rows(args.csv, args.k, args.n, args.r, args.seed)
        except ValueError as e:
            parser.error(str(e))
        text, result = report(rows, notes)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)
    if args.json:
        import json

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
