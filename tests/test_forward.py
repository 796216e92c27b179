"""Forward pass vs an independent float64 dense oracle, for every backend.

On CPU the reference backend runs this grid; on a GPU the triton backend runs it too.
"""

import pytest
import torch

import baracuda_kernels as bk
from cases import ALL_DTYPES, BACKENDS, DEVICE, nblocks, random_pattern, random_qkv
from oracle import assert_matches_oracle, dense_attention


def run_and_check(q, k, v, pattern, bs, causal, backend, scale=None):
    y, lse = bk.block_sparse_attention(q, k, v, pattern, block_size=bs, is_causal=causal,
                                       scale=scale, return_lse=True, backend=backend)
    y64, lse64 = dense_attention(q, k, v, pattern, bs, causal, scale)
    y_lp, lse_lp = dense_attention(q, k, v, pattern, bs, causal, scale, dtype=q.dtype)
    assert y.dtype == q.dtype and y.shape == y64.shape
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert_matches_oracle(y, y64, y_lp, what="y")
    assert_matches_oracle(lse, lse64, lse_lp, what="lse")
    return y, lse


# (block_size, Nq, Nk): lengths 1, bs-1, bs+1, 113, 203 and Nq != Nk.
LENGTH_CASES = [
    (1, 1, 1), (1, 13, 7), (1, 37, 37),
    (16, 1, 1), (16, 15, 15), (16, 17, 17), (16, 113, 203), (16, 203, 113),
    (32, 31, 31), (32, 33, 33), (32, 113, 113), (32, 203, 203),
    (64, 63, 65), (64, 65, 63), (64, 113, 203),
    (128, 127, 127), (128, 129, 129), (128, 203, 113),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("bs,Nq,Nk", LENGTH_CASES)
def test_forward_matches_oracle(backend, dtype, causal, bs, Nq, Nk):
    q, k, v = random_qkv(2, 2, Nq, Nk, 32, 32, dtype, seed=Nq * 7 + Nk)
    pattern = random_pattern(2, 2, Nq, Nk, bs, seed=bs + Nq)
    run_and_check(q, k, v, pattern, bs, causal, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["b1h1", "b1", "h1", "flat", "uint8"])
def test_broadcast_and_flat_patterns(backend, layout):
    B, H, N, bs = 2, 3, 100, 16
    q, k, v = random_qkv(B, H, N, N, 16, 24, torch.float32)
    Bp, Hp = {"b1h1": (1, 1), "b1": (1, H), "h1": (B, 1)}.get(layout, (B, H))
    pattern = random_pattern(Bp, Hp, N, N, bs, seed=5)
    y_full = run_and_check(q, k, v, pattern, bs, True, backend)[0]
    if layout == "flat":
        pattern = pattern.flatten(2)
    elif layout == "uint8":
        pattern = pattern.to(torch.uint8)
    y = bk.block_sparse_attention(q, k, v, pattern, block_size=bs, is_causal=True, backend=backend)
    torch.testing.assert_close(y, y_full, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_all_zero_pattern(backend, dtype):
    q, k, v = random_qkv(1, 2, 70, 50, 16, 16, dtype)
    pattern = torch.zeros(1, 1, nblocks(70, 32), nblocks(50, 32), dtype=torch.bool, device=DEVICE)
    y, lse = bk.block_sparse_attention(q, k, v, pattern, block_size=32, return_lse=True, backend=backend)
    assert (y == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Nq,Nk", [(96, 96), (100, 77), (77, 100)])
def test_all_ones_equals_torch_sdpa(backend, dtype, causal, Nq, Nk):
    q, k, v = random_qkv(2, 2, Nq, Nk, 32, 32, dtype)
    pattern = torch.ones(1, 1, nblocks(Nq, 32), nblocks(Nk, 32), dtype=torch.bool, device=DEVICE)
    y = bk.block_sparse_attention(q, k, v, pattern, block_size=32, is_causal=causal, backend=backend)
    expect = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(y, expect, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_rows_emptied_by_pattern_and_causal(backend, dtype):
    bs, N = 16, 72
    q, k, v = random_qkv(1, 2, N, N, 16, 16, dtype)
    pattern = torch.ones(1, 2, nblocks(N, bs), nblocks(N, bs), dtype=torch.bool, device=DEVICE)
    pattern[..., 0, 0] = False          # block row 0 keeps only blocks above the diagonal
    pattern[:, 1, 2, :] = False         # head 1: a whole block row is off
    y, lse = run_and_check(q, k, v, pattern, bs, True, backend)
    assert (y[:, :, :bs] == 0).all() and torch.isneginf(lse[:, :, :bs]).all()
    assert (y[:, 1, 2 * bs:3 * bs] == 0).all()
    assert not torch.isnan(y).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_inputs(backend, dtype):
    B, H, Nq, Nk, D, bs = 2, 3, 90, 70, 16, 32
    q_bnhd, k_bnhd, v_bnhd = random_qkv(B, Nq, H, Nk, D, D, dtype)  # [B, N, H, D] storage
    q = random_qkv(B, Nq, H, Nk, D, D, dtype)[0].transpose(1, 2)
    big = torch.randn(B, H, Nk + 9, D + 8, dtype=torch.float32).to(DEVICE, dtype)
    k = big[:, :, 5:5 + Nk, 3:3 + D]                                   # storage offset + padded rows
    v = random_qkv(B, H, Nk, Nk, D, D, dtype, seed=3)[2].transpose(1, 2).contiguous().transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    pattern = random_pattern(B, H, Nq, Nk, bs, seed=9)
    y = run_and_check(q, k, v, pattern, bs, False, backend)[0]
    y_contig = bk.block_sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), pattern,
                                         block_size=bs, backend=backend)
    torch.testing.assert_close(y, y_contig, rtol=0, atol=0)
    del q_bnhd, k_bnhd, v_bnhd


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale_and_head_dims(backend):
    q, k, v = random_qkv(1, 2, 50, 60, 24, 40, torch.float64)
    pattern = random_pattern(1, 2, 50, 60, 16)
    run_and_check(q, k, v, pattern, 16, True, backend, scale=0.37)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_deterministic(backend, dtype):
    q, k, v = random_qkv(2, 2, 150, 150, 32, 32, dtype)
    pattern = random_pattern(2, 1, 150, 150, 32)
    first = bk.block_sparse_attention(q, k, v, pattern, block_size=32, return_lse=True, backend=backend)
    for _ in range(3):
        again = bk.block_sparse_attention(q, k, v, pattern, block_size=32, return_lse=True, backend=backend)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 10, 10), (2, 0, 10, 10), (1, 2, 0, 10), (1, 2, 10, 0)])
