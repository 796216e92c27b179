"""Host-side numerics every attention launcher shares, written once (no triton import, so
the pure-PyTorch reference can use them on any platform): the padded head-dim tile, the
accumulator dtype, the softmax scale as kernels receive it, list strides with broadcast
dims, the 64-bit in-tile offset rule, and the merge of partial attention results by lse.
The device-side counterparts are in kernel_pieces.py."""

from __future__ import annotations

import math
import struct

import torch

LOG2E = 1.4426950408889634


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, (int(x) - 1).bit_length())


def head_dim_tile(d: int) -> int:
    """Padded head dim a kernel tile uses for a head dim ``d`` (power of two, >= 16)."""
    return max(16, next_pow2(d))


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and lse) dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_by_lse(y1: torch.Tensor, lse1: torch.Tensor, y2: torch.Tensor,
                 lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over two disjoint key sets from each set's (y [..., D], lse [...]):
    lse = logaddexp(lse1, lse2), y = y1 exp(lse1 - lse) + y2 exp(lse2 - lse), in lse's dtype
    (the accumulator). A row neither set reached keeps y = 0, lse = -inf; NaN stays NaN.
    y1 is overwritten when it already has lse's dtype (callers pass fresh partials)."""
    total = torch.logaddexp(lse1, lse2)
    live = total != float("-inf")
    w1 = torch.where(live, (lse1 - total).exp(), 0.0).unsqueeze(-1)
    w2 = torch.where(live, (lse2 - total).exp(), 0.0).unsqueeze(-1)
    return y1.to(total.dtype).mul_(w1).addcmul_(y2.to(total.dtype), w2), total


def scale_args(scale: float, dtype: torch.dtype) -> tuple[float, float]:
    """The softmax scale as two float arguments (hi, lo) for a kernel (see ``kernel_scale``).

    Python floats reach Triton kernels as float32. Kernels for f16/bf16/f32 work in exp2, so
    they get scale * log2(e) in ``hi`` (and lo = 0). float64 kernels use the natural exp and
    need the scale to f64 precision: it arrives split as hi + lo, both exact in float32."""
    if dtype != torch.float64:
        return float(scale) * LOG2E, 0.0
    hi = struct.unpack("f", struct.pack("f", float(scale)))[0]
    lo = struct.unpack("f", struct.pack("f", float(scale) - hi))[0]
    return hi, lo


def list_strides(index: torch.Tensor, count: torch.Tensor) -> tuple[int, ...]:
    """(index b, index h, index row, count b, count h) strides of [Bp, Hp, n, m] block lists
    and their [Bp, Hp, n] counts, 0 on broadcast (size-1) dims."""
    bcast_b, bcast_h = index.shape[0] == 1, index.shape[1] == 1
    return (0 if bcast_b else index.stride(0), 0 if bcast_h else index.stride(1), index.stride(2),
            0 if bcast_b else count.stride(0), 0 if bcast_h else count.stride(1))


def wide_tile_offsets(rows: int, *row_strides_and_widths: int) -> bool:
    """True when a tile of ``rows`` rows at the given row strides (and widths) spans 2^31
    elements or more: its in-tile offsets then need 64-bit arithmetic."""
    return rows * max(abs(x) for x in row_strides_and_widths) >= 2**31


def all_finite(*tensors) -> bool:
    """Whether every element of the CPU tensors (None skipped; on a GPU the host read would
    synchronise) is finite: one sum per tensor (a NaN or inf element makes the sum
    non-finite; a sum that overflows from finite elements costs an exact check)."""
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        # math.isfinite of the host float: ~2 us against ~7 for torch.isfinite + bool on
        # a decode step's tiny output.
        if not math.isfinite(t.sum().item()) and not bool(torch.isfinite(t).all()):
            return False
    return True
