"""pytest-benchmark entry point: a few representative points of both benchmark scripts, for regression tracking.

    pytest benchmarks/test_bench_pytest.py --benchmark-only                      # time them
    pytest benchmarks/test_bench_pytest.py --benchmark-only --benchmark-json=bench.json
    pytest benchmarks/test_bench_pytest.py --benchmark-compare                   # against a saved run

It lives in benchmarks/, not tests/: CI's plain ``pytest`` (``testpaths = ["tests"]``) never collects it, and
tests/test_benchmarks_smoke.py runs it once with ``--benchmark-disable`` so it cannot rot. On CUDA the points are the
the shapes of TARGETS.md (bf16); on the CPU they are tiny fp32 shapes with the torch backend (the numbers mean nothing).
The full tables with ratios, floors and the correctness checks come from the two scripts; this file only times.

pytest-benchmark times with ``time.perf_counter`` on the host, so every CUDA target ends with a synchronize; decode
and multi-adapter points replay a CUDA graph (one call per replay), as the scripts do.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_lora_linear as bll  # noqa: E402
from benchmarks import bench_multi_lora as bml  # noqa: E402
from benchmarks import common  # noqa: E402

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
BACKEND = None if CUDA else "torch"
TRAIN = (8192, 4096, 4096, 16) if CUDA else (33, 64, 48, 4)  # M, K, N, r
DECODE = (1, 4096, 4096, 16) if CUDA else (1, 64, 48, 4)
MULTI = (128, 256, 4096, 4096, 16) if CUDA else (5, 7, 64, 48, 4)  # L, T, K, N, r
ROUNDS = 50 if CUDA else 3


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _run(benchmark, fn, rounds=ROUNDS):
    def target():
        fn()
        _sync()

    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=3)


def _graph_or_call(fn):
    """A CUDA graph replay of ``fn`` on CUDA (launch overhead excluded, as in the scripts); ``fn`` itself on the CPU."""
    if not CUDA:
        return fn
    graph = common.capture_graph(fn, DEVICE)
    return graph.replay


def _weights(M, K, N, r, grad: bool):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(M, K, generator=g, device=DEVICE).to(DTYPE).requires_grad_(grad)
    W = (torch.randn(N, K, generator=g, device=DEVICE) / K**0.5).to(DTYPE)
    A = (torch.randn(r, K, generator=g, device=DEVICE) / K**0.5).to(DTYPE).requires_grad_(grad)
    B = (torch.randn(N, r, generator=g, device=DEVICE) / r**0.5).to(DTYPE).requires_grad_(grad)
    dy = torch.randn(M, N, generator=g, device=DEVICE).to(DTYPE)
    return x, W, A, B, dy


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["base", "eager", "lora_kernels"])
def test_lora_linear_train(benchmark, provider, mode):
    M, K, N, r = TRAIN
    x, W, A, B, dy = _weights(M, K, N, r, grad=True)
    built = bll.build(provider, W, A, B, 0.0, True, BACKEND)
    benchmark.group = f"lora_linear {mode} M={M} K={K} N={N} r={r}"
    benchmark.extra_info.update(provider=provider, mode=mode, M=M, K=K, N=N, r=r, dtype=str(DTYPE))
    if mode == "fwd":
        fn = lambda: built.forward(x)  # noqa: E731
    else:

        def fn():
            for t in [x] + built.params:
                t.grad = None
            built.forward_backward(x, dy)

    _run(benchmark, fn)


@pytest.mark.parametrize("provider", ["base", "eager", "lora_kernels"])
def test_lora_linear_decode_graph(benchmark, provider):
    M, K, N, r = DECODE
    x, W, A, B, _ = _weights(M, K, N, r, grad=False)
    with torch.no_grad():
        built = bll.build(provider, W, A, B, 0.0, False, BACKEND)
        replay = _graph_or_call(lambda: built.forward(x))
        benchmark.group = f"lora_linear decode (graph) M={M} K={K} N={N} r={r}"
        benchmark.extra_info.update(provider=provider, M=M, K=K, N=N, r=r, dtype=str(DTYPE))
        _run(benchmark, replay, rounds=ROUNDS * 4)


@pytest.mark.parametrize("provider", ["base", "gather_bmm", "loop", "lora_kernels"])
def test_multi_lora_graph(benchmark, provider):
    L, T, K, N, r = MULTI
    gen = torch.Generator().manual_seed(0)
    wgen = torch.Generator(device=DEVICE).manual_seed(1)
    with torch.no_grad():
        ws = bml.WeightSet(L, K, N, r, DTYPE, DEVICE, wgen)
        ids = bml.token_ids("uniform", L, T, gen)
        x = torch.randn(T, K, generator=wgen, device=DEVICE).to(DTYPE)
        fn = bml.build(provider, ws, ids, DEVICE, BACKEND)
        replay = _graph_or_call(lambda: fn(x))
        benchmark.group = f"multi-adapter layer (graph) L={L} T={T} K={K} N={N} r={r}"
        benchmark.extra_info.update(provider=provider, L=L, T=T, K=K, N=N, r=r, dtype=str(DTYPE))
        _run(benchmark, replay, rounds=ROUNDS * 4)
