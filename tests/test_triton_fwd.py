"""Triton forward kernel of block-sparse attention vs the float64 dense oracle (the TMA K/V
path: test_triton_fwd_tma.py; shared inputs and run_case: triton_fwd_cases.py).

CPU tests run the same kernels under TRITON_INTERPRET=1 (set by conftest) on small shapes
(no bf16 there: the interpreter's bf16 tl.dot is broken). GPU tests (marked ``gpu``) cover
bf16, every head dim up to 256, large block sizes, NaN-padding probes, determinism and a
tensor with more than 2^31 elements.

Every run starts from outputs filled with NaN, so an element the kernel forgot to write
fails the comparison (NaN always fails), and outputs that are views of bigger NaN buffers
check that nothing outside the valid region is written.
"""

from __future__ import annotations

import pytest
import torch

from baracuda_kernels.attention.block_sparse.block_lists import BlockLists
from baracuda_kernels.attention.block_sparse.triton_fwd_configs import (
    ForwardConfig,
    candidate_forward_configs,
    default_forward_config,
    estimate_shared_bytes,
)
from baracuda_kernels.attention.block_sparse.triton_fwd_tune import (autotune_forward_config,
                                                                     clear_autotune_cache)
from baracuda_kernels.attention.block_sparse.triton_fwd import block_sparse_attention_forward_triton
from baracuda_kernels.core import ArchSku, InvalidProblem
from oracle import assert_matches_oracle, dense_attention, rel_error
from triton_fwd_cases import BF16, DEVICE, F16, F32, F64, gpu, run_case


# ------------------------------------------------- CPU (interpreter) and GPU: correctness

@pytest.mark.parametrize("dtype", [F32, F16, F64])
@pytest.mark.parametrize("causal", [False, True])
def test_dtypes(dtype, causal):
    run_case(B=1, H=2, Nq=77, Nk=77, dk=32, bs=16, dtype=dtype, causal=causal)


