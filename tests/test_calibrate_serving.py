"""benchmarks/calibrate_serving.py: fitting the static serving model's constants to measured CSVs. The measurements
here are made by the model itself at known constants and written by the benchmark's own CSV writer, so the fit must
find those constants again; the rows a GPU run cannot price (failed providers, eager tables, peers, other ids) must
be left out, and the overlap constant must span PDL's full overlap and serial launches."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

# Constants a GPU run might find: each off the assumed value, on the fit's grids
# (the PDL'd GEMM launch costs less than a plain one: the fit must tell the two launch costs apart)
TRUE = dict(
    bandwidth=3.1e12,
    cublas_flops=690e12,
    tma_slowdown=1.12,
    wgmma_slowdown=1.5,
    launch_us=1.3,
    pdl_launch_us=0.8,
    overlap=0.7,
)


def _measured_csv(path, k, timing="cycled", providers=None, tokens=(1, 16, 64, 256, 1024, 4096), extra=None, run=None):
    """A CSV as ``bench_multi_lora.py --csv`` writes it, with the model's times at constants ``k``; ``run``: the
    run's columns (K, N, r, seed), which CSVs of older runs lack."""
    from benchmarks import bench_multi_lora as bml
    from benchmarks import calibrate_serving as cal
    from benchmarks import common
    from benchmarks import static_serving as ss

    providers = cal.PRICED if providers is None else providers  # every variant the model prices
    title = bml.TITLES["graph" if timing == "hot" else timing].format(n=3)
    table = common.Table(
        title, ["dist", "L", "T", "active"], ["base", *providers, "gather_bmm", *(extra or {})], show_floor=True
    )
    table.live = None
    for dist in ss.DISTS:
        for L in ss.ADAPTERS:
            for T in tokens:
                ids = bml.point_ids(dist, L, T, (run or {}).get("seed", 0))
                key = {"dist": dist, "L": L, "T": T, "active": int(torch.unique(ids).numel())}
                table.set_floor(key, ss.floor_us(T, key["active"]))
                for p in providers:
                    lns = cal.model_launches(p, ids, L, 4096, 4096, 16, 2, bml.adapter_bound(dist, L, T))
                    table.add(key, p, cal.predict(lns, k))
                table.add(key, "gather_bmm", 99.0)  # a peer: not priced
                for p, us in (extra or {}).items():
                    table.add(key, p, us, None if us else "failed: RuntimeError")
    meta = {"device": "NVIDIA H100 80GB HBM3", "dtype": "bf16", "date": "2026-12-01", "torch": "x", "triton": "y"}
    common.write_csv(str(path), [table], dict(meta, **(run or {})), quiet=True)
    return path


@pytest.mark.parametrize("l2", [math.inf, 8e12], ids=["l2-never-binds", "l2-8TBps"])
def test_the_fit_finds_the_constants_the_times_were_made_with(tmp_path, l2):
    from benchmarks import calibrate_serving as cal

    true = cal.Constants(**TRUE, l2_bandwidth=l2)
    rows, notes = cal.read_rows([_measured_csv(tmp_path / "m.csv", true)])
    assert len(rows) == 24 * len(cal.PRICED) and not notes
    assert {r.timing for r in rows} == {"cycled"}
    k, used = cal.fit(rows)
    for name, want in TRUE.items():
        grid = cal.GRIDS[name]
        assert used[name] > 0, name
        assert abs(getattr(k, name) - want) < 0.5 * (grid[1] - grid[0]), (name, getattr(k, name), want)
    # L2 binding or not, the fit says so (unbounded: no value of the grid fits better than the assumption)
    assert k.l2_bandwidth == l2 and used["l2_bandwidth"] > 0
    # no row of the grid's variants runs mma.sync where its compute binds: that constant stays as assumed
    assert used["mma_sync_slowdown"] == 0 and k.mma_sync_slowdown == cal.Constants().mma_sync_slowdown
    # the times are rounded to 1 ns: at the true constants the error is that rounding
    assert cal.loss(rows, k) < 1e-6 < 1e-3 < cal.loss(rows, cal.Constants())


