"""Hardening of the single-adapter core: the custom ops' fake implementations against the real ones on every layout,
argument checks of ``lora_linear``, autocast, merged training, tied weights, all-or-nothing ``inject_lora``, PiSSA
and LoRA-GA edge cases, meta-device init, and the precision contracts (one rounding, adapter dtype under autocast).
Torch backend and tiny shapes unless a test says otherwise."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
from _tolerances import close_small_k

import lora_kernels as lk
from lora_kernels.ops import lora_linear as op_mod

from conftest import HAS_CUDA, INTERPRET

needs_triton = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRET), reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (set by conftest without CUDA)"
)


# ------------------------------------------------------------------------------ fakes match the real ops' strides
M, K, N, R = 7, 20, 12, 4


def _layout(name: str, g: torch.Generator):
    """(x, weight, lora_A, lora_B) of the shapes [M, K], [N, K], [R, K], [N, R] in the layout ``name``."""
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / math.sqrt(K)
    a, b = torch.randn(R, K, generator=g) / math.sqrt(K), torch.randn(N, R, generator=g)
    if name == "x_t":
        x = torch.randn(K, M, generator=g).t()
    elif name == "x_sliced":
        x = torch.randn(M, 2 * K, generator=g)[:, 1::2]
    elif name == "w_t":
        w = torch.randn(K, N, generator=g).t()
    elif name == "w_sliced":
        w = torch.randn(N, 3 * K, generator=g)[:, ::3]
    elif name == "ab_t":
        a, b = torch.randn(K, R, generator=g).t(), torch.randn(R, N, generator=g).t()
    elif name == "ab_sliced":
        a, b = torch.randn(R, 2 * K, generator=g)[:, ::2], torch.randn(2 * N, R, generator=g)[::2]
    elif name == "all_t":
        x, w = torch.randn(K, M, generator=g).t(), torch.randn(K, N, generator=g).t()
        a, b = torch.randn(K, R, generator=g).t(), torch.randn(R, N, generator=g).t()
    else:
        assert name == "contiguous"
    return x, w, a, b


LAYOUTS = ["contiguous", "x_t", "x_sliced", "w_t", "w_sliced", "ab_t", "ab_sliced", "all_t"]


def _opcheck_both(backend, layout, p, bias, device="cpu"):
    g = torch.Generator().manual_seed(3)
    x, w, a, b = (t.to(device) for t in _layout(layout, g))
    bb = torch.randn(N, generator=g).to(device) if bias else None
    seed = torch.tensor(987654321, dtype=torch.int64, device=device)
    leaves = [t.requires_grad_() for t in (x, w, a, b)]  # trainable W too: dW is formed
    args = [*leaves, None if bb is None else bb.requires_grad_(), 0.5, p, seed, backend]
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_fwd.default, args)
    with torch.no_grad():
        _, xa, _ = torch.ops.lora_kernels.lora_linear_fwd(*[t.detach() for t in leaves], bb, 0.5, p, seed, backend)
    dy = torch.randn(M, N, generator=g).to(device)
    for flags in ((True, True, bias), (False, True, False), (True, False, False)):
        bargs = [dy, *[t.detach() for t in leaves], xa, 0.5, p, seed, backend, *flags]
        torch.library.opcheck(torch.ops.lora_kernels.lora_linear_bwd.default, bargs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_opcheck_every_layout_torch_backend(layout, p):
    """The fakes promise row-major outputs; the real ops return them for every input layout (a transposed trainable
    weight used to get dW with the weight's strides in the fake and row-major strides from the kernels)."""
    _opcheck_both("torch", layout, p, bias=True)


@needs_triton
@pytest.mark.parametrize("layout", ["w_t", "all_t", "ab_sliced"])
def test_opcheck_every_layout_triton_backend(layout, device):
    _opcheck_both("triton", layout, 0.25, bias=False, device=device)


def test_compiled_backward_with_transposed_trainable_weight():
    g = torch.Generator().manual_seed(5)
    x, w, a, b = _layout("all_t", g)

    def loss(x, w, a, b):
        return lk.lora_linear(x, w, a, b, 0.5, backend="torch").square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (loss, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, a, b)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for ge, gc in zip(*grads):
        torch.testing.assert_close(gc, ge)


# ------------------------------------------------------------------------------------------ scale is a constant
@pytest.mark.parametrize("arg", ["scale", "dropout_p"])
def test_tensor_argument_that_requires_grad_is_refused(arg):
    g = torch.Generator().manual_seed(1)
    x, w, a, b = _layout("contiguous", g)
    kwargs = dict(scale=0.5, dropout_p=0.1)
    kwargs[arg] = torch.tensor(0.5 if arg == "scale" else 0.1, requires_grad=True)
    with pytest.raises(ValueError, match=arg):
        lk.lora_linear(x, w, a, b, backend="torch", **kwargs)
    # A tensor that does not ask for a gradient is still a valid constant.
    kwargs[arg] = kwargs[arg].detach()
    y = lk.lora_linear(x, w, a, b, backend="torch", training=False, **kwargs)
    torch.testing.assert_close(y, lk.lora_linear(x, w, a, b, 0.5, backend="torch", training=False))


# -------------------------------------------------------------------------------------------------------- autocast
def test_op_ignores_autocast_for_fp32_inputs():
    """The op's dtypes are its inputs' on every backend: under autocast the torch backend computed the fp32 math in
    bf16 (S came back bf16 where the fake says fp32, adapter gradients ~1e4 times less accurate)."""
    g = torch.Generator().manual_seed(2)
    x, w, a, b = _layout("contiguous", g)
    bb = torch.randn(N, generator=g)
    results = []
    for on in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, a, b, bb)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            y = lk.lora_linear(*leaves[:4], 0.5, bias=leaves[4], backend="torch")
            _, xa, _ = torch.ops.lora_kernels.lora_linear_fwd(
                *[t.detach() for t in leaves[:4]], None, 0.5, 0.0, torch.tensor(0), "torch"
            )
            y.square().sum().backward()  # backward inside the context too: autograd keeps the thread's autocast
        assert y.dtype == xa.dtype == torch.float32
        results.append((y.detach(), [t.grad for t in leaves]))
    (y0, g0), (y1, g1) = results
    assert torch.equal(y1, y0)
    for a0, a1 in zip(g0, g1):
        assert torch.equal(a1, a0)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_fp32_master_adapter_stays_fp32_under_autocast(base_dtype, monkeypatch):
    """Under autocast(bf16) x, W0 and bias are cast like an nn.Linear's, and an fp32 adapter reaches the op as
    fp32: the result equals the op on exactly those inputs, bit for bit (an adapter rounded to bf16 changes it)."""
    torch.manual_seed(0)
    layer = lk.LoRALinear(K, N, r=R, alpha=2 * R, dtype=base_dtype, lora_dtype=torch.float32, backend="torch")
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 would hide the adapter
        layer.lora_A.mul_(1.0 + 1e-3 * torch.randn_like(layer.lora_A))  # values with low bits that bf16 drops
    x = torch.randn(M, K, dtype=base_dtype)
    seen = []
    real_fwd = op_mod._fwd

    def spy(x_, w_, a_, b_, *rest):
        seen.append((x_.dtype, w_.dtype, a_.dtype, b_.dtype))
        return real_fwd(x_, w_, a_, b_, *rest)

    monkeypatch.setattr(op_mod, "_fwd", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    monkeypatch.setattr(op_mod, "_fwd", real_fwd)
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)]
    assert y.dtype == torch.bfloat16
    bf = torch.bfloat16
    expected = lk.lora_linear(
        x.to(bf),
        layer.weight.to(bf),
        layer.lora_A,
        layer.lora_B,
        layer.scaling,
        bias=layer.bias.to(bf),
        backend="torch",
    )
    assert torch.equal(y, expected)
    # and the fp32 adapter is what the result used: rounding it to bf16 gives a different result
    rounded = lk.lora_linear(
        x.to(bf),
        layer.weight.to(bf),
        layer.lora_A.to(bf),
        layer.lora_B.to(bf),
        layer.scaling,
        bias=layer.bias.to(bf),
        backend="torch",
    )
    assert not torch.equal(rounded, expected)
    y.float().square().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------- tied weights
