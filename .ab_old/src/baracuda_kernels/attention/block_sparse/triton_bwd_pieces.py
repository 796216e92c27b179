"""@triton.jit pieces shared by the backward kernels (triton_bwd_dq.py, triton_bwd_dkdv.py):
masked tile loads, per-row statistics (delta, lse2), block-list stepping, and the small
preprocessing kernel that computes the row statistics when dQ is not wanted."""

from __future__ import annotations

import triton
import triton.language as tl

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
        lse2 = lse.to(tl.float32) * 1.4426950408889634  # log2(e): numerics.LOG2E
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
