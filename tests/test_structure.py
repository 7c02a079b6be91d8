"""The package's structure, read from its source (nothing is imported).

1. The import graph of ``lora_kernels`` has no cycle. Every ``import`` / ``from ... import`` counts, also the ones
   inside functions (a function-local import is the usual way a cycle is hidden, not removed). An edge goes from the
   importing module to the module it names: ``from .x import name`` is an edge to ``x``, ``from . import x`` (x a
   submodule) an edge to ``x``. Importing a module of a subpackage also runs that subpackage's ``__init__.py``, so
   ``from .init.svd import f`` is an edge to ``lora_kernels.init.svd`` and to ``lora_kernels.init``; the root
   package's ``__init__.py`` is the top of the graph by design (it re-exports the public API) and gets no such edges.
2. No module uses a private name (leading underscore) of another module: neither ``from .m import _name`` nor
   ``m._name`` on an imported module. The package-internal underscore modules in ``SHARED_INTERNALS`` exist to be
   shared: importing them and their underscore names is allowed.
"""

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lora_kernels"

# Modules shared by the package's modules: their underscore names are the package's internal API.
SHARED_INTERNALS = frozenset(
    {
        "lora_kernels._backend",
        "lora_kernels._autocast",
        "lora_kernels._progress",
        "lora_kernels._numerics",
        "lora_kernels.ops._validate",
        "lora_kernels.triton._utils",
        "lora_kernels.triton._compat",
        "lora_kernels.triton._dropout",
        "lora_kernels.triton._gemm",
    }
)


