"""Randomized truncated SVD of a matrix whose rows are sharded across the ranks of a process group.

Each rank holds a row block ``G_i [m_i, n]`` of ``G = [G_0; G_1; …]`` (the layout FSDP2 gives a Linear weight's
gradient: dim 0 sharded). The range finder of Halko, Martinsson and Tropp (2011, Alg. 4.4) needs only products that
split along those rows:

* ``Y_i = G_i·Ω`` is local (Ω ``[n, q]`` is drawn from the same seed on every rank);
* the tall-skinny ``Y`` is orthonormalised by CholeskyQR2: ``YᵀY = Σ_i Y_iᵀY_i`` is one q×q all-reduce, and every
  rank applies the same ``R⁻¹`` to its own rows;
* ``GᵀQ = Σ_i G_iᵀQ_i`` is one n×q all-reduce, after which that factor is replicated and handled locally.

So no rank ever holds more than its own rows of ``G``: the traffic per power iteration is ``n·q + 2·q²`` numbers,
against ``m·n`` to gather ``G``. Every rank ends with its own rows of ``U``, and the same ``S`` and ``Vh``.

Signs are fixed by :func:`canonical_signs` (the largest-magnitude entry of each right singular vector is positive),
so the factors do not depend on how ``G`` was split, nor on the world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Same contract as the single-process ``svd._ORTHO_TOL``: the largest |QᵀQ − I| accepted from CholeskyQR2 before the
# shifted variant is used (numerically rank-deficient Y, e.g. a zero gradient).
_ORTHO_TOL = 1e-4


# Passed as ``group`` for a factor that is already replicated on every rank: no collective at all (``None`` means
# torch.distributed's default group, not "local").
LOCAL = object()


def _distributed(group) -> bool:
    if group is LOCAL:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if _distributed(group):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _cholesky_qr_rows(Y: torch.Tensor, group, rounds: int = 2) -> torch.Tensor:
    """Orthonormal basis of the columns of the row-sharded ``Y`` (this rank's rows ``[m_i, q]``), in float64.

    CholeskyQR2; when a Cholesky factorisation fails or the result is not orthonormal to ``_ORTHO_TOL`` (the Gram
    matrix is singular to working precision), shifted CholeskyQR3 (Fukaya et al., SIAM J. Sci. Comput. 2020): a shift
    of ``11·(m·q + q(q+1))·u·‖Y‖²`` on the first Gram matrix keeps the factorisation positive definite, and two more
    plain rounds restore orthonormality. All decisions depend only on all-reduced values, so every rank takes the same
    branch and no collective is skipped on one rank only.
    """
    Y = Y.double()
    q = Y.shape[-1]
    eye = torch.eye(q, dtype=torch.float64, device=Y.device)
    m_total = _all_reduce(torch.tensor([float(Y.shape[0])], dtype=torch.float64, device=Y.device), group)

    def one_round(Z: torch.Tensor, shift: float = 0.0) -> tuple[torch.Tensor, bool]:
        gram = _all_reduce(Z.transpose(-2, -1) @ Z, group)
        if shift:
            gram = gram + shift * eye
        L, info = torch.linalg.cholesky_ex(gram)
        if int(info) != 0:
            return Z, False
        return torch.linalg.solve_triangular(L.transpose(-2, -1), Z, upper=True, left=False), True

    def ortho_error(Z: torch.Tensor) -> float:
        gram = _all_reduce(Z.transpose(-2, -1) @ Z, group)
        return float((gram - eye).abs().amax())

    Z, ok = Y, True
    for _ in range(rounds):
        Z, ok = one_round(Z)
        if not ok:
            break
    if ok:
        err = ortho_error(Z)
        if err == err and err <= _ORTHO_TOL:  # err == err: not NaN
            return Z
    # Shifted CholeskyQR3 from the original Y.
    norm2 = float(_all_reduce((Y * Y).sum().reshape(1), group))
    u = torch.finfo(torch.float64).eps / 2
    shift = 11.0 * (float(m_total) * q + q * (q + 1)) * u * max(norm2, torch.finfo(torch.float64).tiny)
    Z, ok = one_round(Y, shift)
    for _ in range(2):
        if not ok:
            break
        Z, ok = one_round(Z)
    if not ok:
        # Y is (numerically) zero: any orthonormal basis spans its range; use the first q unit vectors of the global
        # row space, split by rank, so the result is still orthonormal and identical to the single-process answer.
        offset = _row_offset(Y.shape[0], group, Y.device)
        Z = torch.zeros_like(Y)
        for j in range(q):
            row = j - offset
            if 0 <= row < Y.shape[0]:
                Z[row, j] = 1.0
    return Z


def _row_offset(rows: int, group, device) -> int:
    """Index of this rank's first row in the global matrix (ranks hold consecutive row blocks in rank order)."""
    if not _distributed(group):
        return 0
    world = dist.get_world_size(group)
    counts = torch.zeros(world, dtype=torch.float64, device=device)
    counts[dist.get_rank(group)] = rows
    _all_reduce(counts, group)
    return int(counts[: dist.get_rank(group)].sum())


def canonical_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so that the largest-magnitude entry of its right singular vector (row of ``Vh``) is
    positive (the first such entry on ties). ``Vh`` is replicated on every rank, so all ranks flip alike; the SVD's
    sign ambiguity otherwise makes factors depend on rounding, hence on the world size."""
    idx = Vh.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(Vh, -1, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)  # [..., q, 1]
    return U * sign.transpose(-2, -1), Vh * sign


def sharded_randomized_svd(
    G_rows: torch.Tensor,
    q: int,
    niter: int = 4,
    generator: torch.Generator | None = None,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-``q`` SVD of the row-sharded ``G`` from this rank's rows ``G_rows [m_i, n]``.

    Returns ``U_rows [m_i, q]`` (this rank's rows of U), ``S [q]`` and ``Vh [q, n]`` (identical on every rank), with
    canonical signs. Every rank of ``group`` must call it with the same ``q``, ``niter``, column count and generator
    state (the Gaussian test matrix is drawn on the CPU from ``generator``, ``torch.default_generator`` when None).
    Without an initialised process group (or with one rank) it is the ordinary randomized SVD of ``G_rows``.
    Computed in float64 internally; results in ``G_rows``' dtype.
    """
    if not isinstance(G_rows, torch.Tensor) or G_rows.dim() != 2:
        raise ValueError(
            f"G_rows must be a 2-D tensor [rows, n], got {type(G_rows).__name__} {tuple(getattr(G_rows, 'shape', ()))}"
        )
    if not G_rows.is_floating_point():
        raise TypeError(f"G_rows must be floating point, got {G_rows.dtype}")
    n = G_rows.shape[1]
    m_total = int(_all_reduce(torch.tensor([float(G_rows.shape[0])], dtype=torch.float64, device=G_rows.device), group))
    if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= min(m_total, n):
        raise ValueError(f"q must be an int in [1, min(m, n)={min(m_total, n)}] for a {m_total}x{n} matrix, got {q!r}")
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"niter must be a non-negative int, got {niter!r}")
    out_dtype = G_rows.dtype
    G = G_rows.double()
    omega = torch.randn(n, q, generator=generator, dtype=torch.float64).to(G.device)
    Q = _cholesky_qr_rows(G @ omega, group)  # this rank's rows of an orthonormal basis of range(G)
    for _ in range(niter):
        # GᵀQ is a sum over the row blocks: one n×q all-reduce; the result is replicated, orthonormalised locally.
        Z = _cholesky_qr_rows(_all_reduce(G.transpose(0, 1) @ Q, group), LOCAL)
        Q = _cholesky_qr_rows(G @ Z, group)
    small_t = _all_reduce(G.transpose(0, 1) @ Q, group)  # [n, q] = (QᵀG)ᵀ, replicated
    # SVD of QᵀG through a q×q core, as in the single-process version.
    Qt = _cholesky_qr_rows(small_t, LOCAL)
    R = Qt.transpose(0, 1) @ small_t
    Ub, S, Wh = torch.linalg.svd(R.transpose(0, 1))
    U_rows, Vh = canonical_signs(Q @ Ub, Wh @ Qt.transpose(0, 1))
    return U_rows.to(out_dtype), S.to(out_dtype), Vh.to(out_dtype)
