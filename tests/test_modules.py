"""LoRALinear, inject_lora, lora_state_dict / load_lora_state_dict (module level; the op itself is tested in
test_lora_linear.py). Everything runs on the PyTorch reference backend, plus one small case through the Triton
kernels (interpreter on the CPU)."""

import copy
import math
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _oracle import lora_linear_f64
from _tolerances import TOL, close, close_small_k

import lora_kernels as lk
from lora_kernels import LoRALinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SIZES = [(1, 1), (7, 33), (100, 7)]  # (in_features, out_features): odd on purpose
TRITON_MODULE = os.path.join(os.path.dirname(lk.__file__), "triton", "lora_linear.py")


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # Every shape here is tiny: one intra-op thread is fastest, and on a loaded 2-core machine a second (spinning)
    # thread made these tests ~20x slower. Restored afterwards so other test files keep their setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    yield
    torch.set_num_threads(threads)


def _layer(in_f, out_f, dtype=torch.float32, bias=True, r=4, alpha=8.0, randomize_b=True, **kw):
    """A LoRALinear wrapped around a fresh nn.Linear, with a non-zero B unless asked otherwise."""
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    layer = LoRALinear.from_linear(lin, r=r, alpha=alpha, backend="torch", **kw)
    if randomize_b:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)
    return lin, layer


def _expected(layer, x):
    """y = x·W0ᵀ + b + s·x·Aᵀ·Bᵀ in float64, from the layer's tensors (no dropout)."""
    w0 = layer._unmerged_weight if layer.merged else layer.weight
    return lora_linear_f64(x, w0, layer.lora_A, layer.lora_B, layer.scaling, layer.bias)


# ------------------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_f,out_f", SIZES)
def test_from_linear_untouched_equals_linear(in_f, out_f, bias, dtype):
    lin, layer = _layer(in_f, out_f, dtype=dtype, bias=bias, randomize_b=False)
    # Shared, not copied; base frozen, adapter trainable, adapter in the base dtype.
    assert layer.weight is lin.weight and not layer.weight.requires_grad
    assert layer.bias is lin.bias
    assert layer.lora_A.shape == (4, in_f) and layer.lora_B.shape == (out_f, 4)
    assert layer.lora_A.dtype == dtype and layer.lora_B.dtype == dtype
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(2, 3, in_f, dtype=dtype)
    y = layer(x)
    assert y.shape == (2, 3, out_f) and y.dtype == dtype
    atol = rtol = TOL[dtype]
    torch.testing.assert_close(y, lin(x), atol=atol, rtol=rtol)


def test_constructor_matches_formula_and_inits_like_linear():
    layer = LoRALinear(9, 5, r=3, alpha=6, bias=True, backend="torch")
    assert not layer.weight.requires_grad and layer.bias.requires_grad
    bound = 1 / math.sqrt(9)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 9)
    torch.testing.assert_close(layer(x).double(), _expected(layer, x), **close_small_k())
    assert LoRALinear(9, 5, r=3, bias=False).bias is None


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("r", [1, 4, 16])
def test_scaling(r, use_rslora):
    _, layer = _layer(7, 33, r=r, alpha=32, use_rslora=use_rslora)
    expected = 32 / math.sqrt(r) if use_rslora else 32 / r
    assert layer.scaling == pytest.approx(expected, rel=1e-12)
    assert lk.lora_scaling(r, 32, use_rslora) == pytest.approx(expected, rel=1e-12)
    x = torch.randn(5, 7)
    torch.testing.assert_close(layer(x).double(), _expected(layer, x), **close(torch.float32))
    # alpha=None means alpha = r, i.e. scaling 1 without rsLoRA.
    assert LoRALinear.from_linear(nn.Linear(3, 3), r=r).scaling == 1.0


