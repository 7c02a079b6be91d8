"""The row-sharded randomized SVD: one process equals the exact SVD on low-rank-plus-noise matrices; two gloo
processes holding row blocks give the single-process factors (their own rows of U, the same S and Vh), and nobody
ever needs more than its own rows."""

import os

import pytest
import torch

from lora_kernels.init.dist_svd import canonical_signs, sharded_randomized_svd

from _dist_helpers import gloo_available, spawn


def _matrix(m, n, rank, seed=0, noise=1e-3):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64)).Q
    S = torch.logspace(1, -1, rank, dtype=torch.float64)
    return U @ torch.diag(S) @ V.T + noise * torch.randn(m, n, generator=g, dtype=torch.float64)


def _exact(G, q):
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    U, Vh = canonical_signs(U[:, :q], Vh[:q])
    return U, S[:q], Vh


@pytest.mark.parametrize("m,n,q", [(33, 20, 4), (7, 100, 3), (100, 7, 7)])
def test_single_process_matches_exact_svd(m, n, q):
    G = _matrix(m, n, rank=min(q, m, n))
    U, S, Vh = sharded_randomized_svd(G, q, niter=4, generator=torch.Generator().manual_seed(1))
    Ue, Se, Vhe = _exact(G, q)
    torch.testing.assert_close(S, Se, rtol=1e-6, atol=1e-8)
    # canonical signs make the vectors themselves comparable, not only the subspaces
    torch.testing.assert_close(Vh, Vhe, rtol=0, atol=1e-6)
    torch.testing.assert_close(U, Ue, rtol=0, atol=1e-6)


def test_zero_matrix_gives_orthonormal_factors():
    G = torch.zeros(9, 5, dtype=torch.float64)
    U, S, Vh = sharded_randomized_svd(G, 3, generator=torch.Generator().manual_seed(0))
    assert torch.all(S == 0)
    torch.testing.assert_close(U.T @ U, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(3, dtype=torch.float64))


def test_canonical_signs_fix_the_largest_entry_positive():
    U = torch.randn(6, 3, dtype=torch.float64)
    Vh = torch.randn(3, 5, dtype=torch.float64)
    U2, Vh2 = canonical_signs(U, Vh)
    assert torch.all(torch.gather(Vh2, 1, Vh2.abs().argmax(1, keepdim=True)) > 0)
    torch.testing.assert_close(U2 @ Vh2, U @ Vh)  # each pair flipped together: the product is unchanged


@pytest.mark.parametrize(
    "bad,match", [(dict(q=0), "q must be"), (dict(q=10), "q must be"), (dict(q=2, niter=-1), "niter")]
)
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        sharded_randomized_svd(torch.randn(6, 5), **bad)


# Row splits of a 37-row matrix between the two ranks: even, and one rank with fewer rows than q.
SPLITS = [(0, 20, 37), (0, 3, 37)]


def _worker(rank, out_dir):
    G = _matrix(37, 23, rank=5, seed=3)
    for k, splits in enumerate(SPLITS):
        lo, hi = splits[rank], splits[rank + 1]
        U, S, Vh = sharded_randomized_svd(G[lo:hi].clone(), 6, niter=3, generator=torch.Generator().manual_seed(7))
        torch.save({"U": U, "S": S, "Vh": Vh}, os.path.join(out_dir, f"split{k}_rank{rank}.pt"))


@pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is not available in this build")
def test_two_ranks_match_single_process(tmp_path):
    spawn(_worker, tmp_path)
    G = _matrix(37, 23, rank=5, seed=3)
    U, S, Vh = sharded_randomized_svd(G, 6, niter=3, generator=torch.Generator().manual_seed(7))
    for k, splits in enumerate(SPLITS):
        r0, r1 = torch.load(tmp_path / f"split{k}_rank0.pt"), torch.load(tmp_path / f"split{k}_rank1.pt")
        assert r0["U"].shape == (splits[1], 6) and r1["U"].shape == (37 - splits[1], 6)  # own rows only
        torch.testing.assert_close(r0["S"], r1["S"], rtol=0, atol=0)  # replicated factors: identical on every rank
        torch.testing.assert_close(r0["Vh"], r1["Vh"], rtol=0, atol=0)
        torch.testing.assert_close(r0["S"], S, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(r0["Vh"], Vh, rtol=0, atol=1e-9)
        torch.testing.assert_close(torch.cat([r0["U"], r1["U"]]), U, rtol=0, atol=1e-9)
