"""Smoke tests of benchmarks/: every script runs end to end on the CPU with tiny shapes (torch backend, a few calls per
timing), writes its tables, CSV and PNG, and its correctness gate rejects a provider that computes the wrong thing.

The numbers are meaningless here (no GPU); what is tested is that the scripts do not rot: argument parsing, provider
construction, the reference checks, the timers' CPU fallback, the writers, and the pytest-benchmark entry point.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import bench_lora_linear as bll  # noqa: E402
from benchmarks import bench_multi_lora as bml  # noqa: E402
from benchmarks import common  # noqa: E402

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
CPU = ["--device", "cpu", "--dtype", "fp32", "--warmup-ms", "1", "--rep-ms", "1"]


@pytest.fixture(autouse=True)
def _fast_cpu_timer(monkeypatch):
    # One warm-up call and one timed call per measurement: the smoke tests check mechanics, not speed.
    monkeypatch.setattr(common, "CPU_BUDGET_S", 0.0)
    monkeypatch.setattr(common, "CPU_MIN_CALLS", 1)


def _assert_all_timed(tables, providers):
    for t in tables:
        assert t.keys, t.title
        for k in t.keys:
            for p in providers:
                us = t.times[k].get(p)
                assert us is not None and us > 0 and math.isfinite(us), (t.title, k, p, t.errors)


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------- single adapter
def test_lora_linear_script_runs(tmp_path, capsys):
    out_csv, out_png = tmp_path / "lora.csv", tmp_path / "lora.png"
    tables = bll.main(
        CPU
        + [
            "--backend",
            "torch",
            "--m",
            "17",
            "--kn",
            "24:40,40:8",
            "--ranks",
            "3",
            "--decode",
            "1:24:40,5:32:16",
            "--decode-rank",
            "3",
            "--cycle",
            "2",
            "--providers",
            "eager,addmm,lora_kernels",
            "--csv",
            str(out_csv),
            "--plot",
            str(out_png),
        ]
    )
    titles = [t.title for t in tables]
    assert len(tables) == 6, titles  # fwd, fwd+bwd, fwd+bwd dropout; decode graph, cycled, eager
    assert "2 weight sets cycled" in titles[4]
    _assert_all_timed(tables, ["base", "eager", "addmm", "lora_kernels"])
    assert [len(t.keys) for t in tables] == [2, 2, 2, 2, 2, 2]
    text = capsys.readouterr().out
    assert "**geomean**" in text and "measured ceilings" in text and "command:" in text
    assert (
        "fwd+bwd dropout, lora_kernels geomean / base" in text
    )  # the summary against the targets (benchmarks/TARGETS.md)
    assert "decode M ≤ 256 in graphs (cycled), lora_kernels worst / base" in text
    rows = _read_csv(out_csv)
    assert len(rows) == 6 * 2 * 4
    base = [r for r in rows if r["provider"] == "base"]
    assert all(float(r["ratio_base"]) == 1.0 for r in base)
    wanted = {"table", "M", "K", "N", "r", "us", "ratio_base", "ratio_floor", "floor_us", "device", "date"}
    assert wanted <= set(rows[0])
    if HAS_MPL:
        assert out_png.stat().st_size > 1000


def test_lora_linear_check_rejects_wrong_forward(monkeypatch):
    def no_lora(x, W, A, B, scale, p, training):
        return F.linear(x, W) + 0.0 * F.linear(F.linear(x, A), B)

    monkeypatch.setattr(bll, "_eager_lora", no_lora)
    tables = bll.main(
        CPU
        + [
            "--backend",
            "torch",
            "--m",
            "9",
            "--kn",
            "16:24",
            "--ranks",
            "2",
            "--modes",
            "fwd",
            "--skip-decode",
            "--providers",
            "eager,lora_kernels",
        ]
    )
    (t,) = tables
    (k,) = t.keys
    assert t.times[k]["eager"] is None
    assert "wrong result" in t.errors["eager"][0] and "output" in t.errors["eager"][0]
    assert t.times[k]["lora_kernels"] is not None


def test_lora_linear_check_rejects_wrong_gradient(monkeypatch):
    def frozen_a(x, W, A, B, scale, p, training):
        return F.linear(x, W) + scale * F.linear(F.linear(x, A.detach()), B)  # right output, dA missing

    monkeypatch.setattr(bll, "_eager_lora", frozen_a)
    tables = bll.main(
        CPU
        + [
            "--backend",
            "torch",
            "--m",
            "9",
            "--kn",
            "16:24",
            "--ranks",
            "2",
            "--modes",
            "fwd,fwd+bwd",
            "--skip-decode",
            "--providers",
            "eager",
        ]
    )
    fwd, bwd = tables
    (k,) = fwd.keys
    # Checked at the first mode (forward only: passes); the fwd+bwd check catches the missing gradient.
    assert fwd.times[k]["eager"] is not None
    assert bwd.times[k]["eager"] is None and "dA" in bwd.errors["eager"][0]
    # A dropout-only run still checks exactness at p = 0 first (the dropout check itself is only a sanity check).
    (drop,) = bll.main(
        CPU
        + [
            "--backend",
            "torch",
            "--m",
            "9",
            "--kn",
            "16:24",
            "--ranks",
            "2",
            "--modes",
            "fwd+bwd dropout",
            "--skip-decode",
            "--providers",
            "eager,lora_kernels",
        ]
    )
    (k,) = drop.keys
    assert drop.times[k]["eager"] is None and "dA" in drop.errors["eager"][0]
    assert drop.times[k]["lora_kernels"] is not None


def test_lora_linear_triton_base_gemm_switch():
    # The two BASE_GEMM variants of the Triton backend, in the interpreter (conftest sets TRITON_INTERPRET=1).
    pytest.importorskip("triton")
    # CPU tensors reach the Triton kernels only through the interpreter; without it (a GPU machine running the
    # compiled kernels) the same run goes to the GPU.
    if os.environ.get("TRITON_INTERPRET") == "1":
        where = CPU
    elif torch.cuda.is_available():
        where = ["--device", "cuda", "--dtype", "fp32", "--warmup-ms", "1", "--rep-ms", "1"]
    else:
        pytest.skip("the Triton backend needs TRITON_INTERPRET=1 on a machine without CUDA")
    tables = bll.main(
        where
        + [
            "--backend",
            "triton",
            "--m",
            "16",
            "--kn",
            "32:16",
            "--ranks",
            "4",
            "--modes",
            "fwd+bwd",
            "--skip-decode",
            "--providers",
            "lk_cublas_base,lk_triton_base",
        ]
    )
    _assert_all_timed(tables, ["base", "lk_cublas_base", "lk_triton_base"])


def test_peft_providers():
    pytest.importorskip("peft")
    tables = bll.main(
        CPU
        + [
            "--backend",
            "torch",
            "--m",
            "9",
            "--kn",
            "16:24",
            "--ranks",
            "2",
            "--modes",
            "fwd+bwd,fwd+bwd dropout",
            "--decode",
            "3:16:24",
            "--decode-rank",
            "2",
            "--decode-timings",
            "graph",
            "--providers",
            "peft",
        ]
    )
    _assert_all_timed(tables, ["base", "peft"])
    graph, eager = bml.main(
        CPU
        + [
            "--backend",
            "torch",
            "--k",
            "16",
            "--n",
            "24",
            "--r",
            "2",
            "--adapters",
            "4",
            "--tokens",
            "9",
            "--dists",
            "uniform",
            "--timings",
            "graph,eager",
            "--providers",
            "peft_mixed",
        ]
    )
    _assert_all_timed([eager], ["base", "peft_mixed"])
    (k,) = graph.keys
    assert graph.times[k]["peft_mixed"] is None and "eager only" in graph.errors["peft_mixed"][0]


# ---------------------------------------------------------------------------------------------- many adapters
def test_multi_lora_script_runs(tmp_path, capsys):
    out_csv, out_png = tmp_path / "multi.csv", tmp_path / "multi.png"
    tables = bml.main(
        CPU
        + [
            "--backend",
            "torch",
            "--k",
            "24",
            "--n",
            "40",
            "--r",
            "3",
            "--adapters",
            "5",
            "--tokens",
            "1",
            "9",
            "--cycle",
            "2",
            "--providers",
            "gather_bmm,loop,lora_kernels",
            "--csv",
            str(out_csv),
            "--plot",
            str(out_png),
        ]
    )
    assert len(tables) == 3  # graph, cycled, eager
    _assert_all_timed(tables, ["base", "gather_bmm", "loop", "lora_kernels"])
    keys = tables[0].keys
    assert [(k[0], k[2]) for k in keys] == [("uniform", 1), ("uniform", 9), ("mix", 1), ("mix", 9)]
    assert all(k[3] == 1 for k in keys if k[2] == 1)  # T = 1: one adapter present
    t = tables[0]
    for k in keys:  # the floor is positive and the base's ratio to it is reported
        assert t.floors[k] > 0 and t.ratio(k, "base", "floor") is not None
    rows = _read_csv(out_csv)
    assert len(rows) == 3 * 4 * 4
    assert {"dist", "L", "T", "active", "ratio_floor"} <= set(rows[0])
    # each point's ids are its own draw (point_ids), whatever else the run measures: the calibration of the static
    # model rebuilds them and prices every row of the two graph tables
    from benchmarks import calibrate_serving as cal

    priced, notes = cal.read_rows([str(out_csv)], K=24, N=40, R=3)
    assert not notes and len(priced) == 2 * 4 * 2  # base and lora_kernels, graph and cycled, 4 points
    text = capsys.readouterr().out
    assert "floor µs (floor/base)" in text
    assert (
        "graphs (hot), lora_kernels worst time / floor" in text
    )  # the summary against the target (benchmarks/TARGETS.md)
    if HAS_MPL:
        assert out_png.stat().st_size > 1000


def test_multi_lora_check_rejects_wrong_provider(monkeypatch):
    def unscaled(x, ws, ids):  # forgets the per-adapter scale
        y = F.linear(x, ws.W)
        s = torch.bmm(x.unsqueeze(1), ws.A_stack[ids].transpose(1, 2))
        return y + torch.bmm(s, ws.B_stack[ids].transpose(1, 2)).squeeze(1)

    monkeypatch.setattr(bml, "_gather_bmm", unscaled)
    tables = bml.main(
        CPU
        + [
            "--backend",
            "torch",
            "--k",
            "16",
            "--n",
            "24",
            "--r",
            "2",
            "--adapters",
            "3",
            "--tokens",
            "5",
            "--dists",
            "uniform",
            "--timings",
            "graph",
            "--providers",
            "gather_bmm,loop",
        ]
    )
    (t,) = tables
    (k,) = t.keys
    assert t.times[k]["gather_bmm"] is None and "wrong result" in t.errors["gather_bmm"][0]
    assert t.times[k]["loop"] is not None


def test_token_ids_distributions():
    gen = torch.Generator().manual_seed(0)
    ids = bml.token_ids("uniform", 16, 1000, gen)
    assert ids.shape == (1000,) and 0 <= int(ids.min()) and int(ids.max()) < 16
    assert torch.unique(ids).numel() == 16
    for T in (1, 2, 7, 300):
        ids = bml.token_ids("mix", 128, T, gen)
        assert ids.shape == (T,) and 0 <= int(ids.min()) and int(ids.max()) < 128
        assert torch.unique(ids).numel() <= bml.MIX_ADAPTERS
        runs = 1 + int((ids[1:] != ids[:-1]).sum())  # contiguous requests (neighbours may share an adapter)
        assert runs <= bml.MIX_REQUESTS
    with pytest.raises(ValueError, match="distribution"):
        bml.token_ids("zipf", 4, 4, gen)


# ------------------------------------------------------------------------------------------------------ common
def test_mismatch_rejects_nan_wrong_values_and_shape():
    e = torch.randn(64, 32, dtype=torch.float64)
    assert common.mismatch("y", e.float(), e, torch.float32) is None
    assert common.mismatch("y", e.to(torch.bfloat16), e, torch.bfloat16) is None
    bad = e.clone()
    bad[3, 4] = float("nan")
    assert "NaN" in common.mismatch("y", bad, e, torch.float32)
    off = e.clone()
    off[0, 0] += 50 * e.abs().max()  # one wild element the norm would dilute
    assert "worst element" in common.mismatch("y", off, e, torch.float32)
    assert "relative error" in common.mismatch("y", e * 1.1, e, torch.bfloat16)
    assert "shape" in common.mismatch("y", e[:, :31], e, torch.float32)


def test_geomean_floor_and_table():
    assert common.geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert common.geomean([None, 3.0]) == pytest.approx(3.0)
    assert common.geomean([]) is None
    ceil = common.Ceilings(bandwidth=1e12, flops=1e15, measured_bandwidth=1e12, measured_flops=1e15, matmul_size=8)
    assert common.floor_us(1e9, 1e6, ceil) == pytest.approx(1.0)  # compute-bound: 1e9 / 1e15 s
    assert common.floor_us(1e6, 1e7, ceil) == pytest.approx(10.0)  # memory-bound: 1e7 / 1e12 s
    t = common.Table("t", ["M"], ["base", "a"], show_floor=True, geomean_row=True)
    for M, base, a in ((1, 10.0, 20.0), (2, 10.0, 80.0)):
        t.add({"M": M}, "base", base)
        t.add({"M": M}, "a", a)
        t.set_floor({"M": M}, 5.0)
    t.add({"M": 3}, "base", 1.0)
    t.add({"M": 3}, "a", None, "broke")
    md = t.markdown()
    assert "| 1 | 10.0 | 5.0 (0.50) | 2.00 (4.00) |" in md
    assert "**4.00** (8.00)" in md  # geomean of 2 and 8 (of 4 and 16 to the floor); the broken point is skipped
    assert "- a: broke" in md
    rows = t.long_rows({"device": "cpu"})
    assert len(rows) == 6 and rows[1]["ratio_base"] == 2.0 and rows[1]["ratio_floor"] == 4.0


def test_selected_providers():
    assert common.selected_providers(None, ["base", "a", "b"]) == ["base", "a", "b"]
    assert common.selected_providers("b", ["base", "a", "b"]) == ["base", "b"]
    with pytest.raises(SystemExit, match="unknown"):
        common.selected_providers("zz", ["base", "a"])


# -------------------------------------------------------------------------------------- pytest-benchmark entry
class _FakeBenchmark:
    """Stands in for pytest-benchmark's fixture: runs the target the requested number of times."""

    def __init__(self):
        self.group, self.extra_info, self.calls = None, {}, 0

    def pedantic(self, target, rounds=1, iterations=1, warmup_rounds=0, **kw):
        for _ in range(min(rounds, 2) * iterations + min(warmup_rounds, 1)):
            target()
            self.calls += 1


