"""LoRA-GA's factors from a gradient (steps 2-4 of the recipe in :mod:`lora_kernels.init.lora_ga`): tensors in,
tensors out, for a batch of same-shaped gradients."""

from __future__ import annotations

import math

import torch

from .dist_svd import canonical_signs
from .svd import autocast_off, randomized_svd

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")


def direction_indices(r: int, direction: str, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the 2r leading singular directions: (those used for A, those used for B)."""
    if direction == "ArB2r":
        return torch.arange(0, r), torch.arange(r, 2 * r)
    if direction == "A2rBr":
        return torch.arange(r, 2 * r), torch.arange(0, r)
    if direction == "ArBr":
        return torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    if direction == "random":
        perm = torch.randperm(2 * r, generator=generator)
        return perm[:r], perm[r:]
    raise ValueError(f"direction={direction!r} is not one of {', '.join(DIRECTIONS)}")


def stable_scale(out_features: int, stable_gamma: float) -> float:
    """The factor ``c = d_out^(1/4) / √γ`` that multiplies both A and B (the official ``scale="stable"``: forward and
    backward magnitudes Θ(1) in width and rank)."""
    return out_features**0.25 / math.sqrt(float(stable_gamma))


def lora_ga_factors(
    G: torch.Tensor,
    r: int,
    direction: str = "ArB2r",
    stable_gamma: float = 16.0,
    niter: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's ``A [..., r, n]`` and ``B [..., m, r]`` for gradients ``G [..., m, n]`` (steps 2-4 of the recipe).

    Computed in float32 (float64 if G is), batched over leading dimensions. Needs ``2r ≤ min(m, n)``.
    """
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    m, n = G.shape[-2:]
    if 2 * r > min(m, n):
        raise ValueError(f"LoRA-GA needs 2r = {2 * r} ≤ min(out, in) = {min(m, n)}; got G of shape {tuple(G.shape)}")
    if not stable_gamma > 0:
        raise ValueError(f"stable_gamma must be positive, got {stable_gamma}")
    idx_a, idx_b = direction_indices(r, direction, generator)
    G = G if G.dtype == torch.float64 else G.float()
    with autocast_off(G):
        U, _, Vh = randomized_svd(G, q=min(4 * r, min(m, n)), niter=niter, generator=generator)
        U, Vh = canonical_signs(U, Vh)
    c = stable_scale(m, stable_gamma)
    A = Vh[..., idx_a.to(G.device), :] * c
    B = U[..., :, idx_b.to(G.device)] * c
    return A, B