def test_rows_the_model_cannot_price_are_left_out(tmp_path):
    from benchmarks import calibrate_serving as cal

    k = cal.Constants()
    good = _measured_csv(tmp_path / "a.csv", k, providers=("base", "lora_kernels"), extra={"lk_cuda": None})
    eager = _measured_csv(tmp_path / "b.csv", k, timing="eager", providers=("base",), tokens=(16,))
    rows, notes = cal.read_rows([good, eager])
    # peers (gather_bmm), the failed CUDA-extension provider and the eager table are not rows
    assert {r.provider for r in rows} == {"base", "lora_kernels"} and len(rows) == 48
    assert not notes  # lk_cuda is not a priced provider: nothing to report about it
    # a run with another seed timed other ids: its points are skipped, and the note says why
    rows, notes = cal.read_rows([good], seed=7)
    assert len(rows) < 48 and any("ids differ" in n for n in notes)
    # a failed run of a priced provider: no time, noted
    bad = _measured_csv(tmp_path / "c.csv", k, providers=("base",), tokens=(16,), extra={"lk_split": None})
    rows, notes = cal.read_rows([bad])
    assert {r.provider for r in rows} == {"base"} and notes == ["skipped 4 row(s): no time (failed or not run)"]


def test_rows_are_priced_at_the_shape_and_seed_they_name(tmp_path):
    """bench_multi_lora.py's rows name K, N, r and the seed of their ids: the calibration prices each row by them,
    and a flag that contradicts them is an error, not a silent re-pricing at another shape."""
    from benchmarks import calibrate_serving as cal

    k = cal.Constants()
    run = {"K": 4096, "N": 4096, "r": 16, "seed": 0}
    named = _measured_csv(tmp_path / "a.csv", k, providers=("base", "lora_kernels"), run=run)
    rows, notes = cal.read_rows([named])
    assert len(rows) == 48 and not notes
    assert cal.read_rows([named], K=4096, N=4096, R=16, seed=0)[0] == rows  # flags that agree change nothing
    with pytest.raises(ValueError, match=r"seed = 0, not --seed 7"):
        cal.read_rows([named], seed=7)
    with pytest.raises(ValueError, match=r"r = 16, not --r 64"):
        cal.read_rows([named], R=64)
    with pytest.raises(SystemExit):  # the command line says the same through argparse
        cal.main(["--k", "8192", str(named)])
    # a run at rank 64 (its times made at rank 16 here: only the pricing matters) moves more adapter bytes
    wide = _measured_csv(tmp_path / "b.csv", k, providers=("base", "lora_kernels"), run=dict(run, r=64))

    def lk_bytes(rs):
        return {
            (r.dist, r.L, r.T): sum(ln["bytes_read"] for ln in r.launches) for r in rs if r.provider == "lora_kernels"
        }

    at16, at64 = lk_bytes(rows), lk_bytes(cal.read_rows([wide])[0])
    assert at16.keys() == at64.keys() and all(at64[p] > at16[p] for p in at16)
    # the seed column rebuilds the ids of that seed: a run with seed 7 is priced on its own draws, none skipped
    seven = _measured_csv(tmp_path / "c.csv", k, providers=("base",), tokens=(16, 256), run=dict(run, seed=7))
    assert len(cal.read_rows([seven])[0]) == 8 and not cal.read_rows([seven])[1]


def test_overlap_spans_pdl_and_serial_launches():
    from benchmarks import calibrate_serving as cal
    from benchmarks import static_serving as ss

    ids = ss._ids("uniform", 16, 1024, 0)
    pdl = ss.launches(ids, 16, path="gemm", adapters=16)
    serial = ss.launches(ids, 16, path="gemm", adapters=16, pdl=False)
    assert pdl[-1]["overlaps_previous"] and not serial[-1].get("overlaps_previous")
    k = cal.Constants()
    full, none, half = (cal.predict(pdl, dataclasses.replace(k, overlap=f)) for f in (1.0, 0.0, 0.5))
    assert full == pytest.approx(ss.predict_us(pdl))  # the model's own assumption
    # with no overlap, the PDL pair costs what the two launches cost one after the other (the shrink's K blocks
    # differ with PDL, not its bytes or FLOPs)
    assert none == pytest.approx(cal.predict(serial, k)) and none > full
    assert half == pytest.approx((full + none) / 2)
    # the PDL'd GEMM's launch costs pdl_launch_us, the serial one's launch_us
    assert pdl[-1]["pdl_launch"] and not serial[-1]["pdl_launch"]
    cheap = dataclasses.replace(k, pdl_launch_us=k.pdl_launch_us - 1.5)
    assert cal.predict(pdl, cheap) == pytest.approx(full - 1.5)
    assert cal.predict(serial, cheap) == pytest.approx(none)
    # an L2 bandwidth bounds each launch by the bytes its programs request (the PDL pair: by their sum)
    l2 = sum(ln["l2_read"] for ln in pdl) / 1e12 * 1e6
    assert cal.predict(pdl, dataclasses.replace(k, l2_bandwidth=1e12)) == pytest.approx(l2 + k.pdl_launch_us)
    assert cal.predict(pdl, dataclasses.replace(k, l2_bandwidth=1e15)) == pytest.approx(full)