def test_inits():
    lin = nn.Linear(2000, 6)
    d = LoRALinear.from_linear(lin, r=4, init="default")
    bound = 1 / math.sqrt(2000)  # kaiming_uniform(a=√5): bound = sqrt(6 / ((1 + 5)·fan_in))
    assert d.lora_A.abs().max() <= bound and d.lora_A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(d.lora_B) == 0
    g = LoRALinear.from_linear(lin, r=4, init="gaussian")
    assert g.lora_A.mean().abs() < 0.01
    assert g.lora_A.std().item() == pytest.approx(1 / 4, rel=0.05)  # PEFT's std = 1/r
    assert torch.count_nonzero(g.lora_B) == 0
    z = LoRALinear.from_linear(lin, r=4, init="zeros")
    assert torch.count_nonzero(z.lora_A) == 0 and torch.count_nonzero(z.lora_B) == 0
    z.reset_lora_parameters("gaussian")  # the hook other inits plug into
    assert torch.count_nonzero(z.lora_A) > 0


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        ({"r": 0}, ValueError, "r must be"),
        ({"r": True}, ValueError, "r must be"),
        ({"r": 2.0}, ValueError, "r must be"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"alpha": float("inf")}, ValueError, "alpha"),
        ({"init": "kaiming"}, ValueError, "init="),
        ({"backend": "nope"}, ValueError, "nope"),
        ({"lora_dtype": torch.float16}, TypeError, "lora_dtype"),
    ],
)
def test_bad_arguments_change_nothing(kwargs, exc, words):
    lin = nn.Linear(4, 3).to(torch.bfloat16)
    with pytest.raises(exc, match=words):
        LoRALinear.from_linear(lin, **kwargs)
    assert lin.weight.requires_grad  # the user's layer was not touched


def test_meta_device_construction():
    layer = LoRALinear(6, 5, r=2, device="meta")
    assert layer.weight.is_meta and layer.lora_A.is_meta and layer.lora_B.shape == (5, 2)
    with torch.device("meta"):
        lin = nn.Linear(6, 5)
    wrapped = LoRALinear.from_linear(lin, r=2)
    assert wrapped.lora_A.is_meta and wrapped.weight is lin.weight
    wrapped.to_empty(device="cpu")
    wrapped.reset_lora_parameters("default")
    assert torch.count_nonzero(wrapped.lora_B) == 0 and torch.count_nonzero(wrapped.lora_A) > 0


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(3, 3, 1))


def test_fp32_adapter_on_bf16_base():
    lin, layer = _layer(7, 33, dtype=torch.bfloat16, lora_dtype=torch.float32)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    x = torch.randn(6, 7, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), _expected(layer, x), **close(torch.bfloat16))
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    assert torch.isfinite(layer.lora_A.grad).all() and layer.lora_B.grad.abs().sum() > 0
    w0 = lin.weight.detach().clone()
    layer.merge()
    assert layer.weight.dtype == torch.bfloat16
    layer.unmerge()
    assert torch.equal(lin.weight, w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autocast_like_linear(dtype):
    # Under torch.autocast(bf16) the layer computes in bf16 like an autocast nn.Linear; the parameters keep their
    # dtype (fp32: the usual master-weight setup; fp16: the adapter is cast to bf16 for the op and back for grads).
    lin, layer = _layer(33, 7, dtype=dtype)
    x = torch.randn(5, 33, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_lin = lin(x)
    assert y.dtype == torch.bfloat16 == y_lin.dtype
    # Looser than the bf16 table: autocast rounds x and W to bf16 before the op, and the oracle has the unrounded ones.
    torch.testing.assert_close(y.double(), _expected(layer, x.detach()), atol=5e-2, rtol=2e-2)
    y.float().square().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert layer.lora_A.grad.dtype == dtype and layer.lora_B.grad.abs().sum() > 0
    assert layer.weight.grad is None and layer.weight.dtype == dtype  # the stored weight is untouched


# ---------------------------------------------------------------------------------------------------- dropout
def test_dropout_eval_and_train():
    _, layer = _layer(33, 7, dropout=0.5)
    _, plain = _layer(33, 7, dropout=0.0)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(8, 33)
    layer.eval()
    plain.eval()
    y_eval = layer(x)
    assert torch.equal(y_eval, layer(x))  # deterministic
    assert torch.equal(y_eval, plain(x))  # eval = no dropout
    layer.train()
    plain.train()
    torch.manual_seed(7)
    y1 = layer(x)
    torch.manual_seed(7)
    y2 = layer(x)
    y3 = layer(x)
    assert torch.equal(y1, y2)  # reproducible under torch.manual_seed
    assert not torch.equal(y1, y3)  # a fresh mask each call
    assert not torch.equal(y1, plain(x))  # p > 0 differs from p = 0 in training
    # The base path is not dropped: with B = 0 the output equals the plain layer's even in training.
    with torch.no_grad():
        layer.lora_B.zero_()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), **close_small_k())


