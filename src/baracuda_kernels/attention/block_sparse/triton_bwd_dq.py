"""dQ kernel of the block-sparse attention backward (launched by triton_bwd.py).

One program per (b, query head, query tile): it loads its Q, dY, Y rows once, computes the
rows' delta and lse2 (stored for the dK/dV kernel), then walks its query block's key blocks
(FULL first with no mask arithmetic, then PARTIAL) in the K/V head of its GQA group, and
writes dQ once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common.kernel_pieces import (bias_tile, block_bits_tile, exp_base, head_value,
                                    kernel_scale, modified_scores, token_allowed, token_values)
from ..common.triton_tma import head_source, masked_step_source
from .triton_bwd_pieces import _list_step, _load_rows, _row_stats


@triton.jit
def _dq_inner(
    dq, q, dy, lse2, delta, k_src, v_src, list_row, it_lo, it_hi,
    stride_kn, stride_vn, offs_m, Nk, causal_offset, win_lo, win_hi, sinks, qk_scale, b32, h32,
    q_id, q_pos, k_ids, k_poss, slot_row, bits_words, m_in_block, row_ok, cap, slope,
    alibi_off, bias_rows,
    BS: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    SUBS_N: tl.constexpr, EVEN_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_F64: tl.constexpr,
    PRECISION: tl.constexpr,
    MASKED: tl.constexpr, USE_TMA: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_POS: tl.constexpr, HAS_BITS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
    FAST_TANH: tl.constexpr,
):
    """Accumulate dQ of one query tile over key tiles it_lo..it_hi of the block list.

    Keys that must not count load k = v = 0 and get P = 0 by an element mask (a zero key
    alone would still give P = exp(-lse), which may overflow for very negative lse).
    k_src/v_src: pointers to K/V of this (b, K/V head), or (USE_TMA) descriptors (see
    triton_bwd_dkdv._dkdv_inner); b32/h32 index the descriptors.
    Token rules (MASKED steps only, see triton_fwd_steps._attend_blocks): a padded key counts as a
    key past the end (k = v = 0, P = 0); with ids the kernel passes pointers (USE_TMA off).
    HAS_BITS: the block's bits (slot ``slot_row[kb]``) at rows ``m_in_block`` also decide.
    HAS_SOFTCAP / HAS_ALIBI: P from the modified scores (kernel_pieces.modified_scores), and
    dS through the cap's tanh: d cap*tanh(s/cap) / ds = 1 - (capped / cap)^2.
    HAS_BIAS: the bias rows ``bias_rows`` (pointers [M]) join the scores.
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
        if MASKED and HAS_IDS:
            k_id = tl.load(k_ids + offs_n, mask=col_ok, other=-2)
            col_ok = col_ok & (k_id >= 0)
        k = _load_rows(k_src, b32, h32, col0, offs_n, col_ok, stride_kn, offs_dk, dk_ok,
                       CHECK_COLS, BLOCK_DK != D_K, USE_TMA, BLOCK_N, BLOCK_DK)
        v = _load_rows(v_src, b32, h32, col0, offs_n, col_ok, stride_vn, offs_dv, dv_ok,
                       CHECK_COLS, BLOCK_DV != D_V, USE_TMA, BLOCK_N, BLOCK_DV)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=dq.dtype)
        if HAS_POS and ((MASKED and (IS_CAUSAL or HAS_WINDOW)) or HAS_ALIBI):
            k_pos = tl.load(k_poss + offs_n, mask=offs_n < Nk, other=0)
        else:
            k_pos = offs_n
        if HAS_SOFTCAP or HAS_ALIBI or HAS_BIAS:
            if HAS_BIAS:
                bias = bias_tile(bias_rows, offs_n, row_ok, col_ok, IS_F64, False, CHECK_COLS)
            else:
                bias = qk  # unused
            s_mod, capped = modified_scores(qk * qk_scale, q_pos[:, None], k_pos[None, :], cap,
                                            slope, alibi_off, bias, HAS_SOFTCAP, HAS_ALIBI,
                                            HAS_BIAS, IS_F64, FAST_TANH)
            p = exp_base(s_mod - lse2[:, None], IS_F64)
        else:
            p = exp_base(qk * qk_scale - lse2[:, None], IS_F64)
        if MASKED:
            allowed = col_ok[None, :]
            if IS_CAUSAL or HAS_WINDOW:
                allowed = allowed & token_allowed(q_pos[:, None], k_pos[None, :],
                                                  causal_offset, win_lo, win_hi, sinks,
                                                  IS_CAUSAL, HAS_WINDOW)
            if HAS_IDS:
                allowed = allowed & (q_id[:, None] == k_id[None, :])
            if HAS_BITS:
                slot = tl.load(slot_row + kb)
                allowed = allowed & block_bits_tile(bits_words, slot, m_in_block, row_ok,
                                                    offs_n - kb * BS, col0 - kb * BS, BS,
                                                    False)
            p = tl.where(allowed, p, 0.0)
        elif not EVEN_N:
            p = tl.where(col_ok[None, :], p, 0.0)
        dp = tl.dot(dy, tl.trans(v), input_precision=PRECISION, out_dtype=dq.dtype)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ratio = capped * (1.0 / cap)
            ds = ds * (1.0 - ratio * ratio)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION, out_dtype=dq.dtype)
    return dq


