"""Opt-in TMA (Hopper tensor memory accelerator) loads of the Triton kernels.

With ``ForwardConfig.use_tma`` the forward launcher passes K and V (with
``BackwardConfig.use_tma`` the backward: Q and dY to the dK/dV kernel, K and V to the dQ
kernel) as host-side Triton tensor descriptors
(``triton.tools.tensor_descriptor.TensorDescriptor``, triton >= 3.4) over the tensors as
they are: shape ``[B, H, N, D]``, their own strides, block ``[1, 1, TILE, D_PAD]``. No copy
is made. The copy engine zero-fills rows past ``N`` and columns past ``D``, which covers
ragged tails and padded head dims.

The path is taken only where it is known to be legal; everywhere else the launcher quietly
uses the pointer path (``tma_fallback_reason`` says why). Rules checked:

* device: CUDA sm90 or newer (or the Triton interpreter, which emulates descriptors);
* dtype: float16 / bfloat16 only (f32/f64 keep their tuned pointer-path tiles);
* layout (per tensor): base address 16-byte aligned, every stride but the last a multiple
  of 16 bytes and > 0 (no broadcast/expanded dims), last stride 1, ``D * elem_bytes >= 16``,
  no empty dim. Dims of size 1 never move the address, so their stride is replaced by a
  legal one instead of being checked.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from ...core.runtime import triton_interpreting

TMA_DTYPES = (torch.float16, torch.bfloat16)


def tma_strides(shape, strides, elem_bytes: int) -> list[int]:
    """Strides to hand the descriptor: a size-1 dim (other than the last) is never stepped
    over, so its stride is replaced by the extent of the inner dims rounded up to 16 bytes
    (a legal value) instead of whatever the tensor happens to carry."""
    out = list(strides)
    step = max(1, 16 // elem_bytes)
    for i in range(len(shape) - 1):
        if shape[i] == 1:
            extent = 1 + sum(abs(out[j]) * (shape[j] - 1) for j in range(i + 1, len(shape)))
            out[i] = -(-extent // step) * step
    return out


def tma_layout_problem(shape, strides, address: int, elem_bytes: int) -> str | None:
    """Why a tensor of this layout cannot back a TMA descriptor, or None if it can.

    Pure Python (no tensors): ``shape``/``strides`` in elements, ``address`` in bytes (the
    data pointer, i.e. storage base + storage offset * elem_bytes).
    """
    if any(n <= 0 for n in shape):
        return f"empty dim in shape {tuple(shape)}"
    if strides[-1] != 1:
        return f"last stride is {strides[-1]}, expected 1"
    if shape[-1] * elem_bytes < 16:
        return f"last dim {shape[-1]} x {elem_bytes} B < 16 B"
    if address % 16:
        return f"base address {address:#x} not 16-byte aligned"
    for n, s in zip(shape[:-1], tma_strides(shape, strides, elem_bytes)[:-1]):
        if n > 1 and s <= 0:
            return f"stride {s} of a dim of size {n} (broadcast dims are not supported)"
        if (s * elem_bytes) % 16:
            return f"stride {s} x {elem_bytes} B is not a multiple of 16 B"
        if s * elem_bytes >= 1 << 40:
            return f"stride {s} x {elem_bytes} B over the 2^40 B TMA limit"
    return None


@lru_cache(maxsize=16)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def tma_fallback_reason(dtype: torch.dtype, device: torch.device, *tensors) -> str | None:
    """Why a kernel must not load these tensors through TMA, or None."""
    if dtype not in TMA_DTYPES:
        return f"dtype {dtype} (TMA path is for float16/bfloat16)"
    if not triton_interpreting():
        if device.type != "cuda":
            return f"device {device} (needs CUDA sm90+ or TRITON_INTERPRET)"
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = _cuda_capability(index)
        if major < 9:
            return f"sm{major}{minor} has no TMA (needs sm90+)"
    for t in tensors:
        problem = tma_layout_problem(t.shape, t.stride(), t.data_ptr(), t.element_size())
        if problem is not None:
            return problem
    return None


def row_tile_descriptor(t: torch.Tensor, block_n: int, d_pad: int):
    """Descriptor over ``t`` ``[B, H, N, D]`` loading ``[1, 1, block_n, d_pad]`` tiles
    (zero-filled out of bounds): K/V in the forward, Q/dY and K/V in the backward. Call
    only when ``tma_fallback_reason`` returned None."""
    from triton.tools.tensor_descriptor import TensorDescriptor  # triton >= 3.4

    strides = tma_strides(t.shape, t.stride(), t.element_size())
    return TensorDescriptor(t, list(t.shape), strides, [1, 1, block_n, d_pad])


@triton.jit
def head_source(T, b, h, stride_b, stride_h, USE_TMA: tl.constexpr):
    """What a kernel loads one (b, h)'s rows from: the descriptor over the whole tensor
    (USE_TMA; loads name b and h), or a pointer to the (b, h) slice."""
    if USE_TMA:
        src = T
    else:
        src = T + b * stride_b + h * stride_h
    return src


@triton.jit
def masked_step_source(src, RAW, b, h, stride_b, stride_h, TMA_OK: tl.constexpr):
    """Where the masked (PARTIAL) steps of a walk load one (b, h)'s rows from: ``src`` (a
    descriptor or pointer from head_source) when TMA_OK, else a pointer to (b, h) of RAW,
    the same tensor: token ids need masked pointer loads there (padding reads as 0; zeroing
    a TMA tile in registers was measured ~2 us per block on an H200)."""
    if TMA_OK:
        out = src
    else:
        out = RAW + b * stride_b + h * stride_h
    return out
