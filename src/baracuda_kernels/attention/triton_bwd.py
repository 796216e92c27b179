"""Triton backward kernels of block-sparse attention (dQ, dK, dV) and their launcher.

Given the forward output ``y`` and its log-sum-exp ``lse``, the gradients are

    P  = exp(scale * Q K^T - lse)          (recomputed, never stored)
    dV = P^T dY
    dS = P * (dY V^T - delta),   delta_i = sum_d dY[i, d] * Y[i, d]
    dQ = scale * dS K,           dK = scale * dS^T Q

Two kernels, launched in order on the current stream, with no host synchronisation:

* ``_bwd_dq_kernel``: one program per (b*h, query tile), looping over the key blocks of its
  query block (``kv_index``), FULL blocks first without any mask arithmetic, then PARTIAL
  blocks (causal diagonal, ragged tail) with masks. It first computes its rows' ``delta``
  and ``lse2`` (``_row_stats``: the lse in the exponent base the loops use, log2 units for
  f16/bf16/f32, natural for f64, with ``-inf`` (a row that attends nothing) replaced by
  ``+inf`` so that ``exp(s - lse2)`` is exactly 0 there) and stores them for:
* ``_bwd_dkdv_kernel``: one program per (b*h, key tile), 1-D grid; it loops only over the
  query blocks that attend its key block (``BlockLists.transposed()``), likewise.

Without dQ (q needs no gradient), ``_bwd_preprocess_kernel`` computes delta and lse2 alone.

Every output element is written by exactly one program (no atomics), so the gradients are
bitwise reproducible. dQ and dK/dV recompute ``Q K^T`` and ``dY V^T`` separately: that is
the price of determinism without atomics (7 matmuls instead of 5; a fused kernel adding dQ
in a fixed order was measured slower in Triton 3.6, see notes/PERF.md).

16-bit inputs on sm90+ load the looped-over tiles (Q/dY in dK/dV, K/V in dQ) through TMA
descriptors (``triton_tma``) when the tile divides the pattern block. Programs take their
work item from a launch-order array (``_launch_order``): (b, h)-major, unusually long items
first.

Tiles may differ from the pattern block: a pattern block of ``block_size`` tokens is covered
by ``ceil(block_size / tile)`` tiles. When the tile does not divide the block (block sizes
that are not powers of two) rows past the block end are masked (the generic path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baracuda_kernels.core import Unsupported

from .triton_bwd_configs import (BackwardConfig, _tile, _warps, default_backward_config,
                                 short_row_backward_config)
from .triton_tma import head_source, row_tile_descriptor, tma_fallback_reason

_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _load_2d(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a [R, C] tile, masking only the dims that may run out of range (0 there)."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _load_rows(src, b32, h32, row0, offs, ok, stride, offs_d, d_ok, CHECK_ROWS: tl.constexpr,
               CHECK_COLS: tl.constexpr, USE_TMA: tl.constexpr, ROWS: tl.constexpr,
               COLS: tl.constexpr):
    """Rows ``offs`` (= row0 + 0..ROWS-1 under USE_TMA) of one (b, h) as a [ROWS, COLS] tile:
    through a TMA descriptor over the whole tensor (rows past the end and columns past D
    read 0), or from a pointer to this (b, h) with the masks that may be needed."""
    if USE_TMA:
        x = src.load([b32, h32, row0, 0]).reshape(ROWS, COLS)
    else:
        x = _load_2d(src + offs.to(tl.int64)[:, None] * stride + offs_d[None, :], ok, d_ok,
                     CHECK_ROWS, CHECK_COLS)
    return x


@triton.jit
def _row_stats(y, dy, lse, dlse, IS_F64: tl.constexpr, HAS_DLSE: tl.constexpr):
    """Per-row terms of the backward from y, dy tiles [R, D] and lse, dlse [R]:
    delta = sum_d y*dy - dlse (f32; f64 for f64) and lse2 = lse in the exponent base of the
    dK/dV and dQ loops (log2 units, natural for f64), -inf (a row that attends nothing)
    turned into +inf so that every recomputed P of that row is exactly 0.

    The lse gradient needs no kernel of its own: d lse_i / d s_ij = p_ij, so it adds
    p_ij * dlse_i to dS_ij = p_ij * (dp_ij - delta_i), i.e. it shifts delta by -dlse."""
    if IS_F64:
        delta = tl.sum(y.to(tl.float64) * dy.to(tl.float64), axis=1)
        lse2 = lse.to(tl.float64)
    else:
        delta = tl.sum(y.to(tl.float32) * dy.to(tl.float32), axis=1)
        lse2 = lse.to(tl.float32) * 1.4426950408889634
    if HAS_DLSE:
        delta = delta - dlse.to(delta.dtype)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse2)
    return delta, lse2


@triton.jit
def _bwd_preprocess_kernel(
    Y, DY, LSE, DLSE, DELTA, LSE2,
    stride_yb, stride_yh, stride_yn,
    stride_gb, stride_gh, stride_gn,
    stride_lb, stride_lh, stride_ln,
    stride_db, stride_dh, stride_dn,
    H, Nq, n_row_tiles,
    D_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, IS_F64: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    """delta and lse2 (see _row_stats) into [B*H, Nq] buffers, for a backward without dQ
    (the dQ kernel computes them itself otherwise).

    Grid (B*H*n_row_tiles,): 1-D, so B*H is not bound by the 65535 grid-y limit."""
    bh = tl.program_id(0) // n_row_tiles
    pid = tl.program_id(0) - bh * n_row_tiles
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_DV)
    row_ok = offs_r < Nq
    mask = row_ok[:, None] & (offs_d[None, :] < D_V)
    y = tl.load(Y + b * stride_yb + h * stride_yh + offs_r[:, None] * stride_yn + offs_d[None, :],
                mask=mask, other=0.0)
    dy = tl.load(DY + b * stride_gb + h * stride_gh + offs_r[:, None] * stride_gn
                 + offs_d[None, :], mask=mask, other=0.0)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_r * stride_ln, mask=row_ok,
                  other=float("-inf"))
    dlse = lse
    if HAS_DLSE:
        dlse = tl.load(DLSE + b * stride_db + h * stride_dh + offs_r * stride_dn, mask=row_ok,
                       other=0.0)
    delta, lse2 = _row_stats(y, dy, lse, dlse, IS_F64, HAS_DLSE)
    out = bh.to(tl.int64) * Nq + offs_r
    tl.store(DELTA + out, delta, mask=row_ok)
    tl.store(LSE2 + out, lse2, mask=row_ok)


@triton.jit
def _list_step(blk, it, offs0, n_tokens, BS: tl.constexpr, TILE: tl.constexpr,
               SUBS: tl.constexpr, MASKED: tl.constexpr):
    """Token offsets ``[TILE]`` and their validity for step ``it`` of a block-list walk:
    pattern block ``blk``, sub-tile ``it % SUBS`` of it. Rows past the block end (tile not
    dividing the block) are invalid; rows past ``n_tokens`` exist only in PARTIAL blocks
    (ragged tail), so only MASKED steps test them.

    Offsets are int32 (token indices < 2^31): the causal mask compares them over a whole
    [BLOCK_N, BLOCK_M] tile, where int64 costs registers. Widen before multiplying by a
    stride. Also returns the tile's first token (where a TMA load of the tile starts)."""
    if SUBS == 1:
        first = 0
    else:
        first = (it % SUBS) * TILE
    start = blk * BS + first
    in_block = first + offs0
    offs = start + offs0
    if MASKED:
        ok = (in_block < BS) & (offs < n_tokens)
    else:
        ok = in_block < BS
    return offs, ok, start


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_src, dy_src, lse_base, delta_base, list_row, it_lo, it_hi,
    stride_qn, stride_gn, offs_n, Nq, qk_scale, b32, h32,
    BS: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    SUBS_M: tl.constexpr, EVEN_M: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_F64: tl.constexpr, PRECISION: tl.constexpr,
    MASKED: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over query tiles it_lo..it_hi of the block list.

    Query rows that must not count (past Nq, or past the block end when the tile does not
    divide the block) load q = dy = 0 and lse2 = +inf, so their P is exactly 0 without any
    per-element mask. Key rows of this tile past Nk only produce rows that are never stored.
    Only the causal diagonal needs an element mask (PARTIAL blocks only).
    q_src/dy_src: pointers to Q/dY of this (b, h), or (USE_TMA, tiles dividing the block)
    descriptors over the whole tensors, whose rows past Nq and columns past D read as 0.
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ok = offs_dk < D_K
    dv_ok = offs_dv < D_V
    CHECK_ROWS: tl.constexpr = MASKED or not EVEN_M
    # The query block of the next step is loaded one iteration ahead and carried, so tile
    # addresses never wait on a load of the same iteration and the pipeliner can keep
    # num_stages tiles in flight (as in the forward's _attend_blocks).
    nxt = tl.load(list_row + it_lo // SUBS_M, mask=it_lo < it_hi, other=0)
    for it in range(it_lo, it_hi):
        qb = nxt
        nxt = tl.load(list_row + (it + 1) // SUBS_M, mask=it + 1 < it_hi, other=0)
        offs_m, row_ok, row0 = _list_step(qb, it, offs_m0, Nq, BS, BLOCK_M, SUBS_M, MASKED)
        q = _load_rows(q_src, b32, h32, row0, offs_m, row_ok, stride_qn, offs_dk, dk_ok,
                       CHECK_ROWS, BLOCK_DK != D_K, USE_TMA, BLOCK_M, BLOCK_DK)
        dy = _load_rows(dy_src, b32, h32, row0, offs_m, row_ok, stride_gn, offs_dv, dv_ok,
                        CHECK_ROWS, BLOCK_DV != D_V, USE_TMA, BLOCK_M, BLOCK_DV)
        if CHECK_ROWS:
            lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            lse2 = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # Transposed scores [BLOCK_N, BLOCK_M]: the results feed dV/dK without transposes.
        qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION, out_dtype=dk.dtype)
        if IS_F64:
            p_t = tl.exp(qk_t * qk_scale - lse2[None, :])
        else:
            p_t = tl.exp2(qk_t * qk_scale - lse2[None, :])
        if MASKED:
            if IS_CAUSAL:
                p_t = tl.where(offs_n[:, None] <= offs_m[None, :], p_t, 0.0)
        dv = tl.dot(p_t.to(dy.dtype), dy, dv, input_precision=PRECISION, out_dtype=dv.dtype)
        dp_t = tl.dot(v, tl.trans(dy), input_precision=PRECISION, out_dtype=dk.dtype)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION, out_dtype=dk.dtype)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DY, LSE2, DELTA, DK, DV, SCALE64,
    Q_INDEX, Q_COUNT_FULL, Q_COUNT, ORDER,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_ib, stride_ih, stride_ir,
    stride_cb, stride_ch,
    H, n_tiles, Nq, Nk, scale, qk_scale,
    BS: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SUBS_M: tl.constexpr, EVEN_M: tl.constexpr, TILES_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_F64: tl.constexpr, PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Grid (B*H*n_tiles,), n_tiles = nk * TILES_N: dK, dV of BLOCK_N keys of one key block.

    Program p does work item ORDER[p] = bh * n_tiles + tile (see ``_launch_order``): by
    default (b, h)-major, so the tiles of one head run together and share its Q/dY in L2,
    first key tiles first (under a causal mask they attend the most query blocks), with
    unusually long items (a sink column) moved to the front of the whole launch.
    """
    item = tl.load(ORDER + tl.program_id(0))
    bh = item // n_tiles
    tile = item - bh * n_tiles
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    kb = tile // TILES_N
    n_in_block = (tile % TILES_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = kb * BS + n_in_block  # int32 for the causal mask; int64 for addresses
    rows = offs_n.to(tl.int64)[:, None]
    key_ok = (n_in_block < BS) & (offs_n < Nk)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ok = offs_dk < D_K
    dv_ok = offs_dv < D_V

    if IS_F64:
        scale = tl.load(SCALE64)
        qk_scale = scale
    # Lists are [Bp, Hp, nk, nq] / [Bp, Hp, nk]; broadcast dims come with stride 0.
    list_row = Q_INDEX + b * stride_ib + h * stride_ih + kb.to(tl.int64) * stride_ir
    count_off = b * stride_cb + h * stride_ch + kb
    n_full = tl.load(Q_COUNT_FULL + count_off)
    n_all = tl.load(Q_COUNT + count_off)
    # A key block no query attends only stores zeros: its K/V loads are masked off.
    load_ok = key_ok & (offs_n < tl.where(n_all > 0, Nk, 0))  # vector & vector (interpreter)
    k = tl.load(K + b * stride_kb + h * stride_kh + rows * stride_kn + offs_dk[None, :],
                mask=load_ok[:, None] & dk_ok[None, :], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + rows * stride_vn + offs_dv[None, :],
                mask=load_ok[:, None] & dv_ok[None, :], other=0.0)
    if IS_F64:
        dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float64)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float64)
    else:
        dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    q_src = head_source(Q, b, h, stride_qb, stride_qh, USE_TMA)
    dy_src = head_source(DY, b, h, stride_gb, stride_gh, USE_TMA)
    b32 = bh // H
    h32 = bh % H
    lse_base = LSE2 + bh.to(tl.int64) * Nq
    delta_base = DELTA + bh.to(tl.int64) * Nq
    dk, dv = _dkdv_inner(dk, dv, k, v, q_src, dy_src, lse_base, delta_base, list_row,
                         0, n_full * SUBS_M, stride_qn, stride_gn, offs_n, Nq, qk_scale,
                         b32, h32, BS, D_K, D_V, BLOCK_DK, BLOCK_DV, BLOCK_M, SUBS_M, EVEN_M,
                         IS_CAUSAL, IS_F64, PRECISION, MASKED=False, USE_TMA=USE_TMA)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_src, dy_src, lse_base, delta_base, list_row,
                         n_full * SUBS_M, n_all * SUBS_M, stride_qn, stride_gn, offs_n, Nq,
                         qk_scale, b32, h32, BS, D_K, D_V, BLOCK_DK, BLOCK_DV, BLOCK_M, SUBS_M,
                         EVEN_M, IS_CAUSAL, IS_F64, PRECISION, MASKED=True, USE_TMA=USE_TMA)
    dk = dk * scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + rows * stride_dkn + offs_dk[None, :],
             dk.to(DK.dtype.element_ty), mask=key_ok[:, None] & dk_ok[None, :])
    tl.store(DV + b * stride_dvb + h * stride_dvh + rows * stride_dvn + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None] & dv_ok[None, :])


@triton.jit
def _dq_inner(
    dq, q, dy, lse2, delta, k_src, v_src, list_row, it_lo, it_hi,
    stride_kn, stride_vn, offs_m, Nk, qk_scale, b32, h32,
    BS: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    SUBS_N: tl.constexpr, EVEN_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_F64: tl.constexpr, PRECISION: tl.constexpr,
    MASKED: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Accumulate dQ of one query tile over key tiles it_lo..it_hi of the block list.

    Keys that must not count load k = v = 0 and get P = 0 by an element mask (a zero key
    alone would still give P = exp(-lse), which may overflow for very negative lse).
    k_src/v_src: pointers to K/V of this (b, h), or (USE_TMA) descriptors (see _dkdv_inner).
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ok = offs_dk < D_K
    dv_ok = offs_dv < D_V
    CHECK_COLS: tl.constexpr = MASKED or not EVEN_N
    # Next key block loaded one iteration ahead (see _dkdv_inner).
    nxt = tl.load(list_row + it_lo // SUBS_N, mask=it_lo < it_hi, other=0)
    for it in range(it_lo, it_hi):
        kb = nxt
        nxt = tl.load(list_row + (it + 1) // SUBS_N, mask=it + 1 < it_hi, other=0)
        offs_n, col_ok, col0 = _list_step(kb, it, offs_n0, Nk, BS, BLOCK_N, SUBS_N, MASKED)
        k = _load_rows(k_src, b32, h32, col0, offs_n, col_ok, stride_kn, offs_dk, dk_ok,
                       CHECK_COLS, BLOCK_DK != D_K, USE_TMA, BLOCK_N, BLOCK_DK)
        v = _load_rows(v_src, b32, h32, col0, offs_n, col_ok, stride_vn, offs_dv, dv_ok,
                       CHECK_COLS, BLOCK_DV != D_V, USE_TMA, BLOCK_N, BLOCK_DV)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=dq.dtype)
        if IS_F64:
            p = tl.exp(qk * qk_scale - lse2[:, None])
        else:
            p = tl.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            allowed = col_ok[None, :]
            if IS_CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(allowed, p, 0.0)
        elif not EVEN_N:
            p = tl.where(col_ok[None, :], p, 0.0)
        dp = tl.dot(dy, tl.trans(v), input_precision=PRECISION, out_dtype=dq.dtype)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION, out_dtype=dq.dtype)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DY, LSE2, DELTA, DQ, SCALE64,
    KV_INDEX, KV_COUNT_FULL, KV_COUNT, ORDER, Y, LSE, DLSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn,
    stride_dqb, stride_dqh, stride_dqn,
    stride_ib, stride_ih, stride_ir,
    stride_cb, stride_ch,
    stride_yb, stride_yh, stride_yn,
    stride_lb, stride_lh, stride_ln,
    stride_db, stride_dh, stride_dn,
    H, n_tiles, Nq, Nk, scale, qk_scale,
    BS: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SUBS_N: tl.constexpr, EVEN_N: tl.constexpr, TILES_M: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_F64: tl.constexpr, PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """Grid (B*H*n_tiles,), n_tiles = nq * TILES_M: dQ of BLOCK_M queries of one query block.

    It also computes its rows' delta and lse2 (_row_stats, from the y and dy rows it loads
    anyway) and stores them for the dK/dV kernel launched after it: the backward needs no
    separate preprocessing pass over y and dy (one launch and one read of dy fewer).

    Program p does work item ORDER[p] = bh * n_tiles + (n_tiles - 1 - tile): by default
    (b, h)-major with the last query tiles of a head first (under a causal mask they have
    the most key blocks), unusually long items first of all (see ``_launch_order``).
    """
    item = tl.load(ORDER + tl.program_id(0))
    bh = item // n_tiles
    tile = n_tiles - 1 - (item - bh * n_tiles)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    qb = tile // TILES_M
    m_in_block = (tile % TILES_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = qb * BS + m_in_block  # int32 for the causal mask; int64 for addresses
    rows = offs_m.to(tl.int64)[:, None]
    row_ok = (m_in_block < BS) & (offs_m < Nq)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ok = offs_dk < D_K
    dv_ok = offs_dv < D_V

    if IS_F64:
        scale = tl.load(SCALE64)
        qk_scale = scale
    list_row = KV_INDEX + b * stride_ib + h * stride_ih + qb.to(tl.int64) * stride_ir
    count_off = b * stride_cb + h * stride_ch + qb
    n_full = tl.load(KV_COUNT_FULL + count_off)
    n_all = tl.load(KV_COUNT + count_off)
    # A query block with no active key block reads nothing (masked-off loads): dq = 0, and
    # its delta / lse2 are never read, since no key block's list holds it.
    load_ok = row_ok & (offs_m < tl.where(n_all > 0, Nq, 0))  # vector & vector (interpreter)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qn + offs_dk[None, :],
                mask=load_ok[:, None] & dk_ok[None, :], other=0.0)
    dy = tl.load(DY + b * stride_gb + h * stride_gh + rows * stride_gn
                 + offs_dv[None, :], mask=load_ok[:, None] & dv_ok[None, :], other=0.0)
    y = tl.load(Y + b * stride_yb + h * stride_yh + rows * stride_yn + offs_dv[None, :],
                mask=load_ok[:, None] & dv_ok[None, :], other=0.0)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_m.to(tl.int64) * stride_ln,
                  mask=load_ok, other=float("-inf"))
    dlse = lse
    if HAS_DLSE:
        dlse = tl.load(DLSE + b * stride_db + h * stride_dh + offs_m.to(tl.int64) * stride_dn,
                       mask=load_ok, other=0.0)
    delta, lse2 = _row_stats(y, dy, lse, dlse, IS_F64, HAS_DLSE)
    stats = bh.to(tl.int64) * Nq + offs_m
    tl.store(DELTA + stats, delta, mask=row_ok)
    tl.store(LSE2 + stats, lse2, mask=row_ok)
    if IS_F64:
        dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float64)
    else:
        dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)

    k_src = head_source(K, b, h, stride_kb, stride_kh, USE_TMA)
    v_src = head_source(V, b, h, stride_vb, stride_vh, USE_TMA)
    b32 = bh // H
    h32 = bh % H
    dq = _dq_inner(dq, q, dy, lse2, delta, k_src, v_src, list_row, 0, n_full * SUBS_N,
                   stride_kn, stride_vn, offs_m, Nk, qk_scale, b32, h32, BS, D_K, D_V,
                   BLOCK_DK, BLOCK_DV, BLOCK_N, SUBS_N, EVEN_N, IS_CAUSAL, IS_F64, PRECISION,
                   MASKED=False, USE_TMA=USE_TMA)
    dq = _dq_inner(dq, q, dy, lse2, delta, k_src, v_src, list_row, n_full * SUBS_N,
                   n_all * SUBS_N, stride_kn, stride_vn, offs_m, Nk, qk_scale, b32, h32, BS,
                   D_K, D_V, BLOCK_DK, BLOCK_DV, BLOCK_N, SUBS_N, EVEN_N, IS_CAUSAL, IS_F64,
                   PRECISION, MASKED=True, USE_TMA=USE_TMA)
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows * stride_dqn + offs_dk[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & dk_ok[None, :])


# --------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------

_TORCH_TO_F64 = {torch.float16: False, torch.bfloat16: False, torch.float32: False,
                 torch.float64: True}


def _bhn(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _list_strides(index: torch.Tensor, count: torch.Tensor) -> tuple[int, ...]:
    """Strides of [Bp, Hp, n, m] lists and [Bp, Hp, n] counts, 0 on broadcast dims."""
    bcast_b, bcast_h = index.shape[0] == 1, index.shape[1] == 1
    return (0 if bcast_b else index.stride(0), 0 if bcast_h else index.stride(1), index.stride(2),
            0 if bcast_b else count.stride(0), 0 if bcast_h else count.stride(1))


def block_sparse_attention_backward_triton(
    q, k, v, y, lse, dy, lists, *, block_size: int, scale: float, is_causal: bool,
    dq, dk, dv, dlse=None, allow_tf32: bool = False, config: BackwardConfig | None = None,
) -> None:
    """Write dq, dk, dv of block-sparse attention (no host synchronisation, no atomics).

    Args:
        q: ``[B, H, Nq, Dk]``, k: ``[B, H, Nk, Dk]``, v: ``[B, H, Nk, Dv]``, all one dtype
            (f16, bf16, f32 or f64) on one CUDA device (CPU under TRITON_INTERPRET=1);
            any strides with unit last stride.
        y: forward output ``[B, H, Nq, Dv]`` (same dtype); lse: ``[B, H, Nq]`` natural-log
            log-sum-exp (f32 or f64; -inf on rows that attend nothing).
        dy: upstream gradient ``[B, H, Nq, Dv]``, any strides with unit last stride.
        lists: forward ``BlockLists`` of the pattern (``transposed()`` is used for dK/dV).
        block_size, scale, is_causal: as in the forward.
        dq, dk, dv: preallocated outputs shaped like q, k, v (same dtype); every valid
            element is written (0 where nothing is attended), nothing past Nq/Nk. dq None
            skips the dQ kernel, dk and dv None (together) the dK/dV kernel.
        dlse: gradient of lse ``[B, H, Nq]`` (any strides) or None (zero).
        allow_tf32: let f32 dots use TF32 (ieee otherwise).
        config: tile override (pinned in tests/benchmarks); default per dtype and head dim.
    """
    B, H, Nq, Dk = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    if (dk is None) != (dv is None):
        raise Unsupported("dk and dv must be given together (one kernel writes both)")
    for name, t in (("q", q), ("k", k), ("v", v), ("y", y), ("dy", dy), ("dq", dq), ("dk", dk),
                    ("dv", dv)):
        if t is not None and t.stride(-1) != 1 and t.shape[-1] > 1:
            raise Unsupported(f"{name} has last-dim stride {t.stride(-1)}; expected 1; "
                              f"fix: pass {name}.contiguous()")
    if q.dtype not in _TORCH_TO_F64:
        raise Unsupported(f"dtype {q.dtype}; expected float16, bfloat16, float32 or float64")
    if max(Dk, Dv) > 256:
        raise Unsupported(f"head dims (d_k={Dk}, d_v={Dv}); expected <= 256")
    if lists.kv_index.device != q.device:
        raise Unsupported(f"block lists are on {lists.kv_index.device}, tensors on {q.device}; "
                          "fix: build BlockLists from a pattern on the tensors' device")
    if B * H == 0:
        return
    if Nq == 0 or Nk == 0:
        # Nothing attends anything: every gradient that exists is 0.
        for g in (dq, dk, dv):
            if g is not None:
                g.zero_()
        return
    cfg = config or default_backward_config(q.dtype, max(Dk, Dv), block_size)
    n_blocks = -(-max(Nq, Nk) // block_size)
    if B * H * n_blocks * -(-block_size // 16) >= 2**31:  # 16 = smallest tile
        raise Unsupported(f"B*H*blocks = {B * H * n_blocks} gives a grid over 2^31 programs; "
                          "fix: split the batch")
    # The caller (the plan) makes q's device current: Triton launches on the current device.
    _launch(q, k, v, y, lse, dy, dlse, lists, block_size, scale, is_causal, dq, dk, dv,
            allow_tf32, cfg)


# A work item counts as heavy when its list is this many times the mean list length.
_HEAVY_FACTOR = 2.0


def _launch_order(lists, for_dq: bool, B: int, H: int, tiles: int, mode: str) -> torch.Tensor:
    """int32 [B*H*n*tiles]: the work item each program does, cached on ``lists``.

    Work item w = bh * n_tiles + t is tile t of head bh in the kernel's own order: key tiles
    ascending in dK/dV (list lengths from ``lists.transposed()``), query tiles descending in
    dQ (``for_dq``, list lengths ``lists.kv_count``). "head-major": items in order. "tile-major": tile t
    of every head before tile t + 1. "heavy-first": head-major, except that items whose
    list is over _HEAVY_FACTOR x the mean go first: a sink column attended by every query
    block is ~8x a sliding window's other key blocks, and started last it is the launch's
    tail (measured: window pattern backward +10% with them first).
    """
    if mode not in ("heavy-first", "head-major", "tile-major"):
        raise ValueError(f"launch_order {mode!r}; expected heavy-first, head-major or tile-major")

    count = lists.kv_count if for_dq else lists.transposed()[2]  # [Bp, Hp, n]
    if lists.mean_row_blocks is None and mode == "heavy-first":
        # Lists built for one call: the heavy-first order costs a chain of torch ops (host
        # time every call); keep the plain head-major order.
        mode = "head-major"

    def build():
        n_items = B * H * count.shape[-1] * tiles
        items = torch.arange(n_items, dtype=torch.int32, device=count.device)
        if mode == "head-major":
            return items
        if mode == "tile-major":
            return items.view(B * H, -1).t().contiguous().view(-1)
        per_item = count.expand(B, H, -1).repeat_interleave(tiles, dim=-1)
        if for_dq:
            per_item = per_item.flip(-1)
        per_item = per_item.reshape(-1).float()
        light = per_item <= _HEAVY_FACTOR * per_item.mean()
        return torch.argsort(light.to(torch.int8), stable=True).to(torch.int32)

    return lists.memo(("bwd-order", for_dq, B, H, tiles, mode), build)


def _looped_sources(want_tma: bool, a, b, rows: int, a_pad: int, b_pad: int):
    """The two tensors a kernel loops over (K, V for dQ; Q, dY for dK/dV) as TMA descriptors
    of ``rows``-row tiles when wanted and legal (triton_tma), else as they are.
    -> (a_arg, b_arg, uses_tma)"""
    if want_tma and tma_fallback_reason(a.dtype, a.device, a, b) is None:
        return row_tile_descriptor(a, rows, a_pad), row_tile_descriptor(b, rows, b_pad), True
    return a, b, False


def _launch(q, k, v, y, lse, dy, dlse, lists, block_size, scale, is_causal, dq, dk, dv,
            allow_tf32, cfg: BackwardConfig) -> None:
    """The three launches (see the module docstring); inputs already checked."""
    B, H, Nq, Dk = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    is_f64 = _TORCH_TO_F64[q.dtype]
    precision = "tf32" if (allow_tf32 and q.dtype == torch.float32) else "ieee"
    block_dk = max(16, triton.next_power_of_2(Dk))
    block_dv = max(16, triton.next_power_of_2(Dv))
    acc_dtype = torch.float64 if is_f64 else torch.float32
    dev = q.device
    # Python floats reach kernels as float32: f64 reads its scale from a tensor (a device
    # fill, no host copy, so this stays capturable in a CUDA graph).
    scale64 = torch.full((1,), float(scale), dtype=torch.float64, device=dev) if is_f64 else q
    qk_scale = float(scale) * (1.0 if is_f64 else _LOG2E)

    delta = torch.empty((B * H, Nq), dtype=acc_dtype, device=dev)
    lse2 = torch.empty((B * H, Nq), dtype=acc_dtype, device=dev)
    dlse_arg = lse if dlse is None else dlse  # never read when HAS_DLSE is False
    stats_args = (*_bhn(y), *_bhn(lse), *_bhn(dlse_arg))
    common = dict(BS=block_size, D_K=Dk, D_V=Dv, BLOCK_DK=block_dk, BLOCK_DV=block_dv,
                  IS_CAUSAL=bool(is_causal), IS_F64=is_f64, PRECISION=precision)
    nq, nk = -(-Nq // block_size), -(-Nk // block_size)

    if dq is not None:  # dQ (which also writes delta and lse2) only when q needs a gradient
        bm, tiles_m, _ = _tile(cfg.q_block_m, block_size)
        bn, subs_n, even_n = _tile(cfg.q_block_n, block_size)
        n_tiles = nq * tiles_m
        k_arg, v_arg, tma = _looped_sources(cfg.use_tma and even_n, k, v, bn, block_dk, block_dv)
        order = _launch_order(lists, True, B, H, tiles_m, cfg.launch_order)
        _bwd_dq_kernel[(B * H * n_tiles,)](
            q, k_arg, v_arg, dy, lse2, delta, dq, scale64, lists.kv_index, lists.kv_count_full,
            lists.kv_count, order, y, lse, dlse_arg, *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(dy),
            *_bhn(dq), *_list_strides(lists.kv_index, lists.kv_count), *stats_args,
            H, n_tiles, Nq, Nk, float(scale), qk_scale,
            BLOCK_M=bm, BLOCK_N=bn, SUBS_N=subs_n, EVEN_N=even_n, TILES_M=tiles_m, USE_TMA=tma,
            HAS_DLSE=dlse is not None, **common,
            num_warps=_warps(cfg.q_warps, bn * bm, q.dtype, max(block_dk, block_dv)),
            num_stages=cfg.q_stages)
    elif dk is not None:  # no dQ: a pass of its own for delta and lse2
        block_r = max(16, 4096 // block_dv)  # ~32 live values per thread of 4 warps
        n_row_tiles = triton.cdiv(Nq, block_r)
        _bwd_preprocess_kernel[(B * H * n_row_tiles,)](
            y, dy, lse, dlse_arg, delta, lse2, *_bhn(y), *_bhn(dy), *_bhn(lse), *_bhn(dlse_arg),
            H, Nq, n_row_tiles, D_V=Dv, BLOCK_DV=block_dv, BLOCK_R=block_r, IS_F64=is_f64,
            HAS_DLSE=dlse is not None, num_warps=4)

    if dk is not None:  # dK/dV only when k or v needs a gradient; reads delta and lse2
        q_index, q_count_full, q_count = lists.transposed()
        bn, tiles_n, _ = _tile(cfg.kv_block_n, block_size)
        bm, subs_m, even_m = _tile(cfg.kv_block_m, block_size)
        n_tiles = nk * tiles_n
        q_arg, dy_arg, tma = _looped_sources(cfg.use_tma and even_m, q, dy, bm, block_dk,
                                             block_dv)
        order = _launch_order(lists, False, B, H, tiles_n, cfg.launch_order)
        _bwd_dkdv_kernel[(B * H * n_tiles,)](
            q_arg, k, v, dy_arg, lse2, delta, dk, dv, scale64, q_index, q_count_full, q_count,
            order, *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(dy), *_bhn(dk), *_bhn(dv),
            *_list_strides(q_index, q_count), H, n_tiles, Nq, Nk, float(scale), qk_scale,
            BLOCK_M=bm, BLOCK_N=bn, SUBS_M=subs_m, EVEN_M=even_m, TILES_N=tiles_n, USE_TMA=tma,
            **common,
            num_warps=_warps(cfg.kv_warps, bn * bm, q.dtype, max(block_dk, block_dv)),
            num_stages=cfg.kv_stages)


__all__ = ["BackwardConfig", "block_sparse_attention_backward_triton", "default_backward_config",
           "short_row_backward_config"]