def test_dropout_under_activation_checkpointing():
    # torch.utils.checkpoint restores the CPU RNG state before recomputing, so the recomputed forward draws the same
    # dropout seed: gradients equal those of the plain run.
    from torch.utils.checkpoint import checkpoint

    _, layer = _layer(33, 7, dropout=0.3)
    x = torch.randn(6, 33)
    grads = []
    for use_ckpt in (False, True):
        layer.zero_grad()
        torch.manual_seed(11)
        y = checkpoint(layer, x, use_reentrant=False) if use_ckpt else layer(x)
        y.square().sum().backward()
        grads.append((layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    assert torch.count_nonzero(grads[0][0]) > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-6)  # the same ops replayed: ~bitwise


# ----------------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_f,out_f", SIZES)
def test_merge_unmerge_round_trip(in_f, out_f, bias, dtype):
    lin, layer = _layer(in_f, out_f, dtype=dtype, bias=bias, r=3, alpha=6)
    layer.eval()
    w0 = lin.weight.detach().clone()
    x = torch.randn(5, in_f, dtype=dtype)
    y_unmerged = layer(x)
    assert not layer.merged
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    assert not torch.equal(layer.weight, w0)
    assert lin.weight is layer.weight  # merged in place: the wrapped Linear sees it too
    expected_w = (w0.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()).to(dtype)
    atol = rtol = TOL[dtype]
    torch.testing.assert_close(layer.weight, expected_w, atol=atol, rtol=rtol)
    y_merged = layer(x)
    torch.testing.assert_close(y_merged.double(), _expected(layer, x), atol=4 * atol, rtol=4 * rtol)
    torch.testing.assert_close(y_merged, y_unmerged, atol=4 * atol, rtol=4 * rtol)
    layer.unmerge()
    assert not layer.merged and layer._unmerged_weight is None
    assert torch.equal(lin.weight, w0)  # bit for bit, every dtype
    assert torch.equal(layer(x), y_unmerged)


def test_merge_errors():
    _, layer = _layer(7, 5)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.reset_lora_parameters("default")
    layer.unmerge()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("case", ["fp32_inf", "fp32_nan", "fp16_overflow"])
def test_merge_refuses_non_finite(case):
    if case == "fp16_overflow":
        # Finite in fp32 (the adapter is fp32) but beyond fp16's 65504 once rounded.
        lin, layer = _layer(4, 3, dtype=torch.float16, lora_dtype=torch.float32, randomize_b=False)
        fill, match = 1e4, "overflows"  # s·B·A = 2·4·1e4 = 8e4
    else:
        lin, layer = _layer(4, 3, randomize_b=False)
        fill, match = (1e38 if case == "fp32_inf" else float("nan")), "inf or NaN"
    with torch.no_grad():
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(fill)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        layer.merge()
    assert not layer.merged
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]) or (v.isnan().all() and before[k].isnan().all()), k


def test_training_while_merged_computes_merged_and_warns_once():
    # PEFT's behaviour: a merged layer computes with the merged weight in training mode too; the adapter gets no
    # gradient meanwhile, which is said once.
    _, layer = _layer(7, 5)
    x = torch.randn(3, 7)
    y_ref = layer(x).detach()
    layer.merge()
    with pytest.warns(UserWarning, match="merged LoRALinear is run in training mode"):
        y = layer(x)
    torch.testing.assert_close(y, y_ref, **close_small_k())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y.sum().backward()
        layer(x)  # once per layer
    assert layer.lora_A.grad is None and layer.lora_B.grad is None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y_ref, **close_small_k())
    layer.eval()
    torch.testing.assert_close(layer(x), y_ref, **close_small_k())
    layer.train()
    layer.unmerge()
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None


def test_merged_state_dict_holds_unmerged_weight():
    lin, layer = _layer(7, 5)
    w0 = lin.weight.detach().clone()
    x = torch.randn(3, 7)
    layer.eval()
    y = layer(x)
    layer.merge()
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "lora_A", "lora_B"}  # the backup is not persistent
    assert torch.equal(sd["weight"], w0)
    # Into an unmerged layer: same outputs, nothing applied twice.
    _, fresh = _layer(7, 5)
    fresh.load_state_dict(sd)
    fresh.eval()
    torch.testing.assert_close(fresh(x), y, **close_small_k())
    # Into a merged layer: it loads W0, A, B and stays merged with the new adapter.
    _, other = _layer(7, 5)
    other.merge()
    other.load_state_dict(sd)
    assert other.merged and torch.equal(other._unmerged_weight, w0)
    other.eval()
    torch.testing.assert_close(other(x), y, **close_small_k())
    other.unmerge()
    assert torch.equal(other.weight, w0)
    other.merge()
    with pytest.raises(RuntimeError, match="assign=True"):
        other.load_state_dict(sd, assign=True)
    assert other.merged


