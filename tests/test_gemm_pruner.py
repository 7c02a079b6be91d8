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
