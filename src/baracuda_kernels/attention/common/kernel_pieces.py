"""@triton.jit pieces every attention kernel shares: the exponential in the kernels' base,
the softmax scale rebuilt from the two arguments of ``numerics.scale_args``, the token rules
of PARTIAL blocks (positions, ids, block bits) and the score modifiers (soft-cap, ALiBi,
sinks, an additive bias; common.score_mods)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def kernel_scale(scale_hi, scale_lo, IS_F64: tl.constexpr):
    """The scale of ``scale_args`` inside a kernel: f64 hi + lo, or the f32 hi."""
    if IS_F64:
        s = tl.cast(scale_hi, tl.float64) + tl.cast(scale_lo, tl.float64)
    else:
        s = tl.cast(scale_hi, tl.float32)
    return s


@triton.jit
def exp_base(x, IS_F64: tl.constexpr):
    """The kernels' exponential: exp2 (one MUFU op; scores carry log2(e)) for f16/bf16/f32,
    the accurate natural exp for f64 (exp2 of an f64 is not guaranteed full precision)."""
    if IS_F64:
        r = tl.exp(x)
    else:
        r = tl.exp2(x)
    return r


@triton.jit
def token_allowed(q_pos, k_pos, causal_offset, win_lo, win_hi, sinks,
                  IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The token rule of a PARTIAL block, for broadcastable query / key positions: causal
    (k - q <= causal_offset) AND window (win_lo <= k - q <= win_hi, or k < sinks). Call it
    only when IS_CAUSAL or HAS_WINDOW (FULL blocks need no rule at all)."""
    d = k_pos - q_pos
    if IS_CAUSAL:
        ok = d <= causal_offset
        if HAS_WINDOW:
            ok = ok & (((d >= win_lo) & (d <= win_hi)) | (k_pos < sinks))
    else:
        ok = ((d >= win_lo) & (d <= win_hi)) | (k_pos < sinks)
    return ok


@triton.jit
def token_values(IDS, POS, offs, ok, pad, HAS_IDS: tl.constexpr, HAS_POS: tl.constexpr):
    """(ids, positions) of tokens ``offs`` of one batch row (IDS / POS point at the row;
    common.token_rules): loaded where the rules have them (``pad`` for ids outside ``ok``),
    else the indices themselves."""
    if HAS_IDS:
        ids = tl.load(IDS + offs, mask=ok, other=pad)
    else:
        ids = offs
    if HAS_POS:
        pos = tl.load(POS + offs, mask=ok, other=0)
    else:
        pos = offs
    return ids, pos


@triton.jit
def block_bits_tile(WORDS, slot, rows, row_ok, cols, col_first, BLOCK: tl.constexpr,
                    COLS_FIRST: tl.constexpr):
    """The bits (patterns.block_bits) of one PARTIAL block over a tile: in-block query rows
    ``rows`` [R] (valid where ``row_ok``) by in-block key columns ``cols`` [C], which start
    at ``col_first`` (a multiple of min(C, 32): the tile's columns span N_WORDS = ceil(C /
    32) words of a row). True where the pair is allowed; bool [R, C], or [C, R] when
    COLS_FIRST (the dK/dV kernel's transposed tile). Columns past the block are the
    caller's to mask.

    Each step loads N_WORDS words per row (one [R] vector each) and picks each column's
    word with a select, instead of a gather of R x C words (measured on an H200, a 1000-token
    window as a from_mask_fn rule, bf16 B=2 H=16 N=8192: forward 1.197 ms with the gather,
    0.465 ms with the select). ``slot`` 0 (a block cut only by the causal rule, a window or a
    ragged tail) reads all-ones words."""
    WPR: tl.constexpr = (BLOCK + 31) // 32
    N_WORDS: tl.constexpr = (cols.shape[0] + 31) // 32
    first_word = col_first >> 5
    base = WORDS + slot.to(tl.int64) * (BLOCK * WPR) + rows * WPR + first_word
    rel = (cols >> 5) - first_word
    shift = cols & 31
    for j in tl.static_range(N_WORDS):
        # (rows * 0 + ...: a vector test; the interpreter mistypes scalar & vector masks)
        w = tl.load(base + j, mask=row_ok & (rows * 0 + first_word + j < WPR), other=0)
        if COLS_FIRST:
            if j == 0:
                word = tl.broadcast_to(w[None, :], (cols.shape[0], rows.shape[0]))
            else:
                word = tl.where(rel[:, None] == j, w[None, :], word)
        else:
            if j == 0:
                word = tl.broadcast_to(w[:, None], (rows.shape[0], cols.shape[0]))
            else:
                word = tl.where(rel[None, :] == j, w[:, None], word)
    if COLS_FIRST:
        bits = (word >> shift[:, None]) & 1
    else:
        bits = (word >> shift[None, :]) & 1
    return bits != 0