def test_merged_backup_follows_to_and_deepcopy():
    lin, layer = _layer(7, 5)
    w0 = lin.weight.detach().clone()
    layer.merge()
    assert "_unmerged_weight" in dict(layer.named_buffers())
    layer.double()
    assert layer._unmerged_weight.dtype == torch.float64 and layer.weight.dtype == torch.float64
    twin = copy.deepcopy(layer)
    layer.unmerge()
    assert torch.equal(layer.weight, w0.double())
    twin.unmerge()
    assert torch.equal(twin.weight, w0.double())


@pytest.mark.gpu
def test_merged_backup_follows_cuda():
    lin, layer = _layer(7, 5)
    w0 = lin.weight.detach().clone()
    layer.merge()
    layer.cuda()
    assert layer._unmerged_weight.is_cuda
    layer.unmerge()
    assert torch.equal(layer.weight.cpu(), w0)


# ------------------------------------------------------------------------------------------------- inject_lora
class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.o_proj(att @ v)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = _Attn(d)
        self.up = nn.Linear(d, 2 * d + 1)
        self.down = nn.Linear(2 * d + 1, d, bias=False)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.down(F.gelu(self.up(x)))


class _Tiny(nn.Module):
    def __init__(self, d=12, n_layers=2, n_out=3):
        super().__init__()
        self.layers = nn.ModuleList(_Block(d) for _ in range(n_layers))
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        for blk in self.layers:
            x = blk(x)
        return self.head(x)


QV = ["layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.1.attn.q_proj", "layers.1.attn.v_proj"]


@pytest.mark.parametrize(
    "targets", [["q_proj", "v_proj"], ("attn.q_proj", "v_proj"), r"layers\.\d+\.attn\.(q|v)_proj", r".*[qv]_proj"]
)
def test_inject_lora_by_suffix_and_regex(targets):
    model = _Tiny()
    x = torch.randn(2, 5, 12)
    y0 = model(x).detach()
    names = lk.inject_lora(model, target_modules=targets, r=4, alpha=8, backend="torch")
    assert names == QV
    modules = dict(model.named_modules())
    for n in QV:
        assert isinstance(modules[n], LoRALinear) and modules[n].scaling == 2.0
    for n in ["layers.0.attn.k_proj", "layers.0.attn.o_proj", "layers.1.up", "head"]:
        assert type(modules[n]) is nn.Linear
    assert list(lk.lora_layers(model)) == QV
    # Only the adapters train; the untouched model computes what it did (B = 0).
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.{p}" for n in QV for p in ("lora_A", "lora_B"))
    torch.testing.assert_close(model(x), y0, **close_small_k())


def test_inject_lora_regex_is_full_match():
    model = _Tiny()
    names = lk.inject_lora(model, r"layers\.0\.attn\.q_proj", r=2)
    assert names == ["layers.0.attn.q_proj"]
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        lk.inject_lora(_Tiny(), r"q_proj", r=2)  # a regex must match the whole name, as in PEFT


def test_inject_lora_no_match_lists_candidates():
    model = _Tiny()
    with pytest.raises(ValueError) as info:
        lk.inject_lora(model, ["proj"], r=2)  # suffix on a "." boundary: "proj" is not "q_proj"
    msg = str(info.value)
    assert "layers.0.attn.q_proj" in msg and "layers.1.down" in msg and "head" in msg
    lk.inject_lora(model, ["q_proj"], r=2)
    with pytest.raises(ValueError, match="already LoRALinear: layers.0.attn.q_proj"):
        lk.inject_lora(model, ["q_proj"], r=2)


