"""Host side of the decode kernels (triton_decode.py): configs, split count, launches.

The launcher does no device work besides the launches and the allocation of outputs (and
split workspaces): no host synchronisation, no per-token tensors, so a step can be captured
in a CUDA graph and its host time does not grow with the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ..common.numerics import head_dim_tile, scale_args
from ..common.problem import UNBOUNDED
from ..common.score_mods import fast_tanh
from ..block_sparse.split_kv import MAX_SPLITS, sm_count
from .triton_decode import _append_kernel, _combine_kernel, _decode_kernel

# Dtypes the decode kernel runs (float64 takes the block-sparse path: see kvcache.py).
DECODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Fewest key tiles a split walks: below this the combine costs more than the split saves.
MIN_TILES_PER_SPLIT = 4


@dataclass(frozen=True)
class DecodeConfig:
    """Tile of the decode kernel: BLOCK_M packed query rows (query-major: G rows per query),
    BLOCK_N keys per step; warps and pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_decode_config(group_rows: int, d_k: int, d_v: int, dtype: torch.dtype,
                          block_size: Optional[int]) -> DecodeConfig:
    """The config for ``group_rows`` = G * Nq packed rows: the smallest power-of-two row tile
    that holds them (16 at least, the dot's minimum; 128 at most), 64 keys a step (32 past
    head dim 128 or in f32, to bound registers), or the selection block when it is smaller."""
    block_m = min(128, max(16, triton.next_power_of_2(group_rows)))
    wide = max(d_k, d_v) > 128 or dtype == torch.float32
    block_n = 32 if wide else 64
    if block_size is not None:
        block_n = min(block_n, block_size)
    return DecodeConfig(block_m, block_n, 4 if block_m <= 64 else 8, 3)


def choose_decode_splits(requested: Optional[int], device: torch.device, programs: int,
                         key_tiles: int) -> int:
    """Splits per (b, K/V head, row tile): ``requested`` when >= 1, else on CUDA enough
    programs for about two waves of the card's SMs when there are fewer programs than SMs,
    at most MAX_SPLITS and one per MIN_TILES_PER_SPLIT key tiles of the longest row; 1 on
    the CPU interpreter (its tests ask for splits explicitly)."""
    if requested is not None and requested >= 1:
        return int(requested)
    if device.type != "cuda":
        return 1
    sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(-(-2 * sms // programs), key_tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))


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
        HKV_PAD=triton.next_power_of_2(Hkv), HOST_LEN=seqlens is None, PAGED=paged,
        num_warps=4)


def decode_forward_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
    seqlens: Optional[torch.Tensor], host_len: int, n_new: int, capacity: int,
    block_table: Optional[torch.Tensor], is_causal: bool, scale: float,
    window_size: Optional[tuple] = None, sink_tokens: int = 0, softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None,
    selection: Optional[tuple] = None, block_size: Optional[int] = None,
    return_lse: bool = False, num_splits: Optional[int] = None,
    config: Optional[DecodeConfig] = None):
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
    """
    B, Nq, H, d_k = q.shape
    Hkv, d_v = k_cache.shape[2], v_cache.shape[3]
    G = H // Hkv
    dev = q.device
    if config is None:
        config = default_decode_config(G * Nq, d_k, d_v, q.dtype, block_size)
    bm, bn = config.block_m, config.block_n
    row_tiles = -(-G * Nq // bm)
    splits = choose_decode_splits(num_splits, dev, B * Hkv * row_tiles, -(-capacity // bn))
    y = torch.empty(B, Nq, H, d_v, dtype=q.dtype, device=dev)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=dev) if return_lse else None
    if B * Nq * H == 0:
        return (y, lse) if return_lse else y
    if splits > 1:
        y_out = torch.empty(splits, B, Nq, H, d_v, dtype=torch.float32, device=dev)
        lse_out = torch.empty(splits, B, Nq, H, dtype=torch.float32, device=dev)
        y_st = y_out.stride()[:4]
        l_st = lse_out.stride()
    else:
        y_out, lse_out = y, (lse if lse is not None else y)
        y_st = (0, *y.stride()[:3])
        l_st = (0, lse.stride(0), lse.stride(2), lse.stride(1)) if lse is not None else (0,) * 4
    paged = block_table is not None
    if window_size is not None and tuple(window_size) != (-1, -1):
        left, right = window_size
        win = (-left if left >= 0 else -UNBOUNDED, right if right >= 0 else UNBOUNDED,
               sink_tokens)
    else:
        win = None
    if selection is not None:
        idx, cnt = selection
        sel = (idx, cnt, 0 if idx.shape[0] == 1 else idx.stride(0),
               0 if idx.shape[1] == 1 else idx.stride(1),
               0 if cnt.shape[0] == 1 else cnt.stride(0), 0 if cnt.shape[1] == 1 else cnt.stride(1))
    else:
        sel = (y, y, 0, 0, 0, 0)
    scale_hi, scale_lo = scale_args(scale, q.dtype)
    cap_hi, cap_lo = scale_args(softcap, q.dtype)
    placeholder = y_out
    page_size = k_cache.shape[1] if paged else 1
    _decode_kernel[(splits, row_tiles, B * Hkv)](
        q, k_cache, v_cache, y_out, lse_out,
        seqlens if seqlens is not None else placeholder, block_table if paged else placeholder,
        sel[0], sel[1], alibi_slopes if alibi_slopes is not None else placeholder,
        sinks if sinks is not None else placeholder,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *y_st, *l_st,
        block_table.stride(0) if paged else 0, *sel[2:],
        (alibi_slopes.stride(0) if alibi_slopes.shape[0] > 1 else 0)
        if alibi_slopes is not None else 0,
        Hkv, Nq, host_len, n_new, splits, scale_hi, scale_lo,
        *(win if win is not None else (0, 0, 0)), cap_hi, cap_lo, page_size,
        G=G, D_K=d_k, D_V=d_v, DK_PAD=head_dim_tile(d_k), DV_PAD=head_dim_tile(d_v),
        BLOCK_M=bm, BLOCK_N=bn,
        SEL_STEPS=(block_size // bn) if selection is not None else 1,
        HOST_LEN=seqlens is None, IS_CAUSAL=bool(is_causal), HAS_WINDOW=win is not None,
        PAGED=paged, HAS_SELECT=selection is not None, HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=alibi_slopes is not None, HAS_SINKS=sinks is not None, SPLIT=splits > 1,
        WRITE_LSE=splits > 1 or return_lse, FAST_TANH=fast_tanh(q),
        DOT_PRECISION="ieee", num_warps=config.num_warps, num_stages=config.num_stages)
    if splits > 1:
        l_fin = (lse.stride(0), lse.stride(2), lse.stride(1)) if lse is not None else (0, 0, 0)
        _combine_kernel[(B * Nq * H,)](
            y_out, lse_out, y, lse if lse is not None else y_out,
            sinks if sinks is not None else y_out,
            *y_out.stride()[:4], *lse_out.stride(), *y.stride()[:3], *l_fin,
            Nq, H, splits, D_V=d_v, DV_PAD=head_dim_tile(d_v),
            S_PAD=max(2, triton.next_power_of_2(splits)), HAS_SINKS=sinks is not None,
            WRITE_LSE=return_lse, num_warps=4)
    return (y, lse) if return_lse else y
