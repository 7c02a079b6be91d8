"""Build step of the optional CUDA extension of ``lora_kernels``; the package's metadata is in pyproject.toml.

The extension (csrc/, built through CMakeLists.txt) is added when a CUDA toolkit is found and
``LORA_KERNELS_BUILD_CUDA`` is not ``0``; the package works without it.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# ------------------------------------------------------------------------------------ CUDA extension (csrc/, CMake)
# LORA_KERNELS_BUILD_CUDA: "0" never builds it; "1" requires it (no CUDA toolkit is an error); unset/"auto" builds it
# when nvcc is found. Once a build is attempted, a compile error fails the install (set LORA_KERNELS_BUILD_CUDA=0 to
# install the pure-Python package regardless). LORA_KERNELS_CUDA_ARCHS (e.g. "80;90", the default) picks the archs.
# LORA_KERNELS_CUDA_JOBS caps parallel compile jobs. See csrc/README.md.
BUILD_CUDA_ENV = "LORA_KERNELS_BUILD_CUDA"


def _find_nvcc():
    for var in ("CUDACXX", "CUDA_HOME", "CUDA_PATH"):
        val = os.environ.get(var)
        if not val:
            continue
        cand = val if var == "CUDACXX" else os.path.join(val, "bin", "nvcc")
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    cand = shutil.which("nvcc")
    if cand:
        return cand
    for cand in ("/usr/local/cuda/bin/nvcc",):
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _find_tool(name):
    """cmake / ninja: on PATH (pip's build environment puts its own there), else the pip packages' binaries."""
    found = shutil.which(name)
    if found:
        return found
    try:
        mod = __import__(name)
        bin_dir = getattr(mod, "CMAKE_BIN_DIR", None) or getattr(mod, "BIN_DIR", None)
        cand = os.path.join(bin_dir, name) if bin_dir else None
        if cand and os.path.isfile(cand):
            return cand
    except ImportError:
        pass
    return None


class CMakeExtension(Extension):
    """An extension module built by CMakeLists.txt rather than by setuptools' compiler."""

    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Runs CMake + Ninja for CMakeExtensions; skips them (pure-Python install) when no CUDA toolkit is found."""

    def run(self):
        mode = os.environ.get(BUILD_CUDA_ENV, "auto").strip().lower()
        if mode not in ("0", "1", "auto", ""):
            raise RuntimeError(f"{BUILD_CUDA_ENV} must be 0, 1 or auto, got {mode!r}")
        cmake_exts = [e for e in self.extensions if isinstance(e, CMakeExtension)]
        others = [e for e in self.extensions if not isinstance(e, CMakeExtension)]
        nvcc = _find_nvcc() if mode != "0" else None
        if mode == "0":
            print(f"lora_kernels: {BUILD_CUDA_ENV}=0, not building the CUDA extension", file=sys.stderr)
        elif nvcc is None:
            if mode == "1":
                raise RuntimeError(
                    f"{BUILD_CUDA_ENV}=1 but no CUDA toolkit was found (no nvcc in $CUDACXX, $CUDA_HOME/bin,"
                    " $CUDA_PATH/bin, PATH or /usr/local/cuda/bin)"
                )
            print("lora_kernels: no CUDA toolkit (nvcc) found, installing without the CUDA extension", file=sys.stderr)
        else:
            for ext in cmake_exts:
                self._build_cmake(ext, nvcc)
        self.extensions = others
        if others:
            super().run()

    def get_outputs(self):
        return [p for p in super().get_outputs() if os.path.exists(p)]

    def _build_cmake(self, ext, nvcc):
        cmake, ninja = _find_tool("cmake"), _find_tool("ninja")
        if cmake is None or ninja is None:
            raise RuntimeError("building the CUDA extension needs cmake and ninja (pip install cmake ninja)")
        try:
            import pybind11
        except ImportError as exc:
            raise RuntimeError("building the CUDA extension needs pybind11 (pip install pybind11)") from exc
        src = os.path.dirname(os.path.abspath(__file__))
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake-" + ext.name.replace(".", "_")))
        os.makedirs(out_dir, exist_ok=True)
        os.makedirs(build_dir, exist_ok=True)
        args = [
            cmake,
            "-S",
            src,
            "-B",
            build_dir,
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DLORA_KERNELS_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        archs = os.environ.get("LORA_KERNELS_CUDA_ARCHS", "").strip()
        if archs:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
        # The module must carry the suffix this interpreter imports (CMake's FindPython usually agrees; be explicit).
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        if suffix:
            args.append(f"-DPYTHON_MODULE_EXTENSION={suffix}")
        subprocess.check_call(args)
        build = [cmake, "--build", build_dir]
        jobs = os.environ.get("LORA_KERNELS_CUDA_JOBS") or (str(self.parallel) if self.parallel else None)
        if jobs:
            build += ["--parallel", str(jobs)]
        subprocess.check_call(build)


# Metadata, dependencies and extras are in pyproject.toml; this call only adds the optional CUDA extension.
setup(
    # Skipped when no CUDA toolkit is found (see CMakeBuild above).
    ext_modules=[CMakeExtension("lora_kernels._C_lora")],
    cmdclass={"build_ext": CMakeBuild},
)
