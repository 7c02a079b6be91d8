"""Bad input to the public API: each case must raise the right error type, name the argument, and leave every user
tensor, module, pool and model as it was. Torch backend, tiny shapes (the whole file runs in a few seconds)."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import lora_kernels as lk


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _snapshot(module: nn.Module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(module: nn.Module, snap) -> bool:
    now = module.state_dict()
    return set(now) == set(snap) and all(torch.equal(now[k], snap[k]) for k in snap)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.v_proj(torch.relu(self.q_proj(x)))


# ------------------------------------------------------------------------------------------------------ lora_linear
X, W, A, B, BIAS = _t(3, 8), _t(5, 8), _t(2, 8), _t(5, 2), _t(5)


@pytest.mark.parametrize("scale", [np.float32(0.5), np.float64(0.5), torch.tensor([0.5]), 0.5, 1])
def test_lora_linear_accepts_any_real_scale(scale):
    # np.float32 is no subclass of float; it used to be refused with "scale must be a float, got float32".
    y = lk.lora_linear(X, W, A, B, scale, backend="torch")
    torch.testing.assert_close(y, lk.lora_linear(X, W, A, B, float(scale), backend="torch"))


@pytest.mark.parametrize(
    "scale, err, match",
    [
        (True, TypeError, "scale must be a float, got bool"),
        (np.bool_(True), TypeError, "scale must be a float"),
        ("1", TypeError, "scale must be a float, got str"),
        (float("nan"), ValueError, "scale must be finite"),
        (np.float32("inf"), ValueError, "scale must be finite"),
        (torch.ones(2), ValueError, r"scale must be a scalar.*\(2,\)"),
    ],
)
def test_lora_linear_bad_scale(scale, err, match):
    with pytest.raises(err, match=match):
        lk.lora_linear(X, W, A, B, scale, backend="torch")


@pytest.mark.parametrize("which", ["x", "weight", "lora_A", "bias"])
def test_lora_linear_refuses_sparse(which):
    args = {"x": X, "weight": W, "lora_A": A, "bias": BIAS}
    args[which] = args[which].to_sparse()
    with pytest.raises(TypeError, match=f"{which} must be a dense"):
        lk.lora_linear(args["x"], args["weight"], args["lora_A"], B, 1.0, bias=args["bias"], backend="torch")


@pytest.mark.parametrize("training", ["no", 0, None])
def test_lora_linear_training_must_be_bool(training):
    # A non-empty string is truthy: "no" used to turn dropout on.
    with pytest.raises(TypeError, match="training must be a bool"):
        lk.lora_linear(X, W, A, B, 1.0, dropout_p=0.5, training=training, backend="torch")


@pytest.mark.parametrize(
    "backend, err, match",
    [
        (3, TypeError, "backend must be a str .* got int 3"),
        ("gpu", ValueError, "backend='gpu' is not a backend"),
    ],
)
def test_bad_backend_names(backend, err, match):
    with pytest.raises(err, match=match):
        lk.lora_linear(X, W, A, B, 1.0, backend=backend)
    with pytest.raises(err, match=match):
        lk.LoRALinear(8, 4, r=2, backend=backend)
    assert lk.lora_linear(X, W, A, B, 1.0, backend=" Torch ").shape == (3, 5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lead", [(3,), (2, 3), ()])
def test_lora_linear_empty_in_features(backend, lead, device):
    # K = 0 used to fail in reshape(-1, 0) with a RuntimeError; the product is just the bias.
    # The Triton backend takes CUDA tensors, or CPU tensors only with the interpreter on: on a GPU machine (no
    # interpreter) these tensors live on the GPU, and a CPU machine without the interpreter skips.
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    x = torch.randn(*lead, 0, device=device, requires_grad=True)
    a = torch.randn(2, 0, device=device, requires_grad=True)
    b = torch.randn(5, 2, device=device, requires_grad=True)
    bias = BIAS.to(device)
    y = lk.lora_linear(x, torch.randn(5, 0, device=device), a, b, 1.0, bias=bias, backend=backend)
    assert y.shape == (*lead, 5)
    torch.testing.assert_close(y, bias.expand(*lead, 5))
    y.sum().backward()
    assert x.grad.shape == x.shape and a.grad.shape == a.shape
    assert torch.equal(b.grad, torch.zeros_like(b))


# ------------------------------------------------------------------------------------------------------- LoRALinear
@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"alpha": "16"}, TypeError, "alpha must be a real number, got str"),
        ({"alpha": None, "dropout": None}, TypeError, "dropout must be a real number, got NoneType"),
        ({"dropout": "0.1"}, TypeError, "dropout must be a real number"),
        ({"dtype": torch.int32}, TypeError, "dtype must be a floating torch.dtype"),
        ({"lora_dtype": "float32"}, TypeError, "lora_dtype must be a torch.dtype"),
    ],
)
def test_lora_linear_module_bad_args(kwargs, err, match):
    with pytest.raises(err, match=match):
        lk.LoRALinear(8, 4, r=2, **kwargs)


def test_lora_scaling_bad_rank():
    with pytest.raises(ValueError, match="r must be a positive int, got 0"):
        lk.lora_scaling(0, 8, False)


@pytest.mark.parametrize(
    "target, err, match",
    [
        (None, TypeError, "target_modules must be a regex str or a list"),
        (0, TypeError, "target_modules must be a regex str or a list"),
    ],
)
def test_inject_lora_bad_targets(target, err, match):
    model = TwoLayer()
    snap = _snapshot(model)
    with pytest.raises(err, match=match):
        lk.inject_lora(model, target)
    assert _same(model, snap) and isinstance(model.q_proj, nn.Linear)


@pytest.mark.parametrize(
    "fn",
    [
        "inject_lora",
        "load_lora_state_dict",
        "save_adapter",
        "load_adapter",
        "from_peft",
        "set_adapter",
        "load_adapters",
        "inject_multi_lora",
    ],
)
def test_model_must_be_a_module(fn, tmp_path):
    args = {
        "inject_lora": (["q_proj"],),
        "load_lora_state_dict": ({},),
        "save_adapter": (tmp_path,),
        "load_adapter": (tmp_path,),
        "from_peft": (),
        "set_adapter": ("a",),
        "load_adapters": ({"a": tmp_path},),
        "inject_multi_lora": (["q_proj"], 2, 2),
    }[fn]
    if fn in ("from_peft", "set_adapter"):
        pytest.importorskip("peft")
    with pytest.raises(TypeError, match="model must be an nn.Module, got NoneType"):
        getattr(lk, fn)(None, *args)


def _lora_model():
    torch.manual_seed(0)
    model = TwoLayer()
    lk.inject_lora(model, ["q_proj", "v_proj"], r=2)
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.lora_B.normal_()
    return model


def test_pissa_init_refuses_a_merged_layer():
    # It used to rewrite the merged weight and the adapter; unmerge() then restored the old W0 under the new adapter.
    layer = lk.LoRALinear(8, 4, r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.merge()
    snap = _snapshot(layer)
    weight = layer.weight.clone()
    with pytest.raises(RuntimeError, match="pissa_init: the layer is merged; unmerge"):
        lk.pissa_init(layer)
    assert _same(layer, snap) and torch.equal(layer.weight, weight) and layer.merged


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize(
    "case, match",
    [
        ("nan", "v_proj.lora_A: contains inf or NaN"),
        ("inf", "v_proj.lora_B: contains inf or NaN"),
        ("meta", "v_proj.lora_A: is on the meta device"),
        ("sparse", "v_proj.lora_A: layout torch.sparse_coo"),
        ("fp16_overflow", "v_proj.lora_B: overflows"),
    ],
)
def test_load_lora_state_dict_refuses_unusable_values(case, match, merged):
    # Each used to be loaded (NaN/inf: silently; fp16 overflow: as inf) or to fail half-way through the writes
    # (meta, sparse: after q_proj was already overwritten).
    model = _lora_model()
    if case == "fp16_overflow":
        model.half()
    if merged:
        model.v_proj.merge()
    snap = _snapshot(model)
    weight = model.v_proj.weight.clone()
    sd = {k: torch.randn_like(v) for k, v in lk.lora_state_dict(model).items()}  # q_proj's values would load first
    if case == "nan":
        sd["v_proj.lora_A"][0, 0] = float("nan")
    elif case == "inf":
        sd["v_proj.lora_B"][0, 0] = float("inf")
    elif case == "meta":
        sd["v_proj.lora_A"] = sd["v_proj.lora_A"].to("meta")
    elif case == "sparse":
        sd["v_proj.lora_A"] = sd["v_proj.lora_A"].to_sparse()
    else:
        sd["v_proj.lora_B"] = sd["v_proj.lora_B"].float()
        sd["v_proj.lora_B"][0, 0] = 1e6
    with pytest.raises(ValueError, match=match):
        lk.load_lora_state_dict(model, sd)
    assert _same(model, snap) and torch.equal(model.v_proj.weight, weight)
    assert model.v_proj.merged == merged


# ----------------------------------------------------------------------------------------------- pool and batches
def test_pool_bad_constructor_args():
    with pytest.raises(ValueError, match="out_features must be a positive int or a non-empty list of them, got None"):
        lk.AdapterPool(2, 2, 8, None)
    with pytest.raises(TypeError, match="dtype must be one of .* got 'float32'"):
        lk.AdapterPool(2, 2, 8, 6, dtype="float32")


def _pool():
    pool = lk.AdapterPool(3, 4, 8, 6)
    pool.load("a", _t(2, 8), _t(6, 2))
    return pool


def _pool_state(pool):
    return (
        pool.A_stack.clone(),
        pool.B_stack.clone(),
        pool.ranks.clone(),
        pool.scales.clone(),
        pool.names,
        pool.slots_in_use,
        pool.host_ranks,
    )


def _pool_same(pool, state):
    return all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(_pool_state(pool), state))


@pytest.mark.parametrize("case", ["A_meta", "B_meta", "A_sparse"])
def test_pool_load_refuses_tensors_without_values(case):
    # Meta tensors used to fail inside the NaN check with "Tensor.item() cannot be called on meta tensors".
    pool = _pool()
    state = _pool_state(pool)
    a, b = _t(2, 8), _t(6, 2)
    if case == "A_meta":
        a = a.to("meta")
    elif case == "B_meta":
        b = b.to("meta")
    else:
        a = a.to_sparse()
    what = "lora_A" if case.startswith("A") else "lora_B"
    with pytest.raises(ValueError, match=f"{what} must be a dense tensor holding values"):
        pool.load("b", a, b)
    assert _pool_same(pool, state)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"alpha": "16"}, TypeError, "alpha must be a real number or a list of one per slice, got '16'"),
        ({"scale": None, "alpha": [1.0, "x"]}, ValueError, "alpha has 2 entries but the pool has 1 output slices"),
        ({"scale": True}, TypeError, "scale must be a real number"),
        ({"scale": float("nan")}, ValueError, "scale must be finite"),
        ({"slot": 7}, ValueError, r"slot must be an int in \[0, 3\), got 7"),
        ({"slot": 0}, ValueError, "slot 0 already holds adapter 'a'"),
    ],
)
def test_pool_load_bad_settings(kwargs, err, match):
    pool = _pool()
    state = _pool_state(pool)
    with pytest.raises(err, match=match):
        pool.load("b", _t(2, 8), _t(6, 2), **kwargs)
    assert _pool_same(pool, state)


@pytest.mark.parametrize("ids", [np.array([0, -1, 2]), [np.int64(0), np.int32(-1), 2], (0, -1, 2)])
def test_batch_accepts_numpy_ints(ids):
    batch = lk.LoRABatch.prepare(ids)
    assert batch.num_tokens == 3 and batch.token_slots.tolist() == [0, -1, 2]


@pytest.mark.parametrize(
    "ids, err, match",
    [
        (None, TypeError, "adapter_ids must be a sequence of ints or an integer tensor, got NoneType"),
        (3, TypeError, "adapter_ids must be a sequence of ints or an integer tensor, got int"),
        ("01", TypeError, "adapter_ids must be a sequence of ints"),
        ([0.0, 1.0], TypeError, "adapter_ids must be ints"),
        ([np.bool_(True)], TypeError, "adapter_ids must be ints"),
        (torch.tensor([0, 1], device="meta"), ValueError, "adapter_ids must be a dense tensor holding values"),
    ],
)
def test_batch_prepare_bad_ids(ids, err, match):
    with pytest.raises(err, match=match):
        lk.LoRABatch.prepare(ids)
    # prepare_ refuses before touching the batch (meta ids used to fail after the buffers were reset).
    batch = lk.LoRABatch.prepare([0, 1, -1])
    before = [t.clone() for t in (batch.token_slots, batch.sorted_tokens, batch.tile_starts)]
    with pytest.raises(err, match=match):
        batch.prepare_(ids)
    assert batch.num_tokens == 3 and batch.host_slots.tolist() == [0, 1, -1]
    assert all(torch.equal(a, b) for a, b in zip(before, (batch.token_slots, batch.sorted_tokens, batch.tile_starts)))


def test_batch_prepare_sequences_bad_slots():
    with pytest.raises(TypeError, match="sequence_slots must be ints"):
        lk.LoRABatch.prepare_sequences(["a"], 2)


@pytest.mark.parametrize("ranks, match", [([9, 2, 0], "slot 0: 9"), ([2, -1, 0], "slot 1: -1")])
@pytest.mark.parametrize("op", ["shrink", "expand"])
def test_shrink_expand_refuse_ranks_out_of_range(op, ranks, match):
    # A rank above R made the kernels read past the slot's rows of the stack (into the next slice or slot); a
    # negative one was reported as "ids of empty (unloaded) slots".
    pool = _pool()
    batch = lk.LoRABatch.prepare([0, 0, -1])
    r = torch.tensor(ranks, dtype=torch.int32)
    out = torch.full((3, 4), 7.0)
    y = torch.full((3, 6), 7.0)
    with pytest.raises(ValueError, match=rf"ranks must be in 0\.\.R=4.*{match}"):
        if op == "shrink":
            lk.lora_shrink(_t(3, 8), pool.A_stack, batch, out, ranks=r, backend="torch")
        else:
            lk.lora_expand(_t(3, 4), pool.B_stack, batch, y, 1.0, ranks=r, backend="torch")
    assert (out == 7).all() and (y == 7).all()


@pytest.mark.parametrize(
    "scales, err, match",
    [
        (float("nan"), ValueError, "scales must be finite, got nan"),
        (float("inf"), ValueError, "scales must be finite"),
        ("1", TypeError, "scales must be a float32 tensor"),
    ],
)
def test_expand_bad_float_scales(scales, err, match):
    # A NaN scale used to be written into y.
    pool = _pool()
    batch = lk.LoRABatch.prepare([0, 0, -1])
    y = torch.full((3, 6), 7.0)
    with pytest.raises(err, match=match):
        lk.lora_expand(_t(3, 4), pool.B_stack, batch, y, scales, backend="torch")
    assert (y == 7).all()


def test_expand_refuses_scales_that_require_grad():
    # The multi-adapter ops register no gradient: a learnable scale would silently get none.
    pool = _pool()
    batch = lk.LoRABatch.prepare([0, 0, -1])
    y = torch.full((3, 6), 7.0)
    scales = torch.ones(pool.B_stack.shape[0], requires_grad=True)
    with pytest.raises(ValueError, match="scales must not require grad"):
        lk.lora_expand(_t(3, 4), pool.B_stack, batch, y, scales, backend="torch")
    assert (y == 7).all()


def test_expand_accepts_numpy_scale():
    pool = _pool()
    batch = lk.LoRABatch.prepare([0, 0, -1])
    s = _t(3, 4)
    y1 = lk.lora_expand(s, pool.B_stack, batch, torch.zeros(3, 6), np.float32(0.5), backend="torch")
    y2 = lk.lora_expand(s, pool.B_stack, batch, torch.zeros(3, 6), 0.5, backend="torch")
    torch.testing.assert_close(y1, y2)


def test_shrink_num_slices_bool():
    pool = _pool()
    with pytest.raises(ValueError, match="num_slices=True"):
        lk.lora_shrink(_t(3, 8), pool.A_stack, lk.LoRABatch.prepare([0, 0, -1]), torch.zeros(3, 4), num_slices=True)


def _multi_model():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6))
    lk.inject_multi_lora(model, ["0", "2"], max_adapters=2, max_rank=2)
    return model


@pytest.mark.parametrize(
    "target, err, match",
    [
        (None, TypeError, "target_modules must be a regex str or a list"),
        ("(", ValueError, "not a valid regex"),
        ([""], TypeError, "target_modules must be a regex str or a list"),
    ],
)
def test_inject_multi_lora_bad_targets(target, err, match):
    model = nn.Sequential(nn.Linear(8, 6))
    with pytest.raises(err, match=match):
        lk.inject_multi_lora(model, target, 2, 2)
    assert isinstance(model[0], nn.Linear)


def test_inject_multi_lora_cannot_replace_the_model_itself():
    # The model's own name is "": it used to be picked by a regex like ".*" and then set as an attribute "".
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        lk.inject_multi_lora(nn.Linear(4, 4), ".*", 2, 2)


@pytest.mark.parametrize(
    "weights, err, match",
    [
        ([("0", (_t(2, 8), _t(6, 2)))], TypeError, "weights must be a mapping"),
        ({"0": _t(2, 8)}, ValueError, r"weights\['0'\] must be a pair"),
        (
            {"0": (_t(2, 8), _t(6, 2)), "2": (_t(2, 6), _t(6, 3))},
            ValueError,
            r"layer '2': lora_B must be \[out_features=6",
        ),
    ],
)
def test_load_multi_adapter_bad_weights(weights, err, match):
    model = _multi_model()
    with pytest.raises(err, match=match):
        lk.load_multi_adapter(model, "a", weights)
    assert all(len(m.pool) == 0 for m in lk.multi_lora_layers(model).values())


# ------------------------------------------------------------------------------------------------------ files, init
def test_save_adapter_to_a_file_path(tmp_path):
    pytest.importorskip("safetensors")
    target = tmp_path / "adapter"
    target.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="save_adapter: .* is not a directory"):
        lk.save_adapter(_lora_model(), target)
    assert target.read_text() == "not a directory"


@pytest.mark.parametrize("fn", ["save_adapter", "load_adapter"])
def test_adapter_path_type(fn):
    pytest.importorskip("safetensors")
    with pytest.raises(TypeError, match=f"{fn}: path must be a str or os.PathLike"):
        getattr(lk, fn)(_lora_model(), None)


@pytest.mark.parametrize("fn", ["load_adapter", "load_adapters"])
def test_load_from_a_file_path(fn, tmp_path):
    pytest.importorskip("safetensors")
    target = tmp_path / "adapter"
    target.write_text("{}")
    model = TwoLayer()
    snap = _snapshot(model)
    with pytest.raises(NotADirectoryError, match=f"{fn}: .* is a file"):
        if fn == "load_adapter":
            lk.load_adapter(model, target)
        else:
            lk.load_adapters(model, {"a": target})
    assert _same(model, snap) and isinstance(model.q_proj, nn.Linear)


@pytest.mark.parametrize(
    "update, match",
    [
        ({"r": 2.5}, "r must be a positive int, got 2.5"),  # used to be truncated to r = 2 without a word
        ({"rank_pattern": {"q_proj": "x"}}, r"rank_pattern\['q_proj'\] must be a positive int, got 'x'"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern must be an object"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, r"alpha_pattern\['q_proj'\] must be a positive number"),
        ({"target_modules": 3}, "target_modules must be a regex string or a list of module names, got 3"),
    ],
)
@pytest.mark.parametrize("fn", ["load_adapter", "load_adapters"])
def test_load_adapter_bad_config_values(update, match, fn, tmp_path):
    pytest.importorskip("safetensors")
    if fn == "load_adapters":
        pytest.importorskip("peft")
    path = tmp_path / "adapter"
    lk.save_adapter(_lora_model(), path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(update)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    model = TwoLayer()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        if fn == "load_adapter":
            lk.load_adapter(model, path)
        else:
            lk.load_adapters(model, {"a": path})
    assert _same(model, snap) and isinstance(model.q_proj, nn.Linear)


def _loss(model, batch):
    return model(batch).pow(2).mean()


@pytest.mark.parametrize(
    "batches, loss_fn, err, match",
    [
        (None, _loss, TypeError, "batches must be an iterable of batches"),
        ([torch.randn(2, 8)], 3, TypeError, "loss_fn must be callable"),
        (
            [torch.randn(2, 8)],
            lambda m, b: m(b).sum() * float("nan"),
            ValueError,
            r"estimated gradient of \['q_proj'\] contains inf or NaN",
        ),
    ],
)
def test_lora_ga_init_bad_batches_or_loss(batches, loss_fn, err, match):
    # A NaN loss used to surface as torch's _LinAlgError from the SVD.
    model = TwoLayer()
    snap = _snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(err, match=match):
        lk.lora_ga_init(model, batches, loss_fn, r=2, target_modules=["q_proj"], backend="torch")
    assert _same(model, snap) and isinstance(model.q_proj, nn.Linear)
    assert [p.requires_grad for p in model.parameters()] == flags


# ------------------------------------------------------------------------------------------------------------ PEFT
def test_from_peft_on_a_plain_model():
    pytest.importorskip("peft")
    model = TwoLayer()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="from_peft: TwoLayer holds no PEFT LoRA layer"):
        lk.from_peft(model)
    assert _same(model, snap)


def test_set_adapter_without_converted_layers(tmp_path):
    # A model served by load_adapters has no converted layer: set_adapter used to do nothing, silently.
    pytest.importorskip("peft")
    pytest.importorskip("safetensors")
    lk.save_adapter(_lora_model(), tmp_path / "a")
    model = TwoLayer().eval()
    lk.load_adapters(model, {"a": tmp_path / "a"})
    with pytest.raises(ValueError, match="set_adapter: TwoLayer has no converted PEFT layer"):
        lk.set_adapter(model, "a")
