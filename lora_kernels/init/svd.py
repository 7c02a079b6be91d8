"""Randomized truncated SVD of a batch of same-shaped matrices (Halko, Martinsson, Tropp 2011, Alg. 4.4 + 5.1).

Same semantics as ``torch.svd_lowrank(G, q, niter)`` (Gaussian test matrix of q columns, ``niter`` power iterations
with a QR re-orthogonalisation after every product, small SVD of QᵀG), but for ``G`` of shape ``[..., m, n]``: one
batched matmul / QR / SVD per step instead of a Python loop over matrices. LoRA-GA needs this for hundreds of
same-shaped gradients (a 7B model has 224 target matrices in 3 shapes), where the per-matrix launches of a loop over
``torch.svd_lowrank`` dominate.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def randomized_svd(
    G: torch.Tensor,
    q: int,
    niter: int = 4,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-q SVD of every matrix in ``G`` ``[..., m, n]``.

    Returns ``U [..., m, q]``, ``S [..., q]`` (descending) and ``Vh [..., q, n]`` with ``G ≈ U·diag(S)·Vh``; computed in
    G's dtype (use float32 or float64). ``q`` must be ≤ min(m, n). The Gaussian test matrix is drawn on the CPU from
    ``generator`` (``torch.default_generator`` when None) so that a seed gives the same result on every device and rank.
    """
    if not isinstance(G, torch.Tensor) or G.dim() < 2:
        raise ValueError(f"G must be a tensor [..., m, n], got {type(G).__name__} {getattr(G, 'shape', '')}")
    if not G.is_floating_point():
        raise TypeError(f"G must be floating point, got {G.dtype}")
    m, n = G.shape[-2:]
    if not isinstance(q, int) or not 1 <= q <= min(m, n):
        raise ValueError(f"q must be an int in [1, min(m, n)={min(m, n)}] for G of shape {tuple(G.shape)}, got {q!r}")
    if not isinstance(niter, int) or niter < 0:
        raise ValueError(f"niter must be a non-negative int, got {niter!r}")
    omega = torch.randn(*G.shape[:-2], n, q, generator=generator, dtype=G.dtype).to(G.device)
    Gt = G.transpose(-2, -1)
    # Range finder: Q spans the dominant left singular subspace; the power iterations sharpen it by S^(2·niter),
    # re-orthogonalised after every product so that small singular directions are not lost to rounding.
    Q = torch.linalg.qr(G @ omega).Q  # [..., m, q]
    for _ in range(niter):
        Q = torch.linalg.qr(Gt @ Q).Q  # [..., n, q]
        Q = torch.linalg.qr(G @ Q).Q  # [..., m, q]
    small = Q.transpose(-2, -1) @ G  # [..., q, n]
    Ub, S, Vh = torch.linalg.svd(small, full_matrices=False)
    return Q @ Ub, S, Vh