@pytest.mark.parametrize("Nq,Nk", [(1, 1), (15, 15), (17, 17), (1, 33), (33, 1), (50, 29),
                                   (29, 50), (16, 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_ragged_lengths(Nq, Nk, causal):
    run_case(Nq=Nq, Nk=Nk, dk=16, bs=16, causal=causal, density=0.7)


@pytest.mark.parametrize("bs", [16, 32, 64, 24, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_block_sizes(bs, causal):
    n = 61 if bs == 5 else 101
    run_case(Nq=n, Nk=n - 6, dk=16, bs=bs, causal=causal, density=0.6)


@pytest.mark.parametrize("bs,cfg", [
    (64, ForwardConfig(16, 16, 1, 1)),    # 4 programs per query block, 4 steps per key block
    (64, ForwardConfig(32, 64, 2, 1)),
    (32, ForwardConfig(64, 16, 2, 1)),    # tile taller than the block: rows masked
    (24, ForwardConfig(16, 16, 1, 1)),    # generic: 2 tiles, 2 steps, column masks in FULL
    (3, ForwardConfig(16, 32, 1, 1)),
])
@pytest.mark.parametrize("causal", [False, True])
def test_tile_splits(bs, cfg, causal):
    n = 40 if bs < 16 else 100
    run_case(Nq=n, Nk=n - 10, dk=16, bs=bs, causal=causal, density=0.6, config=cfg)


def test_empty_rows_pattern_and_causal():
    # Query block 0 sees only key block 2 (above the diagonal): causal empties it entirely.
    # Query block 1 has an all-zero pattern row. Query block 2 sees block 1 (FULL) and 2.
    pat = torch.tensor([[0, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)[None, None]
    y, lse, _ = run_case(B=1, H=1, Nq=44, Nk=44, dk=16, bs=16, causal=True, pattern=pat)
    assert torch.all(y[..., :32, :] == 0) and torch.all(lse[..., :32] == float("-inf"))
    assert torch.isfinite(lse[..., 32:]).all()


def test_all_empty_pattern():
    pat = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    y, lse, _ = run_case(B=2, H=2, Nq=40, Nk=40, bs=16, pattern=pat)
    assert torch.all(y == 0) and torch.all(lse == float("-inf"))


def test_causal_queries_past_keys():
    # Nq > Nk under causal: late queries see every key; Nq < Nk: late keys are never seen.
    run_case(Nq=70, Nk=35, dk=16, bs=16, causal=True, density=1.0)
    run_case(Nq=35, Nk=70, dk=16, bs=16, causal=True, density=1.0)


@pytest.mark.parametrize("dims", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_broadcast_patterns(dims):
    run_case(B=2, H=2, Nq=50, Nk=50, dk=16, bs=16, causal=True, pattern_dims=dims)


@pytest.mark.parametrize("layout", ["bnhd", "padded"])
def test_strided_inputs_and_outputs(layout):
    run_case(B=2, H=2, Nq=45, Nk=38, dk=24, dv=20, bs=16, causal=True, layout=layout,
             strided_out=True)


@pytest.mark.parametrize("dk,dv,dtype", [(24, 24, F32), (24, 40, F64), (64, 16, F16),
                                         (8, 8, F32), (48, 64, F32)])
def test_head_dims(dk, dv, dtype):
    run_case(Nq=40, Nk=40, dk=dk, dv=dv, bs=16, dtype=dtype, causal=True)


def test_f64_keeps_full_precision():
    # A scale that is not representable in f32: passing it as one f32 would cost ~1e-8.
    y, lse, (q, k, v, pat, scale) = run_case(Nq=50, Nk=50, dk=32, bs=16, dtype=F64,
                                             scale=0.1234567890123457, causal=True)
    ref_y, ref_lse = dense_attention(q, k, v, pat, 16, True, scale)
    assert rel_error(y, ref_y) < 1e-12 and rel_error(lse, ref_lse) < 1e-12


@pytest.mark.parametrize("scale", [0.0, -0.3, 2.5])
def test_unusual_scales(scale):
    run_case(Nq=40, Nk=40, dk=16, bs=16, causal=True, scale=scale, density=0.8)


def test_zero_lengths_are_noops():
    run_case(Nq=0, Nk=20, bs=16, check=False)
    y, lse, _ = run_case(Nq=20, Nk=0, bs=16, density=1.0, check=False)
    assert torch.all(y == 0) and torch.all(lse == float("-inf"))


# --------------------------------------------------------------------------- config table

@pytest.mark.parametrize("arch", [ArchSku.SM80, ArchSku.SM86, ArchSku.SM90, ArchSku.CPU])
def test_default_table_is_complete(arch):
    limits = {ArchSku.SM80: 163 * 1024, ArchSku.SM86: 99 * 1024, ArchSku.SM90: 227 * 1024}
    for dtype in (F16, BF16, F32, F64):
        for d in (16, 32, 64, 72, 80, 96, 128, 192, 256):
            for bs in (1, 5, 16, 32, 48, 64, 100, 128, 256, 300):
                for tf32 in (False, True):
                    cfg = default_forward_config(d, d, dtype, bs, arch, tf32)
                    assert isinstance(cfg, ForwardConfig)
                    assert cfg.describe().startswith(f"BM={cfg.block_m},BN={cfg.block_n},")
                    if arch in limits:
                        need = estimate_shared_bytes(cfg, d, d, dtype.itemsize, arch)
                        assert need <= limits[arch] or cfg.block_m == cfg.block_n == 16


def test_config_validation_and_candidates():
    with pytest.raises(InvalidProblem):
        ForwardConfig(48, 64, 4, 2)
    with pytest.raises(InvalidProblem):
        ForwardConfig(64, 64, 3, 2)
    cands = candidate_forward_configs(128, 128, BF16, 128, ArchSku.SM90)
    assert cands[0] == default_forward_config(128, 128, BF16, 128, ArchSku.SM90)
    assert len(set(cands)) == len(cands) >= 4
    assert all(c.block_m <= 128 and c.block_n <= 128 for c in cands)


def test_autotune_on_cpu_returns_default():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 20, 16, generator=gen)
    lists = BlockLists.build(torch.ones(1, 1, 2, 2, dtype=torch.bool), 20, 20, 16, False)
    cfg = autotune_forward_config(q, q, q, lists, block_size=16, scale=0.25, is_causal=False,
                                  allow_tf32=False)
    assert cfg == default_forward_config(16, 16, F32, 16, ArchSku.CPU)


# ------------------------------------------------------------------------------ GPU only

HEAD_DIMS = [32, 64, 72, 80, 96, 128, 192, 256]


@gpu
@pytest.mark.parametrize("dtype", [BF16, F16, F32, F64])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_gpu_dtypes_head_dims(dtype, d):
    run_case(B=2, H=3, Nq=333, Nk=301, dk=d, bs=64, dtype=dtype, causal=True, density=0.5)


@gpu
@pytest.mark.parametrize("bs", [16, 32, 64, 128, 256, 48, 100, 7])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_block_sizes(bs, causal):
    run_case(B=2, H=4, Nq=1001, Nk=999, dk=128, bs=bs, dtype=BF16, causal=causal, density=0.4)


@gpu
@pytest.mark.parametrize("bs", [64, 128])
def test_gpu_all_candidate_configs(bs):
    for cfg in candidate_forward_configs(128, 128, BF16, bs, ArchSku.from_device(DEVICE)):
        run_case(B=1, H=2, Nq=777, Nk=777, dk=128, bs=bs, dtype=BF16, causal=True, config=cfg)


@gpu
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("dk,dv", [(64, 128), (128, 64), (72, 200), (256, 32)])
def test_gpu_dk_ne_dv(dtype, dk, dv):
    run_case(B=2, H=2, Nq=300, Nk=270, dk=dk, dv=dv, bs=64, dtype=dtype, causal=True)


@gpu
def test_gpu_f32_is_true_f32_and_tf32_is_opt_in():
    y, lse, (q, k, v, pat, scale) = run_case(B=2, H=2, Nq=256, Nk=256, dk=64, bs=64, dtype=F32)
    ref_y, _ = dense_attention(q, k, v, pat, 64, False, scale)
    assert rel_error(y, ref_y) < 2e-5  # TF32 products would give ~1e-3
    y32, _, _ = run_case(B=2, H=2, Nq=256, Nk=256, dk=64, bs=64, dtype=F32, allow_tf32=True,
                         check=False)
    assert rel_error(y32, ref_y) < 2e-2


@gpu
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_f64_precision(d):
    y, lse, (q, k, v, pat, scale) = run_case(B=1, H=2, Nq=300, Nk=300, dk=d, bs=64, dtype=F64,
                                             causal=True, scale=0.1234567890123457)
    ref_y, ref_lse = dense_attention(q, k, v, pat, 64, True, scale)
    assert rel_error(y, ref_y) < 1e-12, rel_error(y, ref_y)
    assert rel_error(lse, ref_lse) < 1e-12, rel_error(lse, ref_lse)


@gpu
@pytest.mark.parametrize("dtype", [BF16, F16, F32, F64])
@pytest.mark.parametrize("bs", [64, 100])
def test_gpu_nan_padding_probe(dtype, bs):
    run_case(B=2, H=2, Nq=389, Nk=367, dk=72, dv=96, bs=bs, dtype=dtype, causal=True,
             layout="padded", strided_out=True)


@gpu
@pytest.mark.parametrize("dims", [(1, 1), (2, 1), (1, 4), (2, 4)])
def test_gpu_broadcast_and_empty_rows(dims):
    run_case(B=2, H=4, Nq=700, Nk=700, dk=128, bs=128, dtype=BF16, causal=True,
             pattern_dims=dims, density=0.3, layout="bnhd")


@gpu
def test_gpu_empty_rows():
    pat = torch.tensor([[0, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)[None, None]
    y, lse, _ = run_case(B=1, H=2, Nq=300, Nk=300, dk=128, bs=128, dtype=BF16, causal=True,
                         pattern=pat)
    assert torch.all(y[..., :256, :] == 0) and torch.all(lse[..., :256] == float("-inf"))


@gpu
def test_gpu_determinism():
    y0, lse0, (q, k, v, pat, scale) = run_case(B=4, H=8, Nq=2048, Nk=2048, dk=128, bs=128,
                                               dtype=BF16, causal=True, density=0.4,
                                               check=False)
    lists = BlockLists.build(pat.to(DEVICE), 2048, 2048, 128, True)
    for _ in range(20):
        y = torch.empty_like(y0)
        lse = torch.empty_like(lse0)
        block_sparse_attention_forward_triton(q, k, v, lists, block_size=128, scale=scale,
                                              is_causal=True, y=y, lse=lse)
        assert torch.equal(y, y0) and torch.equal(lse, lse0)


@gpu
@pytest.mark.parametrize("config", [None, ForwardConfig(128, 128, 8, 3, True)],
                         ids=["default", "tma"])
def test_gpu_more_than_2_31_elements(config):
    # q, k, v, y each hold B*H*N*D > 2^31 bf16 elements; a block-diagonal pattern keeps the
    # work tiny. The oracle is the same block-diagonal attention computed per block.
    B, H, N, D, bs = 1, 128, 131200, 128, 128
    need = 4 * B * H * N * D * 2 + (1 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free GPU memory, card has {free / 2**30:.1f}")
    assert B * H * N * D > 2**31
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(B, H, N, D, generator=gen, device=DEVICE, dtype=BF16)
    k = torch.randn(B, H, N, D, generator=gen, device=DEVICE, dtype=BF16)
    v = torch.randn(B, H, N, D, generator=gen, device=DEVICE, dtype=BF16)
    nb = N // bs
    pat = torch.eye(nb, dtype=torch.bool, device=DEVICE)[None, None]
    lists = BlockLists.build(pat, N, N, bs, False)
    y = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, N), float("nan"), device=DEVICE)
    scale = D ** -0.5
    block_sparse_attention_forward_triton(q, k, v, lists, block_size=bs, scale=scale,
                                          is_causal=False, y=y, lse=lse, config=config)
    for h in (0, H // 2, H - 1):  # the last head lives past element 2^31
        qh, kh, vh = (t[0, h].double().view(nb, bs, D) for t in (q, k, v))
        s = qh @ kh.transpose(-1, -2) * scale
        ref_lse = torch.logsumexp(s, -1).reshape(N)
        ref_y = (torch.softmax(s, -1) @ vh).reshape(N, D)
        same_s = (q[0, h].view(nb, bs, D) @ k[0, h].view(nb, bs, D).transpose(-1, -2)).float() * scale
        same_y = (torch.softmax(same_s, -1).to(BF16) @ v[0, h].view(nb, bs, D)).reshape(N, D)
        assert_matches_oracle(y[0, h], ref_y, same_y, what=f"y head {h}")
        assert_matches_oracle(lse[0, h], ref_lse, torch.logsumexp(same_s, -1).reshape(N),
                              what=f"lse head {h}")


@gpu
def test_gpu_autotune_caches_choice():
    clear_autotune_cache()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1, 4, 1024, 128, generator=gen, device=DEVICE, dtype=BF16)
               for _ in range(3))
    pat = torch.rand(1, 4, 8, 8, generator=gen, device=DEVICE) < 0.5
    lists = BlockLists.build(pat, 1024, 1024, 128, True)
    kw = dict(block_size=128, scale=128 ** -0.5, is_causal=True, allow_tf32=False)
    cfg = autotune_forward_config(q, k, v, lists, **kw)
    assert cfg in candidate_forward_configs(128, 128, BF16, 128, ArchSku.from_device(DEVICE))
    assert autotune_forward_config(q, k, v, lists, **kw) is cfg
    run_case(B=1, H=4, Nq=1024, Nk=1024, dk=128, bs=128, dtype=BF16, causal=True, config=cfg)
