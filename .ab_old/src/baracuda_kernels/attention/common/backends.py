"""When the Triton backend can run an attention problem, and why not.

Shared by the attention ops' backend registries. Nothing here is global state: availability
is probed when a plan is selected.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ...core.runtime import triton_interpreting

TRITON_MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401 (only whether it imports)
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton is not importable ({exc}); install it with `pip install triton`"
    return None


def triton_unavailable_reason(d_k: int, d_v: int, device: torch.device,
                              explicit: bool = True) -> Optional[str]:
    """None when our Triton kernels can run head dims (d_k, d_v) on ``device``, else a
    sentence saying why. On the CPU they run only under TRITON_INTERPRET=1 and only when
    asked for explicitly (``explicit``): automatic selection never picks the interpreter."""
    reason = _triton_import_error()
    if reason:
        return reason
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the triton backend needs compute capability 8.0 or newer, {device} has {major}.x"
    elif not (device.type == "cpu" and triton_interpreting()):
        return (f"the triton backend runs on CUDA devices (or on CPU under TRITON_INTERPRET=1), "
                f"got device {device}")
    elif not explicit:
        return "on the CPU the Triton interpreter runs only when asked for (backend='triton')"
    if max(d_k, d_v) > TRITON_MAX_HEAD_DIM:
        return (f"the triton backend supports head dims up to {TRITON_MAX_HEAD_DIM}, got "
                f"d_k={d_k}, d_v={d_v}")
    return None