def test_provider_flags_are_restored_and_priced_as_the_benchmark_sets_them():
    from lora_kernels.triton import multi_lora as ML

    from benchmarks import calibrate_serving as cal
    from benchmarks import static_serving as ss

    before = {n: getattr(ML, n) for n in ("PDL", "TMA_GEMM", "LANES_GEMM", "SORTED_GATHER", "SORTED_MIN_TOKENS")}
    ids = ss._ids("uniform", 16, 1024, 0)
    kernels = {
        p: [ln["kernel"] for ln in cal.model_launches(p, ids, 16, 4096, 4096, 16, 2, 16)]
        for p in ("lk_gemm_plain", "lk_gemm_serial", "lk_gemm_sorted_copy", "lk_split")
    }
    assert {n: getattr(ML, n) for n in before} == before
    assert kernels["lk_gemm_plain"] == ["_batched_shrink_kernel", "_gemm_expand_kernel"]
    assert kernels["lk_gemm_serial"] == ["_batched_shrink_kernel", "_gemm_tma_expand_kernel"]
    assert kernels["lk_gemm_sorted_copy"] == ["_batched_shrink_kernel", "_gemm_expand_kernel"]
    assert kernels["lk_split"][0] == "cublas_gemm (F.linear)" and len(kernels["lk_split"]) == 3
    serial = cal.model_launches("lk_gemm_serial", ids, 16, 4096, 4096, 16, 2, 16)
    assert not serial[-1]["overlaps_previous"]
    assert cal.model_launches("gather_bmm", ids, 16, 4096, 4096, 16, 2, 16) is None


def test_command_line_writes_the_report_and_the_fit(tmp_path, capsys):
    from benchmarks import calibrate_serving as cal

    csv_path = _measured_csv(tmp_path / "m.csv", cal.Constants(**TRUE), tokens=(16, 1024))
    hot = _measured_csv(tmp_path / "h.csv", cal.Constants(bandwidth=6e12), timing="hot", tokens=(16, 1024))
    md, js = tmp_path / "cal.md", tmp_path / "cal.json"
    cal.main([str(csv_path), str(hot), "--markdown", str(md), "--json", str(js)])
    text = md.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "fitted (cycled, rows informing)" in text and "fitted (hot, rows informing)" in text
    result = json.loads(js.read_text())
    assert result["fits"]["cycled"]["constants"]["launch_us"] == pytest.approx(1.3)
    assert result["fits"]["cycled"]["constants"]["pdl_launch_us"] == pytest.approx(0.8)
    # W0 hot in L2: the hot table's bandwidth is an effective one, fitted apart from DRAM's
    assert result["fits"]["hot"]["constants"]["bandwidth"] == pytest.approx(6e12, rel=0.01)
    assert len(result["grid"]) == 24 and all(g["ratio"] > 0.9 for g in result["grid"])
    # the rows the fitted model misses most, worst first, with their launches
    assert len(result["misfits"]) == cal.MISFITS and "Largest misfits" in text
    errors = [abs(math.log(m["us"] / m["predicted_us"])) for m in result["misfits"]]
    assert errors == sorted(errors, reverse=True)
    # the grid against the rules: every point says its default path and the fastest one
    assert "| uniform | 128 | 1024 |" in text and "predicted over 1.2 × the floor" in text


def test_no_priced_rows_is_said_not_fitted(tmp_path):
    from benchmarks import calibrate_serving as cal

    eager = _measured_csv(tmp_path / "e.csv", cal.Constants(), timing="eager", providers=("base",), tokens=(16,))
    text, result = cal.report(*cal.read_rows([eager]))
    assert "No priced rows" in text and result["fits"] == {}


