"""benchmarks/static_serving.py: the static launch model of the serving ops covers every point of the multi-adapter
grid, and its tile configurations are the ones the Triton launchers use."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def test_grid_launches_cover_the_grid():
    from benchmarks import static_serving as ss

    points = ss.grid_launches()
    assert len(points) == len(ss.DISTS) * len(ss.ADAPTERS) * len(ss.TOKENS)
    for p in points:
        assert set(p["paths"]) == {"fused", "split", "gemm"} and p["chosen"] in p["paths"]
        assert [len(p["paths"][k]) for k in ("fused", "split", "gemm")] == [2, 4, 2]
        gemm = p["paths"]["gemm"]
        assert [ln["kernel"] for ln in gemm] == ["_batched_shrink_kernel", "_gemm_expand_kernel"]
        for lst in p["paths"].values():
            for ln in lst:
                assert set(ln) >= {"kernel", "grid", "config", "bytes_read", "bytes_written", "flops"}
                assert ln["bytes_read"] >= 0 and ln["bytes_written"] > 0 and ln["flops"] >= ln["useful_flops"] >= 0
        # the gemm path writes y once and never reads it; the split path reads and writes the LoRA rows of y again
        T, N = p["T"], p["N"]
        assert gemm[1]["bytes_written"] == T * N * 2
        assert p["floor_us"] > 0 and ss.predict_us(gemm) >= p["floor_us"] * 0.5


def test_configs_match_the_launchers(monkeypatch):
    """The grid and tile configuration the model reports for the gemm path are the ones linear_gemm launches with
    (on a 132-SM GPU with 227 KiB of shared memory; recorded, nothing is run)."""
    from lora_kernels import _backend
    from lora_kernels.ops import multi_lora as ops
    from lora_kernels.ops._batch import BatchMeta
    from lora_kernels.triton import _utils as U
    from lora_kernels.triton import multi_lora as ML

    from benchmarks import static_serving as ss

    recorded = []

    class Rec:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: recorded.append((self.name, grid, kw))

    for name in ("_batched_shrink_kernel", "_gemm_expand_kernel"):
        monkeypatch.setattr(ML, name, Rec(name))
    monkeypatch.setattr(U, "sm_count", lambda i: ss.H100_SMS)
    monkeypatch.setattr(U, "max_smem", lambda i: ss.H100_SMEM)
    monkeypatch.setattr(_backend, "interpreter_enabled", lambda: False)
    L, T, K, N, R = 16, 64, 4096, 4096, 16
    ids = torch.arange(T) % L
    model = ss.launches(ids, L, K, (N,), R, path="gemm")
    e = torch.bfloat16
    tile_m = ops.step_tile_m(ss.auto_tile_m(T), T)
    ML.linear_gemm(
        torch.empty(T, K, dtype=e),
        torch.empty(N, K, dtype=e),
        None,
        torch.empty(L, R, K, dtype=e),
        torch.empty(L, N, R, dtype=e),
        torch.empty(L, dtype=torch.int32),
        torch.empty(L, 1),
        BatchMeta(*(torch.empty(n, dtype=torch.int32) for n in (T, T, T, T + 1))),
        [N],
        tile_m,
    )
    assert [r[0] for r in recorded] == [ln["kernel"] for ln in model]
    assert model[1]["config"]["NUM_SPLITS"] == recorded[0][2]["SPLIT_K"]
    for (name, grid, kw), ln in zip(recorded, model):
        assert tuple(grid) == ln["grid"], name
        for k, v in ln["config"].items():
            if k not in ("ATOMIC", "NUM_SPLITS"):  # NUM_SPLITS is a runtime argument (= the shrink's SPLIT_K)
                assert kw[k] == v, (name, k)


def test_decode_launch_model():
    from benchmarks import static_serving as ss

    for M, K in ss.DECODE_POINTS:
        (ln,) = ss.decode_launches(M, K, K)
        assert ln["kernel"] == "_decode_kernel"
        # W0 crosses DRAM once: the LoRA adds only x, A, B (and nothing is written but y)
        assert ln["bytes_read"] == (K * K + M * K + 16 * K + K * 16) * 2 and ln["bytes_written"] == M * K * 2
        assert ln["flops"] >= ln["useful_flops"]
