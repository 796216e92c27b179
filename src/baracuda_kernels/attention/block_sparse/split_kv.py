"""Split-KV (flash-decoding) for the forward: when a launch has too few programs to fill the
card (decode: one query row per head, a few heads, a long cache), several programs share one
query tile's key list, each folding a contiguous share of it into a partial (y, lse), and a
combine step merges the partials in split order (deterministic: a fixed reduction over a
dimension of fixed size).

The kernel side is ``triton_fwd._block_sparse_fwd_kernel`` with SPLIT; this module holds the
host side: how many splits, and the combine (torch ops on [splits, B, H, Nq] tensors).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

# Split only launches whose query blocks hold at most this many rows (decode, short chunks):
# longer queries fill the card with query tiles already.
SPLIT_MAX_ROWS = 16
# The most splits of one tile, and the fewest key blocks a split walks.
MAX_SPLITS, MIN_BLOCKS_PER_SPLIT = 64, 2


@lru_cache(maxsize=16)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_splits(requested: Optional[int], device: torch.device, programs: int,
                  rows_in_block: int, key_blocks: int) -> int:
    """Splits per query tile: ``requested`` when given (>= 1), else automatic on CUDA: enough
    programs for two waves of the card's SMs when a launch of short query blocks has fewer
    programs than SMs, at most MAX_SPLITS and one split per MIN_BLOCKS_PER_SPLIT key blocks;
    1 (no split) otherwise and on the CPU interpreter."""
    if requested is not None:
        return max(1, int(requested))
    if rows_in_block > SPLIT_MAX_ROWS:
        return 1
    return auto_splits(device, programs, key_blocks, 2, MAX_SPLITS, MIN_BLOCKS_PER_SPLIT)


def auto_splits(device: torch.device, programs: int, work: int, programs_per_sm: int,
                max_splits: int, min_work_per_split: int) -> int:
    """The automatic split count of a launch of ``programs`` programs, each over ``work``
    units (key blocks or tiles): on CUDA, when there are fewer programs than SMs, enough
    splits for ``programs_per_sm`` programs per SM, at most ``max_splits`` and one per
    ``min_work_per_split`` units; 1 otherwise and on the CPU interpreter."""
    if device.type != "cuda":
        return 1
    sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(-(-programs_per_sm * sms // programs), work // min_work_per_split,
                      max_splits))


def combine_splits(y_part: torch.Tensor, lse_part: torch.Tensor, y: torch.Tensor,
                   lse: torch.Tensor, sinks: Optional[torch.Tensor] = None,
                   live: Optional[torch.Tensor] = None) -> None:
    """Merge partials y_part [S, B, H, Nq, Dv] (each normalised by its own sum) and lse_part
    [S, B, H, Nq] (natural log; -inf: the split saw no key) into y, lse (written in place):
    lse = log sum_s exp(lse_s) (+ exp(sink) on live rows), y = sum_s exp(lse_s - lse) y_s.
    A row no split reached and no sink joins gets y = 0, lse = -inf; NaN reaches y and lse.
    sinks: [H] in lse's dtype; live: bool broadcastable to [B, H, Nq] (rows that take the
    sink: not padding), None = every row."""
    m = lse_part.amax(0)                                            # [B, H, Nq]
    if sinks is not None:
        sink = sinks.to(lse.dtype)[None, :, None].expand_as(m)
        if live is not None:
            sink = torch.where(live, sink, float("-inf"))
        m = torch.maximum(m, sink)
    m_safe = torch.where(m == float("-inf"), torch.zeros((), dtype=m.dtype, device=m.device), m)
    w = torch.exp(lse_part - m_safe)                                # [S, B, H, Nq]; 0 if -inf
    total = w.sum(0)
    if sinks is not None:
        total = total + torch.exp(sink - m_safe)
    empty = total == 0
    scale = w / torch.where(empty, torch.ones_like(total), total)   # [S, B, H, Nq]
    y.copy_((scale[..., None] * y_part).sum(0))
    lse.copy_(torch.where(empty, float("-inf"), m_safe + torch.log(total)))
