"""The optional CUDA extension (csrc/, lora_kernels._C_lora) and its loader (lora_kernels/extension.py;
lora_kernels.cuda is the same module under its former name).

On every machine: the sources compile through CMakeLists.txt (sm_80 and sm_90) when nvcc, cmake, ninja and pybind11
are present, so a compile error fails CI; the built module imports without a GPU and reports "no CUDA device" as a
Python exception instead of crashing; the loader skips, warns once, or disables as documented; setup.py's build step
honours LORA_KERNELS_BUILD_CUDA. With a GPU: the kernels against the float64 reference on odd sizes, both half
dtypes, strided and misaligned inputs, bad ids with a NaN fence around the pool, the multi-adapter ops with
backend="cuda" on the Triton tests' cases, CUDA graphs, and compute-sanitizer on a small case.
"""

from __future__ import annotations

import importlib.util
import math
import os
import runpy
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from _oracle import F64, multi_lora_in_dtype
from _replay import warm_up
from _tolerances import assert_close_to_oracle, close

from lora_kernels import _backend
from lora_kernels import extension as lkc
from lora_kernels.ops._batch import BatchMeta

from conftest import HAS_CUDA

ROOT = Path(__file__).resolve().parents[1]
NVCC = (
    os.environ.get("CUDACXX")
    or shutil.which("nvcc")
    or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
)


def _cuda_root():
    """The toolkit directory holding include/cuda_fp16.h (nvcc may be a wrapper script elsewhere)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if NVCC:
        cands.append(str(Path(NVCC).resolve().parents[1]))
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and (Path(c) / "include" / "cuda_fp16.h").exists():
            return Path(c)
    return None


def _tool(name):
    found = shutil.which(name)
    if found:
        return found
    try:
        mod = __import__(name)
    except ImportError:
        return None
    bin_dir = getattr(mod, "CMAKE_BIN_DIR", None) or getattr(mod, "BIN_DIR", None)
    cand = os.path.join(bin_dir, name) if bin_dir else None
    return cand if cand and os.path.exists(cand) else None


@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader with its cache cleared before and after (tests change MODULE_NAME and the environment)."""
    lkc._reset()
    yield lkc
    lkc._reset()


