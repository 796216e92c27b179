"""@triton.jit pieces every attention kernel shares: the exponential in the kernels' base,
and the softmax scale rebuilt from the two arguments of ``numerics.scale_args``."""

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
    at ``col_first`` (a multiple of min(C, 32): the tile's columns span N_WORDS 32-bit words
    of a row, N_WORDS = ceil(C / 32)). True where the pair is allowed; bool [R, C], or [C, R] when COLS_FIRST (the
    dK/dV kernel's transposed tile). Columns past the block are the caller's to mask.

    Each step loads N_WORDS words per row (one [R] vector each) and picks each column's
    word with a select, instead of a gather of R x C words (measured on an H200: the gather
    cost ~25 us per partial block, a third of a window's forward). ``slot`` 0 (a block cut
    only by the causal rule, a window or a ragged tail) reads all-ones words."""
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
