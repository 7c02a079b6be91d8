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
