"""The GEMM tile pruner of the Triton lora_linear: with dropout, no dX tile that spills registers on sm_90 is offered
(the first surviving config is the one that runs with LORA_KERNELS_AUTOTUNE=0, e.g. under CUDA graphs)."""

import torch

from lora_kernels.triton import lora_linear as tri


def _prune(dropout, M_BUCKET=8192, dtype=torch.bfloat16, base=True):
    configs = tri._gemm_configs("BLOCK_K", "BLOCK_N", tri._CUDA_TILES)
    named = {"dy_ptr": torch.empty(1, dtype=dtype), "M_BUCKET": M_BUCKET}
    return tri._gemm_pruner("dy_ptr", "BLOCK_K", "BLOCK_N")(configs, named, HAS_DROPOUT=dropout, BASE=base)


def _per_thread(c):
    return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] / (32 * c.num_warps)


def test_dropout_drops_tiles_over_the_register_budget():
    kept = _prune(True)
    assert kept and all(_per_thread(c) <= tri._DROPOUT_MAX_PER_THREAD for c in kept), [str(c) for c in kept]
    # 64 elements per thread (128×128 at 8 warps, 64×128 at 4) still spilled on sm_90.
    assert tri._DROPOUT_MAX_PER_THREAD <= 32
    # The 128×256 tile at 8 warps (128 elements per thread: 255 registers and spills with the mask) is not offered.
    assert not any(c.kwargs["BLOCK_M"] == 128 and c.kwargs["BLOCK_K"] == 256 for c in kept)


def test_without_dropout_the_big_tile_stays_first():
    first = _prune(False)[0]
    assert (first.kwargs["BLOCK_M"], first.kwargs["BLOCK_K"], first.num_warps) == (128, 256, 8)


def test_autotune_off_keeps_one_non_spilling_config(monkeypatch):
    monkeypatch.setenv(tri.AUTOTUNE_ENV_VAR, "0")
    for bucket in (1, 16, 256, 8192):
        kept = _prune(True, M_BUCKET=bucket)
        assert len(kept) == 1 and _per_thread(kept[0]) <= tri._DROPOUT_MAX_PER_THREAD, (bucket, str(kept[0]))


def test_lora_only_path_drops_deep_reduction_tiles():
    # BASE=False has no reduction loop; the 128-deep decode tile spilled 8 bytes there.
    for bucket in (1, 16, 8192):
        kept = _prune(False, M_BUCKET=bucket, base=False)
        assert kept and all(c.kwargs["BLOCK_N"] <= tri._LORA_ONLY_MAX_RED for c in kept), [str(c) for c in kept]


def test_fused_shrink_keeps_small_tiles():
    configs = tri._gemm_configs("BLOCK_N", "BLOCK_K", tri._CUDA_TILES)
    for bucket in (1, 64, 256):
        named = {"x_ptr": torch.empty(1, dtype=torch.bfloat16), "M_BUCKET": bucket}
        kept = tri._gemm_pruner("x_ptr", "BLOCK_N", "BLOCK_K")(configs, named, BASE=True, FUSE_SHRINK=True)
        assert kept and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= tri._FUSED_SHRINK_MAX_TILE for c in kept)


# ------------------------------------------------------------------------------------------- per-architecture tiles
# A stand-in for a GPU tensor: the pruner reads only .device and .element_size(); the device queries are faked.
class _OnGpu:
    device = torch.device("cuda", 0)

    def __init__(self, elem):
        self.elem = elem

    def element_size(self):
        return self.elem


A100 = ((8, 0), 163 * 1024)  # compute capability, opt-in shared memory per block
H100 = ((9, 0), 227 * 1024)


def _fake_gpu(monkeypatch, gpu):
    capability, smem = gpu
    monkeypatch.setattr(tri._utils, "capability", lambda index: capability)
    monkeypatch.setattr(tri._utils, "max_smem", lambda index: smem)


def _prune_on(operand, col_key, red_key, elem, bucket, **kw):
    configs = tri._gemm_configs(col_key, red_key, tri._CUDA_TILES)
    named = {operand: _OnGpu(elem), "M_BUCKET": bucket}
    return tri._gemm_pruner(operand, col_key, red_key)(configs, named, **kw)


# (operand, output-column key, reduction key) of the forward and the dX GEMM
GEMMS = [("x_ptr", "BLOCK_N", "BLOCK_K"), ("dy_ptr", "BLOCK_K", "BLOCK_N")]
CASES = [
    dict(HAS_DROPOUT=dropout, BASE=base, FUSE_SHRINK=fused)
    for dropout in (False, True)
    for base in (True, False)
    for fused in (False, True)
]


