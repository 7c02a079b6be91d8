"""Installs the pure-Python package ``lora_kernels``.

The optional CUDA extension (csrc/, built through CMakeLists.txt) is added by the build step in this file when a CUDA
toolkit is found and ``LORA_KERNELS_BUILD_CUDA`` is not ``0``; the package works without it.
"""

from setuptools import find_packages, setup

TEST_REQUIRES = [
    "pytest>=7",
    "pytest-benchmark>=4",
    "hypothesis>=6",
]

setup(
    name="lora_kernels",
    version="0.1.0",
    description="Fused LoRA kernels (Triton, optional CUDA) for PyTorch: training, multi-adapter serving, LoRA-GA",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lora_kernels", "lora_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0", "safetensors>=0.4", "numpy"],
    extras_require={"test": TEST_REQUIRES, "plot": ["matplotlib"]},
    entry_points={"console_scripts": ["lora-kernels-demo=lora_kernels.demo:main"]},
)
