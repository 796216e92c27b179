"""Query-aware selection of KV-cache blocks (Quest-style): keep, per K/V head, the key blocks
whose keys can score highest against the current queries, bounded from per-block key ranges.

Approximate by design: the attention computed over the selected blocks is exact for those
blocks (``block_sparse_attention_with_kvcache(..., block_pattern=selected)``), but the blocks
left out are not attended, so the result differs from dense attention where they would have
carried weight. Nothing here reads more than the per-block bounds and the queries.

    bounds = key_block_bounds(k_cache, cache_seqlens, block_size=128)   # once, then per append
    keep = select_key_blocks(q, bounds, keep=16)                        # [B, Hkv, 1, nb]
    y = block_sparse_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens,
                                            block_pattern=keep, block_size=128)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core import InvalidProblem


@dataclass(frozen=True)
class KeyBlockBounds:
    """Per key block, the elementwise min and max of its keys: ``lo``, ``hi`` float32
    ``[B, Hkv, nb, D]``; ``valid`` bool ``[B, nb]`` (the block holds at least one cached key);
    ``block_size`` tokens per block."""

    lo: torch.Tensor
    hi: torch.Tensor
    valid: torch.Tensor
    block_size: int


def key_block_bounds(k_cache: torch.Tensor, cache_seqlens, block_size: int = 128
                     ) -> KeyBlockBounds:
    """Bounds of the keys of a contiguous cache ``[B, Ncache, Hkv, D]`` (flash-attn's layout)
    per block of ``block_size`` tokens; keys at or past ``cache_seqlens[b]`` (int or [B])
    are ignored. Reads the cache once: keep the result and recompute only the blocks an
    append touched (``bounds.lo[:, :, j]`` for block j) as the cache grows."""
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise InvalidProblem(f"k_cache has shape {tuple(getattr(k_cache, 'shape', ()))}; "
                             f"expected [B, Ncache, Hkv, D].")
    if block_size < 1:
        raise InvalidProblem(f"block_size is {block_size}; expected an int >= 1.")
    B, N, Hkv, D = k_cache.shape
    nb = -(-N // block_size)
    lens = torch.as_tensor(cache_seqlens, device=k_cache.device).reshape(-1).expand(B)
    pos = torch.arange(nb * block_size, device=k_cache.device)
    present = pos[None, :] < lens[:, None]                                    # [B, nb*bs]
    keys = torch.nn.functional.pad(k_cache.float(), (0, 0, 0, 0, 0, nb * block_size - N))
    keys = keys.view(B, nb, block_size, Hkv, D)
    mask = present.view(B, nb, block_size)[..., None, None]
    lo = torch.where(mask, keys, float("inf")).amin(2).transpose(1, 2)      # [B, Hkv, nb, D]
    hi = torch.where(mask, keys, float("-inf")).amax(2).transpose(1, 2)
    return KeyBlockBounds(lo.contiguous(), hi.contiguous(), present.view(B, nb, -1).any(-1),
                          block_size)


def select_key_blocks(q: torch.Tensor, bounds: KeyBlockBounds, keep: int, *,
                      always_first: int = 1, always_last: int = 1) -> torch.Tensor:
    """bool pattern ``[B, Hkv, 1, nb]`` (per K/V head, shared by its query heads, so GQA
    groups share their K/V reads): for q ``[B, Nq, H, D]`` (flash-attn's layout), the
    ``keep`` valid key blocks with the highest upper bound of a score, max over the group's
    query heads and the queries of sum_d max(q_d lo_d, q_d hi_d), plus the first
    ``always_first`` (attention sinks) and last ``always_last`` valid blocks (the recent
    window). Blocks with no cached key are never selected. Fewer valid blocks than asked
    for: every valid block."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise InvalidProblem(f"q has shape {tuple(getattr(q, 'shape', ()))}; expected "
                             f"[B, Nq, H, D].")
    B, Nq, H, D = q.shape
    Hkv = bounds.lo.shape[1]
    if bounds.lo.shape[0] != B or bounds.lo.shape[-1] != D or H % Hkv:
        raise InvalidProblem(f"q {tuple(q.shape)} does not fit bounds of keys "
                             f"{tuple(bounds.lo.shape)}; expected the same batch and head dim "
                             f"and H a multiple of Hkv.")
    if keep < 0:
        raise InvalidProblem(f"keep is {keep}; expected an int >= 0.")
    qg = q.float().view(B, Nq, Hkv, H // Hkv, D)                               # [B,Nq,Hkv,G,D]
    lo, hi = bounds.lo[:, None, :, None], bounds.hi[:, None, :, None]         # [B,1,Hkv,1,nb,D]
    qx = qg[..., None, :]                                                      # [B,Nq,Hkv,G,1,D]
    upper = torch.maximum(qx * lo, qx * hi).sum(-1).amax(dim=(1, 3))          # [B, Hkv, nb]
    valid = bounds.valid[:, None, :].expand_as(upper)
    upper = torch.where(valid, upper, float("-inf"))
    nb = upper.shape[-1]
    chosen = torch.zeros_like(valid)
    if keep:
        top = upper.topk(min(keep, nb), dim=-1).indices
        chosen.scatter_(-1, top, True)
    order = torch.cumsum(valid.long(), -1)                                     # 1-based rank
    count = order[..., -1:]
    chosen |= valid & (order <= always_first)
    chosen |= valid & (order > count - always_last)
    return (chosen & valid)[:, :, None, :]
