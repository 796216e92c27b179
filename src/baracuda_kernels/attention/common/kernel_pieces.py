"""@triton.jit pieces every attention kernel shares: the exponential in the kernels' base,
and the softmax scale rebuilt from the two arguments of ``numerics.scale_args``."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def kernel_scale(scale_hi, scale_lo, IS_F64: tl.constexpr):
    """The scale of ``scale_args`` inside a kernel: f64 hi + lo, or the f32 hi."""
    if IS_F64:
        s = tl.cast(scale_hi, tl.float64) + tl.cast(scale_lo, tl.float64)
    else:
        s = tl.cast(scale_hi, tl.float32)
    return s


@triton.jit
def exp_base(x, IS_F64: tl.constexpr):
    """The kernels' exponential: exp2 (one MUFU op; scores carry log2(e)) for f16/bf16/f32,
    the accurate natural exp for f64 (exp2 of an f64 is not guaranteed full precision)."""
    if IS_F64:
        r = tl.exp(x)
    else:
        r = tl.exp2(x)
    return r
