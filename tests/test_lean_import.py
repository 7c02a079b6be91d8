"""Importing the package is lean: no Triton, no native extension, no device query.

``import lora_kernels`` (and importing any of its modules outside the Triton kernel files) must not import
``triton`` (slow, and ``TRITON_INTERPRET`` must still be settable before the first kernel is defined), must not load
the compiled CUDA extension (it loads on first use, and may be absent or broken), and must not query a device (an
import on a login node, in a forked DataLoader worker or before ``CUDA_VISIBLE_DEVICES`` is set must not create a
CUDA context or fail for want of a GPU). The kernel modules under ``lora_kernels/triton/`` import triton by design
and are the only exception.

Each check runs in a fresh interpreter, where torch's device functions are replaced before the first lora_kernels
import by ones that record the call (with its stack) and raise. The modules are found on disk, so a module added
later is checked too.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_kernels"
# Kernel modules: they define @triton.jit functions at import, so importing them imports triton.
TRITON_KERNEL_PACKAGE = "lora_kernels.triton"

# Imported in the subprocess: argv[1] is a JSON list of modules, imported in that order; prints a JSON report.
_PROBE = textwrap.dedent(
    r"""
    import importlib, importlib.machinery, json, os, sys, traceback

    import torch

    calls = []

    def _refuse(name):
        def refuse(*args, **kwargs):
            # the caller's frames, without the import machinery's
            frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<frozen")]
            calls.append({"function": name, "stack": "".join(traceback.format_list(frames[-12:]))})
            raise RuntimeError(f"device query during import: {name}")
        return refuse

    # Everything that asks the driver for devices or initializes CUDA (get_device_properties & co. go through
    # _lazy_init); torch.accelerator is torch's device-generic front end of the same queries.
    for owner, names in (
        (torch.cuda, ("is_available", "device_count", "current_device", "get_device_properties",
                      "get_device_capability", "get_device_name", "is_bf16_supported", "mem_get_info", "init",
                      "_lazy_init", "synchronize", "set_device")),
        (getattr(torch, "accelerator", None), ("is_available", "device_count", "current_accelerator",
                                                "current_device_index", "set_device_index")),
    ):
        for name in names:
            if owner is not None and hasattr(owner, name):
                setattr(owner, name, _refuse(f"{owner.__name__}.{name}"))

    package_dir = None
    report = []
    for module in json.loads(sys.argv[1]):
        before = len(calls)
        error = None
        try:
            importlib.import_module(module)
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
        if package_dir is None and "lora_kernels" in sys.modules:
            package_dir = os.path.dirname(os.path.abspath(sys.modules["lora_kernels"].__file__))
        native = sorted(
            name for name, mod in list(sys.modules.items())
            if package_dir and str(getattr(mod, "__file__", None) or "").endswith(
                tuple(importlib.machinery.EXTENSION_SUFFIXES))
            and os.path.abspath(mod.__file__).startswith(package_dir + os.sep)
        )
        report.append({
            "module": module,
            "error": error,
            "triton": sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))[:5],
            "native": native,
            "calls": calls[before:],
        })
    print("REPORT " + json.dumps({"package_dir": package_dir, "modules": report}))
    """
)


def _probe(modules, extra_path=None):
    """Imports ``modules`` in order in a fresh interpreter; returns the per-module report (cumulative sys.modules)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path or ""), str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(modules)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, (
        f"probe failed (exit {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    report = json.loads(lines[-1][len("REPORT ") :])
    assert report["package_dir"] is None or Path(report["package_dir"]) == PACKAGE, (
        f"the probe imported lora_kernels from {report['package_dir']}, not from this checkout"
    )
    return report["modules"]


def _package_modules():
    """Every module of the package found on disk, packages before their submodules, the kernel files left out."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if name.startswith(TRITON_KERNEL_PACKAGE + "."):
            continue
        names.append(name)
    return sorted(names, key=lambda n: (n.count("."), n))


def _problems(entry):
    out = []
    if entry["error"]:
        out.append(f"import failed: {entry['error']}")
    if entry["triton"]:
        out.append(f"imported triton ({', '.join(entry['triton'])})")
    if entry["native"]:
        out.append(f"loaded the native extension ({', '.join(entry['native'])})")
    for call in entry["calls"]:
        out.append(f"queried the device with {call['function']}():\n{call['stack']}")
    return out


def test_package_import_is_lean():
    """``import lora_kernels`` alone, in a fresh interpreter."""
    (entry,) = _probe(["lora_kernels"])
    problems = _problems(entry)
    assert not problems, "import lora_kernels: " + "\n".join(problems)


def test_every_module_import_is_lean():
    """Each module of the package (lora_kernels.modules, .io, .peft_compat, .ops.multi_lora, ...) imported in turn in
    one interpreter; the first import after which triton, the extension or a device call shows up is the culprit."""
    modules = _package_modules()
    # the public entry points a user imports must be among them (a renamed package dir would empty the list)
    for expected in ("lora_kernels", "lora_kernels.modules", "lora_kernels.ops", "lora_kernels.init"):
        assert expected in modules, (expected, modules)
    report = _probe(modules)
    found = {}
    for entry in report:
        problems = _problems(entry)
        if problems:
            found[entry["module"]] = problems
            break  # sys.modules is cumulative: later modules would all show what the first one loaded
    assert not found, "\n".join(f"import {m}: " + "\n".join(p) for m, p in found.items())


# ------------------------------------------------------------------------------------ the probe can see a violation
def test_probe_sees_triton_import():
    """A kernel module imports triton: the probe must report it (else the tests above could not fail)."""
    pytest.importorskip("triton")
    kernel = next(p for p in sorted((PACKAGE / "triton").glob("*.py")) if not p.name.startswith("_"))
    (entry,) = _probe([f"{TRITON_KERNEL_PACKAGE}.{kernel.stem}"])
    assert "triton" in entry["triton"], entry


def test_probe_sees_device_query(tmp_path):
    """A module that asks for the device count at import: the probe records the call and the import fails."""
    (tmp_path / "asks_for_devices.py").write_text("import torch\nN = torch.cuda.device_count()\n")
    (entry,) = _probe(["asks_for_devices"], extra_path=tmp_path)
    assert [c["function"] for c in entry["calls"]] == ["torch.cuda.device_count"], entry
    assert entry["error"] and "device query during import" in entry["error"], entry
    assert "asks_for_devices.py" in entry["calls"][0]["stack"]


def test_probe_sees_native_extension():
    """Importing the built extension: the probe must report it (runs where the install built it)."""
    import importlib.util

    spec = importlib.util.find_spec("lora_kernels._C_lora")
    if spec is None:
        pytest.skip("lora_kernels._C_lora is not built in this install (no CUDA toolkit at install time)")
    (entry,) = _probe(["lora_kernels._C_lora"])
    assert entry["native"] == ["lora_kernels._C_lora"], entry