@triton.jit
def tanh_approx(x):
    """tanh of float32 x with the GPU's one-instruction approximation (tanh.approx.f32,
    relative error ~2^-11: far below the rounding of bf16 scores). CUDA only."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def soft_cap(s, cap, IS_F64: tl.constexpr, FAST_TANH: tl.constexpr):
    """cap * tanh(s / cap), s and cap in the same units (the kernels' exponent base).
    FAST_TANH (bf16 inputs on a GPU): the hardware tanh, one instruction. Otherwise
    tanh through one exponential, 1 - 2 / (exp(2x) + 1): exact limits +-cap where exp
    overflows or vanishes, full f32/f64 precision, and the interpreter needs no asm."""
    x = s * (1.0 / cap)
    if FAST_TANH:
        t = tanh_approx(x)
    else:
        if IS_F64:
            e = tl.exp(2.0 * x)
        else:
            e = tl.exp2(2.8853900817779268 * x)  # exp(2x) = 2^(2 log2(e) x)
        t = 1.0 - 2.0 / (e + 1.0)
    return cap * t


@triton.jit
def bias_tile(row_ptrs, cols, row_ok, col_ok, IS_F64: tl.constexpr, COLS_FIRST: tl.constexpr,
              CHECK_COLS: tl.constexpr):
    """An additive score bias over a tile, in the kernels' exponent base (times log2(e)
    below f64): ``row_ptrs`` [R] point at each query row's bias for key 0 (the bias has a
    unit key stride: ScoreMods.check_for), ``cols`` [C] are key indices. [R, C], or [C, R]
    when COLS_FIRST (the dK/dV kernel's transposed tile); 0 outside row_ok (x col_ok when
    CHECK_COLS). Steps whose keys are all valid leave CHECK_COLS off: a mask that compares
    keys with the unspecialised Nk would split the contiguous key loads into scalar ones."""
    if COLS_FIRST:
        if CHECK_COLS:
            ok = col_ok[:, None] & row_ok[None, :]
        else:
            ok = row_ok[None, :]
        x = tl.load(row_ptrs[None, :] + cols[:, None], mask=ok, other=0.0)
    else:
        if CHECK_COLS:
            ok = row_ok[:, None] & col_ok[None, :]
        else:
            ok = row_ok[:, None]
        x = tl.load(row_ptrs[:, None] + cols[None, :], mask=ok, other=0.0)
    return in_exponent_base(x, IS_F64)


@triton.jit
def modified_scores(s, q_pos, k_pos, cap, slope, alibi_off, bias, HAS_SOFTCAP: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, IS_F64: tl.constexpr,
                    FAST_TANH: tl.constexpr):
    """Scores s (scaled, exponent base) after the score modifiers (common.score_mods):
    soft-capped, then minus slope * |k_pos - q_pos - alibi_off| (ALiBi), plus ``bias``
    (a ``bias_tile`` shaped like s). q_pos / k_pos / slope broadcast against s (slope per
    row). Returns (scores, capped scores: what the soft-cap gradient needs, s itself
    without a cap)."""
    if HAS_SOFTCAP:
        s = soft_cap(s, cap, IS_F64, FAST_TANH)
    t = s
    if HAS_BIAS:
        s = s + bias
    if HAS_ALIBI:
        # Positions to float before they meet (one conversion per row and per column, not
        # per pair; exact below 2^24 in f32).
        dist = tl.abs(k_pos.to(s.dtype) - (q_pos + alibi_off).to(s.dtype))
        s = s - slope * dist
    return s, t


@triton.jit
def head_value(PTR, b, heads, rows, stride_b, IS_F64: tl.constexpr):
    """A per-(b, head) float (ALiBi slope, sink logit) for every row of a tile, in the
    kernels' exponent base (times log2(e) below f64): ``heads`` a scalar or per-row vector,
    ``rows`` the tile's row vector (sets the shape)."""
    return in_exponent_base(tl.load(PTR + b * stride_b + heads + rows * 0), IS_F64)


@triton.jit
def in_exponent_base(x, IS_F64: tl.constexpr):
    """A natural-log quantity (a logit, a bias, a slope) in the kernels' exponent base: f64
    as it is, else float32 times log2(e) (scores below f64 carry log2(e): exp2 then gives
    the natural exp)."""
    if IS_F64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32) * 1.4426950408889634
    return x


@triton.jit
def fold_sink(acc, m_i, l_i, sink, live, IS_F64: tl.constexpr):
    """Fold a sink logit (per row, exponent base) into a finished online softmax (acc,
    m_i, l_i) on the ``live`` rows: one more term in the denominator, no value. A live row
    that saw no key ends with l = 1 around m = sink: y = 0, lse = sink."""
    m_f = tl.maximum(m_i, sink)
    alpha = exp_base(m_i - m_f, IS_F64)  # m_i = -inf (no key yet): 0
    l_f = l_i * alpha + exp_base(sink - m_f, IS_F64)
    acc = tl.where(live[:, None], acc * alpha[:, None], acc)
    return acc, tl.where(live, m_f, m_i), tl.where(live, l_f, l_i)
