"""Kernel-level timing of the multi-adapter LoRA delta: CUDA extension (per-token and tiled kernels) against Triton,
for choosing ``lora_kernels.cuda.TILED_MIN_TOKENS_PER_SLOT`` and the "auto" order of ``ops.multi_lora``.

    python csrc/bench_bgmv.py [--dtype bfloat16] [--K 4096] [--N 4096] [--csv out.csv]

Times ``y += LoRA(x)`` (shrink into an fp32 buffer, expand into y; one random adapter per token, all slots loaded at
the rank under test) for T in {1, 16, 64, 256}, L in {16, 128}, r in {8, 16, 64}, each call replayed from a CUDA graph
(median µs per call, benchmarks/common.py's timer) after checking each provider against the float64 reference.
Providers: ``triton`` (split shrink + expand), ``triton_fused`` (one kernel), ``cuda_token`` (per-token kernels),
``cuda_tiled`` (the LoRABatch work list). Needs a GPU; prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from lora_kernels import cuda as lkc  # noqa: E402
from lora_kernels.ops import multi_lora as ops  # noqa: E402
from lora_kernels.pool import AdapterPool, LoRABatch  # noqa: E402
from lora_kernels.reference import multi_lora as ref  # noqa: E402

from benchmarks.common import GraphCaptureError, time_graph  # noqa: E402

PROVIDERS = ("triton", "triton_fused", "cuda_token", "cuda_tiled")


def make_case(T, L, r, K, N, dtype, gen):
    pool = AdapterPool(L, r, K, N, dtype=dtype, device="cuda")
    for i in range(L):
        pool.load(
            f"a{i}", torch.randn(r, K, generator=gen) / math.sqrt(K), torch.randn(N, r, generator=gen), alpha=float(r)
        )
    ids = torch.randint(0, L, (T,), generator=gen).tolist()
    batch = LoRABatch.prepare(ids, device="cuda")
    x = torch.randn(T, K, generator=gen).to("cuda", dtype)
    y = torch.zeros(T, N, device="cuda", dtype=dtype)
    return pool, batch, x, y, ids


def run(provider, pool, batch, x, y):
    fields = (batch.token_slots, batch.sorted_tokens, batch.sorted_slots, batch.tile_starts)
    slices = list(pool.slices)
    if provider == "triton_fused":
        ops._fused_op(
            x, pool.A_stack, pool.B_stack, pool.ranks, pool.scales, *fields, y, slices, batch.tile_m, "triton"
        )
        return
    backend = "triton" if provider == "triton" else "cuda"
    s = torch.empty(x.shape[0], pool.max_rank, dtype=torch.float32, device=x.device)
    ops._shrink_op(x, pool.A_stack, pool.ranks, *fields, s, 1, batch.tile_m, backend)
    ops._expand_op(s, pool.B_stack, pool.ranks, pool.scales, *fields, y, slices, batch.tile_m, backend)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--K", type=int, default=4096)
    parser.add_argument("--N", type=int, default=4096)
    parser.add_argument("--T", default="1,16,64,256")
    parser.add_argument("--L", default="16,128")
    parser.add_argument("--r", default="8,16,64")
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    why = lkc.cuda_ops_unavailable_reason()
    if why:
        print(f"the CUDA extension is unavailable: {why}")
        return 1
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"| T | L | r | {' | '.join(PROVIDERS)} | best |")
    print("|" + "---|" * (len(PROVIDERS) + 4))
    saved = lkc.TILED_MIN_TOKENS_PER_SLOT
    for L in [int(v) for v in args.L.split(",")]:
        for r in [int(v) for v in args.r.split(",")]:
            for T in [int(v) for v in args.T.split(",")]:
                pool, batch, x, y, ids = make_case(T, L, r, args.K, args.N, dtype, gen)
                want = ref.lora_expand(
                    ref.lora_shrink(x.double().cpu(), pool.A_stack.cpu(), torch.tensor(ids), pool.ranks.cpu()),
                    pool.B_stack.cpu(),
                    torch.tensor(ids),
                    pool.ranks.cpu(),
                    pool.scales.cpu(),
                    torch.zeros(T, args.N, dtype=torch.float64),
                )
                times = {}
                for prov in PROVIDERS:
                    lkc.TILED_MIN_TOKENS_PER_SLOT = 0.0 if prov == "cuda_tiled" else float("inf")
                    try:
                        y.zero_()
                        run(prov, pool, batch, x, y)
                        torch.cuda.synchronize()
                        tol = 3e-2 if dtype == torch.bfloat16 else 4e-3
                        torch.testing.assert_close(y.double().cpu(), want, rtol=tol, atol=tol)
                        times[prov] = time_graph(lambda: run(prov, pool, batch, x, y), torch.device("cuda"))
                    except (GraphCaptureError, AssertionError, RuntimeError) as exc:
                        print(f"<!-- {prov} T={T} L={L} r={r}: {type(exc).__name__}: {str(exc).splitlines()[0]} -->")
                    finally:
                        lkc.TILED_MIN_TOKENS_PER_SLOT = saved
                best = min(times, key=times.get) if times else "-"
                cells = [f"{times[p]:.2f}" if p in times else "-" for p in PROVIDERS]
                print(f"| {T} | {L} | {r} | {' | '.join(cells)} | {best} |", flush=True)
                rows.append((T, L, r, *[times.get(p) for p in PROVIDERS], best))
    if args.csv:
        with open(args.csv, "w", encoding="utf-8") as f:
            f.write("T,L,r," + ",".join(f"{p}_us" for p in PROVIDERS) + ",best\n")
            for row in rows:
                f.write(
                    ",".join("" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)) for v in row) + "\n"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
