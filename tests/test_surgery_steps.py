"""The named steps of inject_lora (check, plan, build, install) and of the two LoRA-GA paths (check, estimate,
decompose, install), each called on its own."""

import copy

import pytest
import torch
import torch.nn as nn

import lora_kernels as lk
from lora_kernels import modules
from lora_kernels.init import ga_common, lora_ga, sharded
from lora_kernels.init.ga_factors import lora_ga_factors


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 16)
        self.mid = nn.Linear(16, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.up(x)))))


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def problem(seed=0):
    torch.manual_seed(seed)
    model = Net()
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(8, 12, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(3)]
    return model, batches


def snapshot(model):
    return (
        [(n, id(m)) for n, m in model.named_modules()],
        {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    )


def assert_unchanged(model, snap):
    mods, params = snapshot(model)
    assert mods == snap[0]
    for n, (p, flag) in params.items():
        assert torch.equal(p, snap[1][n][0]) and flag == snap[1][n][1], n


# ---------------------------------------------------------------------------------------------------- inject_lora
def test_inject_lora_plan_lists_a_shared_layer_under_each_name_and_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model.add_module("again", model[0])  # one Linear under two names
    snap = snapshot(model)
    chosen = modules.plan_injection(model, modules.check_injection(model, ["0", "again"]))
    assert list(chosen) == ["0", "again"] and chosen["0"] is chosen["again"]
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="matched no nn.Linear; candidates: 0, again"):
        modules.plan_injection(model, ["nothing"])


def test_inject_lora_build_step_attaches_nothing_and_restores_flags_on_error():
    model, _ = problem()
    chosen = modules.plan_injection(model, ["up", "mid"])
    targets = {id(lin): (n, lin) for n, lin in chosen.items()}
    snap = snapshot(model)
    built, factors = modules.build_layers(model, targets, r=2, init="pissa", backend="torch")
    assert set(built) == set(targets) and set(factors) == set(targets)
    assert all(b.weight is lin.weight for (_, lin), b in zip(targets.values(), built.values()))
    assert [n for n, _ in model.named_modules()] == [n for n, _ in snap[0]]  # nothing attached
    model, _ = problem()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="dropout"):
        modules.build_layers(model, targets_of(model), r=2, dropout=2.0)
    assert_unchanged(model, snap)


def targets_of(model):
    return {id(lin): (n, lin) for n, lin in modules.plan_injection(model, ["up", "mid"]).items()}


def test_inject_lora_steps_compose_to_inject_lora():
    model, _ = problem()
    want = copy.deepcopy(model)
    torch.manual_seed(5)
    lk.inject_lora(want, ["up", "mid"], r=2, backend="torch")
    torch.manual_seed(5)
    chosen = modules.plan_injection(model, ["up", "mid"])
    targets = {id(lin): (n, lin) for n, lin in chosen.items()}
    built, factors = modules.build_layers(model, targets, r=2, backend="torch")
    modules.install_layers(model, chosen, built, factors, {}, freeze_base=True)
    assert model.state_dict().keys() == want.state_dict().keys()
    for k, v in want.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in want.parameters()]


# ---------------------------------------------------------------------------------------------------- LoRA-GA
def test_lora_ga_check_step_refuses_a_shared_weight_and_changes_nothing():
    model, _ = problem()
    model.extra = nn.Linear(12, 16)
    model.extra.weight = model.up.weight
    snap = snapshot(model)
    with pytest.raises(ValueError, match="share one weight tensor"):
        lora_ga.check_targets(model, ["up", "extra"], r=2)
    with pytest.raises(ValueError, match="up.weight is tied to extra.weight"):
        lora_ga.check_targets(model, ["up"], r=2)
    assert_unchanged(model, snap)
    assert list(lora_ga.check_targets(model, ["mid", "head"], r=1)) == ["mid", "head"]


def test_lora_ga_estimate_step_sums_the_gradients_and_restores_the_model():
    model, batches = problem()
    model.train(False)
    snap = snapshot(model)
    weights = {n: model.get_submodule(n).weight for n in ("up", "mid")}
    sums, n = lora_ga.estimate_gradients(model, weights, batches, mse, None, True, "cpu", lambda *a: None)
    assert n == len(batches)
    ref = copy.deepcopy(model).double()
    total = sum(mse(ref, (x.double(), y.double())) for x, y in batches)
    grads = torch.autograd.grad(total, [ref.get_submodule(k).weight for k in weights])
    for k, g in zip(weights, grads):
        assert sums[k].dtype == torch.float32 and sums[k].device.type == "cpu"
        torch.testing.assert_close(sums[k].double(), g, rtol=1e-5, atol=1e-6)
    assert_unchanged(model, snap)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_lora_ga_decompose_step_is_lora_ga_factors_of_the_average():
    gen = torch.Generator().manual_seed(0)
    weights = {"a": torch.empty(16, 12), "b": torch.empty(16, 12), "c": torch.empty(10, 16)}
    sums = {n: torch.randn(w.shape, generator=gen) for n, w in weights.items()}
    averages = {n: s / 3 for n, s in sums.items()}
    factors = lora_ga.decompose(weights, dict(sums), 3, r=2, seed=7)
    # one generator, seeded once, drawn per chunk in shape-group order: (a, b) together, then c
    g = torch.Generator().manual_seed(7)
    A_ab, B_ab = lora_ga_factors(torch.stack([averages["a"], averages["b"]]), 2, "ArB2r", 16.0, 4, g)
    A_c, B_c = lora_ga_factors(averages["c"][None], 2, "ArB2r", 16.0, 4, g)
    for n, (A, B) in (("a", (A_ab[0], B_ab[0])), ("b", (A_ab[1], B_ab[1])), ("c", (A_c[0], B_c[0]))):
        torch.testing.assert_close(factors[n][0], A, rtol=0, atol=0)
        torch.testing.assert_close(factors[n][1], B, rtol=0, atol=0)


def test_the_two_lora_ga_paths_estimate_the_same_gradient():
    """The re-init path's dYᵀ·X hooks and the replacing path's weight gradients agree (whole W0, one process)."""
    model, batches = problem()
    weights = {n: model.get_submodule(n).weight for n in ("up", "mid")}
    sums, n = lora_ga.estimate_gradients(model, weights, batches, mse, None, True, "cpu", lambda *a: None)
    injected, _ = problem()
    lk.inject_lora(injected, ["up", "mid"], r=2, backend="torch")
    layers, alpha, dropout = sharded.check_reinit(
        injected, batches, mse, 2, 4, ["up", "mid"], "ArB2r", 16, True, None, torch.float32, 4, 0.0, "cpu"
    )
    assert list(layers) == ["up", "mid"] and (alpha, dropout) == (4.0, 0.0)
    avg = sharded.estimate_row_gradients(injected, layers, batches, mse, None, True, "cpu", None, lambda *a: None)
    for k in weights:
        torch.testing.assert_close(avg[k], sums[k] / n, rtol=1e-5, atol=1e-6)


def test_run_batches_stops_at_num_batches_without_drawing_more():
    model, batches = problem()
    it = iter(batches)
    assert ga_common.run_batches(model, it, mse, 2, lambda *a: None) == 2
    assert len(list(it)) == 1
    with pytest.raises(RuntimeError, match="does not depend on any target layer"):
        ga_common.run_batches(model, batches, lambda m, b: torch.zeros(()), None, lambda *a: None, what="layer")
