"""Checks of concrete tensors against a descriptor, and pattern canonicalisation.

Every function raises InvalidProblem with a message that says expected / got / fix, and
none of them writes to any tensor, so a failed call leaves preallocated outputs untouched.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core import InvalidProblem
from .descriptor import SdpaBlockSparseDescriptor


def check_tensor(name: str, t, shape: tuple, dtype: torch.dtype, device: torch.device,
                 fix_dtype: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidProblem(f"{name} is a {type(t).__name__}; expected a torch.Tensor of shape {shape}.")
    if tuple(t.shape) != tuple(shape):
        raise InvalidProblem(
            f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)} from the descriptor. "
            f"Select a plan for this shape (SdpaBlockSparseDescriptor.from_tensors).")
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


def check_qkv(desc: SdpaBlockSparseDescriptor, q, k, v) -> torch.device:
    dtype = desc.element.torch_dtype
    if not isinstance(q, torch.Tensor):
        raise InvalidProblem(f"q is a {type(q).__name__}; expected a torch.Tensor.")
    device = q.device
    check_tensor("q", q, desc.query_shape(), dtype, device)
    check_tensor("k", k, desc.key_shape(), dtype, device)
    check_tensor("v", v, desc.value_shape(), dtype, device)
    return device


def check_outputs(desc: SdpaBlockSparseDescriptor, device, y, lse) -> None:
    if y is not None:
        check_tensor("y", y, desc.output_shape(), desc.element.torch_dtype, device)
    if lse is not None:
        check_tensor("lse", lse, desc.lse_shape(), desc.lse_dtype, device,
                     fix_dtype=f"lse is always {desc.lse_dtype} for {desc.element.torch_dtype} inputs.")


def canonical_pattern(desc: SdpaBlockSparseDescriptor, pattern, device: Optional[torch.device]) -> torch.Tensor:
    """Validate a block pattern and return it as a 4-D view [Bp, Hp, nq, nk] (Bp in {1,B},
    Hp in {1,H}), bool or uint8 as given (no copy: non-zero = active).

    Accepts a uint8/bool tensor in the flat layout [B|1, H|1, nq*nk] or as [B|1, H|1, nq, nk],
    or any object with a ``mask`` tensor and ``block_size`` / ``query_len`` / ``key_len``
    attributes (a BlockPattern), whose geometry must match the descriptor.
    """
    if hasattr(pattern, "mask") and hasattr(pattern, "block_size"):
        _check_pattern_geometry(desc, pattern)
        pattern = pattern.mask
    return pattern_view(pattern, desc.num_blocks_q, desc.num_blocks_k, desc.block_size,
                        (desc.query_len, desc.key_len), device, desc.batch_size, desc.num_heads)


def pattern_view(pattern, nq: int, nk: int, block_size: int, lengths: tuple[int, int],
                 device: Optional[torch.device], batch: Optional[int] = None,
                 heads: Optional[int] = None) -> torch.Tensor:
    """A raw pattern tensor as a 4-D view [Bp, Hp, nq, nk], checked (dtype, device, shape).

    ``batch`` / ``heads``: when given, Bp and Hp must be 1 or equal to them."""
    if not isinstance(pattern, torch.Tensor):
        raise InvalidProblem(
            f"block_pattern is a {type(pattern).__name__}; expected a bool/uint8 tensor "
            f"[B, H, nq, nk] or [B, H, nq*nk], a BlockPattern or a PreparedPattern.")
    if pattern.dtype not in (torch.bool, torch.uint8):
        raise InvalidProblem(
            f"block_pattern has dtype {pattern.dtype}; expected torch.bool or torch.uint8. "
            f"Convert with block_pattern.bool() (non-zero = compute the block).")
    if device is not None and pattern.device != device:
        raise InvalidProblem(
            f"block_pattern is on {pattern.device}; expected {device} like q. "
            f"Move it with block_pattern.to(q.device) once, outside the training loop.")
    lead_ok = pattern.dim() in (3, 4) and \
        (batch is None or pattern.shape[0] in (1, batch)) and \
        (heads is None or pattern.shape[1] in (1, heads))
    if lead_ok and pattern.dim() == 3 and pattern.shape[2] == nq * nk:
        return pattern.view(pattern.shape[0], pattern.shape[1], nq, nk) if pattern.is_contiguous() \
            else pattern.reshape(pattern.shape[0], pattern.shape[1], nq, nk)
    if lead_ok and pattern.dim() == 4 and tuple(pattern.shape[2:]) == (nq, nk):
        return pattern
    B = "B" if batch is None else batch
    H = "H" if heads is None else heads
    raise InvalidProblem(
        f"block_pattern has shape {tuple(pattern.shape)}; expected ({B}, {H}, {nq * nk}) = "
        f"[B, H, nq*nk] with nq={nq}, nk={nk} for block_size={block_size} "
        f"(Nq={lengths[0]}, Nk={lengths[1]}), or ({B}, {H}, {nq}, {nk}) = [B, H, nq, nk]; "
        f"B and H may be 1 to broadcast.")


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


def _check_pattern_geometry(desc: SdpaBlockSparseDescriptor, pattern) -> None:
    got = (pattern.block_size, pattern.query_len, pattern.key_len)
    want = (desc.block_size, desc.query_len, desc.key_len)
    if got != want:
        raise InvalidProblem(
            f"BlockPattern has (block_size, query_len, key_len) = {got}; expected {want} from the "
            f"problem. Build the pattern for these lengths, or pass block_size={pattern.block_size}.")
    if getattr(pattern, "is_causal", False) and not desc.is_causal:
        raise InvalidProblem(
            "BlockPattern is causal (its blocks assume the diagonal is masked) but is_causal is "
            "False; expected is_causal=True. Pass is_causal=True (or None to follow the pattern), "
            "or build the pattern with causal=False.")
