"""Generic checks of concrete tensors, shared by every op's plan.

Each raises InvalidProblem with a message that says what was expected, what was given and the
fix; none writes to any tensor, so a failed call leaves preallocated outputs untouched.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import InvalidProblem


def check_tensor(name: str, t, shape: tuple, dtype: torch.dtype, device: torch.device,
                 fix_dtype: str = "", fix_shape: str = "") -> None:
    """``t`` is a tensor of exactly this shape, dtype and device, with a unit last stride
    (any other strides are fine)."""
    if not isinstance(t, torch.Tensor):
        raise InvalidProblem(f"{name} is a {type(t).__name__}; expected a torch.Tensor of shape {shape}.")
    if tuple(t.shape) != tuple(shape):
        raise InvalidProblem(
            f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)} from the descriptor. "
            f"{fix_shape or 'Select a plan for this shape (Descriptor.from_tensors).'}")
    if t.dtype != dtype:
        raise InvalidProblem(
            f"{name} has dtype {t.dtype}; expected {dtype} from the descriptor's element. "
            f"{fix_dtype or f'Cast with {name}.to({dtype}) or select a plan for {t.dtype}.'}")
    if t.device != device:
        raise InvalidProblem(
            f"{name} is on {t.device}; expected {device} like q. Move it with {name}.to(q.device).")
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise InvalidProblem(
            f"{name} has last-dimension stride {t.stride(-1)}; expected 1 (any other strides are "
            f"fine). Pass {name}.contiguous() or a view whose last dimension is dense.")


def _byte_span(t: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """(storage address, first byte, one past the last byte) that ``t`` can touch."""
    if t.numel() == 0:
        return None
    extent = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return t.untyped_storage().data_ptr(), start, start + (extent + 1) * t.element_size()


def check_no_overlap(outputs: dict, inputs: dict) -> None:
    """InvalidProblem when an output buffer shares memory with an input or another output.

    Conservative (compares the byte ranges the views can touch, not element sets): a kernel
    writing an output while reading an overlapping input would give a wrong answer, and the
    outputs are written in place, so both must be distinct memory."""
    spans = {name: _byte_span(t) for name, t in {**inputs, **outputs}.items() if t is not None}
    spans = {name: span for name, span in spans.items() if span is not None}
    outs = [name for name in outputs if name in spans]
    for i, out in enumerate(outs):
        # Each output against every input and every later output (each pair once).
        for other in [name for name in inputs if name in spans] + outs[i + 1:]:
            a, b = spans[out], spans[other]
            if a[0] == b[0] and a[1] < b[2] and b[1] < a[2]:
                raise InvalidProblem(
                    f"{out} shares memory with {other}; expected an output buffer of its own "
                    f"(outputs are written in place while inputs are read). Pass a fresh "
                    f"tensor (torch.empty_like) as {out}, or None to let the plan allocate it.")