def test_empty_problems(backend, shape):
    B, H, Nq, Nk = shape
    q, k, v = random_qkv(B, H, Nq, Nk, 8, 8, torch.float32)
    pattern = torch.ones(1, 1, nblocks(Nq, 4), nblocks(Nk, 4), dtype=torch.bool, device=DEVICE)
    y, lse = bk.block_sparse_attention(q, k, v, pattern, block_size=4, return_lse=True, backend=backend)
    assert y.shape == (B, H, Nq, 8) and (y == 0).all() and torch.isneginf(lse).all()


def test_plan_writes_preallocated_outputs_and_reports_sku():
    d = bk.SdpaBlockSparseDescriptor(1, 2, 64, 64, 16, 16, block_size=16, is_causal=True,
                                     element=torch.float32)
    plan = bk.SdpaBlockSparsePlan.select(d, device=DEVICE, backend="reference")
    q, k, v = random_qkv(1, 2, 64, 64, 16, 16, torch.float32)
    pattern = random_pattern(1, 1, 64, 64, 16)
    y = torch.full(d.output_shape(), float("nan"), device=DEVICE)
    lse = torch.full(d.lse_shape(), float("nan"), device=DEVICE)
    out = plan.run(bk.SdpaBlockSparseArgs(q, k, v, pattern, y=y, lse=lse))
    assert out[0] is y and out[1] is lse and not torch.isnan(y).any()
    assert plan.workspace_size() == 0 and (plan.num_blocks_q, plan.num_blocks_k) == (4, 4)
    sku = plan.sku
    assert sku.backend is bk.BackendKind.REFERENCE and sku.element is bk.ElementKind.F32
    assert sku.aux_element is bk.ElementKind.F32 and sku.op is bk.AttentionKind.BLOCK_SPARSE_ATTENTION
    g = plan.precision_guarantee
    assert g.deterministic and g.bit_stable_on_same_hardware and g.math_precision is bk.MathPrecision.F32