def test_inject_lora_bad_input_leaves_model_unchanged():
    model = _Tiny()
    before = copy.deepcopy(model.state_dict())
    for kwargs, exc in [
        ({"r": 0}, ValueError),
        ({"init": "nope"}, ValueError),
        ({"target_modules": []}, ValueError),
        ({"target_modules": "("}, ValueError),
        ({"target_modules": [3]}, TypeError),
    ]:
        kw = {"target_modules": ["q_proj"], "r": 2, **kwargs}
        with pytest.raises(exc):
            lk.inject_lora(model, **kw)
        assert not lk.lora_layers(model)
        assert all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_inject_lora_special_models():
    with pytest.raises(TypeError, match="from_linear"):
        lk.inject_lora(nn.Linear(4, 4), ".*")
    # A Linear reachable under two names (tied) becomes one LoRALinear under both.
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    names = lk.inject_lora(model, ["0"], r=2)
    assert names == ["a.0", "b.0"]
    assert model["a"][0] is model["b"][0] and isinstance(model["a"][0], LoRALinear)
    assert list(lk.lora_state_dict(model)) == ["a.0.lora_A", "a.0.lora_B"]
    # MultiheadAttention reads out_proj.weight directly: refuse rather than silently ignore the adapter.
    with pytest.raises(ValueError, match="MultiheadAttention"):
        lk.inject_lora(nn.Sequential(nn.MultiheadAttention(8, 2)), ["out_proj"])
    # A second call adds adapters and keeps the first call's trainable.
    model = _Tiny()
    lk.inject_lora(model, ["q_proj"], r=2)
    lk.inject_lora(model, ["v_proj"], r=2)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.{p}" for n in QV for p in ("lora_A", "lora_B"))
    # freeze_base=False leaves the rest trainable.
    model = _Tiny()
    lk.inject_lora(model, ["q_proj"], r=2, freeze_base=False)
    assert model.head.weight.requires_grad and model.layers[0].norm.weight.requires_grad
    assert not model.layers[0].attn.q_proj.weight.requires_grad  # the wrapped weight is always frozen


