"""Launcher of the Triton backward of block-sparse attention (dQ, dK, dV).

The kernels live beside it: ``triton_bwd_dq.py``, ``triton_bwd_dkdv.py`` and the pieces they
share in ``triton_bwd_pieces.py``; configs in ``triton_bwd_configs.py``.

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
* ``_bwd_dkdv_kernel``: one program per (b, K/V head, key tile), 1-D grid; for each query
  head of its GQA group in turn it loops only over the query blocks that attend its key
  block (``BlockLists.transposed()``), likewise, so dK/dV sum over the group in registers.

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

from baracuda_kernels.core import Unsupported

from ..common.numerics import accumulator_dtype, head_dim_tile, list_strides, scale_args
from ..common.problem import WindowRule, causal_offset, window_args
from ..common.triton_tma import row_tile_descriptor, tma_fallback_reason
from ..common.score_mods import (BiasGradTarget, ScoreModFlags, ScoreMods, alibi_offset,
                                 bias_kernel_args, fast_tanh, kernel_mod_args)
from ..common.triton_launch import launch_fitting
from .block_lists import bits_kernel_args
from .triton_bwd_configs import (BackwardConfig, _tile, _warps, default_backward_config,
                                 short_row_backward_config)
from .triton_bwd_dkdv import _bwd_dkdv_kernel
from .triton_bwd_dq import _bwd_dq_kernel
from .triton_bwd_pieces import _bwd_preprocess_kernel


_TORCH_TO_F64 = {torch.float16: False, torch.bfloat16: False, torch.float32: False,
                 torch.float64: True}


def _bhn(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def block_sparse_attention_backward_triton(
    q, k, v, y, lse, dy, lists, *, block_size: int, scale: float, is_causal: bool,
    dq, dk, dv, dlse=None, allow_tf32: bool = False, config: BackwardConfig | None = None,
    window: WindowRule | None = None, softcap: float = 0.0, mods: ScoreMods | None = None,
    dbias: BiasGradTarget | None = None,
) -> torch.Tensor | None:
    """Write dq, dk, dv of block-sparse attention (no host synchronisation, no atomics).

    Args:
        q: ``[B, H, Nq, Dk]``, k: ``[B, Hkv, Nk, Dk]``, v: ``[B, Hkv, Nk, Dv]`` (H a
            multiple of Hkv), all one dtype (f16, bf16, f32 or f64) on one CUDA device (CPU
            under TRITON_INTERPRET=1); any strides with unit last stride.
        y: forward output ``[B, H, Nq, Dv]`` (same dtype); lse: ``[B, H, Nq]`` natural-log
            log-sum-exp (f32 or f64; -inf on rows that attend nothing).
        dy: upstream gradient ``[B, H, Nq, Dv]``, any strides with unit last stride.
        lists: forward ``BlockLists`` of the pattern, 1, Hkv or H pattern heads
            (``transposed()`` is used for dK/dV).
        block_size, scale, is_causal: as in the forward.
        dq, dk, dv: preallocated outputs shaped like q, k, v (same dtype); every valid
            element is written (0 where nothing is attended), nothing past Nq/Nk. dq None
            skips the dQ kernel, dk and dv None (together) the dK/dV kernel.
        dlse: gradient of lse ``[B, H, Nq]`` (any strides) or None (zero).
        allow_tf32: let f32 dots use TF32 (ieee otherwise).
        config: tile override (pinned in tests/benchmarks); default per dtype and head dim.
        window: the forward's sliding window with sink tokens (common.problem.WindowRule).
        softcap, mods: the forward's score modifiers (common.score_mods). Sinks need nothing
            here: lse includes them, and their own gradient is ``score_mods.sinks_grad``.
        dbias: where the dK/dV kernel writes the bias's gradient (mods carry a bias), or
            None; the dK/dV kernel runs for it even when dk / dv are None.
    Returns the rows' delta = dy . y - dlse [B, H, Nq] (f32; f64 for f64), which that
    gradient reuses; None when no kernel ran.
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
    if dbias is not None and dk is None:  # the dK/dV kernel computes d bias: run it anyway
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    return _launch(q, k, v, y, lse, dy, dlse, lists, block_size, scale, is_causal, dq, dk, dv,
                   allow_tf32, cfg, window, softcap, mods, dbias)


