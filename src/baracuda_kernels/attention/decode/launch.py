"""Host side of the decode kernels (triton_decode.py): configs, split count, launches.

The launcher does no device work besides the launches and the allocation of outputs (and
split workspaces): no host synchronisation, no per-token tensors, so a step can be captured
in a CUDA graph and its host time does not grow with the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..common.numerics import head_dim_tile, next_pow2, scale_args
from ..common.problem import window_args, window_rule
from ..common.score_mods import fast_tanh
from ..block_sparse.split_kv import auto_splits
from .triton_decode import _append_kernel, _combine_kernel, _decode_kernel

# Dtypes the decode kernel runs (float64 takes the block-sparse path: see kvcache.py).
DECODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Fewest key tiles a split walks: below this the combine costs more than the split saves.
MIN_TILES_PER_SPLIT = 4
# Automatic splits aim at this many programs per SM (measured on an H200, bf16 decode, B=1:
# two per SM left the card's bandwidth half used) and stop at MAX_DECODE_SPLITS.
PROGRAMS_PER_SM, MAX_DECODE_SPLITS = 4, 128
# An eager step's host time is its launches (~45 us each through Triton 3.6's launcher on an
# H100 host), and splits take two (the split kernel and its combine). While one split's
# device time stays under that, one launch is faster: H100, bf16, B=1, H=16 and 32 over 4 and
# 8 K/V heads, D=128 (bench/results/h100-2026-12-07c/probe_decode_splits.log, back-to-back
# eager calls): one split 64-86 us per call at 512-2048 keys against 97-105 us with
# automatic splits, but 193 us against 100 at 8k keys. The rule does not look at CUDA graph
# capture (inside a graph, where launches cost no host time, automatic splits would be ~25%
# faster on the device at 2k keys): a capture must replay the kernel its eager warm-up
# compiled, not compile another. Under torch.compile the traced step keeps automatic splits.
EAGER_ONE_SPLIT_KEYS = 2048


@dataclass(frozen=True)
class DecodeConfig:
    """Tile of the decode kernel: BLOCK_M packed query rows (query-major: G rows per query),
    BLOCK_N keys per step; warps and pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_decode_config(group_rows: int, d_k: int, d_v: int, dtype: torch.dtype,
                          block_size: Optional[int],
                          page_size: Optional[int] = None) -> DecodeConfig:
    """The config for ``group_rows`` = G * Nq packed rows: the smallest power-of-two row tile
    that holds them (16 at least, the dot's minimum; 128 at most). Decode-sized tiles (<= 32
    rows) stream 32 keys a step through 3 stages: on an H200 (bf16, D=128; scripts/
    probe_decode.py --sweep) that was among the fastest at B=1/16/64 and 4k-32k keys, and its
    small shared-memory footprint leaves room for several programs per SM. Taller tiles
    (chunked prefill) do more arithmetic per key: 64 keys a step (32 past head dim 128 or in
    f32, to bound registers), 2 stages. Never more than the selection block; in a paged
    cache of power-of-two pages >= 16 tokens, never more than a page (a tile then lies in
    one page: one page id per tile, see the kernel's PAGE_ALIGNED)."""
    block_m = min(128, max(16, next_pow2(group_rows)))
    wide = max(d_k, d_v) > 128 or dtype == torch.float32
    if block_m <= 32:
        block_n, stages = 32, 3
    else:
        block_n, stages = (32 if wide else 64), 2
    if block_size is not None:
        block_n = min(block_n, block_size)
    if page_size is not None and page_size >= 16 and not page_size & (page_size - 1):
        block_n = min(block_n, page_size)
    return DecodeConfig(block_m, block_n, 4 if block_m <= 64 else 8, stages)


