"""Turn a per-block pattern into compact lists of active blocks, on the pattern's device.

Every backend reads the pattern through this module, so that "which blocks are computed,
and which need masking" is decided in one place:

* ``classify_blocks`` gives each (query block, key block) cell a class: SKIP (pattern is
  zero, or the causal mask empties the block), FULL (every token pair is allowed: no mask
  arithmetic needed) or PARTIAL (the causal diagonal crosses it, or it touches a ragged tail).
* ``BlockLists`` holds, per (b, h, query block), the active key blocks compacted to the
  front of a row, FULL ones first then PARTIAL ones, each group ascending; and the transposed
  lists per (b, h, key block) for backward passes. On CUDA (and under the Triton
  interpreter) one Triton launch builds both (triton_lists.py); elsewhere torch ops do.
  Neither synchronises with the host, so a step that builds lists can be graph-captured.

Broadcast pattern dims (size 1 in B or H) stay size 1 here; kernels index them with stride 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ..common.problem import WindowRule, causal_offset
from ..common.token_rules import TokenRules, block_ranges

SKIP, FULL, PARTIAL = 0, 1, 2


def classify_blocks(pattern: torch.Tensor, query_len: int, key_len: int, block_size: int,
                    is_causal: bool, window: Optional[WindowRule] = None,
                    tokens: Optional[TokenRules] = None) -> torch.Tensor:
    """Class of every block cell, exact for the token rule: FULL when the rule allows every
    pair of the block, SKIP when it allows none (or the pattern is off), PARTIAL otherwise.

    Args:
        pattern: bool ``[Bp, Hp, nq, nk]`` (already canonical, see ``canonical_pattern``).
        is_causal: False, True (top-left) or "bottom_right" (see common.problem.causal_mode).
        window: a sliding window with sink tokens (common.problem.WindowRule) or None.
        tokens: document ids / positions / block bits (common.token_rules.TokenRules) or
            None. Their blocks are classified from per-block ranges of the ids and positions:
            exact for blocks inside one document (contiguous positions), conservative
            (PARTIAL, which the kernels mask per token) where a block straddles documents.
            Every block with bits is PARTIAL.
    Returns:
        int8 ``[max(Bp, Bt), Hp, nq, nk]`` with values SKIP, FULL, PARTIAL (Bt: the token
        rules' batch, 1 without them).
    """
    nq, nk = pattern.shape[-2], pattern.shape[-1]
    dev = pattern.device
    q_first = torch.arange(nq, device=dev, dtype=torch.int64) * block_size
    q_last = torch.clamp(q_first + block_size, max=query_len) - 1
    k_first = torch.arange(nk, device=dev, dtype=torch.int64) * block_size
    k_last = torch.clamp(k_first + block_size, max=key_len) - 1

    ragged_q = (q_last - q_first + 1) < block_size          # [nq]
    ragged_k = (k_last - k_first + 1) < block_size          # [nk]
    partial = ragged_q[:, None] | ragged_k[None, :]          # [nq, nk]
    alive = torch.ones(nq, nk, dtype=torch.bool, device=dev)
    if tokens is not None and tokens.has_positions:
        # Positions replace indices in the causal rule and the window.
        alive, full = _positioned_blocks(tokens, is_causal, window, query_len, key_len,
                                         block_size)
        partial = partial | ~full
    else:
        if is_causal:
            # query i sees key j only when j <= i + off (off = 0 top-left, like torch SDPA;
            # Nk - Nq bottom-right).
            off = causal_offset(is_causal, query_len, key_len)
            alive = k_first[None, :] <= q_last[:, None] + off          # some pair survives
            fully_allowed = k_last[None, :] <= q_first[:, None] + off  # every pair survives
            partial = partial | ~fully_allowed
        if window is not None:
            alive_w, full_w = _window_blocks(window, is_causal, query_len, key_len, block_size,
                                             nq, k_first, k_last)
            alive, partial = alive & alive_w, partial | ~full_w
    if tokens is not None and tokens.has_ids:
        alive_d, full_d = _document_blocks(tokens, query_len, key_len, block_size)
        alive, partial = alive & alive_d, partial | ~full_d
    if alive.dim() == 3:  # per token-batch row: [Bt, nq, nk] -> [Bt, 1, nq, nk]
        alive, partial = alive[:, None], partial[:, None]
    if tokens is not None and tokens.has_bits:  # blocks with bits are cut: [Bs, Hs, nq, nk]
        partial = partial | (tokens.bits.slots != 0)
    cls = torch.where(partial, PARTIAL, FULL).to(torch.int8)
    cls = torch.where(alive, cls, torch.zeros_like(cls))
    return torch.where(pattern, cls, torch.zeros_like(cls))


def _document_blocks(tokens: TokenRules, query_len: int, key_len: int, block_size: int):
    """(some pair allowed, every pair allowed) [Bt, nq, nk] under the id rule: ranges of ids
    that do not overlap never meet; a block pair all of one valid id always does."""
    q_lo, q_hi = block_ranges(tokens.q_ids, query_len, block_size)
    k_lo, k_hi = block_ranges(tokens.k_ids, key_len, block_size)
    q_lo, q_hi, k_lo, k_hi = q_lo[:, :, None], q_hi[:, :, None], k_lo[:, None, :], k_hi[:, None, :]
    some = (q_lo <= k_hi) & (k_lo <= q_hi) & (q_hi >= 0) & (k_hi >= 0)
    every = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo) & (q_lo >= 0)
    return some, every


def _positioned_blocks(tokens: TokenRules, is_causal, window: Optional[WindowRule],
                       query_len: int, key_len: int, block_size: int):
    """(some pair allowed, every pair allowed) [Bt, nq, nk] of the causal rule and the window
    on token positions, from each block's position range (key-minus-query offsets of a block
    pair lie in [k_lo - q_hi, k_hi - q_lo], every value taken when positions are contiguous)."""
    q_lo, q_hi = block_ranges(tokens.q_pos, query_len, block_size)
    k_lo, k_hi = block_ranges(tokens.k_pos, key_len, block_size)
    q_lo, q_hi, k_lo, k_hi = q_lo[:, :, None], q_hi[:, :, None], k_lo[:, None, :], k_hi[:, None, :]
    d_lo, d_hi = k_lo - q_hi, k_hi - q_lo
    big = 1 << 40
    hi = torch.full_like(d_lo, big)
    some = torch.ones_like(d_lo, dtype=torch.bool)
    every = some.clone()
    if is_causal:
        off = causal_offset(is_causal, query_len, key_len)
        hi = torch.full_like(d_lo, off)
        some, every = d_lo <= off, d_hi <= off
    if window is not None:
        w_hi = torch.minimum(hi, torch.full_like(hi, window.hi))
        in_some = (d_lo <= w_hi) & (d_hi >= window.lo)
        in_every = (d_lo >= window.lo) & (d_hi <= w_hi)
        some = in_some | (some & (k_lo < window.sinks))
        every = in_every | (every & (k_hi < window.sinks))
    return some, every


def _window_blocks(window: WindowRule, is_causal, query_len: int, key_len: int,
                   block_size: int, nq: int, k_first: torch.Tensor, k_last: torch.Tensor):
    """(some pair allowed, every pair allowed) per block [nq, nk] under the window (and the
    causal rule). Row i allows keys [0, S) and [lo_i, hi_i] (both cut at hi_i when causal),
    so each row's test is a pair of interval comparisons; rows are then reduced per block
    (O(Nq * nk) comparisons, no Nq x Nk tensor)."""
    dev = k_first.device
    i = torch.arange(nq * block_size, device=dev, dtype=torch.int64)
    hi = i + window.hi
    if is_causal:
        hi = torch.minimum(hi, i + causal_offset(is_causal, query_len, key_len))
    lo, hi = (i + window.lo)[:, None], hi[:, None]
    j0, j1 = k_first[None, :], k_last[None, :]
    sink_hi = torch.minimum(torch.minimum(j1, torch.full_like(j1, window.sinks - 1)), hi)
    some = (torch.maximum(j0, lo) <= torch.minimum(j1, hi)) | (j0 <= sink_hi)
    every = (j1 <= hi) & ((j0 >= lo) | (lo <= window.sinks))
    real = (i < query_len)[:, None]  # rows past Nq: no pair, and no veto on FULL
    some, every = some & real, every | ~real
    nk = k_first.shape[0]
    return (some.view(nq, block_size, nk).any(1), every.view(nq, block_size, nk).all(1))


def _compact(block_class: torch.Tensor):
    """Sort each row of the last dim: FULL cells, then PARTIAL cells, then SKIP cells.

    Returns (index int32 [..., n], count_full int32 [...], count int32 [...]).
    """
    n = block_class.shape[-1]
    # Rank FULL 0, PARTIAL 1, SKIP 2: (class + 2) % 3, arithmetic rather than a lookup table
    # (a table would be a host-to-device copy, which a CUDA graph cannot capture).
    position = torch.arange(n, dtype=torch.int64, device=block_class.device)
    key = ((block_class.long() + 2) % 3) * n + position
    index = torch.argsort(key, dim=-1, stable=True).to(torch.int32).contiguous()
    count_full = (block_class == FULL).sum(-1, dtype=torch.int32).contiguous()
    count = (block_class != SKIP).sum(-1, dtype=torch.int32).contiguous()
    return index, count_full, count


@dataclass(frozen=True)
class BlockLists:
    """Compact active-block lists of one pattern for one problem geometry, both directions.

    Forward and dQ (rows = query blocks):
        kv_index    int32 [Bp, Hp, nq, nk]  active key blocks first (FULL, then PARTIAL)
        kv_count_full int32 [Bp, Hp, nq]
        kv_count    int32 [Bp, Hp, nq]      FULL + PARTIAL
    dK/dV (rows = key blocks):
        q_index     int32 [Bp, Hp, nk, nq]
        q_count_full, q_count  int32 [Bp, Hp, nk]
    block_class: int8 [Bp, Hp, nq, nk] (SKIP / FULL / PARTIAL), kept by the torch build for
        the reference backend, which walks block rows on the host; None for the Triton build.

    Index entries past a row's count are unspecified. The lists are a snapshot: they never
    look at the pattern tensor again, so a later write to it cannot make them stale.
    """

    kv_index: torch.Tensor
    kv_count_full: torch.Tensor
    kv_count: torch.Tensor
    q_index: torch.Tensor
    q_count_full: torch.Tensor
    q_count: torch.Tensor
    block_class: Optional[torch.Tensor] = None
    # Document ids / positions the kernels apply in PARTIAL blocks (the lists were classified
    # with them), or None.
    tokens: Optional[TokenRules] = None
    # Mean active blocks per query-block row, measured once (a host sync) when the lists
    # are prepared for reuse; None for lists built per call. Prepared lists take the
    # short-row kernel tiles and the heavy-first backward launch order (both cost host
    # work that only pays off when the lists are reused).
    mean_row_blocks: Optional[float] = None

    @classmethod
    def build(cls, pattern: torch.Tensor, query_len: int, key_len: int, block_size: int,
              is_causal: bool, *, use_triton: bool = False,
              window: Optional[WindowRule] = None,
              tokens: Optional[TokenRules] = None) -> "BlockLists":
        """Lists of a canonical pattern (bool or uint8 ``[Bp, Hp, nq, nk]``, any strides).

        ``tokens``: document ids / positions (see ``classify_blocks``); the lists keep them
        for the kernels.
        ``use_triton``: one Triton launch builds both directions (triton_lists.py; no host
        synchronisation, capturable in a CUDA graph). Otherwise a chain of torch ops that
        also keeps ``block_class`` (what the reference backend needs).
        """
        if use_triton and window is None and tokens is None and causal_offset(is_causal, query_len, key_len) == 0:
            # (The Triton builder reasons in whole block indices, which holds for a diagonal
            # through block corners; a bottom-right diagonal with Nq != Nk or a window takes
            # the torch ops below, which are as exact and also free of host syncs.)
            from .triton_lists import build_block_lists_triton
            return cls(*build_block_lists_triton(pattern, query_len, key_len, block_size,
                                                 is_causal))
        if pattern.dtype != torch.bool:
            pattern = pattern != 0  # uint8: non-zero = active
        block_class = classify_blocks(pattern, query_len, key_len, block_size, is_causal, window,
                                      tokens)
        return cls(*_compact(block_class), *_compact(block_class.transpose(-1, -2)),
                   block_class=block_class, tokens=tokens)

    def measured(self) -> "BlockLists":
        """These lists with ``mean_row_blocks`` filled in (synchronises with the device)."""
        rows = self.kv_count.numel()
        mean = float(self.kv_count.sum(dtype=torch.int64)) / rows if rows else 0.0
        return dataclasses.replace(self, mean_row_blocks=mean)

    def memo(self, key, build):
        """A tensor derived from these lists (a launch order, say), built once per key."""
        store = self.__dict__.setdefault("_memo", {})
        if key not in store:
            store[key] = build()
        return store[key]

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q_index [Bp,Hp,nk,nq], q_count_full [Bp,Hp,nk], q_count [Bp,Hp,nk])."""
        return self.q_index, self.q_count_full, self.q_count


def bits_kernel_args(lists: BlockLists, placeholder: torch.Tensor) -> tuple:
    """(BITS_SLOTS, BITS_WORDS, stride_sb, stride_sh, stride_sq) of the block bits the lists
    carry (patterns.block_bits): slots are indexed like the lists (batch b, list head, query
    block, key block), broadcast dims with stride 0. Without bits: placeholders, never read
    (HAS_BITS off)."""
    bits = None if lists.tokens is None else lists.tokens.bits
    if bits is None:
        return placeholder, placeholder, 0, 0, 0
    slots = bits.slots
    if slots.shape[1] not in (1, lists.kv_index.shape[1]) or slots.stride(3) != 1:
        raise RuntimeError(f"block bits with slots {tuple(slots.shape)} do not fit lists "
                           f"{tuple(lists.kv_index.shape)}: internal error")
    return (slots, bits.words, slots.stride(0) if slots.shape[0] > 1 else 0,
            slots.stride(1) if slots.shape[1] > 1 else 0, slots.stride(2))