class TiedLM(nn.Module):
    """A tiny language model whose output layer is tied to the input embedding (one Parameter, as HF ties them)."""

    def __init__(self, vocab=11, hidden=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.proj(self.embed(ids))))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _assert_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_merge_refuses_a_tied_weight_and_untie_weight_allows_it():
    torch.manual_seed(0)
    model = TiedLM()
    lk.inject_lora(model, ["lm_head", "proj"], r=2)
    head = model.lm_head
    assert head.tied_with == ("embed.weight",) and model.proj.tied_with == ()
    with torch.no_grad():
        head.lora_B.normal_()
    emb = model.embed.weight.detach().clone()
    with pytest.raises(ValueError, match=r"tied to embed\.weight"):
        head.merge()
    assert not head.merged and torch.equal(model.embed.weight, emb)
    model.proj.merge()  # untied layers merge as before
    head.untie_weight()
    assert head.weight is not model.embed.weight and head.tied_with == ()
    ids = torch.arange(11)
    model.eval()
    y = model(ids)
    head.merge()
    torch.testing.assert_close(model(ids), y, **close_small_k())
    assert torch.equal(model.embed.weight, emb)


def test_pissa_refuses_a_tied_weight_before_changing_anything():
    torch.manual_seed(0)
    model = TiedLM()
    before = _state(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"lm_head\.weight, which is tied to embed\.weight"):
        lk.inject_lora(model, ["proj", "lm_head"], r=2, init="pissa")
    _assert_state(model, before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert isinstance(model.proj, nn.Linear) and not isinstance(model.proj, lk.LoRALinear)
    # after injection with another init, the layer-level PiSSA refuses as well
    lk.inject_lora(model, ["lm_head"], r=2)
    emb = model.embed.weight.detach().clone()
    with pytest.raises(ValueError, match="tied to embed.weight"):
        model.lm_head.reset_lora_parameters("pissa")
    assert torch.equal(model.embed.weight, emb)


def test_lora_ga_refuses_a_tied_target():
    torch.manual_seed(0)
    model = TiedLM(vocab=12, hidden=8)
    before = _state(model)
    batches = [torch.randint(0, 12, (5,)) for _ in range(2)]

    def loss_fn(m, ids):
        return m(ids).logsumexp(-1).mean()

    with pytest.raises(ValueError, match=r"lm_head\.weight is tied to embed\.weight"):
        lk.lora_ga_init(model, batches, loss_fn, r=2, target_modules=["proj", "lm_head"])
    _assert_state(model, before)
    assert model.lm_head.weight is model.embed.weight


# ----------------------------------------------------------------------------------------- inject_lora: all or none
def test_failing_pissa_inject_leaves_the_model_unchanged():
    """r fits the first layer but not the second: the first used to keep its PiSSA residual as a plain Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    before = _state(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"r ≤ min\(out, in\).*2 has weight \(3, 16\)"):
        lk.inject_lora(model, ["0", "2"], r=4, init="pissa")
    _assert_state(model, before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))


def test_failing_inject_on_a_later_layer_restores_requires_grad():
    """A later layer that from_linear refuses (an fp16 weight with a bf16 lora_dtype) after earlier ones were built:
    the earlier weights were left frozen."""
    model = nn.Sequential(nn.Linear(8, 8).bfloat16(), nn.Linear(8, 8).half())
    with pytest.raises(TypeError, match="lora_dtype"):
        lk.inject_lora(model, ["0", "1"], r=2, lora_dtype=torch.bfloat16)
    assert all(p.requires_grad for p in model.parameters())
    assert all(type(m) is nn.Linear for m in model)


def test_pissa_inject_still_keeps_the_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5))
    x = torch.randn(4, 16)
    y = model(x).detach()
    lk.inject_lora(model, ["0", "2"], r=3, init="pissa")
    torch.testing.assert_close(model(x), y, **close_small_k())
    assert model[0].lora_B.abs().sum() > 0


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


class PlainSubclass(nn.Linear):
    pass


def _weight_normed(old_style: bool):
    lin = nn.Linear(6, 4)
    if old_style:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the old-style API
            return torch.nn.utils.weight_norm(lin)
    return torch.nn.utils.parametrizations.weight_norm(lin)


@pytest.mark.parametrize(
    "case, match",
    [
        ("subclass_forward", "own forward"),
        ("instance_forward", "own forward .on the instance"),
        ("parametrized", "parametrized Linear"),
        ("old_weight_norm", "weight is not a parameter"),
    ],
)
def test_inject_refuses_linears_it_cannot_replace_faithfully(case, match):
    if case == "subclass_forward":
        layer = ScaledLinear(6, 4)
    elif case == "instance_forward":
        layer = nn.Linear(6, 4)
        layer.forward = lambda x, _f=layer.forward: _f(x) + 1.0
    else:
        layer = _weight_normed(case == "old_weight_norm")
    model = nn.Sequential(nn.Linear(6, 6), layer)
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        lk.inject_lora(model, ["0", "1"], r=2)
    _assert_state(model, before)
    assert type(model[0]) is nn.Linear and model[1] is layer
    with pytest.raises(ValueError, match=match):
        lk.LoRALinear.from_linear(layer, r=2)


def test_inject_accepts_a_subclass_without_its_own_forward():
    model = nn.Sequential(PlainSubclass(6, 4))
    assert lk.inject_lora(model, ["0"], r=2) == ["0"]
    assert isinstance(model[0], lk.LoRALinear)


# ------------------------------------------------------------------------------------------------- PiSSA twice
@pytest.mark.parametrize("first", ["pissa", "lora_ga"])
def test_second_pissa_init_is_refused(first):
    """A second PiSSA took the residual for W0: the output changed and the init record (used to save against the
    original weight) was overwritten."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    if first == "pissa":
        lk.inject_lora(model, ["0"], r=2, init="pissa")
    else:
        batches = [torch.randn(3, 12) for _ in range(2)]
        lk.lora_ga_init(model, batches, lambda m, x: m(x).square().mean(), r=2, target_modules=["0"])
    layer = model[0]
    before = _state(model)
    record = [t.clone() for t in getattr(layer, lk.init.pissa.INIT_RECORD)]
    with pytest.raises(ValueError, match="already replaced by a residual"):
        layer.reset_lora_parameters("pissa")
    with pytest.raises(ValueError, match="already replaced by a residual"):
        lk.pissa_init(layer, niter=2)
    _assert_state(model, before)
    for a, b in zip(record, getattr(layer, lk.init.pissa.INIT_RECORD)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------- LoRA-GA
class ModeSpy(nn.Module):
    """Records the training flag of every forward; dropout makes the gradient depend on the mode."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(10, 8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 6)
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, self.drop.training))
        return self.head(self.drop(torch.tanh(self.up(x))))


def _mse(m, x):
    return m(x).square().mean()


@pytest.mark.parametrize("train_mode, expected", [(True, (True, True)), (False, (False, False)), (None, (False, True))])
def test_lora_ga_estimates_in_train_mode_and_restores_every_mode(train_mode, expected):
    torch.manual_seed(0)
    model = ModeSpy()
    model.eval()
    model.drop.train()  # mixed modes: each is restored as it was
    batches = [torch.randn(4, 10) for _ in range(2)]
    kwargs = {} if train_mode is True else {"train_mode": train_mode}  # True is the default
    lk.lora_ga_init(model, batches, _mse, r=2, target_modules=["up"], **kwargs)
    assert model.seen == [expected] * 2
    assert not model.training and model.drop.training and not model.head.training and not model.up.training
    with pytest.raises(TypeError, match="train_mode"):
        lk.lora_ga_init(ModeSpy(), batches, _mse, r=2, target_modules=["up"], train_mode="yes")


def test_lora_ga_warns_on_a_target_with_zero_gradient():
    torch.manual_seed(0)

    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)

        def forward(self, x):
            return self.a(x) + 0.0 * self.b(x)

    model = Dead()
    batches = [torch.randn(3, 6) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"gradient of \['b'\] is exactly zero"):
        lk.lora_ga_init(model, batches, _mse, r=2, target_modules=["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.lora_ga_init(Dead(), batches, _mse, r=2, target_modules=["a"])


def test_lora_ga_factors_have_a_fixed_sign():
    """Different random projections (or a gradient summed over another number of ranks) must give the same factors;
    without a sign convention each singular pair came out with an arbitrary sign."""
    gen = torch.Generator().manual_seed(1)
    m, n, r = 16, 12, 3
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    S = torch.tensor([10.0 * 0.8**i for i in range(n)])
    G = (U[:, :n] * S) @ V.T
    ref_a, ref_b = lk.init.lora_ga_factors(G, r, generator=torch.Generator().manual_seed(0))
    assert bool((ref_a.gather(1, ref_a.abs().argmax(1, keepdim=True)) > 0).all())  # the convention itself (rows of Vh)
    for seed in range(1, 6):
        noisy = G * (1 + 1e-6 * torch.randn(m, n, generator=gen))  # another summation order's rounding
        a, b = lk.init.lora_ga_factors(noisy, r, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(a, ref_a, atol=1e-4, rtol=0)
        torch.testing.assert_close(b, ref_b, atol=1e-4, rtol=0)


def test_lora_ga_shows_progress_over_the_batches(monkeypatch):
    import lora_kernels.init.ga_common as ga_common

    calls = []

    def fake_progress(iterable, **kw):
        calls.append(kw)
        yield from iterable

    monkeypatch.setattr(ga_common, "progress_bar", fake_progress)
    torch.manual_seed(0)
    model = ModeSpy()
    batches = iter([torch.randn(4, 10) for _ in range(5)])
    lk.lora_ga_init(model, batches, _mse, r=2, target_modules=["up"], num_batches=3)
    assert len(calls) == 1 and calls[0]["unit"] == "batch"
    assert len(list(batches)) == 2  # the bar drew nothing beyond num_batches


# ------------------------------------------------------------------------------------------------ meta-device init
@pytest.mark.parametrize("init", ["default", "gaussian", "pissa"])
def test_meta_device_init_with_to_empty_and_reset_parameters(init):
    torch.manual_seed(3)
    direct = lk.LoRALinear(16, 8, r=4, init=init)
    with torch.device("meta"):
        layer = lk.LoRALinear(16, 8, r=4, init=init)
    assert layer.weight.is_meta
    layer.to_empty(device="cpu")
    torch.manual_seed(3)
    layer.reset_parameters()  # the same draws as the constructor on a real device
    for name, t in direct.state_dict().items():
        assert torch.equal(layer.state_dict()[name], t), name
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.reset_parameters()


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_meta_model_through_inject_lora(init):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    lk.inject_lora(model, ["0", "2"], r=2, init=init)
    model.to_empty(device="cpu")
    torch.manual_seed(4)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    torch.manual_seed(4)
    direct = nn.Sequential(lk.LoRALinear(8, 8, r=2, init=init), nn.ReLU(), lk.LoRALinear(8, 4, r=2, init=init))
    for n, t in direct.state_dict().items():
        assert torch.equal(model.state_dict()[n], t), n


# ---------------------------------------------------------------------------------------------- wrapping keeps mode
@pytest.mark.parametrize("training", [False, True])
def test_from_linear_and_inject_keep_the_wrapped_layers_mode(training):
    lin = nn.Linear(12, 6).train(training)
    layer = lk.LoRALinear.from_linear(lin, r=2, dropout=0.5, backend="torch")
    assert layer.training is training
    model = nn.Sequential(nn.Linear(12, 12), nn.Linear(12, 6)).train(training)
    lk.inject_lora(model, ["0", "1"], r=2, dropout=0.5, backend="torch")
    assert [m.training for m in model] == [training, training]
    if not training:  # an eval layer with dropout > 0 is deterministic
        with torch.no_grad():
            layer.lora_B.normal_()
        x = torch.randn(4, 12)
        assert torch.equal(layer(x), layer(x))


# ----------------------------------------------------------------------------------------- rounded once, to the ulp
def _dyadic(shape, g, top, denom):
    """Integers in [-top, top] / denom (a power of two): exact in fp16 and bf16 for top < 128."""
    return torch.randint(-top, top + 1, shape, generator=g).double() / denom


def _exact_case(M_, K_, N_, R_, p, g):
    """Every product and partial sum of y and dx is a multiple of 2^-12 below 2^11, so exact in fp32 (and float64)
    in any order: the only rounding an implementation may do is the final one to the output dtype. The base product
    alone needs ~13 significant bits, more than fp16's 11 and bf16's 8, so rounding it first shows."""
    x, w = _dyadic((M_, K_), g, 31, 1), _dyadic((N_, K_), g, 127, 1024)
    a, b = _dyadic((R_, K_), g, 3, 4), _dyadic((N_, R_), g, 3, 4)
    bias = _dyadic((N_,), g, 15, 16)
    seed = 12345
    keep = lk.reference.dropout_keep_mask(seed, M_, K_, p).double()
    xd = x * keep / (1.0 - p) if p > 0 else x  # p = 0.5: 1/(1-p) = 2 is exact
    scale = 0.5
    y = x @ w.T + scale * ((xd @ a.T) @ b.T) + bias
    dy = _dyadic((M_, N_), g, 15, 4)
    dx = dy @ w + keep * ((scale * dy @ b) @ a) / (1.0 - p)
    return x, w, a, b, bias, scale, seed, y, dy, dx


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_reference_rounds_once(dtype, p):
    """y and dx equal the exact result rounded once to the output dtype, bit for bit: rounding the base product
    or S (or the LoRA term) to fp16/bf16 first puts many elements one ulp off."""
    g = torch.Generator().manual_seed(11)
    x, w, a, b, bias, scale, seed, y64, dy, dx64 = _exact_case(33, 40, 24, 5, p, g)
    ref = lk.reference.lora_linear
    cast = [t.to(dtype) for t in (x, w, a, b, bias)]
    assert all(torch.equal(c.double(), t) for c, t in zip(cast, (x, w, a, b, bias)))  # inputs exact in dtype
    y, xa = ref.lora_linear_forward(*cast[:4], scale, cast[4], p, seed)
    assert torch.equal(y, y64.to(dtype))
    assert not torch.equal(y64.to(dtype).double(), y64)  # the case does need a rounding
    dx, *_ = ref.lora_linear_backward(dy.to(dtype), *cast[:4], xa, scale, p, seed, True, False, False)
    assert torch.equal(dx, dx64.to(dtype))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernels_round_once(dtype, device, monkeypatch):
    if dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("bf16 tl.dot is not exact in the Triton CPU interpreter")
    from lora_kernels.triton import lora_linear as tri

    monkeypatch.setattr(tri, "BASE_GEMM", "triton")  # the fused path (the cuBLAS base path rounds the base first)
    g = torch.Generator().manual_seed(12)
    p = 0.5
    x, w, a, b, bias, scale, seed, y64, dy, dx64 = _exact_case(33, 40, 24, 5, p, g)
    cast = [t.to(device=device, dtype=dtype) for t in (x, w, a, b, bias)]
    seed_t = torch.tensor(seed, dtype=torch.int64, device=device)
    y, xa, _ = torch.ops.lora_kernels.lora_linear_fwd(*cast[:4], cast[4], scale, p, seed_t, "triton")
    assert torch.equal(y.cpu(), y64.to(dtype))
    dx, *_ = torch.ops.lora_kernels.lora_linear_bwd(
        dy.to(device=device, dtype=dtype), *cast[:4], xa, scale, p, seed_t, "triton", True, False, False
    )
    assert torch.equal(dx.cpu(), dx64.to(dtype))


# --------------------------------------------------------------------------------- dropout offsets past 2^31, 2^32
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device with ~40 GB free")
def test_dropout_mask_offsets_past_2_to_the_32_on_gpu(monkeypatch):
    """Element (m, k) of x sits at the int64 offset m·K + k, and its mask word at Philox counter m·ceil(K/4) + k // 4
    (word k % 4). With x of more than 2^33 elements, element offsets pass 2^32 and counters pass 2^31: an int32 (or
    uint32) index wraps and the last rows get another row's data or mask. W0 = 0, so S = dropout(x)·Aᵀ and dX =
    mask⊙(dS·A)/(1-p) of the last rows can be checked against the reference Philox at their true counters."""
    from lora_kernels.reference.dropout import RAND_BITS, WORDS_PER_COUNTER, dropout_threshold, philox_4x32

    if torch.cuda.mem_get_info()[0] < 40e9:
        pytest.skip("needs ~40 GB of free GPU memory (x and dX of 2^33 fp16 elements)")
    monkeypatch.setenv("LORA_KERNELS_AUTOTUNE", "0")  # no tile benchmarking on 17 GB inputs
    K_, R_, N_, p, tail = 2048, 4, 8, 0.5, 48
    M_ = (1 << 33) // K_ + tail  # 8.6e9 elements: fp16 x is 17 GB, dx as much
    dev = "cuda"
    torch.manual_seed(0)
    x = torch.randn(M_, K_, device=dev, dtype=torch.float16)
    w = torch.zeros(N_, K_, device=dev, dtype=torch.float16)
    a = (torch.randn(R_, K_, device=dev) / K_**0.5).half()
    b = torch.randn(N_, R_, device=dev).half()
    seed = 0x1234_5678_9ABC
    seed_t = torch.tensor(seed, dtype=torch.int64, device=dev)
    _, xa, _ = torch.ops.lora_kernels.lora_linear_fwd(x, w, a, b, None, 1.0, p, seed_t, "triton")
    dy = torch.randn(M_, N_, device=dev, dtype=torch.float16)
    dx, *_ = torch.ops.lora_kernels.lora_linear_bwd(dy, x, w, a, b, xa, 1.0, p, seed_t, "triton", True, False, False)
    groups = K_ // WORDS_PER_COUNTER
    rows = torch.cat(
        [
            torch.arange(0, 8),
            torch.arange((1 << 31) // groups - 8, (1 << 31) // groups + 8),
            torch.arange(M_ - tail, M_),
        ]
    ).to(dev)
    counters = rows[:, None].to(torch.int64) * groups + torch.arange(groups, device=dev)[None, :]
    assert int(counters.max()) >= 1 << 31 and int(rows.max()) * K_ >= 1 << 32
    words = torch.stack(philox_4x32(seed, counters), dim=-1).reshape(len(rows), K_)
    keep = (words >> (32 - RAND_BITS)) >= dropout_threshold(p)
    xd = torch.where(keep, x[rows].float() / (1 - p), torch.zeros((), device=dev))
    s_ref = xd @ a.float().T
    torch.testing.assert_close(xa[rows], s_ref, atol=1e-2, rtol=1e-2)
    d_s = dy[rows].float() @ b.float()
    dx_ref = torch.where(keep, (d_s @ a.float()) / (1 - p), torch.zeros((), device=dev))
    torch.testing.assert_close(dx[rows].float(), dx_ref, atol=2e-3, rtol=1e-2)


def test_lora_ga_refuses_a_linear_it_cannot_replace_and_names_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), ScaledLinear(8, 8))
    before = _state(model)
    with pytest.raises(ValueError, match=r"^1 is an nn.Linear with its own forward"):
        lk.lora_ga_init(model, [torch.randn(3, 8)], _mse, r=2, target_modules=["0", "1"])
    _assert_state(model, before)
    assert type(model[0]) is nn.Linear


def test_merge_and_inits_ignore_an_enclosing_autocast():
    """merge(), PiSSA and the LoRA-GA factors are fp32 math; called inside a user's autocast block their matmuls ran
    in bf16 (merged weight off by ~2e-3, LoRA-GA factors by ~0.4)."""
    torch.manual_seed(0)
    layer = lk.LoRALinear(40, 24, r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.merge()
    merged = layer.weight.detach().clone()
    layer.unmerge()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.merge()
        delta = layer.delta_weight()
    assert torch.equal(layer.weight, merged) and delta.dtype == torch.float32
    lin = nn.Linear(40, 24)
    twin = nn.Linear(40, 24)
    twin.load_state_dict(lin.state_dict())
    plain = lk.LoRALinear.from_linear(lin, r=4, init="pissa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = lk.LoRALinear.from_linear(twin, r=4, init="pissa")
    for name, t in plain.state_dict().items():
        assert torch.equal(under.state_dict()[name], t), name
    G = torch.randn(24, 40)
    outside = lk.init.lora_ga_factors(G, 4, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = lk.init.lora_ga_factors(G, 4, generator=torch.Generator().manual_seed(0))
    for o, i in zip(outside, inside):
        assert i.dtype == torch.float32 and torch.equal(i, o)


def test_failing_pissa_from_linear_leaves_the_linear_as_it_was():
    lin = nn.Linear(6, 3)
    w = lin.weight.detach().clone()
    with pytest.raises(ValueError, match="r=4 exceeds"):
        lk.LoRALinear.from_linear(lin, r=4, init="pissa")
    assert lin.weight.requires_grad and torch.equal(lin.weight, w)


def test_output_is_not_a_view():
    """A view output makes FSDP2 warn: an in-place op on it would drop FSDP's pre-backward hook. The op's result
    owns its storage; gradients flow as before."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, requires_grad=True)
    w, a, b = torch.randn(5, 8), torch.randn(2, 8, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    y = lk.lora_linear(x, w, a, b, 0.5, backend="torch")
    assert y.shape == (2, 3, 5) and y._base is None
    y.sum().backward()
    ref = x.detach() @ w.T + 0.5 * (x.detach() @ a.detach().T) @ b.detach().T
    torch.testing.assert_close(y.detach(), ref)
    assert x.grad is not None and a.grad is not None and b.grad is not None