# A work item counts as heavy when its list is this many times the mean list length.
_HEAVY_FACTOR = 2.0


def _launch_order(lists, for_dq: bool, B: int, H: int, G: int, tiles: int,
                  mode: str) -> torch.Tensor:
    """int32 [B*(H/G)*n*tiles]: the work item each program does, cached on ``lists``.

    Work item w = bh * n_tiles + t is tile t of head bh in the kernel's own order: query
    heads and query tiles descending in dQ (``for_dq``, G = 1, list lengths
    ``lists.kv_count``); K/V heads (groups of G query heads, summed list lengths) and key
    tiles ascending in dK/dV (list lengths from ``lists.transposed()``). "head-major": items in order. "tile-major": tile t
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
        n_items = B * (H // G) * count.shape[-1] * tiles
        items = torch.arange(n_items, dtype=torch.int32, device=count.device)
        if mode == "head-major":
            return items
        if mode == "tile-major":
            return items.view(B * H, -1).t().contiguous().view(-1)
        per_head = count if count.shape[1] in (1, H) else \
            count.repeat_interleave(H // count.shape[1], dim=1)  # per-K/V-head lists
        per_head = per_head.expand(B, H, -1)
        per_item = per_head.view(B, H // G, G, -1).sum(2).repeat_interleave(tiles, dim=-1)
        if for_dq:
            per_item = per_item.flip(-1)
        per_item = per_item.reshape(-1).float()
        light = per_item <= _HEAVY_FACTOR * per_item.mean()
        return torch.argsort(light.to(torch.int8), stable=True).to(torch.int32)

    return lists.memo(("bwd-order", for_dq, B, H, G, tiles, mode), build)


def _looped_sources(want_tma: bool, a, b, rows: int, a_pad: int, b_pad: int):
    """The two tensors a kernel loops over (K, V for dQ; Q, dY for dK/dV) as TMA descriptors
    of ``rows``-row tiles when wanted and legal (triton_tma), else as they are.
    -> (a_arg, b_arg, uses_tma)"""
    if want_tma and tma_fallback_reason(a.dtype, a.device, a, b) is None:
        return row_tile_descriptor(a, rows, a_pad), row_tile_descriptor(b, rows, b_pad), True
    return a, b, False


def _launch(q, k, v, y, lse, dy, dlse, lists, block_size, scale, is_causal, dq, dk, dv,
            allow_tf32, cfg: BackwardConfig, window: WindowRule | None, softcap: float,
            mods: ScoreMods | None, dbias: BiasGradTarget | None) -> torch.Tensor | None:
    """The three launches (see the module docstring); inputs already checked. Returns the
    rows' delta [B, H, Nq] (dy . y - dlse) the launches computed, None when none ran."""
    B, H, Nq, Dk = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G, list_div = H // Hkv, H // lists.kv_index.shape[1]
    is_f64 = _TORCH_TO_F64[q.dtype]
    precision = "tf32" if (allow_tf32 and q.dtype == torch.float32) else "ieee"
    block_dk, block_dv = head_dim_tile(Dk), head_dim_tile(Dv)
    acc_dtype = accumulator_dtype(q.dtype)
    dev = q.device
    qk_hi, qk_lo = scale_args(scale, q.dtype)
    offset = causal_offset(is_causal, Nq, Nk)  # query i sees key j iff j <= i + offset

    delta = torch.empty((B * H, Nq), dtype=acc_dtype, device=dev)
    lse2 = torch.empty((B * H, Nq), dtype=acc_dtype, device=dev)
    dlse_arg = lse if dlse is None else dlse  # never read when HAS_DLSE is False
    stats_args = (*_bhn(y), *_bhn(lse), *_bhn(dlse_arg))
    common = dict(BS=block_size, D_K=Dk, D_V=Dv, BLOCK_DK=block_dk, BLOCK_DV=block_dv,
                  IS_CAUSAL=bool(is_causal), HAS_WINDOW=window is not None, IS_F64=is_f64,
                  PRECISION=precision)
    nq, nk = -(-Nq // block_size), -(-Nk // block_size)
    tokens = lists.tokens  # document ids / positions of PARTIAL blocks, or None
    token_args = tokens.kernel_args(Nq, Nk) if tokens is not None else (delta,) * 4 + (0, 0)
    bits = bits_kernel_args(lists, delta)  # block bits of cut blocks (placeholders without)
    flags = ScoreModFlags.of(softcap, mods)
    cap, slopes, stride_ab, _ = kernel_mod_args(flags, mods, q.dtype, delta)
    bias, bias_strides = bias_kernel_args(mods, delta)
    alibi_off = alibi_offset(is_causal, Nq, Nk)
    common.update(HAS_IDS=tokens is not None and tokens.has_ids,
                  HAS_POS=tokens is not None and tokens.has_positions,
                  HAS_BITS=tokens is not None and tokens.has_bits,
                  HAS_SOFTCAP=softcap > 0, HAS_ALIBI=flags.alibi, HAS_BIAS=flags.bias,
                  FAST_TANH=fast_tanh(q))

    if dq is not None:  # dQ (which also writes delta and lse2) only when q needs a gradient
        bm, tiles_m, _ = _tile(cfg.q_block_m, block_size)
        bn, subs_n, even_n = _tile(cfg.q_block_n, block_size)
        n_tiles = nq * tiles_m
        k_arg, v_arg, tma = _looped_sources(cfg.use_tma and even_n, k, v, bn, block_dk, block_dv)
        order = _launch_order(lists, True, B, H, 1, tiles_m, cfg.launch_order)
        launch_fitting(
            _bwd_dq_kernel, (B * H * n_tiles,),
            q, k_arg, v_arg, k, v, dy, lse2, delta, dq, lists.kv_index, lists.kv_count_full,
            lists.kv_count, order, y, lse, dlse_arg, *token_args[:4], *bits[:2], slopes, bias,
            *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(dy), *_bhn(dq),
            *list_strides(lists.kv_index, lists.kv_count),
            *stats_args, *token_args[4:], *bits[2:], stride_ab, *bias_strides,
            H, n_tiles, Nq, Nk, float(scale), qk_hi, qk_lo, G, list_div, offset,
            *window_args(window), *cap, alibi_off, BLOCK_M=bm, BLOCK_N=bn, SUBS_N=subs_n, EVEN_N=even_n,
            TILES_M=tiles_m, USE_TMA=tma,
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
        order = _launch_order(lists, False, B, H, G, tiles_n, cfg.launch_order)
        launch_fitting(
            _bwd_dkdv_kernel, (B * Hkv * n_tiles,),
            q_arg, k, v, dy_arg, q, dy, lse2, delta, dk, dv, q_index, q_count_full, q_count,
            order, *token_args[:4], *bits[:2], slopes, bias,
            dbias.buffer if dbias is not None else delta, *_bhn(q), *_bhn(k), *_bhn(v),
            *_bhn(dy), *_bhn(dk), *_bhn(dv), *list_strides(q_index, q_count), *token_args[4:],
            *bits[2:], stride_ab, *bias_strides,
            *(dbias.strides() if dbias is not None else (0, 0, 0)), H, n_tiles, Nq, Nk, float(scale), qk_hi, qk_lo,
            G, list_div, offset, *window_args(window), *cap, alibi_off,
            BLOCK_M=bm, BLOCK_N=bn, SUBS_M=subs_m, EVEN_M=even_m, TILES_N=tiles_n, USE_TMA=tma,
            GROUPED=G > 1, DBIAS_MODE=dbias.mode if dbias is not None else 0, **common,
            num_warps=_warps(cfg.kv_warps, bn * bm, q.dtype, max(block_dk, block_dv)),
            num_stages=cfg.kv_stages)
    return delta.view(B, H, Nq) if (dq is not None or dk is not None) else None


__all__ = ["BackwardConfig", "block_sparse_attention_backward_triton", "default_backward_config",
           "short_row_backward_config"]
