"""The source distribution carries what its own tests need, and installs.

Builds the sdist from a copy of the checkout (setuptools' PEP 517 hook, as ``python -m build --sdist`` calls it, but
without a network-fetched build environment), unpacks it, collects the whole test suite inside it (every test module
must import: conftest.py, benchmarks/ and README.md must be there), runs a few fast tests there against the unpacked
package, and builds a wheel from it (pure Python, CUDA extension off) to check that the wheel has the package and
nothing else.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "out",
    "__pycache__",
    "*.pyc",
    "*.so",
    "*.egg-info",
    ".pytest_cache",
    ".hypothesis",
    ".benchmarks",
    ".ci",
    "*.png",
    "*.csv",
)
# Set inside the unpacked sdist's test run, so that this module does not build an sdist of the sdist.
NESTED_ENV = "LORA_KERNELS_SDIST_UNDER_TEST"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get(NESTED_ENV) == "1", reason="already running inside the unpacked sdist"),
]


def _run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def sdist_tree(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdist")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    dist = tmp / "dist"
    dist.mkdir()
    name = (
        _run(
            [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"],
            cwd=src,
        )
        .strip()
        .splitlines()[-1]
    )
    archive = dist / name
    with tarfile.open(archive) as tar:
        members = tar.getnames()
        try:
            tar.extractall(tmp / "unpacked", filter="data")
        except TypeError:  # Python < 3.10.12 / 3.11.4: no extraction filters (our own archive: trusted)
            tar.extractall(tmp / "unpacked")
    (top,) = {m.split("/")[0] for m in members}
    return tmp / "unpacked" / top, archive, {m.split("/", 1)[1] for m in members if "/" in m}


def test_sdist_ships_what_the_tests_need(sdist_tree):
    tree, _, files = sdist_tree
    for need in (
        "tests/conftest.py",
        "tests/test_demo.py",
        "benchmarks/__init__.py",
        "benchmarks/common.py",
        "benchmarks/bench_lora_linear.py",
        "README.md",
        "pyproject.toml",
        "setup.py",
        "CMakeLists.txt",
        "csrc/bindings.cpp",
        "lora_kernels/demo.py",
        "lora_kernels/_progress.py",
    ):
        assert need in files, need
    assert not [f for f in files if f.endswith((".so", ".pyc"))]
    # every test module in the checkout is in the sdist
    tests = {f"tests/{f}" for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py")}
    assert tests <= files, tests - files


def _env(tree):
    env = dict(os.environ, PYTHONPATH=str(tree), TRITON_INTERPRET="1", **{NESTED_ENV: "1"})
    env.pop("PYTEST_ADDOPTS", None)
    return env


def test_sdist_test_suite_collects_and_runs(sdist_tree):
    tree, _, _ = sdist_tree
    env = _env(tree)
    # the unpacked package is the one imported (not the checkout's or an installed copy)
    where = _run(
        [sys.executable, "-c", "import lora_kernels, os; print(os.path.dirname(lora_kernels.__file__))"],
        cwd=tree,
        env=env,
    ).strip()
    assert os.path.realpath(where) == os.path.realpath(tree / "lora_kernels")
    out = _run(
        [sys.executable, "-m", "pytest", "tests", "-q", "--collect-only", "-p", "no:cacheprovider"], cwd=tree, env=env
    )
    assert "error" not in out.lower().split("\n")[-2], out[-2000:]
    out = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_benchmarks_smoke.py::test_geomean_floor_and_table",
            "tests/test_demo.py::test_demo_help_documents_every_option_with_its_default",
            "tests/test_modules.py",
            "-k",
            "geomean or help_documents or merge",
        ],
        cwd=tree,
        env=env,
    )
    assert " passed" in out and "failed" not in out and "error" not in out, out[-2000:]


def test_sdist_builds_a_wheel_with_the_package_only(sdist_tree, tmp_path):
    tree, archive, _ = sdist_tree
    env = dict(os.environ, LORA_KERNELS_BUILD_CUDA="0")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(archive),
        ],
        cwd=tmp_path,
        env=env,
    )
    (wheel,) = tmp_path.glob("lora_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lora_kernels/demo.py" in names and "lora_kernels/init/lora_ga.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    for req in (
        "Requires-Dist: torch>=2.11",
        "Requires-Dist: scikit-learn",
        "Requires-Python: >=3.10",
        "Provides-Extra: demo",
    ):
        assert req in text, req
