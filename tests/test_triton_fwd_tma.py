"""The Triton forward kernel's TMA K/V path (opt-in: descriptors for K and V tiles on
Hopper; the interpreter emulates them): layout rules, the fallback decision and its
reasons, the config field and candidates, the path against the float64 oracle on ragged,
transposed and NaN-padded layouts (interpreter and GPU), the fallback on illegal layouts,
and bitwise determinism (GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

from baracuda_kernels.attention.block_sparse import triton_fwd
from baracuda_kernels.attention.block_sparse.triton_fwd_configs import (
    ForwardConfig,
    candidate_forward_configs,
    default_forward_config,
    estimate_shared_bytes,
)
from baracuda_kernels.attention.common.triton_tma import (
    tma_fallback_reason,
    tma_layout_problem,
    tma_strides,
)
from baracuda_kernels.core import ArchSku, InvalidProblem
from triton_fwd_cases import BF16, F16, F32, F64, HAS_CUDA, gpu, run_case


@pytest.fixture
def tma_calls(monkeypatch):
    """Counts descriptors the launcher builds: tells the TMA path from its fallback."""
    calls = []
    real = triton_fwd.row_tile_descriptor

    def spy(t, block_n, d_pad):
        calls.append((tuple(t.shape), block_n, d_pad))
        return real(t, block_n, d_pad)

    monkeypatch.setattr(triton_fwd, "row_tile_descriptor", spy)
    return calls


def test_tma_layout_rules():
    ok = tma_layout_problem
    assert ok((2, 3, 100, 128), (38400, 12800, 128, 1), 0x1000, 2) is None
    assert ok((2, 3, 100, 64), (19200, 64, 192, 1), 0x1000, 2) is None     # [B,N,H,D].T(1,2)
    assert ok((2, 3, 100, 72), (21600, 7200, 72, 1), 0x1000, 2) is None    # 144 B rows
    assert "aligned" in ok((2, 3, 100, 128), (38400, 12800, 128, 1), 0x1002, 2)
    assert "multiple of 16" in ok((1, 2, 100, 20), (4000, 2000, 20, 1), 0x1000, 2)
    assert "multiple of 16" in ok((1, 2, 100, 64), (13300, 6650, 133, 1), 0x1000, 2)
    assert "< 16 B" in ok((1, 2, 100, 4), (800, 400, 4, 1), 0x1000, 2)
    assert "last stride" in ok((1, 2, 100, 64), (12800, 6400, 64, 2), 0x1000, 2)
    assert "broadcast" in ok((2, 4, 100, 64), (6400, 0, 64, 1), 0x1000, 2)  # expand over H
    assert "empty" in ok((2, 4, 0, 64), (0, 0, 64, 1), 0x1000, 2)
    # Size-1 dims never move the address: any stride they carry is fine.
    assert ok((1, 1, 100, 64), (3, 5, 64, 1), 0x1000, 2) is None
    assert tma_strides((1, 1, 100, 64), (3, 5, 64, 1), 2) == [6400, 6400, 64, 1]
    assert ok((1, 2, 1, 64), (128, 64, 7, 1), 0x1000, 2) is None
    assert ok((1, 2, 1, 64), (128, 60, 7, 1), 0x1000, 2) is not None


def test_tma_fallback_decision(monkeypatch):
    kv = torch.zeros(1, 2, 40, 32, dtype=F16)
    cpu = torch.device("cpu")
    for dtype in (F32, F64):
        assert "dtype" in tma_fallback_reason(dtype, cpu, kv.to(dtype))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter emulates descriptors
    assert tma_fallback_reason(F16, cpu, kv, kv) is None
    shifted = torch.zeros(kv.numel() + 1, dtype=F16)[1:].view(kv.shape)  # base + 2 bytes
    assert "aligned" in tma_fallback_reason(F16, cpu, kv, shifted)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "device" in tma_fallback_reason(F16, cpu, kv, kv)


def test_tma_config_field_and_candidates():
    assert ForwardConfig(128, 128, 8, 3).describe() == "BM=128,BN=128,warps=8,stages=3"
    assert ForwardConfig(128, 128, 8, 3, True).describe() == "BM=128,BN=128,warps=8,stages=3,tma"
    with pytest.raises(InvalidProblem):
        ForwardConfig(64, 64, 4, 2, use_tma=1)
    cands = candidate_forward_configs(128, 128, BF16, 128, ArchSku.SM90)
    tma = [c for c in cands if c.use_tma]
    assert tma and any(not c.use_tma for c in cands) and len(set(cands)) == len(cands)
    assert all(estimate_shared_bytes(c, 128, 128, 2, ArchSku.SM90) <= 227 * 1024 for c in tma)
    assert not any(c.use_tma for c in candidate_forward_configs(128, 128, BF16, 128, ArchSku.SM80))
    assert not any(c.use_tma for c in candidate_forward_configs(64, 64, F32, 64, ArchSku.SM90, True))
    # Defaults use TMA only where it was measured to help: sm90, f16/bf16, blocks >= 64.
    assert default_forward_config(128, 128, BF16, 128, ArchSku.SM90).use_tma
    assert default_forward_config(64, 64, F16, 64, ArchSku.SM90).use_tma
    for arch in (ArchSku.SM80, ArchSku.SM86, ArchSku.CPU):
        for d in (64, 128, 256):
            for bs in (16, 64, 128, 256):
                assert not default_forward_config(d, d, BF16, bs, arch).use_tma
    for dtype in (F32, F64):
        assert not default_forward_config(128, 128, dtype, 128, ArchSku.SM90).use_tma


@pytest.mark.parametrize("bs,cfg,layout", [
    (16, ForwardConfig(16, 16, 1, 1, True), "contig"),   # ragged q/k tails, padded dv
    (24, ForwardConfig(16, 16, 1, 1, True), "bnhd"),     # generic block: overrun steps
    (16, ForwardConfig(32, 16, 1, 1, True), "nanpad16"), # NaN past Nk rows and D columns
])
@pytest.mark.parametrize("causal", [False, True])
def test_tma_path_interpreter(bs, cfg, layout, causal, tma_calls):
    run_case(B=2, H=2, Nq=45, Nk=38, dk=32, dv=24, bs=bs, dtype=F16, causal=causal,
             layout=layout, config=cfg)
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or _has_tma():
        assert tma_calls, "the TMA path was not taken"


@pytest.mark.parametrize("layout", ["padded", "offset1"])
def test_tma_falls_back_on_illegal_layouts(layout, tma_calls):
    run_case(B=1, H=2, Nq=40, Nk=37, dk=32, bs=16, dtype=F16, causal=True, layout=layout,
             config=ForwardConfig(16, 16, 1, 1, True))
    assert not tma_calls


def _has_tma():
    return HAS_CUDA and torch.cuda.get_device_capability()[0] >= 9


TMA_RUNS = [(BF16, ForwardConfig(128, 128, 8, 3, True)), (BF16, ForwardConfig(64, 64, 4, 3, True)),
            (BF16, ForwardConfig(128, 64, 8, 3, True)), (F16, ForwardConfig(128, 128, 8, 3, True))]


@gpu
@pytest.mark.parametrize("dtype,cfg", TMA_RUNS, ids=lambda x: str(x).split(".")[-1]
                         if isinstance(x, torch.dtype) else x.describe())
@pytest.mark.parametrize("case", [
    dict(Nq=333, Nk=301, dk=128, bs=128, causal=False),          # ragged tails, Nq odd
    dict(Nq=333, Nk=301, dk=128, bs=128, causal=True),
    dict(Nq=257, Nk=390, dk=72, dv=72, bs=64, causal=True),      # padded head dim
    dict(Nq=300, Nk=299, dk=64, dv=128, bs=128, causal=True, layout="bnhd"),
    dict(Nq=389, Nk=367, dk=72, dv=96, bs=64, causal=True, layout="nanpad16"),
    dict(Nq=301, Nk=333, dk=128, bs=100, causal=True),           # generic block size
    dict(Nq=700, Nk=700, dk=128, bs=128, causal=True, pattern_dims=(1, 1), layout="bnhd"),
    dict(Nq=700, Nk=700, dk=128, bs=128, causal=False, pattern_dims=(2, 1)),
], ids=["ragged", "ragged-causal", "d72", "bnhd-dk64-dv128", "nanpad16", "bs100", "bcast11", "bcast21"])
def test_gpu_tma_matches_oracle(dtype, cfg, case, tma_calls):
    run_case(B=2, H=4, dtype=dtype, config=cfg, density=0.5, **case)
    assert bool(tma_calls) == _has_tma()


@gpu
@pytest.mark.parametrize("layout", ["padded", "offset1"])
def test_gpu_tma_misaligned_falls_back(layout, tma_calls):
    run_case(B=2, H=2, Nq=389, Nk=367, dk=72, dv=96, bs=64, dtype=BF16, causal=True,
             layout=layout, strided_out=True, config=ForwardConfig(64, 64, 4, 3, True))
    assert not tma_calls


@gpu
def test_gpu_tma_determinism_and_agrees_with_pointer_path():
    kw = dict(B=2, H=4, Nq=1000, Nk=1000, dk=128, bs=128, dtype=BF16, causal=True, density=0.4)
    y0, lse0, _ = run_case(config=ForwardConfig(128, 128, 8, 3, True), **kw)
    y1, lse1, _ = run_case(config=ForwardConfig(128, 128, 8, 3, True), check=False, **kw)
    yp, lsep, _ = run_case(config=ForwardConfig(128, 128, 8, 3), check=False, **kw)
    assert torch.equal(y0, y1) and torch.equal(lse0, lse1)
    # Same tiles and arithmetic: only the load path differs (expected bitwise equal; a
    # rounding-level difference would still be correct, so only that much is required).
    print("TMA vs pointer path bitwise equal:", torch.equal(y0, yp) and torch.equal(lse0, lsep))
    assert (y0.float() - yp.float()).abs().max() < 2e-2
    assert torch.allclose(lse0, lsep, rtol=0, atol=1e-4, equal_nan=False)