def choose_decode_splits(requested: Optional[int], device: torch.device, programs: int,
                         key_tiles: int, keys: int = 0, eager: bool = False) -> int:
    """Splits per (b, K/V head, row tile): ``requested`` when >= 1; 1 for an ``eager``
    step (not traced by torch.compile) over at most EAGER_ONE_SPLIT_KEYS ``keys``; else on
    CUDA enough programs for PROGRAMS_PER_SM per SM when there are fewer programs than SMs,
    at most MAX_DECODE_SPLITS and one per MIN_TILES_PER_SPLIT key tiles of the longest row;
    1 on the CPU interpreter (its tests ask for splits explicitly)."""
    if requested is not None and requested >= 1:
        return int(requested)
    if eager and keys <= EAGER_ONE_SPLIT_KEYS:
        return 1
    return auto_splits(device, programs, key_tiles, PROGRAMS_PER_SM, MAX_DECODE_SPLITS,
                       MIN_TILES_PER_SPLIT)


def append_to_cache(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, seqlens: Optional[torch.Tensor], host_len: int,
                    block_table: Optional[torch.Tensor]) -> None:
    """Write k_new / v_new [B, Nnew, Hkv, D] at positions len_b .. len_b + Nnew - 1 of each
    row (len_b = seqlens[b], or host_len when seqlens is None), in place, one launch."""
    B, n_new, Hkv, d_k = k_new.shape
    d_v = v_new.shape[3]
    if B * n_new == 0:
        return
    paged = block_table is not None
    table = block_table if paged else k_cache
    _append_kernel[(B * n_new,)](
        k_new, v_new, k_cache, v_cache, seqlens if seqlens is not None else k_cache, table,
        k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        table.stride(0) if paged else 0,
        Hkv, n_new, host_len, k_cache.shape[1] if paged else 1,
        D_K=d_k, D_V=d_v, DK_PAD=head_dim_tile(d_k), DV_PAD=head_dim_tile(d_v),
        HKV_PAD=next_pow2(Hkv), HOST_LEN=seqlens is None, PAGED=paged,
        num_warps=4)


