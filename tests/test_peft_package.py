"""The PEFT package's layout: the old module path ``lora_kernels.peft_compat`` keeps every public name and the
objects that models saved whole refer to, and importing lora_kernels or lora_kernels.peft loads neither peft nor
transformers."""

import ast
import os
import pickle
import subprocess
import sys

import pytest

import lora_kernels as lk
import lora_kernels.peft as lk_peft
from lora_kernels import peft_compat

PEFT_DIR = os.path.dirname(lk_peft.__file__)


def test_old_module_path_reexports_every_public_name():
    for name in lk_peft.__all__:
        assert getattr(peft_compat, name) is getattr(lk_peft, name)
    assert sorted(peft_compat.__all__) == sorted(lk_peft.__all__)
    for name in ("from_peft", "to_peft", "set_adapter", "load_adapters", "PeftLoRALinear"):
        assert getattr(lk, name) is getattr(lk_peft, name)


@pytest.mark.parametrize(
    "name, module",
    [
        ("_DisableAdapter", "patches"),
        ("_EnableAdapterLayers", "patches"),
        ("_MixedBatchHooks", "patches"),
        ("_mixed_names_pre_hook", "patches"),
        ("_ServingGenerate", "serving"),
        ("_Serving", "serving"),
        ("_serving_pre_hook", "serving"),
        ("_serving_post_hook", "serving"),
        ("_Adapter", "layer"),
    ],
)
def test_objects_pickled_under_the_old_path_unpickle(name, module):
    obj = getattr(getattr(lk_peft, module), name)
    old = pickle.dumps(obj, protocol=2).replace(f"lora_kernels.peft.{module}".encode(), b"lora_kernels.peft_compat")
    assert b"lora_kernels.peft_compat" in old
    assert pickle.loads(old) is obj
    with pytest.raises(AttributeError):
        peft_compat.__getattr__("_no_such_name")