def _elems_per_thread(c, col_key):
    return c.kwargs["BLOCK_M"] * c.kwargs[col_key] / (32 * c.num_warps)


def test_sm80_keeps_only_tiles_within_the_mma_sync_register_limit(monkeypatch):
    monkeypatch.setenv(tri.AUTOTUNE_ENV_VAR, "1")
    _fake_gpu(monkeypatch, A100)
    budget = A100[1] - (227 * 1024 - tri._SMEM_BUDGET)
    assert tri._MMA_SYNC_MAX_PER_THREAD <= 64  # 128 per thread spilled 48-116 bytes on sm_80
    for operand, col, red in GEMMS:
        for elem in (2, 4):
            for bucket in (1, 16, 256, 8192):
                for kw in CASES:
                    kept = _prune_on(operand, col, red, elem, bucket, **kw)
                    assert kept, (operand, elem, bucket, kw)
                    for c in kept:
                        assert _elems_per_thread(c, col) <= tri._MMA_SYNC_MAX_PER_THREAD, (str(c), kw)
                        stage = (c.kwargs["BLOCK_M"] + c.kwargs[col]) * c.kwargs[red] * elem
                        assert c.num_stages >= 2 and c.num_stages * stage <= budget, (str(c), kw)
    # What the limit removes at training sizes: the Hopper-first 128×256 tile (8 warps: 128 per thread) and 128×128
    # at 4 warps; the others stay in order, the 64×64×128 tile at 8 warps (at 4 it spilled 60 bytes on sm_80).
    kept = _prune_on("x_ptr", "BLOCK_N", "BLOCK_K", 2, 8192, BASE=True)
    dropped = {(128, 256, 8), (128, 128, 4)}
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in kept] == [
        (bm, bc, bk, 8 if (bm, bc, bk) == (64, 64, 128) else w)
        for bm, bc, bk, _, w, _ in tri._CUDA_TILES
        if (bm, bc, w) not in dropped
    ]
    assert any(t[:3] == (64, 64, 128) and t[4] == 4 for t in tri._CUDA_TILES)  # 4 warps on Hopper (wgmma)


def test_sm90_keeps_todays_list(monkeypatch):
    monkeypatch.setenv(tri.AUTOTUNE_ENV_VAR, "1")
    _fake_gpu(monkeypatch, H100)
    for operand, col, red in GEMMS:
        for elem in (2, 4):
            for bucket in (1, 16, 256, 8192):
                for kw in CASES:
                    on_gpu = _prune_on(operand, col, red, elem, bucket, **kw)
                    configs = tri._gemm_configs(col, red, tri._CUDA_TILES)
                    named = {operand: torch.empty(1, dtype=torch.float32 if elem == 4 else torch.bfloat16)}
                    off_gpu = tri._gemm_pruner(operand, col, red)(configs, dict(named, M_BUCKET=bucket), **kw)
                    assert [str(c) for c in on_gpu] == [str(c) for c in off_gpu], (operand, elem, bucket, kw)
    first = _prune_on("x_ptr", "BLOCK_N", "BLOCK_K", 2, 8192, BASE=True)[0]
    assert (first.kwargs["BLOCK_M"], first.kwargs["BLOCK_N"], first.num_warps) == (128, 256, 8)


def test_sm80_autotune_off_runs_a_non_spilling_config(monkeypatch):
    monkeypatch.setenv(tri.AUTOTUNE_ENV_VAR, "0")
    _fake_gpu(monkeypatch, A100)
    for operand, col, red in GEMMS:
        for bucket in (1, 16, 256, 8192):
            for kw in CASES:
                kept = _prune_on(operand, col, red, 2, bucket, **kw)
                assert len(kept) == 1 and _elems_per_thread(kept[0], col) <= tri._MMA_SYNC_MAX_PER_THREAD, (kw, bucket)
    first = _prune_on("dy_ptr", "BLOCK_K", "BLOCK_N", 2, 8192, BASE=True)[0]
    assert (first.kwargs["BLOCK_M"], first.kwargs["BLOCK_K"], first.num_warps, first.num_stages) == (128, 128, 8, 4)


def test_device_queries_are_lazy_and_cached(monkeypatch):
    # Off CUDA (the interpreter) the pruner never asks for a capability; on a GPU, once per device index.
    def boom(index):
        raise AssertionError("capability asked off CUDA")

    monkeypatch.setattr(tri._utils, "capability", boom)
    assert _prune(False) and _prune(True)  # CPU tensors
    monkeypatch.undo()
    assert tri._utils.capability.cache_info().maxsize is None  # functools.cache
