"""Device resolution and the device guard, shared by every plan."""

from __future__ import annotations

import contextlib

import torch

from .errors import InvalidProblem


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


def device_guard(device: torch.device):
    """Context making ``device`` current when it is a CUDA device (Triton and library kernels
    launch on the current device, whatever device the tensors are on); a no-op elsewhere."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
