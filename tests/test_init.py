"""LoRA-GA, PiSSA and the batched randomized SVD (lora_kernels/init/)."""

import copy
import math

import pytest
import torch
import torch.nn as nn

import lora_kernels as lk
from lora_kernels.init import DIRECTIONS, lora_ga_factors, pissa_init, randomized_svd


# ---------------------------------------------------------------------------------------------------------- helpers
def spectrum_matrix(m, n, sv, gen, batch=()):
    """Random matrices [*batch, m, n] with the singular values ``sv`` (descending) and random singular vectors."""
    k = len(sv)
    U = torch.linalg.qr(torch.randn(*batch, m, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=gen, dtype=torch.float64)).Q
    return (U * torch.tensor(sv, dtype=torch.float64)) @ V.transpose(-2, -1)


def projector(M):
    """Orthogonal projector onto the column space of M (M has full column rank)."""
    Q = torch.linalg.qr(M.double()).Q
    return Q @ Q.transpose(-2, -1)


def best_rank(G, k):
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


class MLP(nn.Module):
    def __init__(self, d_in=12, h=16, d_out=3, dtype=torch.float32):
        super().__init__()
        self.up = nn.Linear(d_in, h, dtype=dtype)
        self.mid = nn.Linear(h, 10, dtype=dtype)
        self.head = nn.Linear(10, d_out, dtype=dtype)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.drop(self.up(x))))))


def mse(model, batch):
    x, y = batch
    return ((model(x).float() - y) ** 2).mean()


