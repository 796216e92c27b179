"""dK/dV kernel of the block-sparse attention backward (launched by triton_bwd.py).

One program per (b, K/V head, key tile): it loads its K and V rows once, then walks, for each
query head of its GQA group in turn, the query blocks that attend its key block (the
transposed lists, FULL blocks first with no mask arithmetic, then PARTIAL ones), and writes
dK, dV once: no atomics, the same summation order on every run.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common.kernel_pieces import (bias_tile, block_bits_tile, exp_base, head_value,
                                    kernel_scale, modified_scores, token_allowed, token_values)
from ..common.triton_tma import head_source, masked_step_source
from .triton_bwd_pieces import _list_step, _load_rows


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_src, dy_src, lse_base, delta_base, list_row, it_lo, it_hi,
    stride_qn, stride_gn, offs_n, Nq, causal_offset, win_lo, win_hi, sinks, qk_scale, b32, h32,
    k_id, k_pos, q_ids, q_poss, slot_col, stride_sq, bits_words, n_in_block, cap, slope,
    alibi_off, key_ok, bias_bh, stride_xq, dbias_bh, stride_yq, colsum,
    BS: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    SUBS_M: tl.constexpr, EVEN_M: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_F64: tl.constexpr,
    PRECISION: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_POS: tl.constexpr, HAS_BITS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
    DBIAS_MODE: tl.constexpr, FAST_TANH: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over query tiles it_lo..it_hi of the block list.

    Query rows that must not count (past Nq, or past the block end when the tile does not
    divide the block) load q = dy = 0 and lse2 = +inf, so their P is exactly 0 without any
    per-element mask. Key rows of this tile past Nk only produce rows that are never stored.
    Only the causal diagonal needs an element mask (PARTIAL blocks only).
    q_src/dy_src: pointers to Q/dY of this (b, query head h), or (USE_TMA, tiles dividing the block)
    descriptors over the whole tensors, whose rows past Nq and columns past D read as 0.
    Token rules (MASKED steps only): k_id / k_pos are this tile's key ids / positions, q_ids /
    q_poss pointers to the batch row's query ids / positions; a padded query row counts as a
    row past Nq (q = dy = 0, lse2 = +inf). With ids the caller passes pointers (USE_TMA off)
    for MASKED steps: masked loads zero padding (see triton_fwd).
    HAS_BITS: the bits of block (query block, this key block) (slot ``slot_col[qb * stride_sq]``)
    at key rows ``n_in_block`` also decide.
    HAS_SOFTCAP / HAS_ALIBI: as in triton_bwd_dq._dq_inner, on the transposed tile (slope:
    this query head's).
    HAS_BIAS: the bias of this (b, h) (``bias_bh``, query stride stride_xq) joins the
    scores. DBIAS_MODE (score_mods.BiasGradTarget): 1 stores dS (before the cap's factor:
    the bias is added after the cap) at ``dbias_bh``, query stride stride_yq; 2 adds its
    column sums into ``colsum`` [BLOCK_N]. Returns (dk, dv, colsum).
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ok = offs_dk < D_K
    dv_ok = offs_dv < D_V
    CHECK_ROWS: tl.constexpr = MASKED or not EVEN_M
    n_first = tl.min(n_in_block, 0)  # the key tile's first in-block column (block bits)
    # Keys of this tile the bias loads / d bias stores may touch: past Nk only in MASKED
    # steps (the ragged tail block is PARTIAL); elsewhere only the block end can cut the
    # tile, a test whose constancy the compiler sees (contiguous, vectorised accesses).
    if MASKED:
        keys_ok = key_ok
    else:
        keys_ok = n_in_block < BS
    # The query block of the next step is loaded one iteration ahead and carried, so tile
    # addresses never wait on a load of the same iteration and the pipeliner can keep
    # num_stages tiles in flight (as in the forward's _attend_blocks).
    nxt = tl.load(list_row + it_lo // SUBS_M, mask=it_lo < it_hi, other=0)
    for it in range(it_lo, it_hi):
        qb = nxt
        nxt = tl.load(list_row + (it + 1) // SUBS_M, mask=it + 1 < it_hi, other=0)
        offs_m, row_ok, row0 = _list_step(qb, it, offs_m0, Nq, BS, BLOCK_M, SUBS_M, MASKED)
        if MASKED and HAS_IDS:
            q_id = tl.load(q_ids + offs_m, mask=row_ok, other=-1)
            row_ok = row_ok & (q_id >= 0)
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
        if HAS_POS and ((MASKED and (IS_CAUSAL or HAS_WINDOW)) or HAS_ALIBI):
            q_pos = tl.load(q_poss + offs_m, mask=offs_m < Nq, other=0)
        else:
            q_pos = offs_m
        if HAS_SOFTCAP or HAS_ALIBI or HAS_BIAS:
            if HAS_BIAS:
                bias = bias_tile(bias_bh + offs_m.to(tl.int64) * stride_xq, offs_n, row_ok,
                                 keys_ok, IS_F64, True, True)
            else:
                bias = qk_t  # unused
            s_mod, capped = modified_scores(qk_t * qk_scale, q_pos[None, :], k_pos[:, None],
                                            cap, slope, alibi_off, bias, HAS_SOFTCAP,
                                            HAS_ALIBI, HAS_BIAS, IS_F64, FAST_TANH)
            p_t = exp_base(s_mod - lse2[None, :], IS_F64)
        else:
            p_t = exp_base(qk_t * qk_scale - lse2[None, :], IS_F64)
        if MASKED:
            if IS_CAUSAL or HAS_WINDOW:
                p_t = tl.where(token_allowed(q_pos[None, :], k_pos[:, None], causal_offset,
                                             win_lo, win_hi, sinks, IS_CAUSAL, HAS_WINDOW),
                               p_t, 0.0)
            if HAS_IDS:
                p_t = tl.where(k_id[:, None] == q_id[None, :], p_t, 0.0)
            if HAS_BITS:
                slot = tl.load(slot_col + qb * stride_sq)
                p_t = tl.where(block_bits_tile(bits_words, slot, offs_m - qb * BS, row_ok,
                                               n_in_block, n_first, BS, True), p_t, 0.0)
        dv = tl.dot(p_t.to(dy.dtype), dy, dv, input_precision=PRECISION, out_dtype=dv.dtype)
        dp_t = tl.dot(v, tl.trans(dy), input_precision=PRECISION, out_dtype=dk.dtype)
        ds_t = p_t * (dp_t - delta[None, :])
        if DBIAS_MODE == 1:
            tl.store(dbias_bh + offs_m.to(tl.int64)[None, :] * stride_yq + offs_n[:, None],
                     ds_t.to(dbias_bh.dtype.element_ty),
                     mask=keys_ok[:, None] & row_ok[None, :])
        elif DBIAS_MODE == 2:
            colsum += tl.sum(ds_t, 1).to(colsum.dtype)
        if HAS_SOFTCAP:
            ratio = capped * (1.0 / cap)
            ds_t = ds_t * (1.0 - ratio * ratio)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION, out_dtype=dk.dtype)
    return dk, dv, colsum


@triton.jit
def _dkdv_one_head(
    dk, dv, k, v, Q, DY, Q_RAW, DY_RAW, LSE2, DELTA, Q_INDEX, Q_COUNT_FULL, Q_COUNT,
    stride_qb, stride_qh, stride_qn, stride_gb, stride_gh, stride_gn,
    stride_ib, stride_ih, stride_ir, stride_cb, stride_ch,
    b32, h32, kb, offs_n, H, Nq, LIST_DIV, causal_offset, win_lo, win_hi, sinks, qk_scale,
    k_id, k_pos, q_ids, q_poss, BITS_SLOTS, BITS_WORDS, stride_sb, stride_sh, stride_sq,
    n_in_block, ALIBI, stride_ab, cap, alibi_off, key_ok, BIAS, stride_xb, stride_xh,
    stride_xq, DBIAS, stride_yb, stride_yh, stride_yq,
    BS: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    SUBS_M: tl.constexpr, EVEN_M: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    IS_F64: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_POS: tl.constexpr, HAS_BITS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
    DBIAS_MODE: tl.constexpr, FAST_TANH: tl.constexpr,
):
    """Add query head h32's contribution to the dK, dV of one key tile: its FULL query
    blocks, then its PARTIAL ones, from its own list row (list head h32 // LIST_DIV).
    DBIAS_MODE 2 stores this head's d bias column sums for the tile at the end."""
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    hl = (h32 // LIST_DIV).to(tl.int64)
    list_row = Q_INDEX + b * stride_ib + hl * stride_ih + kb.to(tl.int64) * stride_ir
    count_off = b * stride_cb + hl * stride_ch + kb
    slot_col = BITS_SLOTS + b * stride_sb + hl * stride_sh + kb
    if HAS_ALIBI:
        slope = head_value(ALIBI, b, h, 0, stride_ab, IS_F64)
    else:
        slope = qk_scale  # unused
    n_full = tl.load(Q_COUNT_FULL + count_off)
    n_all = tl.load(Q_COUNT + count_off)
    q_src = head_source(Q, b, h, stride_qb, stride_qh, USE_TMA)
    dy_src = head_source(DY, b, h, stride_gb, stride_gh, USE_TMA)
    PARTIAL_TMA: tl.constexpr = USE_TMA and not HAS_IDS  # ids: masked pointer loads
    q_part = masked_step_source(q_src, Q_RAW, b, h, stride_qb, stride_qh, PARTIAL_TMA)
    dy_part = masked_step_source(dy_src, DY_RAW, b, h, stride_gb, stride_gh, PARTIAL_TMA)
    bias_bh = BIAS + b * stride_xb + h * stride_xh
    dbias_bh = DBIAS + b * stride_yb + h * stride_yh
    if IS_F64:
        colsum = tl.zeros_like(offs_n).to(tl.float64)
    else:
        colsum = tl.zeros_like(offs_n).to(tl.float32)
    rows_base = (b32 * H + h32).to(tl.int64) * Nq
    lse_base = LSE2 + rows_base
    delta_base = DELTA + rows_base
    # FULL blocks (no mask arithmetic), then PARTIAL ones.
    dk, dv, colsum = _dkdv_inner(
                         dk, dv, k, v, q_src, dy_src, lse_base, delta_base, list_row,
                         0, n_full * SUBS_M, stride_qn, stride_gn, offs_n, Nq, causal_offset,
                         win_lo, win_hi, sinks, qk_scale, b32, h32, k_id, k_pos, q_ids, q_poss,
                         slot_col, stride_sq, BITS_WORDS, n_in_block, cap, slope, alibi_off,
                         key_ok, bias_bh, stride_xq, dbias_bh, stride_yq, colsum,
                         BS, D_K, D_V, BLOCK_DK, BLOCK_DV, BLOCK_M, SUBS_M, EVEN_M, IS_CAUSAL,
                         HAS_WINDOW, IS_F64, PRECISION, MASKED=False, USE_TMA=USE_TMA,
                         HAS_IDS=HAS_IDS, HAS_POS=HAS_POS, HAS_BITS=HAS_BITS,
                         HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_BIAS=HAS_BIAS,
                         DBIAS_MODE=DBIAS_MODE, FAST_TANH=FAST_TANH)
    dk, dv, colsum = _dkdv_inner(
                         dk, dv, k, v, q_part, dy_part, lse_base, delta_base, list_row,
                         n_full * SUBS_M, n_all * SUBS_M, stride_qn, stride_gn, offs_n, Nq,
                         causal_offset, win_lo, win_hi, sinks, qk_scale, b32, h32, k_id, k_pos,
                         q_ids, q_poss, slot_col, stride_sq, BITS_WORDS, n_in_block, cap,
                         slope, alibi_off, key_ok, bias_bh, stride_xq, dbias_bh, stride_yq,
                         colsum,
                         BS, D_K, D_V, BLOCK_DK, BLOCK_DV, BLOCK_M, SUBS_M, EVEN_M,
                         IS_CAUSAL, HAS_WINDOW, IS_F64, PRECISION, MASKED=True,
                         USE_TMA=PARTIAL_TMA, HAS_IDS=HAS_IDS, HAS_POS=HAS_POS,
                         HAS_BITS=HAS_BITS, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
                         HAS_BIAS=HAS_BIAS, DBIAS_MODE=DBIAS_MODE, FAST_TANH=FAST_TANH)
    if DBIAS_MODE == 2:
        tl.store(dbias_bh + offs_n, colsum.to(DBIAS.dtype.element_ty), mask=key_ok)
    return dk, dv


@triton.jit(do_not_specialize=["H", "n_tiles", "Nq", "Nk", "G", "LIST_DIV", "CAUSAL_OFFSET",
                                     "WIN_LO", "WIN_HI", "SINKS", "stride_tq", "stride_tk",
                                     "stride_sb", "stride_sh", "stride_sq", "stride_ab",
                                     "ALIBI_OFF"])
def _bwd_dkdv_kernel(
    Q, K, V, DY, Q_RAW, DY_RAW, LSE2, DELTA, DK, DV,
    Q_INDEX, Q_COUNT_FULL, Q_COUNT, ORDER, Q_IDS, K_IDS, Q_POS, K_POS, BITS_SLOTS, BITS_WORDS,
    ALIBI, BIAS, DBIAS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_ib, stride_ih, stride_ir,
    stride_cb, stride_ch, stride_tq, stride_tk, stride_sb, stride_sh, stride_sq, stride_ab,
    stride_xb, stride_xh, stride_xq, stride_yb, stride_yh, stride_yq,
    H, n_tiles, Nq, Nk, scale, qk_hi, qk_lo, G, LIST_DIV, CAUSAL_OFFSET, WIN_LO, WIN_HI, SINKS,
    SOFTCAP, SOFTCAP_LO, ALIBI_OFF,
    BS: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SUBS_M: tl.constexpr, EVEN_M: tl.constexpr, TILES_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_F64: tl.constexpr,
    PRECISION: tl.constexpr, USE_TMA: tl.constexpr, GROUPED: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_POS: tl.constexpr, HAS_BITS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
    DBIAS_MODE: tl.constexpr, FAST_TANH: tl.constexpr,
):
    """Grid (B*Hkv*n_tiles,), n_tiles = nk * TILES_N: dK, dV of BLOCK_N keys of one key block
    of one K/V head.

    GQA: the program owns its K/V tile and loops over the G query heads h = hk*G + g of the
    head's group in order, each with its own list row (list head h // LIST_DIV), summing their
    contributions in registers: the group sum is deterministic and needs no atomics.
    GROUPED (G > 1) is a compile-time switch so that plain attention keeps a single loop nest.

    Program p does work item ORDER[p] = bhk * n_tiles + tile (see ``_launch_order``): by
    default (b, K/V head)-major, so the tiles of one head run together and share its Q/dY in
    L2, first key tiles first (under a causal mask they attend the most query blocks), with
    unusually long items (a sink column) moved to the front of the whole launch.
    """
    item = tl.load(ORDER + tl.program_id(0))
    Hkv = H // G
    bhk = item // n_tiles
    tile = item - bhk * n_tiles
    b32 = bhk // Hkv
    hk32 = bhk % Hkv
    b = b32.to(tl.int64)
    hk = hk32.to(tl.int64)
    kb = tile // TILES_N
    n_in_block = (tile % TILES_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = kb * BS + n_in_block  # int32 for the causal mask; int64 for addresses
    rows = offs_n.to(tl.int64)[:, None]
    key_ok = (n_in_block < BS) & (offs_n < Nk)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ok = offs_dk < D_K
    dv_ok = offs_dv < D_V
    qk_scale = kernel_scale(qk_hi, qk_lo, IS_F64)
    cap = kernel_scale(SOFTCAP, SOFTCAP_LO, IS_F64)  # f64 needs the cap to f64 precision
    if IS_F64:
        scale = qk_scale

    # Lists are [Bp, Hp, nk, nq] / [Bp, Hp, nk]; broadcast dims come with stride 0.
    # A key block no query head of the group attends only stores zeros: its K/V loads are
    # masked off.
    n_any = tl.load(Q_COUNT + b * stride_cb + (hk32 * G // LIST_DIV).to(tl.int64) * stride_ch + kb)
    if GROUPED:
        for g in range(1, G):
            hl = ((hk32 * G + g) // LIST_DIV).to(tl.int64)
            n_any += tl.load(Q_COUNT + b * stride_cb + hl * stride_ch + kb)
    load_ok = key_ok & (offs_n < tl.where(n_any > 0, Nk, 0))  # vector & vector (interpreter)
    q_ids = Q_IDS + b * stride_tq
    q_poss = Q_POS + b * stride_tq
    k_id, k_pos = token_values(K_IDS + b * stride_tk, K_POS + b * stride_tk, offs_n, key_ok, -2,
                               HAS_IDS, HAS_POS)
    if HAS_IDS:
        load_ok = load_ok & (k_id >= 0)  # a padded key: dk = dv = 0, never read
    k = tl.load(K + b * stride_kb + hk * stride_kh + rows * stride_kn + offs_dk[None, :],
                mask=load_ok[:, None] & dk_ok[None, :], other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + rows * stride_vn + offs_dv[None, :],
                mask=load_ok[:, None] & dv_ok[None, :], other=0.0)
    if IS_F64:
        dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float64)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float64)
    else:
        dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    if GROUPED:
        for g in range(0, G):
            dk, dv = _dkdv_one_head(
                dk, dv, k, v, Q, DY, Q_RAW, DY_RAW, LSE2, DELTA, Q_INDEX, Q_COUNT_FULL, Q_COUNT,
                stride_qb, stride_qh, stride_qn, stride_gb, stride_gh, stride_gn,
                stride_ib, stride_ih, stride_ir, stride_cb, stride_ch,
                b32, hk32 * G + g, kb, offs_n, H, Nq, LIST_DIV, CAUSAL_OFFSET, WIN_LO, WIN_HI,
                SINKS, qk_scale, k_id, k_pos, q_ids, q_poss, BITS_SLOTS, BITS_WORDS, stride_sb,
                stride_sh, stride_sq, n_in_block, ALIBI, stride_ab, cap, ALIBI_OFF,
                key_ok, BIAS, stride_xb, stride_xh, stride_xq, DBIAS, stride_yb, stride_yh,
                stride_yq, BS, D_K, D_V, BLOCK_DK, BLOCK_DV, BLOCK_M, SUBS_M, EVEN_M, IS_CAUSAL,
                HAS_WINDOW, IS_F64, PRECISION, USE_TMA, HAS_IDS, HAS_POS, HAS_BITS,
                HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, DBIAS_MODE, FAST_TANH)
    else:
        dk, dv = _dkdv_one_head(
            dk, dv, k, v, Q, DY, Q_RAW, DY_RAW, LSE2, DELTA, Q_INDEX, Q_COUNT_FULL, Q_COUNT,
            stride_qb, stride_qh, stride_qn, stride_gb, stride_gh, stride_gn,
            stride_ib, stride_ih, stride_ir, stride_cb, stride_ch,
            b32, hk32, kb, offs_n, H, Nq, LIST_DIV, CAUSAL_OFFSET, WIN_LO, WIN_HI, SINKS,
            qk_scale, k_id, k_pos, q_ids, q_poss, BITS_SLOTS, BITS_WORDS, stride_sb, stride_sh,
            stride_sq, n_in_block, ALIBI, stride_ab, cap, ALIBI_OFF,
            key_ok, BIAS, stride_xb, stride_xh, stride_xq, DBIAS, stride_yb, stride_yh,
            stride_yq, BS, D_K, D_V, BLOCK_DK, BLOCK_DV, BLOCK_M, SUBS_M, EVEN_M, IS_CAUSAL,
            HAS_WINDOW, IS_F64, PRECISION, USE_TMA, HAS_IDS, HAS_POS, HAS_BITS,
            HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, DBIAS_MODE, FAST_TANH)
    dk = dk * scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + rows * stride_dkn + offs_dk[None, :],
             dk.to(DK.dtype.element_ty), mask=key_ok[:, None] & dk_ok[None, :])
    tl.store(DV + b * stride_dvb + hk * stride_dvh + rows * stride_dvn + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None] & dv_ok[None, :])
