"""The suite as a GPU machine sees it, checked on the CPU: Triton kernels compiled, not interpreted.

On a machine without CUDA, conftest turns the Triton interpreter on, so a test that hands CPU tensors to the Triton
backend passes here and fails on every GPU machine (where nothing turns the interpreter on, and a run with -x stops
at the first such failure, before the GPU tests behind it). Running the suite's collection and the tests that
once made that mistake in a child process with TRITON_INTERPRET=0 reproduces the GPU machine's view: "0" is kept by
conftest's setdefault, and without CUDA such a test must then skip, not fail.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Test files that call a Triton backend with tensors on the fixture's device; each must pass or skip with the
# interpreter off. Add a file here when it gains such a test.
INTERPRETER_OFF_FILES = [
    "tests/test_bad_inputs.py",
    "tests/test_lora_linear_tma.py",
    "tests/test_lora_linear_launches.py",
    "tests/test_dropout_bits.py",
    "tests/test_dy_pass.py",
]


def _run_pytest(*args, timeout=600):
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_suite_collects_with_interpreter_off():
    # Import-time code (kernel definitions, autotune config lists, module-level skips) must not depend on the
    # interpreter being on.
    proc = _run_pytest("--collect-only", "tests", "benchmarks/test_bench_pytest.py")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " error" not in proc.stdout.splitlines()[-1], proc.stdout[-4000:]


@pytest.mark.parametrize("path", INTERPRETER_OFF_FILES)
def test_files_pass_with_interpreter_off(path):
    proc = _run_pytest(path, "-rs")
    out = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, out
    assert "failed" not in proc.stdout.splitlines()[-1], out