def test_decode_rows_are_priced_with_the_decode_kernel(tmp_path):
    from benchmarks import bench_lora_linear as bll
    from benchmarks import calibrate_serving as cal
    from benchmarks import common
    from benchmarks import static_serving as ss

    true = cal.Constants(**TRUE)
    table = common.Table(bll.DECODE_TITLES["cycled"].format(n=4), ["M", "K", "N", "r"], ["base", "lk_decode", "eager"])
    table.live = None
    for M, K in ((1, 4096), (16, 4096), (256, 4096), (1, 8192), (256, 8192)):
        key = {"M": M, "K": K, "N": K, "r": 16}
        table.add(key, "base", cal.predict([ss.base_launch(M, K, K)], true))
        table.add(key, "lk_decode", cal.predict(ss.decode_launches(M, K, K), true))
        table.add(key, "eager", 50.0)  # the module's eager path: not a serving kernel, not priced
    path = tmp_path / "decode.csv"
    common.write_csv(str(path), [table], {"dtype": "bfloat16"}, quiet=True)
    rows, notes = cal.read_rows([str(path)])
    assert not notes and len(rows) == 10 and {r.provider for r in rows} == {"base", "lk_decode"}
    kernels = {(r.T, r.dist): r.launches[0]["kernel"] for r in rows if r.provider == "lk_decode"}
    # up to 64 rows the decode kernel, above it the persistent TMA forward with the shrink inside
    assert kernels[(1, "decode 8192x8192")] == "_decode_kernel"
    assert kernels[(256, "decode 4096x4096")] == "_fwd_tma_kernel"
    assert all(abs(math.log(r.us / cal.predict(r.launches, true))) < 1e-3 for r in rows)
    text, result = cal.report(rows, notes)
    assert "| lk_decode |" in text and "decode 8192x8192" in text


def test_crossings_say_which_constant_value_turns_a_point(capsys):
    """The sensitivity table: for each point over the goal (or just under it), the value of one constant at which
    its default path crosses 1.2x the floor; checked against the model priced at that value and one step short."""
    from benchmarks import calibrate_serving as cal
    from benchmarks import static_serving as ss

    k = cal.Constants()
    cross = {(x["dist"], x["L"], x["T"]): x for x in cal.crossings(k)}
    mix = cross[("mix", 16, 256)]
    assert mix["over"] and mix["ratio"] > 1.2
    # its extra launch is the GEMM's, launched as a programmatic dependent of the shrink: that cost decides, the
    # plain launch's does not enter
    assert mix["crossing"]["launch_us"] is None
    v = mix["crossing"]["pdl_launch_us"]
    assert v is not None and v < k.pdl_launch_us  # a cheaper second launch makes it
    ids = ss._ids("mix", 16, 256, 0)
    lns = ss.launches(ids, 16, adapters=ss.adapter_bound("mix", 16, 256))
    floor = ss.floor_us(256, len(set(ids.tolist())))
    assert lns[-1]["pdl_launch"] and not lns[0].get("pdl_launch")
    step = cal.GRIDS["pdl_launch_us"][1] - cal.GRIDS["pdl_launch_us"][0]
    assert cal.predict(lns, dataclasses.replace(k, pdl_launch_us=v)) / floor <= 1.2
    assert cal.predict(lns, dataclasses.replace(k, pdl_launch_us=v + step)) / floor > 1.2
    # a point just under the goal: the L2 bandwidth below which it misses, searched down from "never binds"
    near = cross[("uniform", 16, 256)]
    assert not near["over"] and math.isfinite(near["crossing"]["l2_bandwidth"])
    # points far under the goal are not listed
    assert ("mix", 16, 1) not in cross
    cal.main(["--assumed"])
    out = capsys.readouterr().out
    assert "assumed constants" in out and "| mix | 16 | 256 | 1.215 | - | ≤ 1.80 µs |" in out
    with pytest.raises(SystemExit):
        cal.main([])


def test_benchmarks_md_sensitivity_table_is_current():
    """BENCHMARKS.md quotes ``calibrate_serving.py --assumed``'s crossing table: it must be what the model says."""
    import pathlib

    from benchmarks import calibrate_serving as cal

    lines, _ = cal.grid_section(cal.Constants(), "assumed")
    table = [ln for ln in lines[lines.index(next(ln for ln in lines if ln.startswith("| dist | L | T | ÷ floor"))) :]]
    text = (pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert "\n".join(table) in text, "re-run `python benchmarks/calibrate_serving.py --assumed` into BENCHMARKS.md"