# ------------------------------------------------------------------------------------------------------ the reader
def find_modules(root, package=PACKAGE):
    """{module name: path} for every .py file of ``package`` under ``root`` (``a/__init__.py`` is module ``a``)."""
    modules = {}
    for path in sorted((Path(root) / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_package(name, modules):
    return modules[name].name == "__init__.py"


def _resolve_from(module, node, modules):
    """The absolute module a ``from ... import`` names (None outside the package or unresolvable)."""
    if node.level == 0:
        return node.module
    base = module if _is_package(module, modules) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    if not base:
        return None
    return f"{base}.{node.module}" if node.module else base


def _parents(name, package=PACKAGE):
    """The subpackages whose ``__init__`` runs before ``name`` (the root package excluded, see the docstring)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def read_imports(root, package=PACKAGE, subpackage_inits=True):
    """Every import of a package module by a package module.

    ``subpackage_inits``: also add the implicit edge to each subpackage whose ``__init__.py`` an import runs (see the
    module docstring); False reads only the modules the import statements name.

    Returns (modules, imports): ``imports`` is a list of dicts with ``src``, ``dst`` (absolute module name), ``name``
    (the imported name for ``from`` imports, else None), ``line``, ``via`` ("import", "from", "parent" for the
    implicit subpackage ``__init__``, "attribute" for ``module._name`` on an imported module) and ``text``.
    """
    modules = find_modules(root, package)
    imports = []
    for src, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        aliases = {}  # local name -> package module it is bound to (for `module._name` uses)

        def add(dst, node, via, name=None, text=None, src=src):
            if dst is None or not (dst == package or dst.startswith(package + ".")):
                return
            rel = os.path.relpath(modules[src], root)
            entry = dict(
                src=src, dst=dst, name=name, line=node.lineno, via=via, text=text, where=f"{rel}:{node.lineno}"
            )
            imports.append(entry)
            if via in ("import", "from") and subpackage_inits:
                for parent in _parents(dst, package):
                    if parent != src and not src.startswith(parent + "."):
                        imports.append(dict(entry, dst=parent, name=None, via="parent"))

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        add(alias.name, node, "import", text=f"import {alias.name}")
                        # `import a.b` binds `a`; `import a.b as c` binds `c` to a.b
                        bound = alias.asname or alias.name.split(".")[0]
                        aliases[bound] = alias.name if alias.asname else alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve_from(src, node, modules)
                if target is None:
                    continue
                dots = "." * node.level + (node.module or "")
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    text = f"from {dots} import {alias.name}"
                    if sub in modules:  # `from . import x`: x is a submodule
                        add(sub, node, "from", text=text)
                        aliases[alias.asname or alias.name] = sub
                    elif target in modules:
                        add(target, node, "from", name=alias.name, text=text)
        # `m._name` where m is bound to a package module (also `lk.modules._name` through the root package); each
        # chain a.b.c once, from its outermost node
        inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or id(node) in inner:
                continue
            chain, cur = [node.attr], node.value
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if not isinstance(cur, ast.Name) or cur.id not in aliases:
                continue
            chain.reverse()  # the attributes after the name, outermost last
            mod = aliases[cur.id]
            for i, attr in enumerate(chain):
                if f"{mod}.{attr}" in modules and i < len(chain) - 1:
                    mod = f"{mod}.{attr}"
                    continue
                if attr.startswith("_") and not attr.startswith("__"):
                    add(mod, node, "attribute", name=attr, text=f"{cur.id}.{'.'.join(chain[: i + 1])}")
                break
    return modules, imports


# ------------------------------------------------------------------------------------------------- the two checks
def find_cycles(imports):
    """The strongly connected components with more than one module (or a module importing itself), each with one
    concrete cycle through it: a list of (cycles), each a list of import entries src -> dst closing the loop."""
    graph = {}
    for imp in imports:
        if imp["via"] == "attribute" or imp["src"] == imp["dst"]:
            continue
        graph.setdefault(imp["src"], {}).setdefault(imp["dst"], imp)
        graph.setdefault(imp["dst"], {})
    # Tarjan's strongly connected components (iterative: the graph is small, but recursion depth is not a concern
    # worth having in a test)
    index, low, on_stack, stack, sccs, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    sccs.append(sorted(comp))
    cycles = []
    for comp in sccs:
        members = set(comp)
        # shortest cycle through the component's first module (breadth-first inside the component)
        first = comp[0]
        prev, frontier, found = {first: None}, [first], None
        while frontier and found is None:
            nxt = []
            for node in frontier:
                for child in sorted(graph[node]):
                    if child == first:
                        found = node
                        break
                    if child in members and child not in prev:
                        prev[child] = node
                        nxt.append(child)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        path.reverse()  # first ... found, and found -> first closes it
        loop = path + [first]
        edges = [i for i in imports if i["via"] != "attribute" and i["src"] in members and i["dst"] in members]
        cycles.append({"modules": comp, "cycle": [graph[a][b] for a, b in zip(loop, loop[1:])], "edges": edges})
    return cycles


def find_private_uses(imports, shared=SHARED_INTERNALS):
    """Uses of another module's private name, and imports of underscore modules that are not shared internals."""
    found = []
    for imp in imports:
        if imp["via"] == "parent" or imp["src"] == imp["dst"]:
            continue
        name = imp["name"]
        if name is not None and name.startswith("_") and not name.startswith("__"):
            if imp["dst"] not in shared:
                found.append(imp)
        elif name is None and imp["via"] in ("import", "from"):
            last = imp["dst"].rpartition(".")[2]
            if last.startswith("_") and not last.startswith("__") and imp["dst"] not in shared:
                found.append(imp)  # an underscore module outside the shared internals
    return found


def format_cycles(cycles):
    def edge(imp):
        how = " (runs its __init__.py)" if imp["via"] == "parent" else ""
        return f"        {imp['src']} -> {imp['dst']}{how}   {imp['where']}: {imp['text']}"

    lines = []
    for c in cycles:
        lines.append(f"cycle among {len(c['modules'])} modules: {', '.join(c['modules'])}")
        lines.append("    for example:")
        lines += [edge(imp) for imp in c["cycle"]]
        # one line per import statement and target (`from .m import a, b` is one line)
        merged = {}
        for imp in sorted(c["edges"], key=lambda i: (i["src"], i["line"], i["dst"], i["via"])):
            key = (imp["src"], imp["line"], imp["dst"], imp["via"])
            if key in merged and imp["name"]:
                merged[key] = dict(merged[key], text=f"{merged[key]['text']}, {imp['name']}")
            else:
                merged.setdefault(key, imp)
        lines.append(f"    all {len(merged)} imports among them (a cut must break every loop):")
        lines += [edge(imp) for imp in merged.values()]
    return "\n".join(lines)


def format_private(found):
    return "\n".join(
        f"{imp['where']}: {imp['src']} uses {imp['dst']}"
        + (f".{imp['name']}" if imp["name"] else "")
        + f"   ({imp['text']})"
        for imp in sorted(found, key=lambda i: (i["src"], i["line"]))
    )


# ------------------------------------------------------------------------------------------------------- the tests
def test_import_graph_has_no_cycle():
    _, imports = read_imports(ROOT)
    cycles = find_cycles(imports)
    print(format_cycles(cycles))
    assert not cycles, f"{len(cycles)} import cycle(s):\n{format_cycles(cycles)}"


def test_no_module_uses_another_modules_private_names():
    _, imports = read_imports(ROOT)
    found = find_private_uses(imports)
    print(format_private(found))
    assert not found, f"{len(found)} use(s) of another module's private name:\n{format_private(found)}"


def test_reader_sees_the_package():
    """The reader finds the package's modules and their imports (else the checks above would pass on nothing)."""
    modules, imports = read_imports(ROOT)
    assert {"lora_kernels", "lora_kernels.modules", "lora_kernels.ops.lora_linear"} <= set(modules)
    assert any(i["src"] == "lora_kernels" and i["dst"] == "lora_kernels.modules" for i in imports)


# --------------------------------------------------------------------------- the checks can fail (a synthetic package)
def _write(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cycle_through_a_function_local_import_is_found(tmp_path):
    _write(
        tmp_path,
        {
            "lora_kernels/__init__.py": "from .a import f\n",
            "lora_kernels/a.py": "from .sub.b import g\n\ndef f():\n    return g()\n",
            "lora_kernels/sub/__init__.py": "",
            "lora_kernels/sub/b.py": "def g():\n    from ..a import f  # hidden in a function\n    return f\n",
            "lora_kernels/c.py": "from . import a\n",  # imports into the cycle, not part of it
        },
    )
    _, imports = read_imports(tmp_path)
    (cycle,) = find_cycles(imports)
    assert cycle["modules"] == ["lora_kernels.a", "lora_kernels.sub.b"]
    assert [(i["src"], i["dst"], i["line"]) for i in cycle["cycle"]] == [
        ("lora_kernels.a", "lora_kernels.sub.b", 1),
        ("lora_kernels.sub.b", "lora_kernels.a", 2),
    ]
    assert "lora_kernels/sub/b.py:2" in format_cycles([cycle])


def test_cycle_through_a_subpackage_init_is_found(tmp_path):
    """``from .sub.leaf import x`` runs sub/__init__.py, which imports a module that imports the importer."""
    _write(
        tmp_path,
        {
            "lora_kernels/__init__.py": "",
            "lora_kernels/top.py": "from .sub.leaf import x\n",
            "lora_kernels/sub/__init__.py": "from .high import y\n",
            "lora_kernels/sub/leaf.py": "x = 1\n",
            "lora_kernels/sub/high.py": "from .. import top\ny = 2\n",
        },
    )
    _, imports = read_imports(tmp_path)
    (cycle,) = find_cycles(imports)
    assert cycle["modules"] == ["lora_kernels.sub", "lora_kernels.sub.high", "lora_kernels.top"]
    assert any(i["via"] == "parent" for i in cycle["cycle"])
    assert find_cycles(read_imports(tmp_path, subpackage_inits=False)[1]) == []  # only through sub/__init__.py
    # an acyclic package: nothing found
    (tmp_path / "lora_kernels/sub/high.py").write_text("y = 2\n")
    assert find_cycles(read_imports(tmp_path)[1]) == []


def test_private_name_uses_are_found(tmp_path):
    _write(
        tmp_path,
        {
            "lora_kernels/__init__.py": "from .a import public\n",
            "lora_kernels/_backend.py": "_table = {}\n",
            "lora_kernels/_secret.py": "x = 1\n",
            "lora_kernels/a.py": "_helper = 1\npublic = 2\n__all__ = ['public']\n",
            "lora_kernels/b.py": (
                "from .a import _helper, public, __all__\n"  # 1: _helper is private; __all__ is not
                "from ._backend import _table\n"  # 2: allowed, a shared internal
                "from . import a as mod_a, _secret\n"  # 3: _secret is an underscore module outside the shared ones
                "import lora_kernels\n"
                "def f():\n"
                "    from .a import _helper as h  # 6: function-local counts\n"
                "    return mod_a._helper, lora_kernels.a._helper, mod_a.public, lora_kernels._backend._table\n"
            ),
        },
    )
    _, imports = read_imports(tmp_path)
    found = find_private_uses(imports)
    got = sorted((i["line"], i["via"], i["dst"], i["name"]) for i in found)
    assert got == [
        (1, "from", "lora_kernels.a", "_helper"),
        (3, "from", "lora_kernels._secret", None),
        (6, "from", "lora_kernels.a", "_helper"),
        (7, "attribute", "lora_kernels.a", "_helper"),
        (7, "attribute", "lora_kernels.a", "_helper"),
    ], got
    assert "lora_kernels/b.py:1: lora_kernels.b uses lora_kernels.a._helper" in format_private(found)