def test_pytest_benchmark_entry_point():
    path = os.path.join(ROOT, "benchmarks", "test_bench_pytest.py")
    spec = importlib.util.spec_from_file_location("_bench_pytest_entry", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for provider in ("base", "eager", "lora_kernels"):
        for mode in ("fwd", "fwd+bwd"):
            b = _FakeBenchmark()
            mod.test_lora_linear_train(b, provider, mode)
            assert b.calls > 0 and b.extra_info["provider"] == provider
        b = _FakeBenchmark()
        mod.test_lora_linear_decode_graph(b, provider)
        assert b.calls > 0
    for provider in ("base", "gather_bmm", "loop", "lora_kernels"):
        b = _FakeBenchmark()
        mod.test_multi_lora_graph(b, provider)
        assert b.calls > 0 and "multi-adapter" in b.group


# ------------------------------------------------------------------------------------- every script, --quick, CPU
QUICK_SCRIPTS = [
    ("benchmarks/bench_lora_linear.py", ["--backend", "torch"], "### Against the targets"),
    ("benchmarks/bench_multi_lora.py", ["--backend", "torch"], "### Against the targets"),
    ("benchmarks/bench_lora_ga.py", [], "LoRA-GA"),
    ("benchmarks/bench_peft_model.py", [], "PEFT vs lora_kernels"),
]


@pytest.mark.parametrize("script, extra, expect", QUICK_SCRIPTS, ids=[s[0].split("/")[-1] for s in QUICK_SCRIPTS])
def test_every_script_quick_cpu_run_finishes_in_seconds(script, extra, expect, tmp_path):
    """The documented smoke run, as a user types it: ``python benchmarks/<script> --quick --device cpu``."""
    import subprocess
    import time

    if script.endswith("bench_peft_model.py"):
        pytest.importorskip("peft")
        pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)  # the torch backend: the interpreter is not needed (nor wanted: slow)
    args = [sys.executable, os.path.join(ROOT, script), "--quick", "--device", "cpu", *extra]
    csv_path = tmp_path / "out.csv"
    if "bench_lora_ga" not in script:
        args += ["--csv", str(csv_path)]
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    took = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout, proc.stdout[-3000:]
    if "bench_lora_ga" not in script:
        rows = _read_csv(csv_path)
        assert rows and not (tmp_path / "out.csv.partial").exists()
    # Seconds on an idle 2-core machine (the full-size shapes took many minutes); generous for a loaded one.
    assert took < 300, took


def test_csv_is_written_after_every_point(tmp_path, monkeypatch):
    """An interrupted run keeps what it measured: the CSV holds every point recorded so far, before the end."""
    out_csv = tmp_path / "live.csv"
    seen = []
    real_add = common.Table.add

    def spy(self, key, provider, us, error=None):
        real_add(self, key, provider, us, error)
        seen.append(len(_read_csv(out_csv)))

    monkeypatch.setattr(common.Table, "add", spy)
    bll.main(
        CPU
        + [
            "--backend",
            "torch",
            "--m",
            "9",
            "--kn",
            "16:24,24:16",
            "--ranks",
            "2",
            "--modes",
            "fwd",
            "--skip-decode",
            "--providers",
            "eager",
            "--csv",
            str(out_csv),
        ]
    )
    assert seen == list(range(1, len(seen) + 1)) and len(seen) == 4  # 2 shapes x (base, eager), one row each
    assert len(_read_csv(out_csv)) == 4
