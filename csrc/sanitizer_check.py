"""A small run of every CUDA kernel path for compute-sanitizer (see csrc/README.md):

    compute-sanitizer --tool memcheck   --error-exitcode 3 python csrc/sanitizer_check.py
    compute-sanitizer --tool racecheck  --error-exitcode 3 python csrc/sanitizer_check.py
    compute-sanitizer --tool initcheck  --error-exitcode 3 python csrc/sanitizer_check.py   (may also flag torch)

Covers fp16/bf16/fp32, the 16-byte and the scalar (strided, misaligned) paths, K and N not multiples of 8, rows past
an adapter's rank, empty slots, and bad ids (-5, L, L + 1000) that must read nothing outside the pool. The pool is
allocated exactly (no slack), so any out-of-bounds read is reported. Exits 0 and prints "ok" when the results match
the reference.
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from lora_kernels import cuda as lkc
from lora_kernels.reference import multi_lora as ref


def main() -> int:
    why = lkc.cuda_ops_unavailable_reason()
    if why:
        print(f"skipped: {why}")
        return 0
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for M, K, slices, L, R in ((5, 33, [17], 3, 8), (9, 64, [40, 8, 8], 4, 16)):
            S, N = len(slices), sum(slices)
            A = (torch.randn(L, S * R, K, generator=gen) / math.sqrt(K)).to("cuda", dtype)
            B = torch.randn(L, N, R, generator=gen).to("cuda", dtype)
            ranks = torch.tensor([R, 0] + [max(1, R // 2 + 1)] * (L - 2), dtype=torch.int32, device="cuda")
            scales = torch.rand(L, S, generator=gen).to("cuda")
            ids = torch.tensor(([0, 1, 2, -1, -5, L, L + 1000] * 3)[:M], dtype=torch.int32, device="cuda")
            xbig = torch.randn(M, K + 1, generator=gen).to("cuda", dtype)
            for x in (xbig[:, :K].contiguous(), xbig[:, 1:]):  # aligned contiguous, then misaligned
                out = torch.empty(M, S * R, device="cuda")
                lkc.multi_lora_shrink(x, A, ranks, ids, None, None, None, out, S, 16)
                y = torch.randn(M, N, generator=gen).to("cuda", dtype)
                y0 = y.clone()
                lkc.multi_lora_expand(out, B, ranks, scales, ids, None, None, None, y, slices, 16)
                torch.cuda.synchronize()
                want_s = ref.lora_shrink(x.cpu().double(), A.cpu().double(), ids.cpu(), ranks.cpu(), S)
                want_y = ref.lora_expand(
                    want_s, B.cpu().double(), ids.cpu(), ranks.cpu(), scales.cpu(), y0.cpu().double(), slices
                )
                torch.testing.assert_close(out.cpu().double(), want_s, rtol=1e-4, atol=1e-4)
                tol = 3e-2 if dtype == torch.bfloat16 else 4e-3
                torch.testing.assert_close(y.cpu().double(), want_y, rtol=tol, atol=tol)
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
