"""Test-session setup.

Without a CUDA GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1) on CPU
tensors. The variable must be set before triton decorates any kernel, so it is set here,
before any test module imports baracuda_kernels.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
