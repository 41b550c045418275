"""Test fixtures: seeding, the `gpu` marker, and Triton on CPU through its interpreter.

Without CUDA, TRITON_INTERPRET=1 is set before anything imports triton, so the Triton kernels run on
CPU tensors (slowly: keep their shapes small). With CUDA the kernels run compiled on the GPU.
"""

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture
def triton_device():
    """Device on which the Triton impl runs: CUDA when present, else CPU under the interpreter."""
    return TRITON_DEVICE
