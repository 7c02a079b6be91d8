"""Randomized truncated SVD of a batch of same-shaped matrices (Halko, Martinsson, Tropp 2011, Alg. 4.4 + 5.1).

Same semantics as ``torch.svd_lowrank(G, q, niter)`` (Gaussian test matrix of q columns, ``niter`` power iterations
with a QR re-orthogonalisation after every product, small SVD of QᵀG), but for ``G`` of shape ``[..., m, n]``: one
batched matmul / QR / SVD per step instead of a Python loop over matrices. LoRA-GA needs this for hundreds of
same-shaped gradients (a 7B model has 224 target matrices in 3 shapes), where the per-matrix launches of a loop over
``torch.svd_lowrank`` dominate. The re-orthogonalisations use CholeskyQR2 in float64 (see ``_orthonormalize``).
"""

from __future__ import annotations

import torch

from .. import _autocast


def autocast_off(t: torch.Tensor):
    """Autocast disabled on ``t``'s device: the inits' matmuls are fp32 (or fp64) math, and inside a user's
    ``torch.autocast`` block they ran in bf16 (LoRA-GA factors off by ~0.4, PiSSA residuals by ~1e-3)."""
    return _autocast.autocast_off(t)


# Orthonormality CholeskyQR2 must reach (max |QᵀQ − I|) before its result is used; beyond it (numerically rank-
# deficient blocks, e.g. a zero gradient) the block falls back to Householder QR. fp32 results are good to ~1e-6.
_ORTHO_TOL = 1e-4


def _orthonormalize(X: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of every ``X [..., m, q]`` (m ≥ q).

    CholeskyQR2 in float64: two rounds of ``R = chol(XᵀX)``, ``X ← X·R⁻¹``. It is a handful of batched launches
    (a skinny matmul, a q×q Cholesky, a triangular solve) for the whole batch, where a batched Householder QR of tall
    matrices runs one solver call per matrix on CUDA; float64 makes the Gram matrix's squared condition number
    harmless for any X an fp32 gradient can produce. Falls back to ``torch.linalg.qr`` when a Cholesky fails or the
    result is not orthonormal to ``_ORTHO_TOL`` (rank-deficient X).
    """
    Y = X.double()
    eye = torch.eye(X.shape[-1], dtype=torch.float64, device=X.device)
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(Y.transpose(-2, -1) @ Y)
        if bool((info != 0).any()):
            return torch.linalg.qr(X).Q
        # Y ← Y·L⁻ᵀ, i.e. solve Z·Lᵀ = Y for Z
        Y = torch.linalg.solve_triangular(L.transpose(-2, -1), Y, upper=True, left=False)
    err = (Y.transpose(-2, -1) @ Y - eye).abs().amax()
    if not bool(torch.isfinite(err)) or float(err) > _ORTHO_TOL:
        return torch.linalg.qr(X).Q
    return Y.to(X.dtype)


def randomized_svd(
    G: torch.Tensor,
    q: int,
    niter: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    with autocast_off(G):
        return _randomized_svd(G, q, niter, generator)


def _randomized_svd(G, q, niter, generator):
    m, n = G.shape[-2:]
    omega = torch.randn(*G.shape[:-2], n, q, generator=generator, dtype=G.dtype).to(G.device)
    Gt = G.transpose(-2, -1)
    # Range finder: Q spans the dominant left singular subspace; the power iterations sharpen it by S^(2·niter),
    # re-orthogonalised after every product so that small singular directions are not lost to rounding.
    Q = _orthonormalize(G @ omega)  # [..., m, q]
    for _ in range(niter):
        Q = _orthonormalize(Gt @ Q)  # [..., n, q]
        Q = _orthonormalize(G @ Q)  # [..., m, q]
    small_t = Gt @ Q  # [..., n, q] = (QᵀG)ᵀ
    # SVD of the wide QᵀG through a q×q core: QᵀG = Rᵀ·Qtᵀ with Qt orthonormal, so only q×q SVDs run (batched
    # Jacobi on CUDA) instead of one q×n SVD per matrix.
    Qt = _orthonormalize(small_t)  # [..., n, q]
    R = Qt.transpose(-2, -1) @ small_t  # [..., q, q]
    Ub, S, Wh = torch.linalg.svd(R.transpose(-2, -1))
    return Q @ Ub, S, Wh @ Qt.transpose(-2, -1)
