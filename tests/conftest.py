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
    # Import triton now, while the variable says "interpret": the library imports it lazily,
    # and a first import inside a test that sets TRITON_INTERPRET=0 for a moment would leave
    # later kernels compiled for a GPU (triton reads the setting when it first loads).
    try:
        import triton  # noqa: F401
    except ImportError:  # platforms without triton: the reference backend still runs
        pass

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