def decode_forward_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
    seqlens: Optional[torch.Tensor], host_len: int, n_new: int, capacity: int,
    block_table: Optional[torch.Tensor], is_causal: bool, scale: float,
    window_size: Optional[tuple] = None, sink_tokens: int = 0, softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None,
    selection: Optional[tuple] = None, block_size: Optional[int] = None,
    return_lse: bool = False, num_splits: Optional[int] = None,
    config: Optional[DecodeConfig] = None, key_mask: Optional[torch.Tensor] = None):
    """Attention of q against the cache; returns y [B, Nq, H, Dv] (and lse [B, H, Nq],
    float32). Inputs are validated by the caller (kvcache.py).

    Args:
        q: [B, Nq, H, D] with unit last stride; k_cache / v_cache: [B, Ncache, Hkv, D] or
            pages [num_pages, page_size, Hkv, D] (block_table [B, pages_per_row] int32/64).
        seqlens: int32/int64 [B] on q.device, the keys of each row before this call's new
            tokens; None: every row holds ``host_len``.
        n_new: new tokens already written into the cache (row b holds seqlens[b] + n_new).
        capacity: keys a row can hold (bounds the split count).
        window_size, sink_tokens: flash-attn's (left, right) window around each query's
            position, -1 unbounded, plus the first ``sink_tokens`` keys always visible.
        softcap (0 = none), alibi_slopes float32 [H] / [B, H], sinks float32 [H].
        selection: None, or (kv_index [B|1, Hkv|1, n] int32, kv_count [B|1, Hkv|1] int32):
            the active key blocks of ``block_size`` tokens (a multiple of the config's
            block_n) per row and K/V head; only they are read.
        num_splits: split-KV programs per row tile (None: automatic).
        key_mask: None, or bool/uint8 [B, capacity] with a unit last stride: 0 marks a
            key no query sees (padding inside the rows).

    Everything but the tensors' addresses and ``host_len`` is a function of shapes,
    strides and options: it is worked out once per such key (``_recipe``), so a decode
    step's host time is two allocations (four with splits) and one or two launches.
    """
    paged = block_table is not None
    # Not traced by torch.compile: launches cost host time (EAGER_ONE_SPLIT_KEYS).
    eager = num_splits is None and not torch.compiler.is_compiling()
    key = (eager, q.shape, q.stride(), k_cache.shape, k_cache.stride(), v_cache.shape,
           v_cache.stride(), q.dtype, q.device, block_table.stride() if paged else None,
           seqlens is None, n_new, capacity, bool(is_causal), scale,
           None if window_size is None else tuple(window_size), sink_tokens, softcap,
           None if alibi_slopes is None else (alibi_slopes.shape, alibi_slopes.stride()),
           sinks is not None, block_size, return_lse, num_splits, config,
           None if selection is None else tuple((t.shape, t.stride()) for t in selection),
           None if key_mask is None else key_mask.stride(0))
    recipe = _RECIPES.get(key)
    if recipe is None:
        if len(_RECIPES) >= 256:
            _RECIPES.clear()
        recipe = _RECIPES[key] = _Recipe.build(
            q, k_cache, v_cache, seqlens, n_new, capacity, block_table, is_causal, scale,
            window_size, sink_tokens, softcap, alibi_slopes, sinks, selection, block_size,
            return_lse, num_splits, config, key_mask, eager)
    dev = q.device
    y = torch.empty(recipe.y_shape, dtype=q.dtype, device=dev)
    lse = torch.empty(recipe.lse_shape, dtype=torch.float32, device=dev) if return_lse else None
    if recipe.empty:
        return (y, lse) if return_lse else y
    if recipe.splits > 1:
        y_out = torch.empty(recipe.part_shape, dtype=torch.float32, device=dev)
        lse_out = torch.empty(recipe.part_shape[:-1], dtype=torch.float32, device=dev)
    else:
        y_out, lse_out = y, (lse if lse is not None else y)
    placeholder = y_out
    idx, cnt = selection if selection is not None else (placeholder, placeholder)
    _decode_kernel[recipe.grid](
        q, k_cache, v_cache, y_out, lse_out,
        seqlens if seqlens is not None else placeholder,
        block_table if paged else placeholder, idx, cnt,
        alibi_slopes if alibi_slopes is not None else placeholder,
        sinks if sinks is not None else placeholder,
        _mask_bytes(key_mask) if key_mask is not None else placeholder,
        *recipe.ints_before, host_len, *recipe.ints_after, **recipe.consts)
    if recipe.splits > 1:
        _combine_kernel[recipe.combine_grid](
            y_out, lse_out, y, lse if lse is not None else y_out,
            sinks if sinks is not None else y_out, *recipe.combine_ints, **recipe.combine_consts)
    return (y, lse) if return_lse else y


def _mask_bytes(key_mask: torch.Tensor) -> torch.Tensor:
    """The bool key mask as uint8 for the kernel: a free reinterpretation in eager mode; a
    conversion when traced (inductor cannot lower a bool -> uint8 view)."""
    if torch.compiler.is_compiling():
        return key_mask.to(torch.uint8)
    return key_mask.view(torch.uint8)


_RECIPES: dict = {}


