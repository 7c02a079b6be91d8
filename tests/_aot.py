"""Ahead-of-time compilation of the Triton kernels for sm_90 on a machine without a GPU.

The parent test hands a script to ``run_child`` (a child process without TRITON_INTERPRET: the parent's kernels are
interpreter objects). The script calls the real launchers with the kernels swapped for ``Recorder``s, then compiles each
recorded launch with ``compile_for_sm90`` (the specialisation the JIT would use) and reads ptxas' report with
``ptxas_report``. Catches what the interpreter cannot: lowering errors in GPU-only code, shared memory over the
limit, register spills.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tempfile

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent


def run_child(script: str, tmp_path, timeout: int) -> str:
    """Run ``script`` with ``python -c`` without TRITON_INTERPRET, a fresh triton cache (compile for real, not from an
    earlier run's cache) and this repository and tests/ importable; assert it exits 0 and prints OK. Spills the child
    reported instead of failing (:func:`no_spills`) are printed here (seen with ``pytest -s``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in proc.stdout.splitlines():
        if line.startswith("SPILLS"):
            print(line)
    return proc.stdout


# ------------------------------------------------------------------------------------- used inside the child process
class Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` appends ``(kernel, grid, args, kwargs)`` to
    ``calls`` instead of launching."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, grid, args, kwargs))


def jit_function(kernel):
    """The JITFunction under a kernel's decorators (autotuner, heuristics)."""
    import triton

    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    return fn


def compile_for_sm90(kernel, args, kwargs):
    """Compile one recorded launch for sm_90; returns ``(compiled, consts)``.

    The keyword arguments of the launch are its constexprs (``num_warps`` / ``num_stages`` are the options); the
    rest is specialised as the JIT does: ints equal to 1 become constants, tensors and ints divisible by 16 get
    16-divisibility."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from benchmarks.jit_signature import specialise

    fn = jit_function(kernel)
    kwargs = dict(kwargs)
    launch = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    kwargs.pop("launch_pdl", None)  # a launch attribute (programmatic dependent launch), not part of the compile
    values = dict(zip(fn.arg_names, args), **kwargs)
    assert set(values) == set(fn.arg_names), sorted(set(fn.arg_names) ^ set(values))
    sig, consts, attrs = specialise(fn.arg_names, values, set(kwargs))  # the launch's keywords are its constexprs
    compiled = triton.compile(
        ASTSource(fn, sig, consts, attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": launch.get("num_warps", 4), "num_stages": launch.get("num_stages", 3)},
    )
    return compiled, consts


def no_spills(stores: int, loads: int, what) -> None:
    """Fail when ptxas reports spill stores or loads for a compiled kernel (``what`` names it). With
    ``LORA_KERNELS_AOT_SPILLS=report`` print them instead (to list every spill of a triton version in one run rather
    than stop at the first; CI fails on them with both the oldest and the newest supported triton)."""
    if stores == 0 and loads == 0:
        return
    if os.environ.get("LORA_KERNELS_AOT_SPILLS") == "report":
        print("SPILLS (reported, not failed):", what, stores, loads, flush=True)
        return
    raise AssertionError(("spills", what, stores, loads))


def _ptxas() -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path  # the ptxas triton itself uses for sm_90
    except (ImportError, TypeError):
        from triton.backends.nvidia.compiler import _path_to_binary

        return _path_to_binary("ptxas")[0]


def ptxas_report(compiled):
    """``(spill store bytes, spill load bytes, registers)`` of a compiled kernel, from ``ptxas -v`` on its PTX."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run(
            [_ptxas(), "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(d, "k.cubin")],
            capture_output=True,
            text=True,
        )
    assert out.returncode == 0, out.stderr
    st = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", out.stderr))
    ld = sum(int(v) for v in re.findall(r"(\d+) bytes spill loads", out.stderr))
    regs = max([int(v) for v in re.findall(r"Used (\d+) registers", out.stderr)] or [0])
    return st, ld, regs


def sass_of(compiled) -> str:
    """The SASS of a compiled kernel's cubin, by triton's bundled nvdisasm (HGMMA = wgmma, UTMALDG = TMA load)."""
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
