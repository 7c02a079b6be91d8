"""The card both static reports model (benchmarks/static_report.py, benchmarks/static_serving.py): an H100 SXM5's
peaks, the rates measured on one, and the assumed rates of Triton GEMMs against cuBLAS. Imports neither triton nor
lora_kernels: importing it changes nothing (static_report.py turns the Triton interpreter off when imported)."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Card:
    """H100 SXM5 80 GB. Peaks from NVIDIA's H100 Tensor Core GPU datasheet: 989.4 TFLOP/s dense BF16/FP16 tensor
    (1979 with sparsity), 494.7 TFLOP/s dense TF32, 3.35 TB/s HBM3, 132 SMs, 1980 MHz max boost clock.
    Reached rates, measured on one H100 80GB HBM3 on 2026-11-25 (torch 2.11, triton.testing.do_bench medians): an
    8192³ bf16 torch.matmul (cuBLAS) at 732 TFLOP/s, i.e. 74% of the dense peak; a device-to-device copy at 2.96 TB/s
    (read + write), 88% of the HBM peak. The model uses the reached rates, not the peaks."""

    name: str = "H100 SXM5 80GB"
    sms: int = 132
    clock_hz: float = 1.98e9
    peak_bf16_flops: float = 989.4e12
    peak_tf32_flops: float = 494.7e12
    peak_hbm_bps: float = 3.35e12
    cublas_flops: float = 732e12  # measured, 8192³ bf16
    copy_bps: float = 2.96e12  # measured, device-to-device copy
    smem_per_sm: int = 228 * 1024
    regs_per_sm: int = 65536
    # Assumed, not measured: the shortest time of any launch (kernel ramp-up and drain; also the cost of a node in a
    # CUDA graph), and how a Triton GEMM compares to cuBLAS by the machine code it compiles to. A plain Triton GEMM
    # (cp.async + wgmma, no TMA, not persistent) measured 1.25-1.45x cuBLAS's time on the H100 above: the middle,
    # 1.35, is used; a TMA + wgmma GEMM is assumed at cuBLAS's rate, ASSUMED, UNMEASURED here: the source is the
    # Triton tutorials' persistent TMA matmul (09-persistent-matmul), which reports fp16 throughput close to cuBLAS's
    # on an H100; mma.sync on Hopper at half of the plain wgmma GEMM's rate.
    min_launch_us: float = 2.0
    # The measured cuBLAS rate already contains that run's partial last wave: 8192³ cut into power-of-two tiles
    # (128×256: 2048 tiles) on 132 SMs is 15.52 waves run as 16, 97.0% busy (any power-of-two tile gives the same
    # 97.0% there). The Triton rates below are relative to that measured rate, so a Triton GEMM's own wave
    # quantisation is charged relative to it: time × (its ceil(waves) / waves) × 0.970, not on top of it.
    cublas_wave_efficiency: float = (2048 / 132) / math.ceil(2048 / 132)
    triton_wgmma_slowdown: float = 1.35
    triton_tma_slowdown: float = 1.0
    triton_mma_sync_slowdown: float = 2.7

    def gemm_rate(self, code: str) -> float:
        """FLOP/s of a Triton GEMM by the machine code it compiles to: "tma" (TMA + wgmma), "wgmma" (without TMA),
        anything else mma.sync; each cuBLAS's measured rate over the slowdown assumed for it."""
        slowdown = {"tma": self.triton_tma_slowdown, "wgmma": self.triton_wgmma_slowdown}.get(
            code, self.triton_mma_sync_slowdown
        )
        return self.cublas_flops / slowdown

    def mma_seconds(self, flops: float, tf32_flops: float, rate: float) -> float:
        """Seconds of ``flops`` of MMA work at ``rate`` FLOP/s (16-bit operands), of which ``tf32_flops`` (products
        on fp32 operands: TF32 MMA, e.g. a GEMM's LoRA epilogue on the fp32 xa) run at the card's TF32 / BF16 peak
        ratio of that rate (one half on an H100)."""
        return (flops - tf32_flops) / rate + tf32_flops / (rate * self.peak_tf32_flops / self.peak_bf16_flops)


CARD = Card()