@dataclass(frozen=True)
class _Recipe:
    """What one launch of the decode kernel (and of its combine) takes besides the tensors
    and host_len: grid, integer arguments, compile-time constants, output shapes."""

    y_shape: tuple
    lse_shape: tuple
    part_shape: tuple
    empty: bool
    splits: int
    grid: tuple
    ints_before: tuple
    ints_after: tuple
    consts: dict
    combine_grid: tuple
    combine_ints: tuple
    combine_consts: dict

    @classmethod
    def build(cls, q, k_cache, v_cache, seqlens, n_new, capacity, block_table, is_causal,
              scale, window_size, sink_tokens, softcap, alibi_slopes, sinks, selection,
              block_size, return_lse, num_splits, config, key_mask,
              eager: bool = False) -> "_Recipe":
        B, Nq, H, d_k = q.shape
        Hkv, d_v = k_cache.shape[2], v_cache.shape[3]
        G = H // Hkv
        paged = block_table is not None
        if config is None:
            config = default_decode_config(G * Nq, d_k, d_v, q.dtype, block_size,
                                           k_cache.shape[1] if paged else None)
        bm, bn = config.block_m, config.block_n
        row_tiles = -(-G * Nq // bm)
        splits = choose_decode_splits(num_splits, q.device, B * Hkv * row_tiles,
                                      -(-capacity // bn), capacity, eager)
        y_shape, lse_shape = (B, Nq, H, d_v), (B, H, Nq)
        part_shape = (splits, B, Nq, H, d_v)
        page_aligned = paged and k_cache.shape[1] % bn == 0
        # Workspaces / outputs are allocated contiguous: their strides follow from shapes.
        y_st = _contiguous_strides(y_shape)
        lse_st = _contiguous_strides(lse_shape)
        if splits > 1:
            out_st = _contiguous_strides(part_shape)[:4]
            l_st = _contiguous_strides(part_shape[:-1])
        else:
            out_st = (0, *y_st[:3])
            l_st = (0, lse_st[0], lse_st[2], lse_st[1]) if return_lse else (0,) * 4
        # Measured from each query's own position: the top-left form of the rule.
        win = window_rule(window_size, sink_tokens, True, Nq, capacity) \
            if window_size is not None else None
        if selection is not None:
            idx, cnt = selection
            sel_st = (0 if idx.shape[0] == 1 else idx.stride(0),
                      0 if idx.shape[1] == 1 else idx.stride(1),
                      0 if cnt.shape[0] == 1 else cnt.stride(0),
                      0 if cnt.shape[1] == 1 else cnt.stride(1))
        else:
            sel_st = (0, 0, 0, 0)
        ints_before = (
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            *out_st, *l_st, block_table.stride(0) if paged else 0, *sel_st,
            (alibi_slopes.stride(0) if alibi_slopes.shape[0] > 1 else 0)
            if alibi_slopes is not None else 0,
            key_mask.stride(0) if key_mask is not None else 0,
            Hkv, Nq)
        ints_after = (n_new, splits, *scale_args(scale, q.dtype),
                      *window_args(win), *scale_args(softcap, q.dtype),
                      k_cache.shape[1] if paged else 1)
        consts = dict(
            G=G, D_K=d_k, D_V=d_v, DK_PAD=head_dim_tile(d_k), DV_PAD=head_dim_tile(d_v),
            BLOCK_M=bm, BLOCK_N=bn,
            SEL_STEPS=(block_size // bn) if selection is not None else 1,
            HOST_LEN=seqlens is None, IS_CAUSAL=bool(is_causal), HAS_WINDOW=win is not None,
            PAGED=paged, PAGE_ALIGNED=page_aligned, HAS_SELECT=selection is not None,
            HAS_KEY_MASK=key_mask is not None,
            HAS_SOFTCAP=softcap > 0,
            HAS_ALIBI=alibi_slopes is not None, HAS_SINKS=sinks is not None,
            SPLIT=splits > 1, WRITE_LSE=splits > 1 or return_lse, FAST_TANH=fast_tanh(q),
            DOT_PRECISION="ieee", num_warps=config.num_warps, num_stages=config.num_stages)
        combine_ints = (*out_st[:4], *l_st, *y_st[:3],
                        *((lse_st[0], lse_st[2], lse_st[1]) if return_lse else (0, 0, 0)),
                        Nq, H, splits)
        combine_consts = dict(D_V=d_v, DV_PAD=head_dim_tile(d_v),
                              S_PAD=max(2, next_pow2(splits)),
                              S_CHUNK=min(16, max(2, next_pow2(splits))),
                              HAS_SINKS=sinks is not None, WRITE_LSE=return_lse, num_warps=4)
        return cls(y_shape, lse_shape, part_shape, B * Nq * H == 0, splits,
                   (splits, row_tiles, B * Hkv), ints_before, ints_after, consts,
                   (B * Nq * H,), combine_ints, combine_consts)


def _contiguous_strides(shape: tuple) -> tuple:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(strides))
