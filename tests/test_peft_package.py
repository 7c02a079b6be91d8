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


@pytest.mark.parametrize("name, module", [("_DisableAdapter", "patches"), ("_EnableAdapterLayers", "patches"),
                                          ("_MixedBatchHooks", "patches"), ("_mixed_names_pre_hook", "patches"),
                                          ("_ServingGenerate", "serving"), ("_Serving", "serving"),
                                          ("_serving_pre_hook", "serving"), ("_serving_post_hook", "serving"),
                                          ("_Adapter", "layer")])
def test_objects_pickled_under_the_old_path_unpickle(name, module):
    obj = getattr(getattr(lk_peft, module), name)
    old = pickle.dumps(obj, protocol=2).replace(f"lora_kernels.peft.{module}".encode(), b"lora_kernels.peft_compat")
    assert b"lora_kernels.peft_compat" in old
    assert pickle.loads(old) is obj
    with pytest.raises(AttributeError):
        peft_compat._no_such_name


def test_import_loads_neither_peft_nor_transformers():
    code = ("import sys, lora_kernels, lora_kernels.peft, lora_kernels.peft_compat; "
            "print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(lk.__file__))})
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