@triton.jit(do_not_specialize=["H", "n_tiles", "Nq", "Nk", "G", "LIST_DIV", "CAUSAL_OFFSET",
                                     "WIN_LO", "WIN_HI", "SINKS", "stride_tq", "stride_tk",
                                     "stride_sb", "stride_sh", "stride_sq", "stride_ab",
                                     "ALIBI_OFF"])
def _bwd_dq_kernel(
    Q, K, V, K_RAW, V_RAW, DY, LSE2, DELTA, DQ,
    KV_INDEX, KV_COUNT_FULL, KV_COUNT, ORDER, Y, LSE, DLSE, Q_IDS, K_IDS, Q_POS, K_POS,
    BITS_SLOTS, BITS_WORDS, ALIBI, BIAS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn,
    stride_dqb, stride_dqh, stride_dqn,
    stride_ib, stride_ih, stride_ir,
    stride_cb, stride_ch,
    stride_yb, stride_yh, stride_yn,
    stride_lb, stride_lh, stride_ln,
    stride_db, stride_dh, stride_dn, stride_tq, stride_tk, stride_sb, stride_sh, stride_sq,
    stride_ab, stride_xb, stride_xh, stride_xq,
    H, n_tiles, Nq, Nk, scale, qk_hi, qk_lo, G, LIST_DIV, CAUSAL_OFFSET, WIN_LO, WIN_HI, SINKS,
    SOFTCAP, SOFTCAP_LO, ALIBI_OFF,
    BS: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SUBS_N: tl.constexpr, EVEN_N: tl.constexpr, TILES_M: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_F64: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, HAS_DLSE: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_POS: tl.constexpr, HAS_BITS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
    FAST_TANH: tl.constexpr,
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

    qk_scale = kernel_scale(qk_hi, qk_lo, IS_F64)
    cap = kernel_scale(SOFTCAP, SOFTCAP_LO, IS_F64)  # f64 needs the cap to f64 precision
    if IS_F64:
        scale = qk_scale
    # GQA: K/V head h // G; list head h // LIST_DIV (per query head, per K/V head or shared).
    hk32 = (bh % H) // G
    hl = ((bh % H) // LIST_DIV).to(tl.int64)
    list_row = KV_INDEX + b * stride_ib + hl * stride_ih + qb.to(tl.int64) * stride_ir
    count_off = b * stride_cb + hl * stride_ch + qb
    slot_row = BITS_SLOTS + b * stride_sb + hl * stride_sh + qb.to(tl.int64) * stride_sq
    n_full = tl.load(KV_COUNT_FULL + count_off)
    n_all = tl.load(KV_COUNT + count_off)
    # A query block with no active key block reads nothing (masked-off loads): dq = 0, and
    # its delta / lse2 are never read, since no key block's list holds it.
    load_ok = row_ok & (offs_m < tl.where(n_all > 0, Nq, 0))  # vector & vector (interpreter)
    k_ids = K_IDS + b * stride_tk
    k_poss = K_POS + b * stride_tk
    q_id, q_pos = token_values(Q_IDS + b * stride_tq, Q_POS + b * stride_tq, offs_m, row_ok, -1,
                               HAS_IDS, HAS_POS)
    if HAS_IDS:
        load_ok = load_ok & (q_id >= 0)  # a padded query row: dq = 0, never read
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
        # Every row's dlse, empty ones too: delta = dy . y - dlse is exact on every row
        # (the sinks' gradient reads it where a row saw only its sink).
        dlse = tl.load(DLSE + b * stride_db + h * stride_dh + offs_m.to(tl.int64) * stride_dn,
                       mask=row_ok, other=0.0)
    delta, lse2 = _row_stats(y, dy, lse, dlse, IS_F64, HAS_DLSE)
    stats = bh.to(tl.int64) * Nq + offs_m
    tl.store(DELTA + stats, delta, mask=row_ok)
    tl.store(LSE2 + stats, lse2, mask=row_ok)
    if IS_F64:
        dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float64)
    else:
        dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)

    k_src = head_source(K, b, hk32.to(tl.int64), stride_kb, stride_kh, USE_TMA)
    v_src = head_source(V, b, hk32.to(tl.int64), stride_vb, stride_vh, USE_TMA)
    PARTIAL_TMA: tl.constexpr = USE_TMA and not HAS_IDS  # ids: masked pointer loads
    k_part = masked_step_source(k_src, K_RAW, b, hk32.to(tl.int64), stride_kb, stride_kh,
                                PARTIAL_TMA)
    v_part = masked_step_source(v_src, V_RAW, b, hk32.to(tl.int64), stride_vb, stride_vh,
                                PARTIAL_TMA)
    b32 = bh // H
    if HAS_ALIBI:
        slope = head_value(ALIBI, b, h, 0, stride_ab, IS_F64)
    else:
        slope = qk_scale  # unused
    bias_rows = BIAS + b * stride_xb + h * stride_xh + offs_m.to(tl.int64) * stride_xq
    # FULL blocks (no mask arithmetic), then PARTIAL ones.
    dq = _dq_inner(dq, q, dy, lse2, delta, k_src, v_src, list_row, 0, n_full * SUBS_N,
                   stride_kn, stride_vn, offs_m, Nk, CAUSAL_OFFSET, WIN_LO, WIN_HI, SINKS,
                   qk_scale, b32, hk32, q_id, q_pos, k_ids, k_poss, slot_row, BITS_WORDS,
                   m_in_block, row_ok, cap, slope, ALIBI_OFF, bias_rows, BS, D_K, D_V,
                   BLOCK_DK,
                   BLOCK_DV, BLOCK_N, SUBS_N, EVEN_N, IS_CAUSAL, HAS_WINDOW, IS_F64, PRECISION,
                   MASKED=False, USE_TMA=USE_TMA, HAS_IDS=HAS_IDS, HAS_POS=HAS_POS,
                   HAS_BITS=HAS_BITS, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
                   HAS_BIAS=HAS_BIAS, FAST_TANH=FAST_TANH)
    dq = _dq_inner(dq, q, dy, lse2, delta, k_part, v_part, list_row, n_full * SUBS_N,
                   n_all * SUBS_N, stride_kn, stride_vn, offs_m, Nk, CAUSAL_OFFSET, WIN_LO,
                   WIN_HI, SINKS, qk_scale, b32, hk32, q_id, q_pos, k_ids, k_poss, slot_row,
                   BITS_WORDS, m_in_block, row_ok, cap, slope, ALIBI_OFF, bias_rows, BS,
                   D_K, D_V,
                   BLOCK_DK, BLOCK_DV, BLOCK_N, SUBS_N, EVEN_N, IS_CAUSAL, HAS_WINDOW, IS_F64,
                   PRECISION, MASKED=True, USE_TMA=PARTIAL_TMA, HAS_IDS=HAS_IDS,
                   HAS_POS=HAS_POS, HAS_BITS=HAS_BITS, HAS_SOFTCAP=HAS_SOFTCAP,
                   HAS_ALIBI=HAS_ALIBI, HAS_BIAS=HAS_BIAS, FAST_TANH=FAST_TANH)
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows * stride_dqn + offs_dk[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & dk_ok[None, :])
