"""The forward kernel's inner loop (triton_fwd.py): fold a run of key blocks of one query
tile's list into the running online softmax, FULL blocks without mask arithmetic, PARTIAL
ones with the token rules, the score modifiers in every block."""

from __future__ import annotations

import triton
import triton.language as tl

from ..common.kernel_pieces import (bias_tile, block_bits_tile, exp_base, modified_scores,
                                    token_allowed)


@triton.jit
def _attend_blocks(acc, m_i, l_i, q, k_src, v_src, b, h, idx_ptr, stride_ik, it_lo, it_hi,
                   offs_m, stride_kn, stride_vn, Nk, causal_offset, win_lo, win_hi, sinks,
                   qk_scale, q_id, q_pos, k_ids, k_poss, slot_row, bits_words, rows_in_block,
                   row_ok, cap, slope, alibi_off, bias_rows,
                   D_K: tl.constexpr, D_V: tl.constexpr, DK_PAD: tl.constexpr,
                   DV_PAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                   STEPS: tl.constexpr, EVEN_N: tl.constexpr, PARTIAL: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   SCALE_NONNEG: tl.constexpr, IS_F64: tl.constexpr,
                   DOT_PRECISION: tl.constexpr,
                   USE_TMA: tl.constexpr, WIDE_TILE: tl.constexpr,
                   HAS_IDS: tl.constexpr, HAS_POS: tl.constexpr, HAS_BITS: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   HAS_BIAS: tl.constexpr, FAST_TANH: tl.constexpr):
    """Fold key blocks ``idx[it_lo:it_hi]`` into the running (acc, m_i, l_i).

    One flat loop over (block, column step) pairs, so the software pipeliner sees a single
    loop. PARTIAL=False is the FULL-block loop: no masks unless a step overruns a generic
    block (EVEN_N False) or the head dim is padded.
    k_src/v_src: pointers to K/V of this (b, K/V head h), or (USE_TMA) descriptors over the
    whole ``[B, Hkv, Nk, D]`` K/V whose out-of-bounds rows/columns read as zeros.
    Token rules (PARTIAL blocks only): q_id / q_pos are the rows' document ids / positions,
    k_ids / k_poss pointers to this batch row's key ids / positions (HAS_IDS / HAS_POS);
    a padded key (id < 0) is treated like a key past the end: never read, never attended.
    HAS_BITS: the block's bits (slot ``slot_row[kb]`` of ``bits_words``, block_bits_tile)
    at rows ``rows_in_block`` (valid where ``row_ok``) also decide.
    HAS_SOFTCAP / HAS_ALIBI: scores go through ``modified_scores`` (cap, per-row slope [M],
    alibi_off: common.score_mods) in every block, FULL ones included; HAS_BIAS adds the
    bias rows ``bias_rows`` (pointers [M], kernel_pieces.bias_tile) the same way.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, DK_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    if not USE_TMA:
        # In-tile offsets stay 32-bit (BLOCK_N rows) unless BLOCK_N rows of K or V span 2^31
        # elements or more (WIDE_TILE, decided by the launcher); the block start is added in
        # 64-bit either way.
        if WIDE_TILE:
            rows_in_tile = offs_n0.to(tl.int64)[:, None]
        else:
            rows_in_tile = offs_n0[:, None]
        k_tile = rows_in_tile * stride_kn + offs_dk[None, :]
        v_tile = rows_in_tile * stride_vn + offs_dv[None, :]
    MASK_COLS: tl.constexpr = PARTIAL or (not EVEN_N)
    n_steps = (it_hi - it_lo) * STEPS
    # The key block of the next step is loaded one iteration ahead and carried: K/V
    # addresses then never wait on a load of the same iteration, and Triton's pipeliner
    # keeps num_stages K/V tiles in flight (with the index loaded in-iteration it fell back
    # to a double buffer with a full wait every step).
    nxt = tl.load(idx_ptr + it_lo * stride_ik, mask=n_steps > 0, other=0)
    for s in range(0, n_steps):
        kb = nxt
        blk0 = kb * BLOCK
        if STEPS == 1:
            col0 = blk0
            nxt = tl.load(idx_ptr + (it_lo + s + 1) * stride_ik, mask=s + 1 < n_steps, other=0)
        else:
            col0 = blk0 + (s % STEPS) * BLOCK_N
            nxt = tl.load(idx_ptr + (it_lo + (s + 1) // STEPS) * stride_ik,
                          mask=s + 1 < n_steps, other=0)
        offs_n = col0 + offs_n0
        if MASK_COLS:
            if PARTIAL:
                col_ok = offs_n < tl.minimum(blk0 + BLOCK, Nk)
            else:
                col_ok = offs_n < blk0 + BLOCK
            if PARTIAL and HAS_IDS:
                k_id = tl.load(k_ids + offs_n, mask=col_ok, other=-2)
                col_ok = col_ok & (k_id >= 0)
        if USE_TMA:
            # Rows past Nk and columns past D_K arrive as zeros. Columns of a step that
            # overruns a generic block are real keys of the next block: scores mask them.
            k = k_src.load([b, h, col0, 0]).reshape(BLOCK_N, DK_PAD)
        else:
            col64 = col0.to(tl.int64)
            k_ptrs = k_src + col64 * stride_kn + k_tile
            v_ptrs = v_src + col64 * stride_vn + v_tile
            if MASK_COLS:
                k = tl.load(k_ptrs, mask=col_ok[:, None] & (offs_dk[None, :] < D_K), other=0.0)
            elif DK_PAD != D_K:
                k = tl.load(k_ptrs, mask=offs_dk[None, :] < D_K, other=0.0)
            else:
                k = tl.load(k_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        MODS: tl.constexpr = HAS_SOFTCAP or HAS_ALIBI or HAS_BIAS
        if HAS_POS and ((PARTIAL and (IS_CAUSAL or HAS_WINDOW)) or HAS_ALIBI):
            k_pos = tl.load(k_poss + offs_n, mask=offs_n < Nk, other=0)
        else:
            k_pos = offs_n
        if MODS:
            if HAS_BIAS:
                if MASK_COLS:
                    bias = bias_tile(bias_rows, offs_n, row_ok, col_ok, IS_F64, False, True)
                else:  # FULL blocks of whole tiles: every key is valid
                    bias = bias_tile(bias_rows, offs_n, row_ok, row_ok, IS_F64, False, False)
            else:
                bias = qk  # unused
            s_mod, _ = modified_scores(qk * qk_scale, q_pos[:, None], k_pos[None, :], cap,
                                       slope[:, None], alibi_off, bias, HAS_SOFTCAP, HAS_ALIBI,
                                       HAS_BIAS, IS_F64, FAST_TANH)

        if MASK_COLS:
            keep = col_ok[None, :]
            if PARTIAL and (IS_CAUSAL or HAS_WINDOW):
                keep = keep & token_allowed(q_pos[:, None], k_pos[None, :], causal_offset,
                                            win_lo, win_hi, sinks, IS_CAUSAL, HAS_WINDOW)
            if PARTIAL and HAS_IDS:
                keep = keep & (q_id[:, None] == k_id[None, :])
            if PARTIAL and HAS_BITS:
                slot = tl.load(slot_row + kb)
                keep = keep & block_bits_tile(bits_words, slot, rows_in_block, row_ok,
                                              offs_n - blk0, col0 - blk0, BLOCK, False)
            # Scale before masking: -inf * 0 would be NaN for scale == 0.
            if MODS:
                s_ij = tl.where(keep, s_mod, float("-inf"))
            else:
                s_ij = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s_ij, 1))
            # A row with nothing allowed so far keeps m = -inf; subtract 0 instead so that
            # exp(-inf - (-inf)) never makes a NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = exp_base(s_ij - m_use[:, None], IS_F64)
        elif MODS:
            m_new = tl.maximum(m_i, tl.max(s_mod, 1))
            if HAS_BIAS:  # a -inf bias can leave a row with nothing so far (see above)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_use = m_new
            p = exp_base(s_mod - m_use[:, None], IS_F64)
        else:
            # No mask: every score is finite, so m_new is finite. max(qk) * scale keeps the
            # scale in a fused multiply-add with the subtraction below.
            if SCALE_NONNEG:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            else:
                m_new = tl.maximum(m_i, tl.min(qk, 1) * qk_scale)
            m_use = m_new
            p = exp_base(qk * qk_scale - m_use[:, None], IS_F64)
        alpha = exp_base(m_i - m_use, IS_F64)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]

        if USE_TMA:
            v = v_src.load([b, h, col0, 0]).reshape(BLOCK_N, DV_PAD)
            if not EVEN_N:
                # p is 0 on overrun columns, but 0 * (inf or NaN in a neighbour block) is not.
                v = tl.where(col_ok[:, None], v, 0.0)
        elif MASK_COLS:
            v = tl.load(v_ptrs, mask=col_ok[:, None] & (offs_dv[None, :] < D_V), other=0.0)
        elif DV_PAD != D_V:
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < D_V, other=0.0)
        else:
            v = tl.load(v_ptrs)
        # Half inputs: P rounded to the input dtype for the tensor-core dot, as flash kernels do.
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        m_i = m_new
    return acc, m_i, l_i
