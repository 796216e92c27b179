"""Shared pieces of the Triton forward kernel's tests: random inputs in several memory
layouts (NaN-padded views, misaligned bases, [B, N, H, D] transposes), patterns with an
empty row, NaN-poisoned outputs (optionally views of bigger NaN buffers), and ``run_case``:
one launch on fresh inputs compared with the float64 oracle (y and lse).
"""

from __future__ import annotations

import math

import pytest
import torch

from baracuda_kernels.attention.block_sparse.block_lists import BlockLists
from baracuda_kernels.attention.block_sparse.triton_fwd import block_sparse_attention_forward_triton
from oracle import assert_matches_oracle, dense_attention

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


# ------------------------------------------------------------------------------- helpers

def lse_dtype(dtype):
    return F64 if dtype == F64 else F32


def _tensor(shape, dtype, layout, gen, device):
    """Random tensor [B, H, N, D] with a given memory layout.

    contig: plain; bnhd: a [B, N, H, D] tensor transposed; offset1: contiguous but starting
    one element into its storage (misaligned base); nanpad16: a view into a NaN buffer with
    16-byte aligned rows (TMA-legal); padded: a view into a bigger
    NaN-filled buffer (rows and head-dim columns past the valid region are NaN, nonzero
    storage offset) so any read past the valid region poisons the result.
    """
    B, H, N, D = shape
    data = torch.randn(shape, generator=gen, dtype=F64).to(dtype).to(device)
    if layout == "contig":
        return data
    if layout == "bnhd":
        out = torch.empty(B, N, H, D, dtype=dtype, device=device).transpose(1, 2)
        out.copy_(data)
        return out
    if layout == "nanpad16":
        # Like padded, but TMA-legal: aligned base, 16-byte row stride, NaN rows past N and
        # NaN columns past D (a load path must clip at the tensor's own shape).
        buf = torch.full((B, H, N + 8, -(-(D + 8) // 8) * 8), float("nan"), dtype=dtype,
                         device=device)
        out = buf[:, :, :N, :D]
        out.copy_(data)
        return out
    if layout == "offset1":
        # Dense layout whose base sits one element past an aligned address (TMA-illegal).
        buf = torch.full((data.numel() + 1,), float("nan"), dtype=dtype, device=device)
        out = buf[1:].view(shape)
        out.copy_(data)
        return out
    if layout == "padded":
        buf = torch.full((B, H, N + 3, D + 5), float("nan"), dtype=dtype, device=device)
        out = buf[:, :, 1:N + 1, 2:D + 2]
        out.copy_(data)
        return out
    raise ValueError(layout)


def _pattern(Bp, Hp, nq, nk, density, gen, empty_rows=True):
    pat = torch.rand(Bp, Hp, nq, nk, generator=gen) < density
    if empty_rows and nq > 1:
        pat[..., nq // 2, :] = False  # an all-zero pattern row -> y = 0, lse = -inf
    return pat


def _poisoned_outputs(B, H, Nq, Dv, dtype, device, strided):
    """NaN-filled outputs; strided=True returns views of bigger NaN buffers plus them."""
    if not strided:
        y = torch.full((B, H, Nq, Dv), float("nan"), dtype=dtype, device=device)
        lse = torch.full((B, H, Nq), float("nan"), dtype=lse_dtype(dtype), device=device)
        return y, lse, None
    ybuf = torch.full((B, Nq + 2, H, Dv + 3), float("nan"), dtype=dtype, device=device)
    lbuf = torch.full((B, Nq + 2, H + 1), float("nan"), dtype=lse_dtype(dtype), device=device)
    y = ybuf[:, 1:Nq + 1, :, 1:Dv + 1].transpose(1, 2)  # [B,H,Nq,Dv], y.stride(3) == 1
    lse = lbuf[:, 1:Nq + 1, :H].transpose(1, 2)          # [B,H,Nq]
    return y, lse, (ybuf, lbuf)


def run_case(B=1, H=2, Nq=40, Nk=40, dk=32, dv=None, bs=16, dtype=F32, causal=False,
             density=0.5, pattern=None, pattern_dims=None, layout="contig",
             strided_out=False, scale=None, config=None, allow_tf32=False, seed=0,
             device=DEVICE, check=True, factor=2.0):
    """Run the kernel on random inputs and compare y and lse with the oracle."""
    dv = dk if dv is None else dv
    gen = torch.Generator().manual_seed(seed)
    q = _tensor((B, H, Nq, dk), dtype, layout, gen, device)
    k = _tensor((B, H, Nk, dk), dtype, layout, gen, device)
    v = _tensor((B, H, Nk, dv), dtype, layout, gen, device)
    nq, nk = -(-Nq // bs), -(-Nk // bs)
    if pattern is None:
        Bp, Hp = pattern_dims or (B, H)
        pattern = _pattern(Bp, Hp, nq, nk, density, gen)
    pattern = pattern.to(device)
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    lists = BlockLists.build(pattern, Nq, Nk, bs, causal)
    y, lse, bufs = _poisoned_outputs(B, H, Nq, dv, dtype, device, strided_out)
    block_sparse_attention_forward_triton(
        q, k, v, lists, block_size=bs, scale=scale, is_causal=causal, y=y, lse=lse,
        config=config, allow_tf32=allow_tf32)
    if bufs is not None:
        # Every element outside the valid views must still be NaN.
        for buf, view in zip(bufs, (y, lse)):
            mark = torch.zeros_like(buf)  # contiguous like buf, so storage offsets agree
            mark.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(1)
            untouched = mark == 0
            assert torch.isnan(buf[untouched]).all(), "kernel wrote outside the valid region"
    if check:
        ref_y, ref_lse = dense_attention(q, k, v, pattern, bs, causal, scale)
        same_y, same_lse = dense_attention(q, k, v, pattern, bs, causal, scale, dtype=dtype)
        assert_matches_oracle(y, ref_y, same_y, factor=factor, what="y")
        assert_matches_oracle(lse, ref_lse, same_lse, factor=factor, what="lse")
    return y, lse, (q, k, v, pattern, scale)