def test_import_loads_neither_peft_nor_transformers():
    code = (
        "import sys, lora_kernels, lora_kernels.peft, lora_kernels.peft_compat; "
        "print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(lk.__file__))},
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _package_imports(path):
    """The lora_kernels.peft modules that ``path`` imports, anywhere in the file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
    return found


def test_no_import_cycle_inside_the_package():
    modules = [f[:-3] for f in os.listdir(PEFT_DIR) if f.endswith(".py") and f != "__init__.py"]
    graph = {m: _package_imports(os.path.join(PEFT_DIR, m + ".py")) & set(modules) for m in modules}
    done, stack = set(), []

    def visit(m):
        assert m not in stack, f"import cycle: {' -> '.join(stack + [m])}"
        if m in done:
            return
        stack.append(m)
        for n in graph[m]:
            visit(n)
        stack.pop()
        done.add(m)

    for m in modules:
        visit(m)
    assert graph["common"] == set()


# ------------------------------------------------------------------------------- a Conv1D-layout serving layer
def _reference(x, w_out_in, bias, adapters, ids):
    """float64 oracle: y = x·Wᵀ + b, plus scale·(x·Aᵀ)·Bᵀ for the rows whose id names an adapter."""
    y = x.double() @ w_out_in.double().t() + bias.double()
    for i, slot in enumerate(ids):
        if slot >= 0:
            A, B, scale = adapters[slot]
            y[i] += scale * (x[i].double() @ A.double().t()) @ B.double().t()
    return y


@pytest.mark.parametrize("m, k, n", [(1, 7, 33), (7, 33, 1), (33, 100, 7)])
def test_in_out_weight_layout_serves_the_transposed_weight(m, k, n):
    import torch

    torch.manual_seed(m * 1000 + k + n)
    w_in_out = torch.nn.Parameter(torch.randn(k, n, dtype=torch.float64), requires_grad=False)  # Conv1D's [in, out]
    bias = torch.nn.Parameter(torch.randn(n, dtype=torch.float64), requires_grad=False)
    layer = lk.MultiLoRALinear.from_weight(w_in_out, bias, 3, 4, weight_layout="in_out", backend="torch")
    assert (layer.in_features, layer.out_features, layer.weight_layout) == (k, n, "in_out")
    assert layer.weight is w_in_out and layer.bias is bias  # shared, not copied: the state dict keeps [in, out]
    assert "weight_layout='in_out'" in repr(layer)
    adapters = {}
    for slot, r in ((0, 1), (2, 4)):
        A, B = torch.randn(r, k, dtype=torch.float64), torch.randn(n, r, dtype=torch.float64)
        layer.load_adapter(f"a{slot}", A, B, scale=0.5 + slot, slot=slot)
        adapters[slot] = (A, B, 0.5 + slot)
    x = torch.randn(m, k, dtype=torch.float64)
    ids = [(0, -1, 2)[i % 3] for i in range(m)]
    out = layer(x, lk.LoRABatch.prepare(ids))
    torch.testing.assert_close(out, _reference(x, w_in_out.t(), bias, adapters, ids), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer(x), x @ w_in_out + bias, rtol=1e-12, atol=1e-12)  # no batch: the base layer


def test_weight_layout_is_checked_and_fresh_layers_follow_it():
    import torch

    with pytest.raises(ValueError, match="weight_layout must be one of 'out_in', 'in_out', got 'transposed'"):
        lk.MultiLoRALinear(7, 5, 2, 2, weight_layout="transposed")
    w = torch.nn.Parameter(torch.zeros(7, 5))
    with pytest.raises(ValueError, match="weight_layout"):
        lk.MultiLoRALinear.from_weight(w, None, 2, 2, weight_layout=True)
    with pytest.raises(TypeError, match="weight must be a 2-D nn.Parameter"):
        lk.MultiLoRALinear.from_weight(torch.zeros(7, 5), None, 2, 2)
    with pytest.raises(TypeError, match=r"bias must be None or an nn.Parameter of shape \(5,\)"):
        lk.MultiLoRALinear.from_weight(w, torch.nn.Parameter(torch.zeros(7)), 2, 2, weight_layout="in_out")
    layer = lk.MultiLoRALinear(7, 5, 2, 2, weight_layout="in_out")
    assert layer.weight.shape == (7, 5) and layer.base_weight().shape == (5, 7)
    assert lk.MultiLoRALinear(7, 5, 2, 2).weight.shape == (5, 7)


def test_a_conv1d_layer_pickled_before_the_flag_unpickles_as_in_out():
    import io

    import torch

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 3), requires_grad=False)
    layer = lk.MultiLoRALinear.from_weight(w, None, 2, 2, weight_layout="in_out", backend="torch")
    layer.load_adapter("a", torch.randn(2, 6), torch.randn(3, 2), scale=2.0)
    del layer.__dict__["weight_layout"]  # what an old pickle holds: no flag, the class says the layout
    layer.__class__ = peft_compat._MultiLoRAConv1D
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    old = torch.load(buf, weights_only=False)
    assert type(old).__module__ == "lora_kernels.peft_compat" and old.weight_layout == "in_out"
    x = torch.randn(4, 6)
    batch = lk.LoRABatch.prepare([0, -1, 0, 0])
    fresh = lk.MultiLoRALinear.from_weight(old.weight, None, 2, 2, weight_layout="in_out", backend="torch")
    fresh.load_adapter("a", old.pool.A_stack[0, :2], old.pool.B_stack[0, :, :2], scale=2.0)
    torch.testing.assert_close(old(x, batch), fresh(x, batch))


# -------------------------------------------------------------------------- load_adapters' steps, on a tiny model
class _Tiny:
    @staticmethod
    def build():
        import torch.nn as nn

        class Tiny(nn.Module):
            def __init__(self):
                super().__init__()
                self.q_proj = nn.Linear(7, 5)
                self.v_proj = nn.Linear(5, 7)

            def forward(self, x):
                return self.v_proj(self.q_proj(x))

        return Tiny().double()


def _saved_adapter(path, seed, **config):
    import json

    import torch

    pytest.importorskip("safetensors")
    torch.manual_seed(seed)
    model = _Tiny.build()
    lk.inject_lora(model, ["q_proj", "v_proj"], r=2, alpha=3)
    for layer in lk.lora_layers(model).values():
        layer.lora_B.data.normal_()
    lk.save_adapter(model, path)
    cfg_path = os.path.join(path, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    with open(cfg_path, "w") as f:
        json.dump({**cfg, **config}, f)
    return model


def test_load_adapters_checks_a_patched_config_in_memory(tmp_path, monkeypatch):
    import tempfile

    import torch

    lora = _saved_adapter(tmp_path, 1, fan_in_fan_out=True)  # PEFT's Conv1D flag: served as the base module says

    def no_temporary_files(*args, **kwargs):
        raise AssertionError("load_adapters wrote a temporary copy of the config")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", no_temporary_files)
    monkeypatch.setattr(tempfile, "mkdtemp", no_temporary_files)
    torch.manual_seed(1)
    model = _Tiny.build()
    assert lk.load_adapters(model, {"a": str(tmp_path)}, backend="torch") == {"a": 0}
    x = torch.randn(3, 2, 7, dtype=torch.float64)
    with torch.no_grad():
        out = model(x, adapter_names=["a", "__base__", "a"])
        torch.testing.assert_close(out[[0, 2]], lora(x[[0, 2]]), rtol=1e-12, atol=1e-12)
        base = _Tiny.build()
        base.load_state_dict(model.state_dict())
        torch.testing.assert_close(out[1], base(x[1]), rtol=1e-12, atol=1e-12)


def test_load_adapters_refuses_variants_naming_the_config(tmp_path):
    _saved_adapter(tmp_path, 2, use_dora=True)
    model = _Tiny.build()
    with pytest.raises(
        ValueError,
        match=r"^load_adapters: .*adapter_config.json: LoRA variant settings cannot be "
        r"served: use_dora=True",
    ):
        lk.load_adapters(model, {"a": str(tmp_path)})
    assert not lk.multi_lora_layers(model)


def test_load_adapters_failing_half_way_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    import torch.nn as nn

    _saved_adapter(tmp_path / "a", 3)
    _saved_adapter(tmp_path / "b", 4)
    model = _Tiny.build()
    before = dict(model.named_children())
    calls = []
    load = lk.AdapterPool.load

    def failing_load(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second adapter's first layer
            raise RuntimeError("injected failure")
        return load(self, *args, **kwargs)

    monkeypatch.setattr(lk.AdapterPool, "load", failing_load)
    with pytest.raises(RuntimeError, match="injected failure"):
        lk.load_adapters(model, {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}, backend="torch")
    assert dict(model.named_children()) == before and all(type(m) is nn.Linear for m in before.values())
    assert not model._forward_pre_hooks and not hasattr(model, "_lora_kernels_serving")