def make_problem(seed=0, n_batches=4, dtype=torch.float32):
    torch.manual_seed(seed)
    model = MLP(dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [
        (torch.randn(16, 12, generator=gen).to(dtype), torch.randn(16, 3, generator=gen)) for _ in range(n_batches)
    ]
    return model, batches


def reference_grads(model, batches, names):
    """Average gradient over the batches, computed in float64 on a copy."""
    ref = copy.deepcopy(model).double()
    total = sum(mse(ref, (x.double(), y.double())) for x, y in batches) / len(batches)
    grads = torch.autograd.grad(total, [ref.get_submodule(n).weight for n in names])
    return dict(zip(names, grads))


# ---------------------------------------------------------------------------------------------- randomized SVD
def test_randomized_svd_matches_exact_svd_batched():
    gen = torch.Generator().manual_seed(0)
    sv = [10.0 * 0.6**i for i in range(20)]
    G = spectrum_matrix(33, 47, sv, gen, batch=(3,)).float()
    q, k = 8, 4
    U, S, Vh = randomized_svd(G, q=q, niter=4, generator=torch.Generator().manual_seed(1))
    assert U.shape == (3, 33, q) and S.shape == (3, q) and Vh.shape == (3, q, 47)
    for b in range(3):
        Ue, Se, Vhe = torch.linalg.svd(G[b].double(), full_matrices=False)
        torch.testing.assert_close(S[b, :k].double(), Se[:k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(projector(U[b, :, :k]), projector(Ue[:, :k]), atol=1e-4, rtol=0)
        torch.testing.assert_close(projector(Vh[b, :k].T), projector(Vhe[:k].T), atol=1e-4, rtol=0)
        # U and Vh are orthonormal
        torch.testing.assert_close(U[b].T @ U[b], torch.eye(q), atol=1e-5, rtol=0)
        torch.testing.assert_close(Vh[b] @ Vh[b].T, torch.eye(q), atol=1e-5, rtol=0)


def test_randomized_svd_agrees_with_svd_lowrank_and_batches_like_a_loop():
    gen = torch.Generator().manual_seed(3)
    sv = [5.0 * 0.7**i for i in range(16)]
    G = spectrum_matrix(40, 24, sv, gen, batch=(2,)).float()
    U, S, Vh = randomized_svd(G, q=12, niter=2, generator=torch.Generator().manual_seed(0))
    for b in range(2):
        Ul, Sl, Vl = torch.svd_lowrank(G[b], q=12, niter=2)
        torch.testing.assert_close(S[b, :6], Sl[:6], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(projector(U[b, :, :6]), projector(Ul[:, :6]), atol=1e-4, rtol=0)
        torch.testing.assert_close(projector(Vh[b, :6].T), projector(Vl[:, :6]), atol=1e-4, rtol=0)
    # q = min(m, n): the range finder spans everything, the result is an exact SVD even without power iterations.
    U2, S2, Vh2 = randomized_svd(G[0], q=24, niter=0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close((U2 * S2) @ Vh2, G[0], atol=1e-5, rtol=1e-4)


def test_orthonormalize_cholesky_qr2_and_fallback(monkeypatch):
    from lora_kernels.init import svd as svd_mod

    gen = torch.Generator().manual_seed(2)
    # ill-conditioned (cond 1e5) but full rank: CholeskyQR2 in float64 handles it without the QR fallback
    X = spectrum_matrix(200, 12, [10.0 ** (-i * 5 / 11) for i in range(12)], gen, batch=(3,)).float()
    real_qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **k: (_ for _ in ()).throw(AssertionError("QR used")))
    Q = svd_mod._orthonormalize(X)
    monkeypatch.setattr(torch.linalg, "qr", real_qr)
    assert Q.dtype == torch.float32 and Q.shape == X.shape
    torch.testing.assert_close(Q.transpose(-2, -1) @ Q, torch.eye(12).expand(3, 12, 12), atol=1e-5, rtol=0)
    torch.testing.assert_close(projector(Q[1]), projector(X[1]), atol=1e-3, rtol=0)
    # rank-deficient and zero blocks: the fallback still returns orthonormal columns
    Xd = torch.cat([X[:, :, :4], X[:, :, :4] * 2, torch.zeros(3, 200, 4)], dim=-1)
    for bad in (Xd, torch.zeros(2, 50, 6)):
        Qb = svd_mod._orthonormalize(bad)
        assert torch.isfinite(Qb).all()
        torch.testing.assert_close(
            Qb.transpose(-2, -1) @ Qb, torch.eye(bad.shape[-1]).expand_as(Qb.transpose(-2, -1) @ Qb), atol=1e-5, rtol=0
        )


def test_randomized_svd_low_rank_and_zero_matrices():
    gen = torch.Generator().manual_seed(4)
    G = spectrum_matrix(30, 20, [3.0, 2.0, 1.0], gen).float()  # rank 3 < q = 8
    U, S, Vh = randomized_svd(G, q=8, niter=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(S[:3], torch.tensor([3.0, 2.0, 1.0]), atol=1e-5, rtol=1e-5)
    assert S[3:].abs().max() < 1e-5
    torch.testing.assert_close((U * S) @ Vh, G, atol=1e-5, rtol=0)
    U0, S0, Vh0 = randomized_svd(torch.zeros(2, 12, 9), q=4, niter=2)
    assert torch.isfinite(U0).all() and torch.isfinite(Vh0).all() and S0.abs().max() == 0


def test_randomized_svd_bad_arguments():
    G = torch.randn(6, 5)
    with pytest.raises(ValueError, match="q must be"):
        randomized_svd(G, q=6)
    with pytest.raises(ValueError, match="q must be"):
        randomized_svd(G, q=0)
    with pytest.raises(ValueError, match="niter"):
        randomized_svd(G, q=2, niter=-1)
    with pytest.raises(TypeError, match="floating"):
        randomized_svd(torch.ones(6, 5, dtype=torch.int64), q=2)


# ---------------------------------------------------------------------------------------------- LoRA-GA factors
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_lora_ga_factors_directions_and_scale(direction):
    gen = torch.Generator().manual_seed(5)
    r, m, n = 3, 20, 12
    sv = [8.0 * 0.7**i for i in range(12)]
    G = spectrum_matrix(m, n, sv, gen).float()
    A, B = lora_ga_factors(
        G, r, direction=direction, stable_gamma=16, niter=4, generator=torch.Generator().manual_seed(0)
    )
    assert A.shape == (r, n) and B.shape == (m, r)
    c = m**0.25 / 4.0
    # Rows of A/c and columns of B/c are orthonormal: no singular value enters them (official "stable" scale).
    torch.testing.assert_close(A @ A.T / c**2, torch.eye(r), atol=1e-5, rtol=0)
    torch.testing.assert_close(B.T @ B / c**2, torch.eye(r), atol=1e-5, rtol=0)
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    idx = {
        "ArB2r": (range(0, r), range(r, 2 * r)),
        "A2rBr": (range(r, 2 * r), range(0, r)),
        "ArBr": (range(1, 2 * r, 2), range(0, 2 * r, 2)),
    }
    if direction in idx:
        ia, ib = idx[direction]
        torch.testing.assert_close(projector(A.T), projector(Vh[list(ia)].T), atol=1e-4, rtol=0)
        torch.testing.assert_close(projector(B), projector(U[:, list(ib)]), atol=1e-4, rtol=0)
    # Every direction: A and B together span the top-2r directions, so G·AᵀA + BBᵀ·G = c²·(best rank-2r of G).
    got = G.double() @ A.T.double() @ A.double() + B.double() @ B.T.double() @ G.double()
    torch.testing.assert_close(got, c**2 * best_rank(G, 2 * r), atol=1e-4, rtol=0)


def test_lora_ga_factors_needs_2r_le_min_dim():
    with pytest.raises(ValueError, match="2r = 8"):
        lora_ga_factors(torch.randn(10, 7), 4)
    with pytest.raises(ValueError, match="direction"):
        lora_ga_factors(torch.randn(10, 10), 2, direction="BrA2r")


# ---------------------------------------------------------------------------------------------- lora_ga_init
def test_lora_ga_init_preserves_output_and_leaves_clean_state():
    model, batches = make_problem()
    ref = copy.deepcopy(model)
    model.train()
    model.head.eval()  # a mixed state that must come back exactly
    modes = {n: m.training for n, m in model.named_modules()}
    events = []
    layers = lk.lora_ga_init(
        model,
        batches,
        mse,
        r=2,
        alpha=16,
        target_modules=["up", "mid"],
        backend="torch",
        progress=lambda stage, done, total, name: events.append((stage, done, total)),
    )
    assert list(layers) == ["up", "mid"]
    assert isinstance(model.up, lk.LoRALinear) and isinstance(model.mid, lk.LoRALinear)
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, lk.LoRALinear)
    assert {n: m.training for n, m in model.named_modules() if n in modes} == modes
    # progress: every batch, then every layer
    assert [e for e in events if e[0] == "batch"] == [("batch", i, 4) for i in range(1, 5)]
    assert [e for e in events if e[0] == "layer"] == [("layer", 1, 2), ("layer", 2, 2)]
    # no gradient left anywhere, only the adapters train (freeze_base=True), no hook left behind
    assert all(p.grad is None for p in model.parameters())
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "mid.lora_A",
        "mid.lora_B",
        "up.lora_A",
        "up.lora_B",
    ]
    assert not model.up.weight._post_accumulate_grad_hooks
    # same output (fp32: W0 − ρBA then +ρBA rounds at ~1e-7 relative)
    x = torch.randn(9, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    # the layers: rsLoRA scaling α/√r, fp32 adapters, W0 really changed
    assert model.up.scaling == pytest.approx(16 / math.sqrt(2))
    assert model.up.lora_A.dtype == torch.float32
    assert not torch.equal(model.up.weight, ref.up.weight)


def test_lora_ga_first_sgd_step_follows_best_rank_2r_of_full_gradient():
    model, batches = make_problem(seed=1)
    r = 2
    G = reference_grads(model, batches, ["up", "mid"])
    layers = lk.lora_ga_init(model, batches, mse, r=r, alpha=8, target_modules=["up", "mid"], backend="torch")
    before = {n: (l.scaling * (l.lora_B.double() @ l.lora_A.double())).detach() for n, l in layers.items()}
    # (a) the first-order change computed exactly from the adapters' gradients
    loss = sum(mse(model, b) for b in batches) / len(batches)
    loss.backward()
    for n, l in layers.items():
        rho, c2 = l.scaling, l.out_features**0.5 / 16
        first_order = rho * (l.lora_B.grad.double() @ l.lora_A.double() + l.lora_B.double() @ l.lora_A.grad.double())
        expected = rho**2 * c2 * best_rank(G[n], 2 * r)
        scale = expected.abs().max()
        torch.testing.assert_close(first_order / scale, expected / scale, atol=2e-4, rtol=0)
    # (b) a real SGD step with a tiny lr moves ρBA by −λ·ρ²c²·G_2r (up to O(λ²))
    lr = 1e-5
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    opt.step()
    for n, l in layers.items():
        rho, c2 = l.scaling, l.out_features**0.5 / 16
        delta = (l.scaling * (l.lora_B.double() @ l.lora_A.double())).detach() - before[n]
        expected = -lr * rho**2 * c2 * best_rank(G[n], 2 * r)
        cos = (delta * expected).sum() / (delta.norm() * expected.norm())
        assert cos > 0.999, (n, cos)
        assert delta.norm() / expected.norm() == pytest.approx(1.0, rel=1e-2)


def test_lora_ga_init_averages_over_batches_and_respects_num_batches():
    model, batches = make_problem(seed=2, n_batches=6)
    seen = []

    def counting_loss(m, b):
        seen.append(1)
        return mse(m, b)

    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    it = iter(batches)
    l1 = lk.lora_ga_init(m1, it, counting_loss, r=2, target_modules=["up"], num_batches=3, backend="torch")
    assert len(seen) == 3
    assert len(list(it)) == 3  # the iterator's remaining batches were not drawn
    l2 = lk.lora_ga_init(m2, batches[:3], mse, r=2, target_modules=["up"], backend="torch")
    torch.testing.assert_close(l1["up"].lora_A, l2["up"].lora_A)
    torch.testing.assert_close(l1["up"].lora_B, l2["up"].lora_B)
    # Doubling every batch (same mean gradient) gives the same init: the gradient is averaged, not summed.
    m3 = copy.deepcopy(model)
    l3 = lk.lora_ga_init(m3, batches[:3] * 2, mse, r=2, target_modules=["up"], backend="torch")
    torch.testing.assert_close(l3["up"].lora_A, l2["up"].lora_A, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(l3["up"].lora_B, l2["up"].lora_B, atol=1e-5, rtol=1e-4)


def test_lora_ga_init_device_buffer_equals_cpu_buffer_and_seed_is_deterministic():
    model, batches = make_problem(seed=3)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    l1 = lk.lora_ga_init(m1, batches, mse, r=2, target_modules=["up", "mid"], grad_buffer="cpu", backend="torch")
    l2 = lk.lora_ga_init(m2, batches, mse, r=2, target_modules=["up", "mid"], grad_buffer="device", backend="torch")
    for n in l1:
        torch.testing.assert_close(l1[n].lora_A, l2[n].lora_A, atol=0, rtol=0)
        torch.testing.assert_close(l1[n].weight, l2[n].weight, atol=0, rtol=0)


def test_lora_ga_init_bf16_model_keeps_output_to_bf16_rounding():
    model, batches = make_problem(seed=4, dtype=torch.bfloat16)
    ref = copy.deepcopy(model)
    layers = lk.lora_ga_init(model, batches, mse, r=2, target_modules=["up", "mid"], backend="torch")
    assert layers["up"].lora_A.dtype == torch.float32 and layers["up"].weight.dtype == torch.bfloat16
    x = torch.randn(7, 12).bfloat16()
    with torch.no_grad():
        y, y_ref = model(x).float(), ref(x).float()
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, atol=3e-2, rtol=3e-2)


def test_lora_ga_init_default_loss_dict_batches_and_loss_attribute():
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = MLP()

        def forward(self, x, labels):
            class Out:
                pass

            out = Out()
            out.loss = ((self.net(x) - labels) ** 2).mean()
            return out

    torch.manual_seed(0)
    model = WithLoss()
    batches = [{"x": torch.randn(8, 12), "labels": torch.randn(8, 3)} for _ in range(2)]
    layers = lk.lora_ga_init(model, batches, r=2, target_modules=["net.up"], backend="torch")
    assert list(layers) == ["net.up"]
    with pytest.raises(ValueError, match="scalar"):  # model(batch) returns the outputs, not a loss
        lk.lora_ga_init(MLP(), [torch.randn(4, 12)], r=2, target_modules=["up"], backend="torch")
    with pytest.raises(TypeError, match="loss"):
        lk.lora_ga_init(MLP(), [torch.randn(4, 12)], lambda m, b: "x", r=2, target_modules=["up"])


def test_lora_ga_init_errors_leave_model_untouched():
    model, batches = make_problem(seed=5)
    x = torch.randn(3, 12)
    model.up.weight.grad = torch.ones_like(model.up.weight)  # a user's .grad must survive
    model.head.weight.requires_grad_(False)
    state = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def check_untouched():
        assert all(not isinstance(m, lk.LoRALinear) for m in model.modules())
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert torch.equal(model.up.weight.grad, torch.ones_like(model.up.weight))
        assert model.mid.weight.grad is None
        assert not model.up.weight._post_accumulate_grad_hooks

    with pytest.raises(ValueError, match="2r = 12"):
        lk.lora_ga_init(model, batches, mse, r=6, target_modules=["up", "mid"])  # mid: 16 → 10
    check_untouched()
    with pytest.raises(TypeError, match="lora_dtype"):  # fp16 adapters on an fp32 model: refused before any work
        lk.lora_ga_init(model, batches, mse, r=2, target_modules=["up", "mid"], dtype=torch.float16)
    check_untouched()
    with pytest.raises(ValueError, match="dropout"):
        lk.lora_ga_init(model, batches, mse, r=2, target_modules=["up", "mid"], dropout=1.5)
    check_untouched()
    with pytest.raises(ValueError, match="no batches"):
        lk.lora_ga_init(model, [], mse, r=2, target_modules=["up"])
    check_untouched()

    def failing(m, b):
        if failing.calls == 1:
            raise RuntimeError("boom")
        failing.calls += 1
        return mse(m, b)

    failing.calls = 0
    with pytest.raises(RuntimeError, match="boom"):
        lk.lora_ga_init(model, batches, failing, r=2, target_modules=["up"])
    check_untouched()
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        lk.lora_ga_init(model, batches, mse, r=2, target_modules=["nope"])
    with pytest.raises(ValueError, match="direction"):
        lk.lora_ga_init(model, batches, mse, r=2, target_modules=["up"], direction="sideways")
    with pytest.raises(ValueError, match="grad_buffer"):
        lk.lora_ga_init(model, batches, mse, r=2, target_modules=["up"], grad_buffer="disk")
    check_untouched()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_lora_ga_init_freeze_base_false_restores_flags():
    model, batches = make_problem(seed=6)
    model.head.bias.requires_grad_(False)
    lk.lora_ga_init(
        model, batches, mse, r=2, target_modules=["up"], freeze_base=False, backend="torch", train_mode=False
    )
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags["head.weight"] and not flags["head.bias"] and flags["mid.weight"]
    assert not flags["up.weight"] and flags["up.lora_A"] and flags["up.lora_B"]
    assert model.training  # train_mode=False was temporary


# ---------------------------------------------------------------------------------------------- PiSSA and friends
@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_init_principal_directions_and_unchanged_output(use_rslora):
    torch.manual_seed(0)
    lin = nn.Linear(20, 14)
    W0 = lin.weight.detach().clone()
    x = torch.randn(5, 20)
    y0 = lin(x).detach()
    layer = lk.LoRALinear.from_linear(lin, r=3, alpha=6, use_rslora=use_rslora, init="pissa", backend="torch")
    delta = layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
    torch.testing.assert_close(delta, best_rank(W0, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.weight.double() + delta, W0.double(), atol=1e-6, rtol=0)
    # PEFT's split: A = √(S/s)·Vh, B = U·√(S/s), so BᵀB = AAᵀ = diag(S_r)/s
    torch.testing.assert_close(layer.lora_B.T @ layer.lora_B, layer.lora_A @ layer.lora_A.T, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y0, atol=1e-5, rtol=1e-5)


def test_pissa_randomized_and_direct_call():
    torch.manual_seed(1)
    lin = nn.Linear(64, 48)
    W0 = lin.weight.detach().clone()
    layer = lk.LoRALinear.from_linear(lin, r=4, alpha=4, init="zeros", backend="torch")
    pissa_init(layer, niter=6, generator=torch.Generator().manual_seed(0))
    delta = layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
    # a random 48×64 matrix has a flat spectrum: compare the captured energy with the exact best rank-4
    assert (delta - W0.double()).norm() <= (best_rank(W0, 4) - W0.double()).norm() * 1.01
    torch.testing.assert_close(layer.weight.double() + delta, W0.double(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="r=9"):
        pissa_init(lk.LoRALinear.from_linear(nn.Linear(8, 8), r=9, init="zeros"))


@pytest.mark.parametrize("init", ["default", "gaussian", "pissa"])
def test_other_inits_same_api_output_unchanged(init):
    torch.manual_seed(2)
    lin = nn.Linear(16, 12)
    x = torch.randn(4, 16)
    y0 = lin(x).detach()
    layer = lk.LoRALinear.from_linear(lin, r=4, alpha=8, init=init, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y0, atol=1e-5, rtol=1e-5)
    assert layer.lora_A.abs().sum() > 0  # A is never all zero


def test_at_most_one_target_gradient_alive_at_a_time():
    model, batches = make_problem(seed=7)
    weights = [model.up.weight, model.mid.weight, model.head.weight]
    alive = []

    def before_accumulate(grad):  # tensor hooks run before .grad is written: count the grads still held
        alive.append(sum(w.grad is not None for w in weights))
        return grad

    handles = [w.register_hook(before_accumulate) for w in weights]
    try:
        lk.lora_ga_init(model, batches, mse, r=1, target_modules=["up", "mid", "head"], backend="torch")
    finally:
        for h in handles:
            h.remove()
    assert len(alive) == 3 * len(batches) and max(alive) == 0


def test_lora_ga_on_transformers_llama_then_save_and_load_on_original(tmp_path):
    transformers = pytest.importorskip("transformers")
    conf = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(conf).eval()
    original = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 12), generator=gen)
        batches.append({"input_ids": ids, "labels": ids})
    layers = lk.lora_ga_init(
        model, batches, r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], backend="torch"
    )  # default loss: model(**batch).loss
    assert len(layers) == 3 and not model.training
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=1e-4, rtol=1e-4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for b in batches:
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = model(ids).logits
    lk.save_adapter(model, tmp_path)  # rank-2r form against the original weights
    lk.load_adapter(original, tmp_path, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(original(ids).logits, trained, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- GPU only
class Deep(nn.Module):
    def __init__(self, d=1024, n=6):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(n))

    def forward(self, x):
        for lin in self.layers:
            x = torch.tanh(lin(x))
        return x.float().pow(2).mean()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_memory_holds_one_layer_gradient_and_buffers_agree(dtype):
    torch.manual_seed(0)
    d = 1024
    model = Deep(d).cuda().to(dtype)
    batches = [torch.randn(8, d, device="cuda", dtype=dtype) for _ in range(3)]
    ref = copy.deepcopy(model)
    one_grad = d * d * torch.tensor([], dtype=dtype).element_size()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    layers = lk.lora_ga_init(
        model,
        batches,
        lambda m, x: m(x),
        r=8,
        target_modules=r"layers\.\d+",
        grad_buffer="cpu",
        svd_chunk_bytes=4 * d * d,
    )
    peak = torch.cuda.max_memory_allocated() - base
    # one gradient in flight (+ one being accumulated into), one fp32 G and the SVD's workspace; never all six
    assert peak < 2 * one_grad + 3 * 4 * d * d, (peak, one_grad)
    other = copy.deepcopy(ref)
    layers2 = lk.lora_ga_init(
        other, batches, lambda m, x: m(x), r=8, target_modules=r"layers\.\d+", grad_buffer="device"
    )
    for n in layers:
        torch.testing.assert_close(layers[n].lora_A, layers2[n].lora_A, atol=1e-4, rtol=1e-3)
    x = torch.randn(4, d, device="cuda", dtype=dtype)
    with torch.no_grad():
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(model(x), ref(x), atol=tol, rtol=tol)