def _load_module_from(path: Path, name: str = "_C_lora"):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------- compile (CPU)
@pytest.fixture(scope="module")
def built_module(tmp_path_factory):
    """Configure and build the extension with CMake + Ninja into a temporary directory (sm_80 and sm_90)."""
    cmake, ninja = _tool("cmake"), _tool("ninja")
    missing = [n for n, v in (("nvcc", NVCC), ("cmake", cmake), ("ninja", ninja)) if v is None]
    if importlib.util.find_spec("pybind11") is None:
        missing.append("pybind11")
    if missing:
        pytest.skip(f"cannot compile the CUDA extension here: {', '.join(missing)} not found")
    import pybind11

    tmp = tmp_path_factory.mktemp("cuda_ext")
    out = tmp / "out"
    configure = [
        cmake,
        "-S",
        str(ROOT),
        "-B",
        str(tmp / "build"),
        "-G",
        "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={ninja}",
        f"-DCMAKE_CUDA_COMPILER={NVCC}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        f"-DLORA_KERNELS_OUTPUT_DIR={out}",
        "-DCMAKE_CUDA_ARCHITECTURES=80;90",
    ]
    for cmd in (configure, [cmake, "--build", str(tmp / "build")]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    built = sorted(out.glob("_C_lora*"))
    assert len(built) == 1, f"expected one built module in {out}, found {built}"
    return built[0]


def test_extension_compiles_and_imports_without_gpu(built_module):
    mod = _load_module_from(built_module)
    assert mod.CUDA_ARCHS == "80,90"
    assert mod.MAX_SLICES == lkc.MAX_SLICES
    assert (mod.DTYPE_FLOAT32, mod.DTYPE_FLOAT16, mod.DTYPE_BFLOAT16) == (
        lkc.DTYPE_CODES[torch.float32],
        lkc.DTYPE_CODES[torch.float16],
        lkc.DTYPE_CODES[torch.bfloat16],
    )
    assert (mod.INDEX_INT32, mod.INDEX_INT64) == (lkc.INDEX_CODES[torch.int32], lkc.INDEX_CODES[torch.int64])
    assert mod.runtime_version() >= 12000
    assert issubclass(mod.CudaError, RuntimeError)


@pytest.fixture(scope="module")
def some_module_path(request):
    """The freshly built module if this machine can build it, else the installed one."""
    spec = importlib.util.find_spec(lkc.MODULE_NAME)
    try:
        return request.getfixturevalue("built_module")
    except pytest.skip.Exception:
        if spec is None or not spec.origin:
            raise
        return Path(spec.origin)


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour on a machine without a GPU")
def test_device_query_without_gpu_is_a_clean_error(some_module_path):
    built_module = some_module_path
    # In a subprocess: a crash (segfault, abort) would show as a signal instead of killing the test run.
    code = textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("_C_lora", {str(built_module)!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        try:
            n = mod.device_count()
        except mod.CudaError as exc:
            print("ERR", exc)
        else:
            print("COUNT", n)
        # Nothing is launched when there is no work, so these return without touching the driver; a real launch
        # raises the runtime's error as CudaError.
        mod.shrink(x=0, x_strides=(0, 1), M=0, K=8, dtype=1, a_slices=[(0, 0, 0, 1)], L=1, r_max=8, ids=0,
                   stride_id=1, ids_type=0, ranks=0, ranks_type=0, scales=0, scale_strides=(0, 0), out=0,
                   out_strides=(0, 0, 1), out_dtype=0, device=0, stream=0)
        try:
            mod.expand(buf=16, buf_strides=(8, 8, 1), buf_dtype=0, M=1, r_max=8, b_slices=[(16, 64, 8, 1, 8, 0)],
                       y=16, y_strides=(8, 1), dtype=1, L=1, ids=16, stride_id=1, ids_type=0, ranks=0, ranks_type=0,
                       scales=0, scale_strides=(0, 0), device=0, stream=0)
        except mod.CudaError as exc:
            print("LAUNCH", exc)
        try:
            mod.shrink(x=16, x_strides=(8, 1), M=1, K=8, dtype=7, a_slices=[(16, 0, 0, 1)], L=1, r_max=8, ids=16,
                       stride_id=1, ids_type=0, ranks=0, ranks_type=0, scales=0, scale_strides=(0, 0), out=16,
                       out_strides=(8, 8, 1), out_dtype=0, device=0, stream=0)
        except mod.CudaError as exc:
            print("ARG", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    assert lines[0] in ("COUNT 0",) or lines[0].startswith("ERR no CUDA device"), proc.stdout
    assert any(line.startswith("LAUNCH CUDA error") for line in lines), proc.stdout
    assert any(line.startswith("ARG") and "dtype" in line for line in lines), proc.stdout


def test_installed_module_if_built(fresh_loader):
    """When the package was installed with the extension (pip install -e . with a toolkit), it is importable as
    lora_kernels._C_lora and reports availability without crashing."""
    if importlib.util.find_spec(lkc.MODULE_NAME) is None:
        pytest.skip("lora_kernels._C_lora is not built in this install (no CUDA toolkit at install time)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a built module must load without the failure warning
        reason = fresh_loader.cuda_ops_unavailable_reason()
    assert fresh_loader.cuda_ops_available() is (reason is None)
    if HAS_CUDA:
        assert reason is None
    else:
        assert reason is not None and reason.startswith("no CUDA device"), reason


# --------------------------------------------------------------------------------------------------- the loader
def test_package_import_loads_no_extension():
    code = (
        "import sys, lora_kernels, lora_kernels.cuda, lora_kernels.ops.multi_lora; "
        "print('lora_kernels._C_lora' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_disabled_by_env(fresh_loader, monkeypatch):
    monkeypatch.setenv(lkc.DISABLE_ENV, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reason = fresh_loader.cuda_ops_unavailable_reason()
        available = fresh_loader.cuda_ops_available()
    assert available is False  # a bool: `if lk.cuda_ops_available():` must be False here
    assert reason is not None and lkc.DISABLE_ENV in reason
    with pytest.raises(RuntimeError, match=lkc.DISABLE_ENV):
        fresh_loader.extension()


def test_not_built_gives_reason_without_warning(fresh_loader, monkeypatch):
    monkeypatch.delenv(lkc.DISABLE_ENV, raising=False)
    monkeypatch.setattr(lkc, "MODULE_NAME", "lora_kernels._C_lora_never_built")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reason = fresh_loader.cuda_ops_unavailable_reason()
        assert fresh_loader.cuda_ops_available() is False
    assert reason is not None and "not built" in reason


def test_broken_module_warns_once_then_falls_back(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.delenv(lkc.DISABLE_ENV, raising=False)
    (tmp_path / "_lk_broken_ext.py").write_text("raise ImportError('undefined symbol: _ZN9lora_cuda5bogusEv')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(lkc, "MODULE_NAME", "_lk_broken_ext")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reasons = [fresh_loader.cuda_ops_unavailable_reason() for _ in range(3)]
        assert fresh_loader.cuda_ops_available() is False
        # The backend chooser then takes the next backend ("triton" on a GPU; "torch" stands in for it here).
        chosen = _backend.select(
            "multi_lora_linear",
            "auto",
            {"cuda": lambda *a: lkc.cuda_ops_unavailable_reason(), "torch": lambda *a: None},
            ("cuda", "torch"),
        )
        with pytest.raises(_backend.BackendError, match="failed to load"):
            _backend.select(
                "multi_lora_linear", "cuda", {"cuda": lambda *a: lkc.cuda_ops_unavailable_reason()}, ("cuda",)
            )
    assert chosen == "torch"
    assert all(r == reasons[0] for r in reasons)
    assert "failed to load" in reasons[0] and "undefined symbol" in reasons[0]
    mine = [w for w in caught if "failed to load" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    assert issubclass(mine[0].category, RuntimeWarning)


def test_ops_report_cuda_reason_on_cpu_tensors():
    from lora_kernels.ops import multi_lora as ops

    assert ops.BACKENDS.checks["cuda"](torch.zeros(2, 3)) is not None


def test_wrappers_validate_before_calling_the_extension():
    """Argument errors are raised in Python (naming the argument) before any pointer reaches the extension."""
    x = torch.zeros(3, 16, dtype=torch.float16)
    A = torch.zeros(2, 8, 16, dtype=torch.float16)
    ids = torch.zeros(3, dtype=torch.int32)
    out = torch.zeros(1, 3, 8)
    with pytest.raises(ValueError, match=r"A_slices\[0\] must be \[L, R, K=16\]"):
        lkc.bgmv_shrink(x, [A[:, :, :15]], ids, out)
    with pytest.raises(ValueError, match=r"out must be \[S=1, M=3, R=8\]"):
        lkc.bgmv_shrink(x, [A], ids, out[:, :2])
    with pytest.raises(ValueError, match="token_slots"):
        lkc.bgmv_shrink(x, [A], ids[:2], out)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        lkc.bgmv_shrink(x, [A], ids, out)
    with pytest.raises(TypeError, match="int32 or int64"):
        lkc.bgmv_shrink(x, [A], ids.float(), out)
    B = torch.zeros(2, 5, 8, dtype=torch.float16)
    y = torch.zeros(3, 10, dtype=torch.float16)
    with pytest.raises(ValueError, match="overlap"):
        lkc.bgmv_expand(torch.zeros(2, 3, 8), [B, B], ids, y, y_offsets=[0, 3])
    with pytest.raises(ValueError, match="outside"):
        lkc.bgmv_expand(torch.zeros(2, 3, 8), [B, B], ids, y, y_offsets=[0, 6])
    with pytest.raises(ValueError, match="y's dtype"):
        lkc.bgmv_expand(torch.zeros(1, 3, 8), [B.float()], ids, y)
    with pytest.raises(ValueError, match="scales"):
        lkc.bgmv_expand(torch.zeros(1, 3, 8), [B], ids, y, scales=torch.ones(2))


# ------------------------------------------------------------------------------------------- setup.py build step
def _setup_module():
    """setup.py's namespace without running setup()."""
    import setuptools

    captured = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        ns = runpy.run_path(str(ROOT / "setup.py"), run_name="not_main")
    finally:
        setuptools.setup = real
    return ns, captured


def _run_build_ext(ns, captured, monkeypatch, tmp_path, nvcc):
    from setuptools import Distribution

    monkeypatch.chdir(ROOT)
    dist = Distribution({"name": "lora_kernels", "ext_modules": captured["ext_modules"]})
    cmd = ns["CMakeBuild"](dist)
    cmd.build_lib = str(tmp_path / "lib")
    cmd.build_temp = str(tmp_path / "tmp")
    cmd.ensure_finalized()
    calls = []
    cmd.run.__func__.__globals__["_find_nvcc"] = lambda: nvcc
    monkeypatch.setattr(cmd, "_build_cmake", lambda ext, nv: calls.append((ext.name, nv)))
    cmd.run()
    return calls


def test_setup_build_cuda_env(monkeypatch, tmp_path):
    ns, captured = _setup_module()
    assert [e.name for e in captured["ext_modules"]] == ["lora_kernels._C_lora"]
    assert captured["cmdclass"]["build_ext"] is ns["CMakeBuild"]
    monkeypatch.setenv("LORA_KERNELS_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="no CUDA toolkit"):
        _run_build_ext(ns, captured, monkeypatch, tmp_path, None)
    monkeypatch.delenv("LORA_KERNELS_BUILD_CUDA")
    assert _run_build_ext(ns, captured, monkeypatch, tmp_path, None) == []  # pure-Python install
    assert _run_build_ext(ns, captured, monkeypatch, tmp_path, "/x/nvcc") == [("lora_kernels._C_lora", "/x/nvcc")]
    monkeypatch.setenv("LORA_KERNELS_BUILD_CUDA", "0")
    assert _run_build_ext(ns, captured, monkeypatch, tmp_path, "/x/nvcc") == []
    monkeypatch.setenv("LORA_KERNELS_BUILD_CUDA", "maybe")
    with pytest.raises(RuntimeError, match="must be 0, 1 or auto"):
        _run_build_ext(ns, captured, monkeypatch, tmp_path, "/x/nvcc")


# ------------------------------------------------------------------------------------------------------ GPU only
needs_ext = pytest.mark.skipif(
    not HAS_CUDA or importlib.util.find_spec(lkc.MODULE_NAME) is None,
    reason="needs a CUDA device and the built extension (python setup.py build_ext --inplace)",
)


def _poison_padding(A_cpu, B_cpu, ranks, S, R):
    """NaN in the rows/columns past each slot's rank: kernels must never read them."""
    for l, r in enumerate(ranks):
        for s in range(S):
            A_cpu[l, s * R + r : (s + 1) * R] = float("nan")
        B_cpu[l, :, r:] = float("nan")


def _check_case(device, M, K, slices, L, R, dtype, misaligned=False, seed=0, tiled=False, tile_m=16):
    """multi_lora_shrink + multi_lora_expand of lora_kernels.cuda against the reference: a NaN fence around the pool
    (slots -1 and L), NaN in the padding past each rank, an empty slot, bad ids (-5, L, L + 1000), out pre-filled
    with NaN (every element must be written), tokens without adapter left bit-identical. ``tiled``: through the
    tiled kernels and a LoRABatch work list (else the per-token kernels)."""
    from lora_kernels.pool import LoRABatch
    from lora_kernels.reference import multi_lora as ref

    gen = torch.Generator().manual_seed(seed * 1000 + M * 31 + K)
    S, N = len(slices), sum(slices)
    ranks_l = [int(v) for v in torch.randint(1, R + 1, (L,), generator=gen)]
    ranks_l[L // 2] = 0  # an empty slot
    A_cpu = torch.randn(L, S * R, K, generator=gen) / math.sqrt(K)
    B_cpu = torch.randn(L, N, R, generator=gen)
    _poison_padding(A_cpu, B_cpu, ranks_l, S, R)
    fence_A = torch.full((L + 2, S * R, K), float("nan"))
    fence_A[1 : L + 1] = A_cpu
    fence_B = torch.full((L + 2, N, R), float("nan"))
    fence_B[1 : L + 1] = B_cpu
    A = fence_A.to(device, dtype)[1 : L + 1]
    B = fence_B.to(device, dtype)[1 : L + 1]
    ranks = torch.tensor(ranks_l, dtype=torch.int32, device=device)
    scales = (torch.rand(L, S, generator=gen) + 0.5).to(device)
    ids_l = [int(v) for v in torch.randint(-1, L, (M,), generator=gen)]
    for i, bad in enumerate((-5, L, L + 1000)[: max(0, M - 2)]):
        ids_l[i] = bad  # bad ids: no adapter, nothing read
    ids = torch.tensor(ids_l, dtype=torch.int32, device=device)
    xbig = torch.randn(M, K + 1, generator=gen).to(device, dtype)
    x = xbig[:, 1:] if misaligned else xbig[:, :K].contiguous()

    lists = (None, None, None)
    if tiled:
        batch = LoRABatch.prepare(ids_l, device=device, tile_m=tile_m)
        lists = (batch.sorted_tokens, batch.sorted_slots, batch.tile_starts)
    used = []
    real_tiles_for = lkc._tiles_for

    def spy(*args):
        got = real_tiles_for(*args)
        used.append(got is not None)
        return got

    saved = lkc.TILED_MIN_TOKENS_PER_SLOT
    lkc.TILED_MIN_TOKENS_PER_SLOT = 0.0 if tiled else float("inf")
    lkc._tiles_for = spy
    try:
        out = torch.full((M, S * R), float("nan"), device=device)  # every element must be written
        lkc.multi_lora_shrink(x, A, ranks, BatchMeta(ids, *lists), out, S, tile_m)
        y0 = torch.randn(M, N, generator=gen).to(device, dtype)
        y = y0.clone()
        lkc.multi_lora_expand(out, B, ranks, scales, BatchMeta(ids, *lists), y, slices, tile_m)
    finally:
        lkc.TILED_MIN_TOKENS_PER_SLOT = saved
        lkc._tiles_for = real_tiles_for
    assert used == [tiled, tiled]
    want_s = ref.lora_shrink(x.cpu(), A.cpu(), ids.cpu(), ranks.cpu(), S, acc_dtype=torch.float64)
    torch.testing.assert_close(out.cpu().double(), want_s, **close(torch.float32))
    want_y = ref.lora_expand(want_s, B.cpu().double(), ids.cpu(), ranks.cpu(), scales.cpu(), y0.cpu().double(), slices)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.cpu().double(), want_y, **close(dtype))
    untouched = torch.tensor([not (0 <= i < L and ranks_l[i] > 0) for i in ids_l])
    assert torch.equal(y.cpu()[untouched], y0.cpu()[untouched])


# ----------------------------------------------------------------------------------- kernels under host emulation
@pytest.fixture(scope="module")
def emu_module(tmp_path_factory):
    """csrc/ compiled by the host C++ compiler with -DLORA_CUDA_EMULATION (csrc/emu/cuda_emu.h: one host thread per
    CUDA thread, barriers for __syncthreads and shuffles): the real kernel and launcher code, run on CPU memory."""
    cxx = shutil.which("g++") or shutil.which("c++")
    cuda_root = _cuda_root()
    if cxx is None or cuda_root is None or not (cuda_root / "include" / "cuda_fp16.h").exists():
        pytest.skip("host emulation needs g++ and the CUDA toolkit headers")
    if importlib.util.find_spec("pybind11") is None:
        pytest.skip("host emulation needs pybind11")
    import sysconfig

    import pybind11

    lib = next(
        (d for d in ("lib64", "lib", "targets/x86_64-linux/lib") if (cuda_root / d / "libcudart_static.a").exists()),
        None,
    )
    if lib is None:
        pytest.skip("libcudart_static.a not found in the CUDA toolkit")
    out = tmp_path_factory.mktemp("cuda_emu") / ("_C_lora_emu" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [
        cxx,
        "-O1",
        "-std=c++20",
        "-shared",
        "-fPIC",
        "-DLORA_CUDA_EMULATION",
        "-DLORA_CUDA_MODULE_NAME=_C_lora_emu",
        f"-I{ROOT / 'csrc'}",
        f"-I{cuda_root / 'include'}",
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{pybind11.get_include()}",
        "-x",
        "c++",
        str(ROOT / "csrc" / "bindings.cpp"),
        str(ROOT / "csrc" / "bgmv_shrink.cu"),
        str(ROOT / "csrc" / "bgmv_expand.cu"),
        "-x",
        "none",
        f"-L{cuda_root / lib}",
        "-lcudart_static",
        "-ldl",
        "-lrt",
        "-lpthread",
        "-o",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"
    mod = _load_module_from(out, "_C_lora_emu")
    assert mod.CUDA_ARCHS == "", "the emulation build must be a module of its own"
    return mod


@pytest.fixture
def emulated(emu_module, monkeypatch):
    """lora_kernels.cuda talking to the emulated module with CPU tensors (device 0, stream 0)."""
    monkeypatch.setattr(lkc, "extension", lambda: emu_module)
    monkeypatch.setattr(lkc, "cuda_ops_available", lambda: True)
    monkeypatch.setattr(lkc, "cuda_ops_unavailable_reason", lambda: None)
    monkeypatch.setattr(lkc, "_check_cuda", lambda **tensors: 0)
    monkeypatch.setattr(lkc, "_stream", lambda device: 0)
    return emu_module


EMU_SHAPES = [
    # (M, K, slices, L, R): small, since every CUDA thread is a host thread
    (5, 33, [17], 3, 8),  # K % 8 != 0 (vector loop + scalar tail), one lane per output column
    (4, 64, [40, 8, 8], 4, 16),  # three slices of unequal widths
    (16, 24, [20], 3, 64),  # M·S·R >= 1024: four rank rows per block; 8 lanes per column; full tiles of 16
    (3, 16, [9], 2, 12),  # R % 8 != 0: scalar expand for half types
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,K,slices,L,R", EMU_SHAPES)
def test_emulated_kernels_match_reference(emulated, M, K, slices, L, R, dtype):
    _check_case("cpu", M, K, slices, L, R, dtype)
    _check_case("cpu", M, K, slices, L, R, dtype, tiled=True, seed=2)
    if dtype == torch.float16:  # misaligned x: the scalar shrink path; a wider tile (two passes of 8 per tile)
        _check_case("cpu", M, K, slices, L, R, dtype, misaligned=True, seed=1)
        _check_case("cpu", M, K, slices, L, R, dtype, misaligned=True, seed=3, tiled=True, tile_m=32)


def test_emulated_strided_int64_ids_all_none(emulated):
    """Column-strided x and y (scalar paths), int64 ids, and an all -1 batch (zeros out, y bit-identical)."""
    from lora_kernels.reference import multi_lora as ref

    gen = torch.Generator().manual_seed(3)
    M, K, N, L, R = 6, 20, 12, 3, 8
    A = (torch.randn(L, R, K, generator=gen) / math.sqrt(K)).half()
    B = torch.randn(L, N, R, generator=gen).half()
    ranks = torch.tensor([8, 5, 1], dtype=torch.int32)
    scales = torch.tensor([[0.5], [2.0], [1.0]])
    ids = torch.tensor([0, 1, 2, -1, 2, 1], dtype=torch.int64)
    x = torch.randn(M, 2 * K, generator=gen).half()[:, ::2]
    out = torch.full((M, R), float("nan"))
    lkc.multi_lora_shrink(x, A, ranks, BatchMeta(ids, None, None, None), out, 1, 16)
    want_s = ref.lora_shrink(x, A, ids, ranks, 1, acc_dtype=torch.float64)
    torch.testing.assert_close(out.double(), want_s, **close(torch.float32))
    y = torch.randn(M, 2 * N, generator=gen).half()[:, ::2]
    y0 = y.clone()
    lkc.multi_lora_expand(out, B, ranks, scales, BatchMeta(ids, None, None, None), y, [N], 16)
    want_y = ref.lora_expand(want_s, B.double(), ids, ranks, scales, y0.double())
    torch.testing.assert_close(y.double(), want_y, **close(torch.float16))
    none = torch.full((M,), -1, dtype=torch.int32)
    lkc.multi_lora_shrink(x, A, ranks, BatchMeta(none, None, None, None), out, 1, 16)
    assert torch.equal(out, torch.zeros(M, R))
    y0 = y.clone()
    lkc.multi_lora_expand(out, B, ranks, scales, BatchMeta(none, None, None, None), y, [N], 16)
    assert torch.equal(y, y0)


@pytest.mark.parametrize("fused", [False, True])
def test_emulated_backend_cuda_through_the_ops(emulated, monkeypatch, fused):
    """lk.multi_lora_linear(backend="cuda") end to end (custom ops, pool and batch layout, mixed ranks, a float32 pool
    with half activations) with the emulated kernels."""
    import lora_kernels as lk
    from lora_kernels.ops import multi_lora as ops
    from lora_kernels.pool import AdapterPool, LoRABatch
    from lora_kernels.reference import multi_lora as ref

    monkeypatch.setitem(ops.BACKENDS.checks, "cuda", lambda *a: None)
    gen = torch.Generator().manual_seed(11)
    K, slices = 24, [16, 8, 8]
    for pool_dtype, x_dtype in ((torch.float16, torch.float16), (torch.float32, torch.bfloat16)):
        pool = AdapterPool(4, 16, K, slices, dtype=pool_dtype)
        for name, r in (("a", 16), ("b", 3)):
            pool.load(
                name,
                [torch.randn(r, K, generator=gen) / math.sqrt(K) for _ in slices],
                [torch.randn(n, r, generator=gen) for n in slices],
                alpha=2.0 * r,
            )
        W = (torch.randn(sum(slices), K, generator=gen) / math.sqrt(K)).to(x_dtype)
        x = torch.randn(5, K, generator=gen).to(x_dtype)
        ids = [0, -1, 1, 1, 0]
        got = lk.multi_lora_linear(x, W, None, pool, LoRABatch.prepare(ids), backend="cuda", fused=fused)
        want = ref.multi_lora_linear(
            x, W, None, pool.A_stack, pool.B_stack, pool.ranks, pool.scales, torch.tensor(ids), slices, **F64
        )
        assert got.dtype == x_dtype
        torch.testing.assert_close(got.double(), want, **close(x_dtype))


@pytest.mark.parametrize("fused", [False, True])
def test_emulated_fp16_shrink_beyond_fp16_range(emulated, monkeypatch, fused):
    """The shrink result stays fp32 up to the expand: x·Aᵀ = 102400 (past fp16's 65504) with a finite output of a
    few hundred, fp16 data, backend="cuda" (the case of tests/test_multi_lora_serving.py)."""
    from test_multi_lora_serving import overflow_case, overflow_want

    import lora_kernels as lk
    from lora_kernels.ops import multi_lora as ops
    from lora_kernels.pool import LoRABatch

    monkeypatch.setitem(ops.BACKENDS.checks, "cuda", lambda *a: None)
    pool, weight, x, ids = overflow_case(device="cpu")
    want = overflow_want(pool, weight, x, ids)
    got = lk.multi_lora_linear(x, weight, None, pool, LoRABatch.prepare(ids), backend="cuda", fused=fused)
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(got.double(), want, **close(torch.float16))


def test_emulated_opcheck_custom_ops_backend_cuda(emulated):
    """The CUDA backend behind the same torch.library custom ops: schema, fake impls and mutation declarations hold
    (torch.library.opcheck) with the emulated kernels, per-token and tiled."""
    from lora_kernels.ops import multi_lora as ops
    from lora_kernels.pool import AdapterPool, LoRABatch

    gen = torch.Generator().manual_seed(21)
    K, slices, R = 16, [8, 4], 8
    pool = AdapterPool(3, R, K, slices, dtype=torch.float16)
    for name, r in (("a", R), ("b", 3)):
        pool.load(
            name, [torch.randn(r, K, generator=gen) for _ in slices], [torch.randn(n, r, generator=gen) for n in slices]
        )
    batch = LoRABatch.prepare([0, -1, 1, 1, 0, 1, 0], max_tokens=8)
    meta = batch.meta
    x = torch.randn(7, K, generator=gen).half()
    for min_per_slot in (float("inf"), 0.0):  # per-token kernels, then tiled
        saved = lkc.TILED_MIN_TOKENS_PER_SLOT
        lkc.TILED_MIN_TOKENS_PER_SLOT = min_per_slot
        try:
            s_buf = torch.zeros(7, 2 * R)
            torch.library.opcheck(ops._shrink_op, (x, pool.A_stack, pool.ranks, *meta, s_buf, 2, batch.tile_m, "cuda"))
            y = torch.randn(7, sum(slices), generator=gen).half()
            torch.library.opcheck(
                ops._expand_op, (s_buf, pool.B_stack, pool.ranks, pool.scales, *meta, y, slices, batch.tile_m, "cuda")
            )
            torch.library.opcheck(
                ops._fused_op,
                (x, pool.A_stack, pool.B_stack, pool.ranks, pool.scales, *meta, y, slices, batch.tile_m, "cuda"),
            )
        finally:
            lkc.TILED_MIN_TOKENS_PER_SLOT = saved


GPU_SHAPES = [
    # (M, K, slices, L, R)
    (1, 4096, [4096], 16, 16),
    (7, 33, [100], 3, 8),
    (16, 100, [33, 7, 7], 5, 16),
    (64, 1000, [512, 128, 128], 9, 64),
    (130, 256, [1], 4, 24),
    (256, 4096, [4096], 128, 8),
]


@needs_ext
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,K,slices,L,R", GPU_SHAPES)
def test_gpu_shrink_expand_match_reference(M, K, slices, L, R, dtype):
    assert lkc.cuda_ops_available() is True, lkc.cuda_ops_unavailable_reason()
    _check_case("cuda", M, K, slices, L, R, dtype)
    _check_case("cuda", M, K, slices, L, R, dtype, misaligned=True, seed=1)
    for tile_m in (16, 64):
        _check_case("cuda", M, K, slices, L, R, dtype, tiled=True, tile_m=tile_m, seed=tile_m)


@needs_ext
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_strided_misaligned_and_all_none(dtype):
    """Inputs that rule out 16-byte loads (column stride 2, offset by one element, K % 8 != 0) take the checked
    scalar path; an all -1 batch writes zeros to out and leaves y bit-identical."""
    from lora_kernels.reference import multi_lora as ref

    gen = torch.Generator().manual_seed(3)
    M, K, N, L, R = 9, 77, 50, 3, 12
    A = (torch.randn(L, R, K, generator=gen) / math.sqrt(K)).to("cuda", dtype)
    B = torch.randn(L, N, R, generator=gen).to("cuda", dtype)
    ranks = torch.tensor([12, 5, 1], dtype=torch.int32, device="cuda")
    scales = torch.tensor([[0.5], [2.0], [1.0]], device="cuda")
    ids = torch.tensor([0, 1, 2, -1, 2, 1, 0, 0, 1], dtype=torch.int64, device="cuda")  # int64 ids too
    base = torch.randn(M, 2 * K + 1, generator=gen).to("cuda", dtype)
    for x in (base[:, 1 : K + 1], base[:, : 2 * K : 2]):  # misaligned start; column stride 2
        out = torch.full((M, R), float("nan"), device="cuda")
        lkc.multi_lora_shrink(x, A, ranks, BatchMeta(ids, None, None, None), out, 1, 16)
        want_s = ref.lora_shrink(x.cpu(), A.cpu(), ids.cpu(), ranks.cpu(), 1, acc_dtype=torch.float64)
        torch.testing.assert_close(out.cpu().double(), want_s, **close(torch.float32))
        ybig = torch.randn(M, 2 * N, generator=gen).to("cuda", dtype)
        y = ybig[:, ::2]  # strided y
        y0 = y.clone()
        lkc.multi_lora_expand(out, B, ranks, scales, BatchMeta(ids, None, None, None), y, [N], 16)
        want_y = ref.lora_expand(want_s, B.cpu(), ids.cpu(), ranks.cpu(), scales.cpu(), y0.cpu().double())
        y_lowp = ref.lora_expand(
            want_s.to(dtype), B.cpu(), ids.cpu(), ranks.cpu(), scales.cpu(), y0.cpu().clone(), acc_dtype=dtype
        )
        assert_close_to_oracle(y, y_lowp, want_y)
    none = torch.full((M,), -1, dtype=torch.int32, device="cuda")
    out = torch.full((M, R), float("nan"), device="cuda")
    lkc.multi_lora_shrink(base[:, :K], A, ranks, BatchMeta(none, None, None, None), out, 1, 16)
    assert torch.equal(out.cpu(), torch.zeros(M, R))
    y = torch.randn(M, N, generator=gen).to("cuda", dtype)
    y0 = y.clone()
    lkc.multi_lora_expand(out, B, ranks, scales, BatchMeta(none, None, None, None), y, [N], 16)
    assert torch.equal(y, y0)


@needs_ext
@pytest.mark.gpu
def test_gpu_ops_backend_cuda_on_triton_cases():
    """lk.multi_lora_linear(backend="cuda") on the cases of tests/test_multi_lora.py's Triton test."""
    import test_multi_lora as tml

    import lora_kernels as lk
    from lora_kernels.pool import LoRABatch

    for T, pattern, slices, fused, lead in tml.CASES:
        gen = torch.Generator().manual_seed(T * 7 + len(pattern))
        ranks = tml.MIXED_RANKS * 6 if pattern == "distinct" else tml.MIXED_RANKS
        pool, adapters = tml._make_pool(len(ranks) + 2, 64, ranks, slices=slices, seed=T, device="cuda")
        N = sum(slices)
        weight = (torch.randn(N, tml.K, generator=gen) / math.sqrt(tml.K)).cuda()
        bias = torch.randn(N, generator=gen).cuda()
        ids = tml._ids(pattern, T, sorted(adapters), gen)
        rows = math.prod(lead) if lead else 1
        ids = (ids * rows)[: T * rows]
        x = torch.randn(*lead, T, tml.K, generator=gen).cuda() if lead else torch.randn(T, tml.K, generator=gen).cuda()
        batch = LoRABatch.prepare(ids, device="cuda")
        got = lk.multi_lora_linear(x, weight, bias, pool, batch, backend="cuda", fused=fused)
        want = tml._naive(
            x.cpu(),
            weight.cpu(),
            bias.cpu(),
            {s: ([t.cpu() for t in a], [t.cpu() for t in b], sc) for s, (a, b, sc) in adapters.items()},
            ids,
            slices,
        )
        torch.testing.assert_close(got.cpu().double(), want, **close(torch.float32))
    for dtype in (torch.float16, torch.bfloat16):
        gen = torch.Generator().manual_seed(5)
        pool, adapters = tml._make_pool(6, 16, [16, 8, 1], dtype=dtype, device="cuda")
        weight = (torch.randn(sum(tml.SLICES), tml.K, generator=gen) / math.sqrt(tml.K)).to("cuda", dtype)
        x = torch.randn(21, tml.K, generator=gen).to("cuda", dtype)
        ids = tml._ids("repeats", 21, sorted(adapters), gen)
        got = lk.multi_lora_linear(x, weight, None, pool, LoRABatch.prepare(ids, device="cuda"), backend="cuda")
        want = tml._naive(
            x.cpu(),
            weight.cpu(),
            None,
            {s: ([t.cpu() for t in a], [t.cpu() for t in b], sc) for s, (a, b, sc) in adapters.items()},
            ids,
            tml.SLICES,
        )
        assert_close_to_oracle(got, multi_lora_in_dtype(x, weight, None, pool, ids, tml.SLICES), want)


@needs_ext
@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    import test_multi_lora as tml

    import lora_kernels as lk
    from lora_kernels.pool import LoRABatch

    T = 16
    gen = torch.Generator().manual_seed(14)
    pool, adapters = tml._make_pool(8, 64, tml.MIXED_RANKS, dtype=torch.float16, device="cuda")
    N = sum(tml.SLICES)
    weight = (torch.randn(N, tml.K, generator=gen) / math.sqrt(tml.K)).to("cuda", torch.float16)
    x = torch.randn(T, tml.K, generator=gen).to("cuda", torch.float16)
    batch = LoRABatch.prepare(tml._ids("repeats", T, sorted(adapters), gen), max_tokens=T, device="cuda")
    warm_up(lambda: lk.multi_lora_linear(x, weight, None, pool, batch, backend="cuda", fused=False))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lk.multi_lora_linear(x, weight, None, pool, batch, backend="cuda", fused=False)
    for pattern in ("repeats", "none", "one"):
        ids = tml._ids(pattern, T, sorted(adapters), gen)
        batch.prepare_(ids)
        x.copy_(torch.randn(T, tml.K, generator=gen).to("cuda", torch.float16))
        graph.replay()
        torch.cuda.synchronize()
        want = tml._naive(
            x.cpu(),
            weight.cpu(),
            None,
            {s: ([t.cpu() for t in a], [t.cpu() for t in b], sc) for s, (a, b, sc) in adapters.items()},
            ids,
            tml.SLICES,
        )
        assert_close_to_oracle(y, multi_lora_in_dtype(x, weight, None, pool, ids, tml.SLICES), want)


@needs_ext
@pytest.mark.gpu
def test_gpu_compile_fullgraph_backend_cuda():
    import test_multi_lora as tml

    import lora_kernels as lk
    from lora_kernels.pool import LoRABatch

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(15)
    pool, _ = tml._make_pool(8, 16, [16, 8, 4], dtype=torch.float16, device="cuda")
    weight = (torch.randn(sum(tml.SLICES), tml.K, generator=gen) / math.sqrt(tml.K)).to("cuda", torch.float16)
    x = torch.randn(40, tml.K, generator=gen).to("cuda", torch.float16)
    batch = LoRABatch.prepare(tml._ids("repeats", 40, [0, 1, 2], gen), device="cuda")
    eager = lk.multi_lora_linear(x, weight, None, pool, batch, backend="cuda")
    compiled = torch.compile(
        lambda x: lk.multi_lora_linear(x, weight, None, pool, batch, backend="cuda"), fullgraph=True
    )
    torch.testing.assert_close(compiled(x), eager, rtol=1e-2, atol=1e-2)


@needs_ext
@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_compute_sanitizer_clean():
    sanitizer = shutil.which("compute-sanitizer") or (
        "/usr/local/cuda/bin/compute-sanitizer" if os.path.exists("/usr/local/cuda/bin/compute-sanitizer") else None
    )
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not installed")
    for tool in ("memcheck", "racecheck"):  # initcheck also inspects torch's own copies: run it by hand
        proc = subprocess.run(
            [
                sanitizer,
                "--tool",
                tool,
                "--error-exitcode",
                "3",
                sys.executable,
                str(ROOT / "csrc" / "sanitizer_check.py"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        assert proc.returncode == 0, f"{tool}: rc={proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
        assert "ERROR SUMMARY: 0 errors" in proc.stdout + proc.stderr, proc.stdout[-3000:]


def test_former_module_name_is_the_same_module():
    """``lora_kernels.cuda`` (the loader's former name) is the very module ``lora_kernels.extension``: a setting made
    through one name (as the tests above do) is seen through the other."""
    import lora_kernels
    import lora_kernels.cuda as former

    assert former is lkc is lora_kernels.cuda
    assert former.multi_lora_shrink is lkc.multi_lora_shrink
