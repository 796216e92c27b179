"""Which backends can run a block-sparse attention problem, and why not.

Kept apart from the plan so that the rules are in one short place. Nothing here is global
state: availability is probed when a plan is selected.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..core import BackendKind, InvalidProblem, Unsupported
from ..core.runtime import triton_interpreting
from .descriptor import SdpaBlockSparseDescriptor

TRITON_MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton is not importable ({exc}); install it with `pip install triton`"
    return None


def triton_unavailable_reason(desc: SdpaBlockSparseDescriptor, device: torch.device) -> Optional[str]:
    """None when the triton backend can run `desc` on `device`, else a sentence saying why."""
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
    if max(desc.d_k, desc.d_v) > TRITON_MAX_HEAD_DIM:
        return (f"the triton backend supports head dims up to {TRITON_MAX_HEAD_DIM}, got "
                f"d_k={desc.d_k}, d_v={desc.d_v}")
    return None


def choose_backend(desc: SdpaBlockSparseDescriptor, device: torch.device,
                   requested: Optional[BackendKind]) -> BackendKind:
    """Forced backend if given (Unsupported when it cannot run), else triton on CUDA when it
    can run the problem, else reference."""
    if requested is BackendKind.REFERENCE:
        return requested
    reason = triton_unavailable_reason(desc, device)
    if requested is BackendKind.TRITON:
        if reason:
            raise Unsupported(f"backend='triton' cannot run this problem: {reason}. "
                              f"Use backend='reference' or backend=None (automatic).")
        return requested
    if device.type == "cuda" and reason is None:
        return BackendKind.TRITON
    return BackendKind.REFERENCE


def resolve_device(device) -> torch.device:
    """A concrete torch.device (CUDA with its index); InvalidProblem for a CUDA device on a
    machine without CUDA or an index past the device count (torch would assert)."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidProblem(f"device is {device!r}; expected a torch.device or a name such as "
                             f"'cuda', 'cuda:1' or 'cpu' ({exc}).") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidProblem(
                f"device is {device} but CUDA is not available here (torch "
                f"{torch.__version__}, CUDA build: {torch.version.cuda is not None}); expected "
                f"a device that exists. Use device='cpu' (the reference backend) or install a "
                f"CUDA build of torch on a machine with a GPU.")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise InvalidProblem(f"device is {device}; this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s). Pick an index below that.")
    return device
