"""Test set-up: on a machine without CUDA, Triton kernels run in the CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is created, hence before lora_kernels' Triton modules
are imported; this file is imported by pytest before any test module.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test shapes are tiny: one intra-op thread avoids contention (measured 20x slower with 2 threads on a loaded 2-core
# machine for a small training loop), and leaves the second core to DDP / subprocess tests.
torch.set_num_threads(1)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return DEVICE
