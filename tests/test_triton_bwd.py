"""Triton backward kernels (dQ, dK, dV) vs autograd through the float64 dense oracle.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest) on small shapes,
f32 and f64 (bf16 dots are wrong in the interpreter). The GPU tests cover all dtypes, real
head dims and block sizes, and bitwise determinism.

Tolerance: kernel error vs float64 <= 3 x (error of autograd through the oracle run in the
input dtype) + a rounding floor; NaN always fails. y and lse fed to the kernel come from the
float64 oracle (y cast to the input dtype), so these tests do not depend on the forward kernel.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from baracuda_kernels.attention.block_sparse.block_lists import BlockLists
from baracuda_kernels.attention.block_sparse.triton_bwd import (
    BackwardConfig,
    block_sparse_attention_backward_triton,
    default_backward_config,
)
from oracle import assert_matches_oracle, dense_attention, rel_error

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def _strided(shape, dtype, layout, gen):
    """A [B, H, N, D] tensor with unit last stride in one of three memory layouts."""
    B, H, N, D = shape
    if layout == "contiguous":
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(DEV, dtype)
    if layout == "bnhd":  # heads interleaved, as after a fused projection
        t = torch.randn((B, N, H, D), generator=gen, dtype=torch.float64).to(DEV, dtype)
        return t.transpose(1, 2)
    if layout == "padded":  # rows longer than D (a slice of a wider buffer)
        t = torch.randn((B, H, N, D + 8), generator=gen, dtype=torch.float64).to(DEV, dtype)
        return t[..., :D]
    raise ValueError(layout)


def _pattern(Bp, Hp, nq, nk, density, gen, empty_rows=(), upper_only_rows=()):
    pat = torch.rand((Bp, Hp, nq, nk), generator=gen) < density
    for r in empty_rows:
        pat[:, :, r, :] = False
    for r in upper_only_rows:  # only blocks above the diagonal: causal AND pattern is empty
        pat[:, :, r, :] = False
        pat[:, :, r, r + 1:] = True
    return pat.to(DEV)


def _oracle_grads(q, k, v, dy, pattern, bs, causal, scale, dtype):
    """(y, lse, dq, dk, dv) by autograd through the dense oracle computed in `dtype`."""
    qd, kd, vd = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    y, lse = dense_attention(qd, kd, vd, pattern, bs, causal, scale, dtype=dtype)
    y.backward(dy.to(dtype))
    return y.detach(), lse.detach(), qd.grad, kd.grad, vd.grad


def _poisoned_like(t, extra_rows=3):
    """NaN-filled output shaped like t, a view of a buffer with extra rows past N."""
    B, H, N, D = t.shape
    buf = torch.full((B, H, N + extra_rows, D), float("nan"), dtype=t.dtype, device=t.device)
    return buf, buf[:, :, :N]


def run_case(*, dtype, B=1, H=2, Nq=48, Nk=48, Dk=16, Dv=16, bs=16, causal=False,
             density=0.6, bcast=(False, False), layout="contiguous", empty_rows=(),
             upper_only_rows=(),
             scale=None, config=None, allow_tf32=False, seed=0, factor=3.0, bound=None):
    gen = torch.Generator().manual_seed(seed)
    q = _strided((B, H, Nq, Dk), dtype, layout, gen)
    k = _strided((B, H, Nk, Dk), dtype, layout, gen)
    v = _strided((B, H, Nk, Dv), dtype, layout, gen)
    dy = _strided((B, H, Nq, Dv), dtype, "bnhd", gen)  # a non-contiguous upstream gradient
    nq, nk = -(-Nq // bs), -(-Nk // bs)
    pattern = _pattern(1 if bcast[0] else B, 1 if bcast[1] else H, nq, nk, density, gen,
                       empty_rows, upper_only_rows)
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale

    y64, lse64, dq64, dk64, dv64 = _oracle_grads(q, k, v, dy, pattern, bs, causal, scale,
                                                 torch.float64)
    _, _, dq_s, dk_s, dv_s = _oracle_grads(q, k, v, dy, pattern, bs, causal, scale, dtype)
    y = y64.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)  # strided y as well
    lse = lse64.to(torch.float64 if dtype == torch.float64 else torch.float32)

    lists = BlockLists.build(pattern, Nq, Nk, bs, causal)
    if config is not None and config.launch_order == "heavy-first":
        lists = lists.measured()  # as prepared: heavy-first applies to reused lists only
    bq, dq = _poisoned_like(q)
    bk, dk = _poisoned_like(k)
    bv, dv = _poisoned_like(v)
    block_sparse_attention_backward_triton(
        q, k, v, y, lse, dy, lists, block_size=bs, scale=scale, is_causal=causal,
        dq=dq, dk=dk, dv=dv, allow_tf32=allow_tf32, config=config)

    for buf, n in ((bq, Nq), (bk, Nk), (bv, Nk)):
        assert torch.isnan(buf[:, :, n:]).all(), "kernel wrote past the sequence length"
    for name, out, ref, same in (("dq", dq, dq64, dq_s), ("dk", dk, dk64, dk_s),
                                 ("dv", dv, dv64, dv_s)):
        assert not torch.isnan(out).any(), f"{name} has NaN (unwritten or masked-row NaN)"
        if bound is None:
            assert_matches_oracle(out, ref, same, factor=factor, what=name)
        else:
            assert rel_error(out, ref) <= bound, f"{name}: {rel_error(out, ref):.2e} > {bound}"
    return pattern, (dq, dk, dv), (dq64, dk64, dv64)


# ---------------------------------------------------------------------------------------
# CPU interpreter (and GPU when present): small shapes, f32 and f64
# ---------------------------------------------------------------------------------------

SMALL_DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_ragged_unequal_lengths(dtype, causal):
    run_case(dtype=dtype, Nq=61, Nk=45, bs=16, causal=causal, empty_rows=(1,))


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
def test_block32_causal_bnhd_layout(dtype):
    run_case(dtype=dtype, B=2, H=2, Nq=70, Nk=70, bs=32, causal=True, layout="bnhd",
             density=0.7)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("bs", [5, 24])
def test_odd_block_sizes(dtype, bs):
    run_case(dtype=dtype, Nq=53, Nk=47, bs=bs, causal=(bs == 24), density=0.5)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
def test_dk_ne_dv_padded_layout(dtype):
    run_case(dtype=dtype, Nq=40, Nk=56, Dk=24, Dv=8, bs=16, layout="padded")


@pytest.mark.parametrize("bcast", [(True, False), (False, True), (True, True)])
def test_broadcast_pattern(bcast):
    run_case(dtype=torch.float32, B=2, H=2, Nq=48, Nk=40, bs=16, bcast=bcast, density=0.5)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
def test_empty_rows_pattern_and_causal(dtype):
    # Block rows 0 and 3 empty in the pattern; block row 2 only has blocks above the
    # diagonal, which the causal mask empties. Those query rows have lse = -inf.
    _, (dq, dk, dv), _ = run_case(dtype=dtype, H=2, Nq=64, Nk=64, bs=16, causal=True,
                                  density=0.5, empty_rows=(0, 3), upper_only_rows=(2,), seed=3)
    for rows in (slice(0, 16), slice(32, 64)):
        assert torch.equal(dq[:, :, rows], torch.zeros_like(dq[:, :, rows]))
    # Key block 3 is attended only by block row 3 (empty) under causal: zero dK, dV.
    assert torch.equal(dk[:, :, 48:], torch.zeros_like(dk[:, :, 48:]))
    assert torch.equal(dv[:, :, 48:], torch.zeros_like(dv[:, :, 48:]))


def test_all_blocks_empty():
    run_case(dtype=torch.float32, Nq=33, Nk=20, bs=16, density=0.0)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
def test_tiles_smaller_than_block(dtype):
    # Pattern block 32 covered by 16-wide tiles in both kernels and both dims (the split
    # path used for block 256 on GPU), plus an uneven split (40 = 16 + 16 + 8).
    cfg = BackwardConfig(16, 16, 4, 1, 16, 16, 4, 1)
    run_case(dtype=dtype, Nq=77, Nk=64, bs=32, causal=True, config=cfg, density=0.7)
    run_case(dtype=dtype, Nq=90, Nk=83, bs=40, causal=False, config=cfg, density=0.7, seed=5)


def test_large_scale_no_overflow():
    # Big scores make exp(s - lse) overflow for masked / padded entries if they are not
    # masked before use: gradients must stay finite and correct.
    run_case(dtype=torch.float32, Nq=45, Nk=37, bs=16, causal=True, scale=3.0, seed=7)


def test_float64_precision():
    _, outs, refs = run_case(dtype=torch.float64, Nq=50, Nk=50, bs=16, causal=True, seed=11)
    for out, ref in zip(outs, refs):
        err = (out - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-12, f"f64 relative error {err:.2e}: some scalar or exp ran in f32"


def test_float16_interpreter():
    run_case(dtype=torch.float16, Nq=40, Nk=37, bs=16, causal=True, seed=2)


TMA_16 = BackwardConfig(16, 16, 4, 1, 16, 16, 4, 1, use_tma=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "bnhd"])
def test_tma_loads_interpreter(causal, layout):
    # Q/dY (dK/dV kernel) and K/V (dQ kernel) through tensor descriptors: ragged tails and
    # the padded head dim (24 -> 32) come back as zeros from the copy engine.
    run_case(dtype=torch.float16, Nq=45, Nk=61, Dk=24, Dv=16, bs=16, causal=causal,
             layout=layout, config=TMA_16, empty_rows=(1,), seed=21)


def test_tma_split_tiles_and_fallback(monkeypatch):
    from baracuda_kernels.attention.block_sparse import triton_bwd
    calls = []
    real = triton_bwd.row_tile_descriptor
    monkeypatch.setattr(triton_bwd, "row_tile_descriptor",
                        lambda t, n, d: calls.append(n) or real(t, n, d))
    # Block 32 over 16-row tiles: descriptors of 16-row tiles in both kernels.
    run_case(dtype=torch.float16, Nq=70, Nk=64, bs=32, causal=True, config=TMA_16, seed=8)
    assert calls == [16, 16, 16, 16]
    # Block 24: the tiles do not divide the block, so both kernels keep pointer loads.
    calls.clear()
    run_case(dtype=torch.float16, Nq=53, Nk=47, bs=24, causal=True, config=TMA_16)
    assert calls == []


def test_default_config_table():
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for d in (16, 64, 72, 128, 256):
            for bs in (16, 32, 64, 100, 128, 256):
                cfg = default_backward_config(dt, d, bs)
                assert cfg.kv_block_n >= 16 and cfg.q_block_m >= 16
                assert cfg.launch_order == "heavy-first"
    # Blocks of 64 or less get their own 16-bit entries (tiles clipped to the block).
    small = default_backward_config(torch.bfloat16, 64, 64)
    assert (small.q_warps, small.q_stages) == (4, 3)
    assert default_backward_config(torch.bfloat16, 128) == default_backward_config(
        torch.bfloat16, 128, 128)


@pytest.mark.parametrize("order", ["head-major", "tile-major", "heavy-first"])
@pytest.mark.parametrize("causal", [False, True])
def test_launch_orders(order, causal):
    # Every launch order (and split tiles) must give the same gradients.
    cfg = BackwardConfig(16, 16, 4, 2, 16, 16, 4, 2, launch_order=order)
    run_case(dtype=torch.float32, B=2, H=2, Nq=70, Nk=45 if not causal else 70, bs=32,
             causal=causal, config=cfg, density=0.7, seed=9)


def test_heavy_first_order_puts_sink_column_first():
    from baracuda_kernels.attention.block_sparse.triton_bwd import _launch_order
    # Sliding window of 2 blocks plus a sink column (key block 0, attended by all 16 rows).
    i = torch.arange(16)
    pattern = (((i[:, None] - i[None, :]).abs() < 2) | (i[None, :] == 0))[None, None]
    lists = BlockLists.build(pattern, 16 * 16, 16 * 16, 16, True).measured()
    order = _launch_order(lists, False, 2, 3, 1, 2, "heavy-first").tolist()
    # Lists built for one call keep the head-major order (no per-call torch ops).
    per_call = BlockLists.build(pattern, 16 * 16, 16 * 16, 16, True)
    assert _launch_order(per_call, False, 2, 3, 1, 2, "heavy-first").tolist() == list(range(6 * 32))
    # Items are (bh * 32 + tile), 2 tiles per block: key block 0 of all 6 heads first
    # (12 items), then the rest head-major; a permutation of all items.
    heavy = [bh * 32 + t for bh in range(6) for t in (0, 1)]
    assert order[:12] == heavy
    rest = [w for w in range(6 * 32) if w not in heavy]
    assert order[12:] == rest
    assert _launch_order(lists, False, 2, 3, 1, 2, "heavy-first") is \
        _launch_order(lists, False, 2, 3, 1, 2, "heavy-first"), "not cached"
    with pytest.raises(ValueError, match="launch_order"):
        _launch_order(lists, False, 2, 3, 1, 2, "random")


def test_prefetch_single_and_empty_lists():
    # Block rows whose list has 0 or 1 entries: the one-ahead index load must stay masked.
    run_case(dtype=torch.float32, Nq=64, Nk=64, bs=16, density=0.15, empty_rows=(0, 2),
             seed=4)


# ---------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------

ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("d", [64, 72, 128, 256])
def test_gpu_head_dims(dtype, d):
    run_case(dtype=dtype, B=2, H=3, Nq=300, Nk=300, Dk=d, Dv=d, bs=64, causal=True,
             density=0.5, empty_rows=(2,), layout="bnhd")


GPU_BLOCK_CASES = ([(torch.bfloat16, bs, c) for bs in (16, 32, 64, 128, 256, 48, 100)
                    for c in (False, True)]
                   + [(dt, bs, True) for dt in (torch.float16, torch.float32)
                      for bs in (32, 128, 256, 48)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bs,causal", GPU_BLOCK_CASES)
def test_gpu_block_sizes(dtype, bs, causal):
    run_case(dtype=dtype, B=1, H=4, Nq=517, Nk=389 if not causal else 517, Dk=128, Dv=128,
             bs=bs, causal=causal, density=0.4, empty_rows=(1,), seed=bs)


@pytest.mark.gpu
def test_gpu_float64_block256():
    run_case(dtype=torch.float64, B=1, H=2, Nq=300, Nk=280, Dk=64, Dv=32, bs=256,
             causal=True, density=0.8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_dk_ne_dv(dtype):
    run_case(dtype=dtype, B=2, H=2, Nq=400, Nk=333, Dk=192, Dv=64, bs=128, causal=False,
             layout="padded", density=0.5)


@pytest.mark.gpu
def test_gpu_tf32_allowed():
    # TF32 dots round operands to 10 mantissa bits: about 1e-3 relative, not f32's 1e-6.
    run_case(dtype=torch.float32, B=1, H=2, Nq=256, Nk=256, Dk=64, Dv=64, bs=64,
             allow_tf32=True, bound=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_deterministic(dtype):
    gen = torch.Generator().manual_seed(1)
    B, H, N, D, bs = 4, 8, 1024, 128, 128
    q, k, v, dy = (torch.randn((B, H, N, D), generator=gen).to(DEV, dtype) for _ in range(4))
    pattern = (torch.rand((1, H, N // bs, N // bs), generator=gen) < 0.4).to(DEV)
    scale = D ** -0.5
    y, lse = dense_attention(q, k, v, pattern, bs, True, scale, dtype=torch.float32)
    y = y.to(dtype)
    lists = BlockLists.build(pattern, N, N, bs, True)
    first = None
    for _ in range(10):
        outs = [torch.empty_like(t) for t in (q, k, v)]
        block_sparse_attention_backward_triton(q, k, v, y, lse, dy, lists, block_size=bs,
                                               scale=scale, is_causal=True, dq=outs[0],
                                               dk=outs[1], dv=outs[2])
        if first is None:
            first = outs
        else:
            for a, b in zip(first, outs):
                assert torch.equal(a, b), "backward is not bitwise deterministic"


@pytest.mark.gpu
def test_gpu_many_heads_1d_grid():
    # B*H over 65535 (the old grid-y limit): the 1-D grids cover every (b, h).
    run_case(dtype=torch.float32, B=1, H=65537, Nq=20, Nk=20, Dk=16, Dv=16, bs=16,
             causal=True, density=1.0, bcast=(True, True))


@pytest.mark.gpu
@pytest.mark.parametrize("bs", [64, 128])
@pytest.mark.parametrize("order", ["tile-major", "head-major"])
def test_gpu_launch_orders(bs, order):
    cfg = dataclasses.replace(default_backward_config(torch.bfloat16, 128, bs),
                              launch_order=order)
    run_case(dtype=torch.bfloat16, B=2, H=3, Nq=517, Nk=517, Dk=128, Dv=128, bs=bs,
             causal=True, density=0.5, config=cfg, seed=bs)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    # Row stride 2**24 + 64 elements: row offsets reach ~2.7e9 > 2**31, so any 32-bit offset
    # arithmetic in any of the three kernels reads or writes the wrong place.
    dtype, N, D, bs = torch.bfloat16, 160, 64, 64
    row = 2**24 + 64
    n_el = (N - 1) * row + 8 * D
    inputs = torch.empty(n_el, dtype=dtype, device=DEV)
    outputs = torch.full((n_el,), float("nan"), dtype=dtype, device=DEV)
    view = lambda buf, i: buf.as_strided((1, 1, N, D), (N * row, N * row, row, 1), i * D)  # noqa
    q, k, v, y, dy = (view(inputs, i) for i in range(5))
    gen = torch.Generator().manual_seed(0)
    for t in (q, k, v, dy):
        t.copy_(torch.randn((1, 1, N, D), generator=gen))
    pattern = torch.tensor([[1, 0, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool,
                           device=DEV)[None, None]
    scale = D ** -0.5
    y64, lse64, dq64, dk64, dv64 = _oracle_grads(q, k, v, dy, pattern, bs, True, scale,
                                                 torch.float64)
    _, _, dq_s, dk_s, dv_s = _oracle_grads(q, k, v, dy, pattern, bs, True, scale, dtype)
    y.copy_(y64)
    dq, dk, dv = (view(outputs, i) for i in range(3))
    lists = BlockLists.build(pattern, N, N, bs, True)
    block_sparse_attention_backward_triton(q, k, v, y, lse64.float(), dy, lists, block_size=bs,
                                           scale=scale, is_causal=True, dq=dq, dk=dk, dv=dv)
    for name, out, ref, same in (("dq", dq, dq64, dq_s), ("dk", dk, dk64, dk_s),
                                 ("dv", dv, dv64, dv_s)):
        assert_matches_oracle(out, ref, same, factor=3.0, what=name)
    assert torch.isnan(view(outputs, 3)).all(), "wrote outside dq/dk/dv"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bs,d,causal", [(128, 128, True), (128, 128, False), (64, 64, True),
                                         (64, 72, False), (256, 128, True), (32, 256, False),
                                         (16, 64, True)])
def test_gpu_tma_loads(dtype, bs, d, causal):
    cfg = dataclasses.replace(default_backward_config(dtype, d, bs), use_tma=True)
    run_case(dtype=dtype, B=2, H=3, Nq=517, Nk=389 if not causal else 517, Dk=d, Dv=d,
             bs=bs, causal=causal, density=0.5, empty_rows=(1,), layout="bnhd", config=cfg,
             seed=bs + d)
