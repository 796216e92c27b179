"""Triton kernels of the decode path (launch.py launches them): attention of a few new
queries per row against a KV cache, contiguous or paged, with per-row lengths read on the
device.

Why a kernel of its own: the block-sparse forward owns one pattern query block of one head
per program and takes its key range from host-built block lists. A decode step has one
query row per head and a cache whose length changes every step, so that path spent its time
in per-call token rules and list building (measured on an H200: 2.5 to 3.7 ms per step
at every cache size). Here each program reads the row's length from ``cache_seqlens``
itself and derives its key range (causal bound, window, sink tokens) with scalar arithmetic:
a step is one launch (two with split-KV), no host work that grows with the problem.

Layout (flash-attn's): q ``[B, Nq, H, D]``; the cache ``[B, Ncache, Hkv, D]``, or pages
``[num_pages, page_size, Hkv, D]`` with a block table ``[B, pages_per_row]``; y ``[B, Nq,
H, Dv]``. Query i of row b sits at position ``L_b - Nq + i`` (bottom-right per row, with
``L_b = cache_seqlens[b] + n_new``), which the causal rule, the window and ALiBi measure from.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common.kernel_pieces import (exp_base, fold_sink, head_value, kernel_scale,
                                    modified_scores)


@triton.jit
def _key_rows(offs_n, b64, col_ok, TABLE, stride_tb, stride_kp, stride_kn, PAGE_SIZE,
              PAGED: tl.constexpr):
    """Element offsets of keys ``offs_n`` of row b in the cache (the head offset aside):
    through the row's block table when PAGED (page p of the row holds its tokens
    p * PAGE_SIZE ..), else rows of a [B, Ncache, ...] cache."""
    if PAGED:
        page = tl.load(TABLE + b64 * stride_tb + offs_n // PAGE_SIZE, mask=col_ok, other=0)
        rows = page.to(tl.int64) * stride_kp + (offs_n % PAGE_SIZE).to(tl.int64) * stride_kn
    else:
        rows = b64 * stride_kp + offs_n.to(tl.int64) * stride_kn
    return rows


@triton.jit(do_not_specialize=["Hkv", "Nq", "host_len", "n_new", "n_splits", "WIN_LO",
                                     "WIN_HI", "SINK_TOKENS", "PAGE_SIZE", "stride_ab"])
def _decode_kernel(
    Q, K, V, Y, LSE, SEQLENS, TABLE, KV_INDEX, KV_COUNT, ALIBI, SINKS, KEY_MASK,
    stride_qb, stride_qm, stride_qh,
    stride_kp, stride_kn, stride_kh,
    stride_vp, stride_vn, stride_vh,
    stride_ys, stride_yb, stride_ym, stride_yh,
    stride_ls, stride_lb, stride_lm, stride_lh,
    stride_tb, stride_ib, stride_ih, stride_cb, stride_ch, stride_ab, stride_mb,
    Hkv, Nq, host_len, n_new, n_splits, scale_hi, scale_lo, WIN_LO, WIN_HI, SINK_TOKENS,
    SOFTCAP, SOFTCAP_LO, PAGE_SIZE,
    G: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr, DK_PAD: tl.constexpr,
    DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SEL_STEPS: tl.constexpr, HOST_LEN: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PAGED: tl.constexpr, PAGE_ALIGNED: tl.constexpr,
    HAS_SELECT: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr,
    SPLIT: tl.constexpr, WRITE_LSE: tl.constexpr, FAST_TANH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M packed query rows of one (b, K/V head), one split of its keys.

    Grid (n_splits, row tiles, B * Hkv). Rows are packed query-major: packed row r of the
    tile is query ``r // G`` of head ``hk * G + r % G``, so the G query heads of a group
    share every K/V tile this program loads (pack-GQA) and a tile's queries are consecutive
    (its causal bound is one scalar).
    Keys: the row's length L = cache_seqlens[b] (or ``host_len``, HOST_LEN) + n_new. Without
    a selection the program walks key tiles [0, key_hi) -- minus, with a window, the tiles
    between the sink tokens and the window's start; with a selection (HAS_SELECT) the
    listed blocks of SEL_STEPS tiles each (KV_INDEX [B|1, Hkv|1, n] with KV_COUNT). Every
    tile applies the token rules (key < L, causal, window + sink tokens) per pair: decode
    is bound by memory, the masks are free.
    SPLIT: ``n_splits`` programs share the walk, each a contiguous share, and write their
    normalised partial y and natural-log lse into split ``program_id(0)`` of the workspaces
    (strides stride_ys / stride_ls); ``_combine_kernel`` merges them and adds the sinks.
    Otherwise sinks fold in here and y / lse are final (lse only when WRITE_LSE).
    PAGED: keys through the row's block table. PAGE_ALIGNED (a page holds whole key tiles):
    one page id per tile, loaded one step ahead and carried, so that no K/V address waits
    on a load of its own iteration (the pipeliner then keeps its stages in flight); else a
    page id per key row.
    HAS_KEY_MASK: uint8 [B, Ncache] (row stride stride_mb), 0 for a key no query sees
    (padding inside the cache, e.g. a left-padded batch); loaded with each tile.
    """
    split = tl.program_id(0)
    tile_m = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // Hkv
    hk = bh - b * Hkv
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)

    r = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_idx = r // G
    head = hk * G + (r - q_idx * G)
    row_ok = q_idx < Nq
    head64 = head.to(tl.int64)
    q_idx64 = q_idx.to(tl.int64)
    if HOST_LEN:
        L = host_len + n_new
    else:
        L = tl.load(SEQLENS + b).to(tl.int32) + n_new
    q_pos = L - Nq + q_idx  # each query's position: bottom-right per row
    # The tile's first and last queries bound its keys with scalars.
    first_q = (tile_m * BLOCK_M) // G
    last_q = tl.minimum((tile_m * BLOCK_M + BLOCK_M - 1) // G, Nq - 1)
    key_hi = L
    if IS_CAUSAL:
        key_hi = tl.minimum(key_hi, L - Nq + last_q + 1)
    if HAS_WINDOW:
        key_hi = tl.minimum(key_hi, L - Nq + last_q + WIN_HI + 1)
    key_hi = tl.maximum(key_hi, 0)

    tiles_hi = tl.cdiv(key_hi, BLOCK_N)
    if HAS_SELECT:
        sel_count = tl.load(KV_COUNT + b64 * stride_cb + hk64 * stride_ch)
        n_items = sel_count * SEL_STEPS
        idx_row = KV_INDEX + b64 * stride_ib + hk64 * stride_ih
        sink_tiles = 0
        tiles_lo = 0
    elif HAS_WINDOW:
        # Tiles wholly between the sink tokens and the window's start are skipped: the walk
        # is [0, sink_tiles) then [tiles_lo, tiles_hi).
        win_start = tl.maximum(L - Nq + first_q + WIN_LO, 0)
        tiles_lo = tl.minimum(win_start // BLOCK_N, tiles_hi)
        sink_tiles = tl.minimum(tl.cdiv(SINK_TOKENS, BLOCK_N), tiles_lo)
        n_items = sink_tiles + tiles_hi - tiles_lo
    else:
        sink_tiles = 0
        tiles_lo = 0
        n_items = tiles_hi
    if SPLIT:
        chunk = tl.cdiv(n_items, n_splits)
        it_lo = tl.minimum(split * chunk, n_items)
        it_hi = tl.minimum(it_lo + chunk, n_items)
    else:
        it_lo = 0
        it_hi = n_items

    offs_dk = tl.arange(0, DK_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    offs_n0 = tl.arange(0, BLOCK_N)
    q_ptrs = Q + b64 * stride_qb + (q_idx64 * stride_qm + head64 * stride_qh)[:, None] \
        + offs_dk[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_dk[None, :] < D_K), other=0.0)
    k_head = K + hk64 * stride_kh
    v_head = V + hk64 * stride_vh

    qk_scale = kernel_scale(scale_hi, scale_lo, False)  # carries log2(e)
    cap = kernel_scale(SOFTCAP, SOFTCAP_LO, False)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    if HAS_ALIBI:
        slope = head_value(ALIBI, b64, head64, r, stride_ab, False)
    else:
        slope = l_i  # unused

    if HAS_SELECT:  # the block of the first item, loaded one step ahead (see the loop)
        nxt = tl.load(idx_row + it_lo // SEL_STEPS, mask=it_lo < it_hi, other=0)
    if PAGE_ALIGNED:  # the page of the first tile, likewise
        tiles_per_page = PAGE_SIZE // BLOCK_N
        table_row = TABLE + b64 * stride_tb
        if HAS_SELECT:
            first_tile = nxt * SEL_STEPS + it_lo % SEL_STEPS
        else:
            first_tile = tl.where(it_lo < sink_tiles, it_lo, tiles_lo + it_lo - sink_tiles)
        page_nxt = tl.load(table_row + first_tile // tiles_per_page, mask=it_lo < it_hi,
                           other=0)
    for it in range(it_lo, it_hi):
        if HAS_SELECT:
            blk = nxt
            nxt = tl.load(idx_row + (it + 1) // SEL_STEPS, mask=it + 1 < it_hi, other=0)
            tile = blk * SEL_STEPS + it % SEL_STEPS
            next_tile = nxt * SEL_STEPS + (it + 1) % SEL_STEPS
        else:
            tile = tl.where(it < sink_tiles, it, tiles_lo + it - sink_tiles)
            next_tile = tl.where(it + 1 < sink_tiles, it + 1, tiles_lo + it + 1 - sink_tiles)
        offs_n = tile * BLOCK_N + offs_n0
        col_ok = offs_n < key_hi
        if HAS_KEY_MASK:
            col_ok = col_ok & (tl.load(KEY_MASK + b64 * stride_mb + offs_n, mask=col_ok,
                                       other=0) != 0)
        if PAGE_ALIGNED:
            page = page_nxt.to(tl.int64)
            page_nxt = tl.load(table_row + next_tile // tiles_per_page, mask=it + 1 < it_hi,
                               other=0)
            in_page = ((tile % tiles_per_page) * BLOCK_N + offs_n0).to(tl.int64)
            k_rows = page * stride_kp + in_page * stride_kn
            v_rows = page * stride_vp + in_page * stride_vn
        elif PAGED:
            k_rows = _key_rows(offs_n, b64, col_ok, TABLE, stride_tb, stride_kp, stride_kn,
                               PAGE_SIZE, PAGED)
            v_rows = _key_rows(offs_n, b64, col_ok, TABLE, stride_tb, stride_vp, stride_vn,
                               PAGE_SIZE, PAGED)
        else:
            k_rows = b64 * stride_kp + offs_n.to(tl.int64) * stride_kn
            v_rows = b64 * stride_vp + offs_n.to(tl.int64) * stride_vn
        k = tl.load(k_head + k_rows[:, None] + offs_dk[None, :],
                    mask=col_ok[:, None] & (offs_dk[None, :] < D_K), other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=tl.float32)
        s = qk * qk_scale
        if HAS_SOFTCAP or HAS_ALIBI:
            s, _ = modified_scores(s, q_pos[:, None], offs_n[None, :], cap, slope[:, None], 0,
                                   s, HAS_SOFTCAP, HAS_ALIBI, False, False, FAST_TANH)
        keep = col_ok[None, :] & row_ok[:, None]
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            d = offs_n[None, :] - q_pos[:, None]
            keep = keep & (((d >= WIN_LO) & (d <= WIN_HI)) | (offs_n[None, :] < SINK_TOKENS))
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Nothing allowed so far keeps m = -inf: subtract 0 so that -inf - -inf is no NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = exp_base(s - m_use[:, None], False)
        alpha = exp_base(m_i - m_use, False)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + v_rows[:, None] + offs_dv[None, :],
                    mask=col_ok[:, None] & (offs_dv[None, :] < D_V), other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION,
                     out_dtype=tl.float32)
        m_i = m_new

    if HAS_SINKS and not SPLIT:
        acc, m_i, l_i = fold_sink(acc, m_i, l_i, head_value(SINKS, 0, head64, r, 0, False),
                                  row_ok, False)
    has_key = l_i != 0
    l_safe = tl.where(has_key, l_i, 1.0)
    y = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    split64 = split.to(tl.int64)
    y_ptrs = Y + split64 * stride_ys + b64 * stride_yb \
        + (q_idx64 * stride_ym + head64 * stride_yh)[:, None] + offs_dv[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < D_V))
    if WRITE_LSE:
        lse_ptrs = LSE + split64 * stride_ls + b64 * stride_lb + q_idx64 * stride_lm \
            + head64 * stride_lh
        tl.store(lse_ptrs, lse.to(LSE.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["Nq", "H", "n_splits"])
def _combine_kernel(
    Y_PART, LSE_PART, Y, LSE, SINKS,
    stride_ps, stride_pb, stride_pm, stride_ph,
    stride_qs, stride_qb, stride_qm, stride_qh,
    stride_yb, stride_ym, stride_yh, stride_lb, stride_lm, stride_lh,
    Nq, H, n_splits,
    D_V: tl.constexpr, DV_PAD: tl.constexpr, S_PAD: tl.constexpr, S_CHUNK: tl.constexpr,
    HAS_SINKS: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    """Merge the split partials of one (b, query, head) row, in split order (deterministic):
    lse = log(sum_s exp(lse_s) [+ exp(sink)]), y = sum_s exp(lse_s - lse) y_s. A row no split
    reached and no sink joins gets y = 0, lse = -inf; NaN in a partial reaches y and lse.
    Grid (B * Nq * H,). The lse of every split is read at once (S_PAD scalars); the partial
    rows S_CHUNK splits at a time, to bound registers at up to 128 splits."""
    pid = tl.program_id(0)
    h = pid % H
    rest = pid // H
    i = rest % Nq
    b = rest // Nq
    b64, i64, h64 = b.to(tl.int64), i.to(tl.int64), h.to(tl.int64)
    s = tl.arange(0, S_PAD)
    s_ok = s < n_splits
    lse_s = tl.load(LSE_PART + s.to(tl.int64) * stride_qs + b64 * stride_qb + i64 * stride_qm
                    + h64 * stride_qh, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    if HAS_SINKS:
        sink = tl.load(SINKS + h).to(tl.float32)
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)  # 0 for a split that saw no key
    total = tl.sum(w, 0)
    if HAS_SINKS:
        total += tl.exp(sink - m_safe)
    d = tl.arange(0, DV_PAD)
    row = Y_PART + b64 * stride_pb + i64 * stride_pm + h64 * stride_ph
    sc = tl.arange(0, S_CHUNK)
    y = tl.zeros([DV_PAD], tl.float32)
    for s0 in range(0, n_splits, S_CHUNK):
        c_ok = s0 + sc < n_splits
        lse_c = tl.load(LSE_PART + (s0 + sc).to(tl.int64) * stride_qs + b64 * stride_qb
                        + i64 * stride_qm + h64 * stride_qh, mask=c_ok, other=float("-inf"))
        y_c = tl.load(row + (s0 + sc).to(tl.int64)[:, None] * stride_ps + d[None, :],
                      mask=c_ok[:, None] & (d[None, :] < D_V), other=0.0)
        y += tl.sum(tl.exp(lse_c - m_safe)[:, None] * y_c, 0)
    y = y / tl.where(total == 0, 1.0, total)
    tl.store(Y + b64 * stride_yb + i64 * stride_ym + h64 * stride_yh + d,
             y.to(Y.dtype.element_ty), mask=d < D_V)
    if WRITE_LSE:
        safe_total = tl.where(total == 0, 1.0, total)  # no log(0), even in a masked lane
        lse = tl.where(total == 0, float("-inf"), m_safe + tl.log(safe_total))
        tl.store(LSE + b64 * stride_lb + i64 * stride_lm + h64 * stride_lh, lse)


@triton.jit(do_not_specialize=["Hkv", "n_new", "host_len", "PAGE_SIZE"])
def _append_kernel(
    K_NEW, V_NEW, K, V, SEQLENS, TABLE,
    stride_nb, stride_nt, stride_nh, stride_wb, stride_wt, stride_wh,
    stride_kp, stride_kn, stride_kh, stride_vp, stride_vn, stride_vh, stride_tb,
    Hkv, n_new, host_len, PAGE_SIZE,
    D_K: tl.constexpr, D_V: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    HKV_PAD: tl.constexpr, HOST_LEN: tl.constexpr, PAGED: tl.constexpr,
):
    """Write new token t of row b (k/v [B, Nnew, Hkv, D]) at position cache_seqlens[b] + t
    of the row's cache, every K/V head at once. Grid (B * Nnew,)."""
    pid = tl.program_id(0)
    b = pid // n_new
    t = pid - b * n_new
    b64 = b.to(tl.int64)
    if HOST_LEN:
        pos = host_len + t
    else:
        pos = tl.load(SEQLENS + b).to(tl.int32) + t
    if PAGED:
        page = tl.load(TABLE + b64 * stride_tb + pos // PAGE_SIZE).to(tl.int64)
        slot = pos % PAGE_SIZE
        k_row = page * stride_kp + slot * stride_kn
        v_row = page * stride_vp + slot * stride_vn
    else:
        k_row = b64 * stride_kp + pos.to(tl.int64) * stride_kn
        v_row = b64 * stride_vp + pos.to(tl.int64) * stride_vn
    hs = tl.arange(0, HKV_PAD).to(tl.int64)
    dk = tl.arange(0, DK_PAD)
    dv = tl.arange(0, DV_PAD)
    h_ok = hs < Hkv
    src = b64 * stride_nb + t.to(tl.int64) * stride_nt
    k = tl.load(K_NEW + src + hs[:, None] * stride_nh + dk[None, :],
                mask=h_ok[:, None] & (dk[None, :] < D_K))
    tl.store(K + k_row + hs[:, None] * stride_kh + dk[None, :], k,
             mask=h_ok[:, None] & (dk[None, :] < D_K))
    src_v = b64 * stride_wb + t.to(tl.int64) * stride_wt
    v = tl.load(V_NEW + src_v + hs[:, None] * stride_wh + dv[None, :],
                mask=h_ok[:, None] & (dv[None, :] < D_V))
    tl.store(V + v_row + hs[:, None] * stride_vh + dv[None, :], v,
             mask=h_ok[:, None] & (dv[None, :] < D_V))
