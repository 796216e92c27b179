"""Shared helpers to build random block-sparse attention problems for tests."""

from __future__ import annotations

import pytest
import torch

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
