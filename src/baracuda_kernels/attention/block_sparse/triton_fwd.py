"""Triton forward kernel of block-sparse attention, and its launcher.

Work happens only where the pattern is active. A program owns ``BLOCK_M`` query rows of one
pattern query block, loads them once, then walks the compacted list of that block's active
key blocks (``BlockLists.kv_index``): first the FULL blocks with an inner loop that does no
mask arithmetic, then the PARTIAL ones (causal diagonal, ragged key tail) with the masked
variant of the same loop. Online softmax in exp2 with log2(e) folded into the scale (f32
running max / sum; f64 and natural ``exp`` for f64 inputs). Fully masked rows give y = 0 and
lse = -inf. No atomics: every output element is written by exactly one program.

Layout: q ``[B,H,Nq,Dk]``, k ``[B,H,Nk,Dk]``, v ``[B,H,Nk,Dv]`` with unit last stride; y
``[B,H,Nq,Dv]``, lse ``[B,H,Nq]`` with any strides. Batch/head offsets are 64-bit.

Experimental, opt-in (``ForwardConfig.use_tma``): K/V tiles loaded by Hopper's tensor memory
accelerator through tensor descriptors (triton_tma.py); only the K/V loads differ.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core import ArchSku
from ..common.kernel_pieces import fold_sink, head_value, kernel_scale, token_values
from ..common.score_mods import (ScoreModFlags, ScoreMods, alibi_offset, bias_kernel_args,
                                 fast_tanh, kernel_mod_args)
from ..common.numerics import head_dim_tile, list_strides, scale_args, wide_tile_offsets
from ..common.problem import WindowRule, causal_offset, window_args
from ..common.triton_tma import (head_source, masked_step_source, row_tile_descriptor,
                                 tma_fallback_reason)
# Re-exported so that callers find the configs next to the launcher.
from .block_lists import bits_kernel_args
from ..common.triton_launch import launch_fitting
from .split_kv import choose_splits, combine_splits
from .triton_fwd_steps import _attend_blocks
from .triton_fwd_configs import (ForwardConfig, default_forward_config,  # noqa: F401
                                 fit_bias_loads, fit_token_loads, pack_gqa_tiles)

__all__ = ["ForwardConfig", "block_sparse_attention_forward_triton", "default_forward_config"]


# Lengths and counts are not specialised (alignment of them never helps here), so a new
# sequence length does not trigger a recompile; strides are, for vectorised loads.
@triton.jit(do_not_specialize=["H", "Nq", "Nk", "n_tiles", "G", "LIST_DIV", "CAUSAL_OFFSET",
                                     "WIN_LO", "WIN_HI", "SINK_TOKENS", "stride_tq", "stride_tk",
                                     "stride_sb", "stride_sh", "stride_sq", "stride_ab",
                                     "ALIBI_OFF", "n_splits", "stride_ys", "stride_ls"])
def _block_sparse_fwd_kernel(
    Q, K, V, K_RAW, V_RAW, Y, LSE, KV_INDEX, KV_COUNT_FULL, KV_COUNT, Q_IDS, K_IDS, Q_POS, K_POS,
    BITS_SLOTS, BITS_WORDS, ALIBI, SINKS, BIAS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_yb, stride_yh, stride_ym, stride_yd,
    stride_lb, stride_lh, stride_lm,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq, stride_tq, stride_tk, stride_sb, stride_sh, stride_sq,
    stride_ab, stride_xb, stride_xh, stride_xq, n_splits, stride_ys, stride_ls,
    H, Nq, Nk, n_tiles, scale_hi, scale_lo, G, LIST_DIV, CAUSAL_OFFSET, WIN_LO, WIN_HI,
    SINK_TOKENS, SOFTCAP, SOFTCAP_LO, ALIBI_OFF,
    D_K: tl.constexpr, D_V: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TILES_PER_BLOCK: tl.constexpr, STEPS: tl.constexpr, EVEN_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SCALE_NONNEG: tl.constexpr,
    IS_F64: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    WIDE_TILE: tl.constexpr,
    PACK_ROWS: tl.constexpr, HAS_IDS: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_BITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    FAST_TANH: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
):
    """One program: BLOCK_M query rows of one pattern query block of one (b, h).

    Grid: (B*H*n_tiles,), (b, h)-major so the query tiles of one head run together and
    share its K/V in L2; within a head the last query tiles (most work under causal) go first.
    Pattern dims of size 1 arrive with stride 0 (stride_ib/ih, stride_cb/ch).
    GQA: query head h reads K/V head h // G and list head h // LIST_DIV (LIST_DIV: 1 for a
    per-query-head pattern, G per K/V head, H broadcast). The G query heads of a group are
    adjacent in the launch, so a K/V tile they share is read from L2 after the first.
    PACK_ROWS > 0 (pack-GQA, when the group shares its pattern): a program instead owns
    PACK_ROWS query positions of each of the G heads of one (b, K/V head), rows ordered
    head-major, so every K/V tile it loads serves the whole group. Grid (B*Hkv*n_tiles,).
    It pays where a pattern block has fewer query rows than a tile (short queries, decode).
    USE_TMA: K and V are tensor descriptors (block [1, 1, BLOCK_N, D*_PAD]), not pointers;
    their stride arguments are then unused.
    HAS_IDS / HAS_POS: int32 document ids / positions per token (common.token_rules),
    [Bt, Nq] and [Bt, Nk] with batch strides stride_tq / stride_tk (0 when shared).
    With ids, PARTIAL blocks load K/V through pointers (K_RAW, V_RAW; the same tensors as K,
    V) even under USE_TMA: masked loads give padded keys zeros for free, where zeroing a TMA
    tile in registers cost ~2 us per block (measured, H200).
    HAS_BITS: int32 slots [Bs, Hs, nq, nk] (strides stride_sb / stride_sh, 0 when broadcast,
    and stride_sq per query block) into the words of cut blocks (patterns.block_bits).
    Score modifiers (common.score_mods): SOFTCAP (exponent base), ALIBI slopes [B|1, H]
    (batch stride stride_ab), ALIBI_OFF the diagonal they measure from, SINKS [H] (one
    logit per head in every valid row's denominator, folded in after the last block), BIAS
    an additive bias over [B, H, Nq, Nk] with strides stride_xb / xh / xq (0 on broadcast
    dims) and a unit key stride, read only in the blocks the lists visit.
    SPLIT (split-KV, flash-decoding; split_kv.py): ``n_splits`` programs share one tile's
    key list, each folding a contiguous share of it (FULL blocks first, as always), and
    write their partial normalised y and lse into split ``pid % n_splits`` of Y / LSE
    (workspaces with split strides stride_ys / stride_ls); sinks join in the combine.
    """
    pid = tl.program_id(0)
    if SPLIT:
        split = pid % n_splits
        pid = pid // n_splits
    bh = pid // n_tiles  # (b, h), or (b, K/V head) when packed
    tile = n_tiles - 1 - (pid - bh * n_tiles)
    qb = tile // TILES_PER_BLOCK
    row_end = tl.minimum(qb * BLOCK + BLOCK, Nq)
    r = tl.arange(0, BLOCK_M)
    if PACK_ROWS > 0:
        Hkv = H // G
        b = bh // Hkv
        hk = bh - b * Hkv
        g_row = r // PACK_ROWS
        offs_m = qb * BLOCK + (tile - qb * TILES_PER_BLOCK) * PACK_ROWS + (r - g_row * PACK_ROWS)
        row_ok = (offs_m < row_end) & (g_row < G)
        head_rows = (hk * G + g_row).to(tl.int64)  # the query head of every row
        hl64 = (hk * G // LIST_DIV).to(tl.int64)
    else:
        b = bh // H
        h = bh - b * H
        hk = h // G
        offs_m = qb * BLOCK + (tile - qb * TILES_PER_BLOCK) * BLOCK_M + r
        row_ok = offs_m < row_end
        head_rows = h.to(tl.int64)  # one query head for all rows
        hl64 = (h // LIST_DIV).to(tl.int64)
    offs_dk = tl.arange(0, DK_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    rows64 = offs_m.to(tl.int64)
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    qb64 = qb.to(tl.int64)

    cnt_off = b64 * stride_cb + hl64 * stride_ch + qb64 * stride_cq
    n_full = tl.load(KV_COUNT_FULL + cnt_off)
    n_all = tl.load(KV_COUNT + cnt_off)
    # A query block with no active key block (common at low density) reads nothing: its
    # masked-off Q load moves no memory, and its rows get y = 0, lse = -inf below.
    q_ptrs = Q + b64 * stride_qb + (head_rows * stride_qh + rows64 * stride_qm)[:, None] \
        + offs_dk[None, :]
    # (A row bound instead of `row_ok & (n_all > 0)`: the interpreter mistypes a
    # scalar-bool & vector-bool mask.)
    load_ok = row_ok & (offs_m < tl.where(n_all > 0, row_end, 0))
    k_ids = K_IDS + b64 * stride_tk
    k_poss = K_POS + b64 * stride_tk
    q_id, q_pos = token_values(Q_IDS + b64 * stride_tq, Q_POS + b64 * stride_tq, offs_m, row_ok,
                               -1, HAS_IDS, HAS_POS)
    if HAS_IDS:
        load_ok = load_ok & (q_id >= 0)  # a padded query row is never read
    q = tl.load(q_ptrs, mask=load_ok[:, None] & (offs_dk[None, :] < D_K), other=0.0)
    k_src = head_source(K, b64, hk64, stride_kb, stride_kh, USE_TMA)
    v_src = head_source(V, b64, hk64, stride_vb, stride_vh, USE_TMA)
    PARTIAL_TMA: tl.constexpr = USE_TMA and not HAS_IDS
    k_part = masked_step_source(k_src, K_RAW, b64, hk64, stride_kb, stride_kh, PARTIAL_TMA)
    v_part = masked_step_source(v_src, V_RAW, b64, hk64, stride_vb, stride_vh, PARTIAL_TMA)
    idx_ptr = KV_INDEX + b64 * stride_ib + hl64 * stride_ih + qb64 * stride_iq
    slot_row = BITS_SLOTS + b64 * stride_sb + hl64 * stride_sh + qb64 * stride_sq
    rows_in_block = offs_m - qb * BLOCK

    qk_scale = kernel_scale(scale_hi, scale_lo, IS_F64)  # carries log2(e) below f64
    cap = kernel_scale(SOFTCAP, SOFTCAP_LO, IS_F64)  # f64 needs the cap to f64 precision
    if IS_F64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    m_i = tl.full([BLOCK_M], float("-inf"), acc_ty)
    l_i = tl.zeros([BLOCK_M], acc_ty)
    acc = tl.zeros([BLOCK_M, DV_PAD], acc_ty)
    if HAS_ALIBI:
        slope = head_value(ALIBI, b64, head_rows, r, stride_ab, IS_F64)
    else:
        slope = l_i  # unused
    bias_rows = BIAS + b64 * stride_xb + head_rows * stride_xh + rows64 * stride_xq

    if SPLIT:  # this program's share of the list: items [lo, hi)
        chunk = (n_all + n_splits - 1) // n_splits
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n_all)
        full_lo, full_hi = lo, tl.minimum(hi, n_full)
        part_lo, part_hi = tl.maximum(lo, n_full), hi
    else:
        full_lo, full_hi, part_lo, part_hi = 0, n_full, n_full, n_all
    acc, m_i, l_i = _attend_blocks(
        acc, m_i, l_i, q, k_src, v_src, b, hk, idx_ptr, stride_ik, full_lo, full_hi, offs_m,
        stride_kn, stride_vn, Nk, CAUSAL_OFFSET, WIN_LO, WIN_HI, SINK_TOKENS, qk_scale, q_id,
        q_pos, k_ids, k_poss, slot_row, BITS_WORDS, rows_in_block, row_ok, cap, slope,
        ALIBI_OFF, bias_rows, D_K, D_V,
        DK_PAD, DV_PAD, BLOCK, BLOCK_N, STEPS, EVEN_N, False, IS_CAUSAL, HAS_WINDOW,
        SCALE_NONNEG, IS_F64, DOT_PRECISION, USE_TMA, WIDE_TILE, HAS_IDS, HAS_POS, HAS_BITS,
        HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, FAST_TANH)
    acc, m_i, l_i = _attend_blocks(
        acc, m_i, l_i, q, k_part, v_part, b, hk, idx_ptr, stride_ik, part_lo, part_hi, offs_m,
        stride_kn, stride_vn, Nk, CAUSAL_OFFSET, WIN_LO, WIN_HI, SINK_TOKENS, qk_scale, q_id,
        q_pos, k_ids, k_poss, slot_row, BITS_WORDS, rows_in_block, row_ok, cap, slope,
        ALIBI_OFF, bias_rows, D_K, D_V,
        DK_PAD, DV_PAD, BLOCK, BLOCK_N, STEPS, EVEN_N, True, IS_CAUSAL, HAS_WINDOW,
        SCALE_NONNEG, IS_F64, DOT_PRECISION, PARTIAL_TMA, WIDE_TILE, HAS_IDS, HAS_POS, HAS_BITS,
        HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, FAST_TANH)

    if HAS_SINKS and not SPLIT:
        live = row_ok
        if HAS_IDS:
            live = live & (q_id >= 0)  # padding takes no sink
        acc, m_i, l_i = fold_sink(acc, m_i, l_i, head_value(SINKS, 0, head_rows, r, 0, IS_F64),
                                  live, IS_F64)

    # Rows with no allowed key: l = 0, acc = 0 -> y = 0, lse = -inf. NaN or +inf scores (NaN
    # or inf in q or k) make l NaN: such a row is not "empty", its NaN reaches y and lse.
    has_key = l_i != 0
    l_safe = tl.where(has_key, l_i, 1.0)
    y = acc / l_safe[:, None]
    if IS_F64:
        lse = m_i + tl.log(l_safe)
    else:
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # log2 units -> natural log
    lse = tl.where(has_key, lse, float("-inf"))

    if SPLIT:
        Y += split.to(tl.int64) * stride_ys
        LSE += split.to(tl.int64) * stride_ls
    y_ptrs = (Y + b64 * stride_yb + (head_rows * stride_yh + rows64 * stride_ym)[:, None]
              + offs_dv[None, :] * stride_yd)
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < D_V))
    lse_ptrs = LSE + b64 * stride_lb + head_rows * stride_lh + rows64 * stride_lm
    tl.store(lse_ptrs, lse.to(LSE.dtype.element_ty), mask=row_ok)


def block_sparse_attention_forward_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists, *, block_size: int,
    scale: float, is_causal: bool, y: torch.Tensor, lse: torch.Tensor,
    config: ForwardConfig | None = None, allow_tf32: bool = False,
    pack_gqa: bool | None = None, window: WindowRule | None = None,
    softcap: float = 0.0, mods: ScoreMods | None = None, split_kv: int | None = None,
) -> None:
    """Launch the forward kernel; writes ``y`` and ``lse`` in place. No host synchronisation.

    Args:
        q: ``[B, H, Nq, Dk]``; k: ``[B, Hkv, Nk, Dk]``; v: ``[B, Hkv, Nk, Dv]`` (same dtype,
            any strides with unit last stride; Dk, Dv <= 256; H a multiple of Hkv).
        lists: ``BlockLists`` built on q.device for (Nq, Nk, block_size, is_causal), with
            1, Hkv or H pattern heads; their ``tokens`` (document ids / positions) are
            applied per token in PARTIAL blocks.
        block_size: pattern block size (any value >= 1; 16..256 multiples of the tile are fast).
        scale: softmax scale applied to q @ k^T.
        is_causal: False, True (key j visible to query i only if j <= i) or "bottom_right"
            (only if j <= i + Nk - Nq).
        y: preallocated ``[B, H, Nq, Dv]`` in q.dtype, any strides.
        lse: preallocated ``[B, H, Nq]`` (float32; float64 for f64 inputs), any strides.
        config: tile config; None takes the default table entry. ``config.use_tma`` takes
            the TMA K/V path where ``triton_tma.tma_fallback_reason`` allows it, else the
            pointer path.
        allow_tf32: f32 inputs may use TF32 products (default: true f32).
        window: a sliding window with sink tokens (common.problem.WindowRule) applied per
            token in PARTIAL blocks (the lists must have been built with the same window).
        pack_gqa: pack the query heads of a GQA group into one tile (see ``pack_gqa_tiles``);
            None decides automatically, True packs wherever allowed, False never.
        softcap, mods: score modifiers (common.score_mods; softcap 0 = none, mods checked
            by ``ScoreMods.check_for``).
        split_kv: programs per query tile, each over a share of its key list (split_kv.py);
            None decides automatically (decode-like launches on CUDA), 1 never splits.
    """
    B, H, Nq, d_k = q.shape
    Hkv, Nk, d_v = k.shape[1], k.shape[2], v.shape[3]
    Hp = lists.kv_index.shape[1]
    dtype = q.dtype
    nq, nk = -(-Nq // block_size), -(-Nk // block_size)
    idx, cnt = lists.kv_index, lists.kv_count
    # Internal invariants only: the plan validated user input before calling the launcher.
    broken = [what for ok, what in (
        (k.dtype == dtype and v.dtype == dtype and y.dtype == dtype, "q/k/v/y dtypes differ"),
        (q.stride(3) == 1 and k.stride(3) == 1 and v.stride(3) == 1, "q/k/v last stride != 1"),
        (d_k <= 256 and d_v <= 256, "head dim over 256"),
        (Hkv > 0 and H % Hkv == 0 and Hp in (1, Hkv, H), f"heads H={H}, Hkv={Hkv}, lists {Hp}"),
        (tuple(idx.shape[2:]) == (nq, nk), f"lists {tuple(idx.shape)} for nq={nq}, nk={nk}"),
        (cnt.shape == lists.kv_count_full.shape and cnt.stride() == lists.kv_count_full.stride(),
         "kv_count and kv_count_full differ in layout"),
    ) if not ok]
    if broken:
        raise RuntimeError(f"block_sparse_attention_forward_triton: internal invariant broken: {broken}")
    if B * H * Nq == 0:
        return
    arch = ArchSku.from_device(q.device)
    if config is None:
        config = default_forward_config(d_k, d_v, dtype, block_size, arch, allow_tf32)
    tokens = lists.tokens
    if tokens is not None:  # their vectors are staged with the K/V tiles: make room
        config = fit_token_loads(config, d_k, d_v, dtype, arch,
                                 int(tokens.has_ids) + int(tokens.has_positions))
    if mods is not None and mods.bias is not None:  # its tiles are staged with K/V too
        config = fit_bias_loads(config, d_k, d_v, dtype, arch, mods.bias.element_size())
    bm, bn, warps = config.block_m, config.block_n, config.num_warps
    G = H // Hkv
    # Query rows of one pattern block: block_size, or fewer when the whole query is shorter.
    rows_in_block = min(block_size, Nq)
    packing = pack_gqa_tiles(G, H // Hp, rows_in_block, bm, pack_gqa)
    if packing is None:
        pack_rows, heads_in_grid = 0, H
        tiles_per_block = -(-rows_in_block // bm)
    else:
        bm, pack_rows = packing
        heads_in_grid = Hkv
        tiles_per_block = -(-rows_in_block // pack_rows)
        warps = min(warps, max(4, bm // 16))
    n_tiles = nq * tiles_per_block
    if B * heads_in_grid * n_tiles >= 2**31:
        raise RuntimeError("block_sparse_attention_forward_triton: grid over 2^31 programs")

    is_f64 = dtype == torch.float64
    scale_hi, scale_lo = scale_args(scale, dtype)
    # Broadcast pattern dims index with stride 0.
    sib, sih, _, scb, sch = list_strides(idx, cnt)
    precision = "tf32" if (allow_tf32 and dtype == torch.float32) else "ieee"
    dk_pad, dv_pad = head_dim_tile(d_k), head_dim_tile(d_v)
    use_tma = config.use_tma and tma_fallback_reason(dtype, q.device, k, v) is None
    if use_tma:
        k_arg, v_arg = row_tile_descriptor(k, bn, dk_pad), row_tile_descriptor(v, bn, dv_pad)
    else:
        k_arg, v_arg = k, v

    splits = choose_splits(split_kv, q.device, B * heads_in_grid * n_tiles, rows_in_block, nk)
    grid = (B * heads_in_grid * n_tiles * splits,)
    y_out, lse_out = y, lse
    if splits > 1:  # partials in the accumulator dtype, merged below
        y_parts = torch.empty((splits, B, H, Nq, d_v), dtype=lse.dtype, device=q.device)
        lse_parts = torch.empty((splits, B, H, Nq), dtype=lse.dtype, device=q.device)
        y, lse = y_parts[0], lse_parts[0]  # the kernel offsets by split * split stride
    token_args = tokens.kernel_args(Nq, Nk) if tokens is not None else (cnt,) * 4 + (0, 0)
    bits = bits_kernel_args(lists, cnt)
    flags = ScoreModFlags.of(softcap, mods)
    cap, slopes, stride_ab, sinks = kernel_mod_args(flags, mods, q.dtype, lse)
    bias, bias_strides = bias_kernel_args(mods, lse)
    launch_fitting(
        _block_sparse_fwd_kernel, grid,
        q, k_arg, v_arg, k, v, y, lse, idx, lists.kv_count_full, cnt, *token_args[:4], *bits[:2],
        slopes, sinks, bias,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        y.stride(0), y.stride(1), y.stride(2), y.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        sib, sih, idx.stride(2), idx.stride(3),
        scb, sch, cnt.stride(2), *token_args[4:], *bits[2:], stride_ab, *bias_strides,
        splits, *((y_parts.stride(0), lse_parts.stride(0)) if splits > 1 else (0, 0)),
        H, Nq, Nk, n_tiles, scale_hi, scale_lo, H // Hkv, H // Hp,
        causal_offset(is_causal, Nq, Nk), *window_args(window), *cap,
        alibi_offset(is_causal, Nq, Nk),
        D_K=d_k, D_V=d_v, DK_PAD=dk_pad, DV_PAD=dv_pad,
        BLOCK=block_size, BLOCK_M=bm, BLOCK_N=bn,
        TILES_PER_BLOCK=tiles_per_block, STEPS=-(-block_size // bn),
        EVEN_N=(block_size % bn == 0), IS_CAUSAL=bool(is_causal),
        HAS_WINDOW=window is not None,
        SCALE_NONNEG=(scale >= 0), IS_F64=is_f64, DOT_PRECISION=precision, USE_TMA=use_tma,
        WIDE_TILE=wide_tile_offsets(bn, k.stride(2), v.stride(2), d_k, d_v),
        PACK_ROWS=pack_rows, HAS_IDS=tokens is not None and tokens.has_ids,
        HAS_POS=tokens is not None and tokens.has_positions,
        HAS_BITS=tokens is not None and tokens.has_bits, HAS_SOFTCAP=flags.softcap > 0,
        HAS_ALIBI=flags.alibi, HAS_SINKS=flags.sinks, FAST_TANH=fast_tanh(q),
        HAS_BIAS=flags.bias, SPLIT=splits > 1,
        num_warps=warps,
        num_stages=config.num_stages,
    )
    if splits > 1:
        live = tokens.q_ids[:, None, :] >= 0 if tokens is not None and tokens.has_ids else None
        combine_splits(y_parts, lse_parts, y_out, lse_out, sinks if flags.sinks else None,
                       live)

