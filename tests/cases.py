"""Shared helpers to build random block-sparse attention problems for tests."""

from __future__ import annotations

import pytest
import torch

import baracuda_kernels as bk
from oracle import assert_matches_oracle, dense_attention

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# The reference backend runs everywhere; the triton grid of the same tests runs on the GPU
# (the interpreter covers triton on CPU in test_triton_fwd.py / test_triton_bwd.py).
BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("triton", id="triton", marks=pytest.mark.gpu),
]

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def nblocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def random_qkv(B, H, Nq, Nk, Dk, Dv, dtype, *, seed=0, device=DEVICE, requires_grad=False):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float32)  # noqa: E731
    q, k, v = make(B, H, Nq, Dk), make(B, H, Nk, Dk), make(B, H, Nk, Dv)
    out = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    for t in out:
        t.requires_grad_(requires_grad)
    return out


def random_pattern(Bp, Hp, Nq, Nk, block_size, density=0.6, *, seed=1, device=DEVICE):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    nq, nk = nblocks(Nq, block_size), nblocks(Nk, block_size)
    return (torch.rand(Bp, Hp, nq, nk, generator=gen) < density).to(device)


def check_token_rule(backend, dtype, Nq, Nk, bs, causal, window=(-1, -1), sinks=0, *, H=4, Hkv=2,
                     B=1, seed=0, prepared=False):
    """block_sparse_attention with a block pattern, a causal rule and a token window (GQA
    H / Hkv) against the float64 oracle, forward, lse and gradients. -> (y, lse, grads)"""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = (torch.randn(B, H, Nq, 16, generator=gen) * 2).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(B, Hkv, Nk, 16, generator=gen).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(B, Hkv, Nk, 24, generator=gen).to(DEVICE, dtype).requires_grad_()
    p = (torch.rand(B, 1, nblocks(Nq, bs), nblocks(Nk, bs), generator=gen) < 0.85).to(DEVICE)
    rule = dict(is_causal=causal, window_size=window, sink_tokens=sinks)
    if prepared:
        pattern = bk.prepare_pattern(p, query_len=Nq, key_len=Nk, block_size=bs, **rule)
        y, lse = bk.block_sparse_attention(q, k, v, pattern, backend=backend, return_lse=True)
    else:
        y, lse = bk.block_sparse_attention(q, k, v, p, block_size=bs, backend=backend,
                                           return_lse=True, **rule)
    dy = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, (q, k, v), dy)

    def oracle(dt):
        qx, kx, vx = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        G = H // Hkv
        yo, lo = dense_attention(qx, kx.repeat_interleave(G, 1), vx.repeat_interleave(G, 1), p,
                                 bs, causal, dtype=dt, window_size=window, sink_tokens=sinks)
        return yo, lo, torch.autograd.grad(yo, (qx, kx, vx), dy.to(yo.dtype))
    y64, lse64, g64 = oracle(torch.float64)
    ys, lses, gs = oracle(dtype)
    assert_matches_oracle(y, y64, ys)
    assert_matches_oracle(lse, lse64, lses, what="lse")
    for name, g, r, s in zip(("dq", "dk", "dv"), grads, g64, gs):
        assert_matches_oracle(g, r, s, factor=3.0, what=name)
    return y, lse, grads