# -------------------------------------------------------------------------------------- training and state dict
def _trained_model(steps=25):
    torch.manual_seed(0)
    model = _Tiny()
    torch.manual_seed(1)
    lk.inject_lora(model, ["q_proj", "v_proj", "up"], r=4, alpha=8, dropout=0.1, backend="torch")
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    x, target = torch.randn(4, 5, 12), torch.randn(4, 5, 3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, base, losses


def test_optimizer_steps_lower_the_loss():
    model, base, losses = _trained_model()
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    for k, v in model.state_dict().items():  # base weights and biases untouched
        if "lora_" not in k:
            assert torch.equal(v, base[k]), k
    assert all(torch.count_nonzero(layer.lora_B) > 0 for layer in lk.lora_layers(model).values())


def test_lora_state_dict_round_trip():
    model, _, _ = _trained_model(steps=5)
    model.eval()
    sd = lk.lora_state_dict(model)
    names = [
        "layers.0.attn.q_proj",
        "layers.0.attn.v_proj",
        "layers.0.up",
        "layers.1.attn.q_proj",
        "layers.1.attn.v_proj",
        "layers.1.up",
    ]
    assert sorted(sd) == sorted(f"{n}.{p}" for n in names for p in ("lora_A", "lora_B"))
    assert all(not t.requires_grad for t in sd.values())
    x = torch.randn(3, 5, 12)
    y = model(x)

    def fresh():
        torch.manual_seed(0)
        m = _Tiny()  # same base weights as _trained_model
        torch.manual_seed(99)  # a different adapter init
        lk.inject_lora(m, ["q_proj", "v_proj", "up"], r=4, alpha=8, dropout=0.1, backend="torch")
        return m.eval()

    other = fresh()
    assert not torch.equal(other(x), y)
    result = lk.load_lora_state_dict(other, {k: v.clone() for k, v in sd.items()})
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(other(x), y)
    # The full state dict also round-trips through load_state_dict.
    other = fresh()
    other.load_state_dict(model.state_dict())
    assert torch.equal(other(x), y)
    # Into a merged model: the new adapter is folded in and the layers stay merged.
    other = fresh()
    for layer in lk.lora_layers(other).values():
        layer.merge()
    lk.load_lora_state_dict(other, sd)
    assert all(layer.merged for layer in lk.lora_layers(other).values())
    torch.testing.assert_close(other(x), y, **close_small_k())


def test_load_lora_state_dict_errors_load_nothing():
    model, _, _ = _trained_model(steps=2)
    sd = {k: v.clone() for k, v in lk.lora_state_dict(model).items()}
    target, _, _ = _trained_model(steps=0)
    before = {k: v.clone() for k, v in lk.lora_state_dict(target).items()}

    def unchanged():
        return all(torch.equal(v, before[k]) for k, v in lk.lora_state_dict(target).items())

    missing = dict(sd)
    del missing["layers.1.up.lora_B"]
    with pytest.raises(ValueError, match=r"missing keys: layers\.1\.up\.lora_B"):
        lk.load_lora_state_dict(target, missing)
    assert unchanged()
    extra = dict(sd, **{"layers.0.attn.k_proj.lora_A": torch.zeros(4, 12)})
    with pytest.raises(ValueError, match=r"unexpected keys: layers\.0\.attn\.k_proj\.lora_A"):
        lk.load_lora_state_dict(target, extra)
    assert unchanged()
    bad_shape = dict(sd, **{"layers.0.up.lora_A": torch.zeros(8, 12)})
    with pytest.raises(ValueError, match=r"layers\.0\.up\.lora_A: shape \(8, 12\) in the state dict, \(4, 12\)"):
        lk.load_lora_state_dict(target, bad_shape, strict=False)
    assert unchanged()
    # A merged layer whose new merge would overflow refuses, and nothing at all is loaded.
    target.layers[1].up.merge()
    w_merged = target.layers[1].up.weight.clone()
    huge = dict(
        sd,
        **{
            "layers.1.up.lora_B": torch.full_like(sd["layers.1.up.lora_B"], 1e38),
            "layers.1.up.lora_A": torch.ones_like(sd["layers.1.up.lora_A"]),
        },
    )
    with pytest.raises(ValueError, match="inf or NaN"):
        lk.load_lora_state_dict(target, huge)
    assert unchanged() and torch.equal(target.layers[1].up.weight, w_merged)
    target.layers[1].up.unmerge()
    # strict=False loads what matches and reports the rest.
    result = lk.load_lora_state_dict(target, missing, strict=False)
    assert result.missing_keys == ["layers.1.up.lora_B"] and result.unexpected_keys == []
    assert torch.equal(target.layers[0].up.lora_A, sd["layers.0.up.lora_A"])
    assert torch.equal(target.layers[1].up.lora_B, before["layers.1.up.lora_B"])
    with pytest.raises(ValueError, match="no LoRALinear"):
        lk.load_lora_state_dict(_Tiny(), sd)


# ----------------------------------------------------------------------------------------- through Triton kernels
def test_module_with_triton_backend():
    if not os.path.exists(TRITON_MODULE):
        pytest.skip("lora_kernels/triton/lora_linear.py does not exist yet")
    pytest.importorskip("triton", reason="triton is not installed")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")
    torch.manual_seed(3)
    lin = nn.Linear(33, 7).to(DEVICE)
    tri = LoRALinear.from_linear(lin, r=4, alpha=8, backend="triton")
    with torch.no_grad():
        tri.lora_B.normal_()
    ref = copy.deepcopy(tri)
    ref.backend = "torch"
    x = torch.randn(5, 33, device=DEVICE)
    y_tri, y_ref = tri(x), ref(x)
    torch.testing.assert_close(y_tri, y_ref, **close(torch.float32))
    y_tri.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(tri.lora_A.grad, ref.lora_A.grad, **close(torch.float32))
    torch.testing.assert_close(tri.lora_B.grad, ref.lora_B.grad, **close(torch.float32))


# ------------------------------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph():
    # The layer must trace without graph breaks (the op is a torch.library custom op with a fake implementation),
    # and merging must be picked up (the merge state is a buffer, guarded by dynamo).
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 7), nn.GELU(), nn.Linear(7, 3))
    lk.inject_lora(model, ["0", "2"], r=2, backend="torch")
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.lora_B.normal_()
    x = torch.randn(4, 8)
    y_ref = model(x)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [model[0].lora_A, model[2].lora_B])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)  # aot_eager runs the same ops: ~bitwise
    g = torch.autograd.grad(y.square().sum(), [model[0].lora_A, model[2].lora_B])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **close_small_k())
    model.eval()
    for layer in lk.lora_layers(model).values():
        layer.merge()
    torch.testing.assert_close(compiled(x), y_ref, **close_small_k())
    torch._dynamo.reset()
