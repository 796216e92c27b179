"""Conversions between block patterns and other block-sparse formats.

* BSR (block compressed sparse rows): ``(indptr, indices)`` over the rows of all stored
  (batch, head) slices, in (b, h, query block) order.
* FlexAttention ``BlockMask`` (``torch.nn.attention.flex_attention``), when the installed
  torch has it. The BlockMask computes exactly what ``block_sparse_attention`` computes for
  the pattern: its ``mask_mod`` is "the pair's block is active" (and ``j <= i`` when causal).

This module sits below ``block_pattern`` and does not import it: the ``to_*`` functions read
a pattern's attributes (``mask``, ``block_size``, lengths, ``is_causal``), and the ``from_*``
directions return the ``BlockPattern`` constructor arguments (``bsr_parts``, ``flex_parts``),
which ``BlockPattern.from_bsr`` / ``BlockPattern.from_flex_block_mask`` (exported as the
package's ``from_bsr`` / ``from_flex_block_mask``) turn into a pattern.
"""

from __future__ import annotations

from typing import Optional

import torch

from baracuda_kernels.core import InvalidProblem, Unsupported

from .checks import check_geometry, check_int
from .counting import (block_lookup_rule, block_ranges, cdiv, count_true,
                       evaluate_rule_on_active_blocks)
from .kernel_rules import kernel_allows


def to_bsr(pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """BSR form of the block mask of ``pattern`` (a BlockPattern).

    Returns:
        indptr: int64 ``[B * H * nq + 1]``; row ``r = (b * H + h) * nq + qb`` holds
            ``indices[indptr[r]:indptr[r + 1]]``.
        indices: int64 ``[nnz]`` active key-block indices, ascending within a row.
    ``B``/``H`` are the stored dims (1 when broadcast). For B = H = 1 this is the usual
    2-D BSR structure of the ``[nq, nk]`` block mask (as in scipy / torch ``sparse_bsr``).
    """
    m = pattern.mask.reshape(-1, pattern.num_blocks_k)
    counts = count_true(m, -1)
    indptr = torch.zeros(m.shape[0] + 1, dtype=torch.int64, device=m.device)
    indptr[1:] = torch.cumsum(counts, 0)
    indices = m.nonzero()[:, 1].to(torch.int64)                           # row-major order
    return indptr, indices


def bsr_parts(indptr, indices, *, block_size: int, query_len: int,
              key_len: Optional[int] = None, batch: int = 1, num_heads: int = 1) -> dict:
    """BlockPattern arguments (mask, block_size, query_len, key_len) of a BSR structure
    ``indptr [batch * num_heads * nq + 1]``, ``indices [nnz]``: the inverse of ``to_bsr``."""
    bs, lq, lk = check_geometry(block_size, query_len, key_len)
    batch, num_heads = check_int("batch", batch, 1), check_int("num_heads", num_heads, 1)
    nq, nk = cdiv(lq, bs), cdiv(lk, bs)
    indptr = torch.as_tensor(indptr).to(torch.int64)
    indices = torch.as_tensor(indices).to(torch.int64).reshape(-1)
    rows = batch * num_heads * nq
    if indptr.dim() != 1 or indptr.numel() != rows + 1:
        raise InvalidProblem(f"indptr has shape {tuple(indptr.shape)}; expected [{rows + 1}] = "
                             f"[batch*num_heads*nq + 1] with batch={batch}, num_heads={num_heads}, "
                             f"nq={nq}.")
    counts = indptr[1:] - indptr[:-1]
    if int(indptr[0]) != 0 or bool((counts < 0).any()) or int(indptr[-1]) != indices.numel():
        raise InvalidProblem(f"indptr must start at 0, be non-decreasing and end at "
                             f"len(indices)={indices.numel()}; got start {int(indptr[0])}, end "
                             f"{int(indptr[-1])}.")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= nk):
        raise InvalidProblem(f"indices must lie in [0, nk={nk}); got [{int(indices.min())}, "
                             f"{int(indices.max())}].")
    mask = torch.zeros(rows, nk, dtype=torch.bool, device=indices.device)
    row_of = torch.repeat_interleave(torch.arange(rows, device=indices.device), counts)
    mask[row_of, indices] = True
    return dict(mask=mask.view(batch, num_heads, nq, nk), block_size=bs, query_len=lq, key_len=lk)


def _flex():
    try:
        from torch.nn.attention import flex_attention as fa
    except ImportError as exc:                                            # torch < 2.5
        raise Unsupported(f"FlexAttention is not available in torch {torch.__version__}; "
                          "expected torch >= 2.5 (torch.nn.attention.flex_attention). Fix: "
                          "upgrade torch.") from exc
    if not hasattr(fa, "BlockMask") or not hasattr(fa.BlockMask, "from_kv_blocks"):
        raise Unsupported(f"torch {torch.__version__} has no BlockMask.from_kv_blocks; expected "
                          "torch >= 2.5. Fix: upgrade torch.")
    return fa


def flex_available() -> bool:
    """Whether the installed torch provides FlexAttention's BlockMask."""
    try:
        _flex()
    except Unsupported:
        return False
    return True


def _ordered(cells: torch.Tensor):
    """(num int32 [..., nq], indices int32 [..., nq, nk]): active columns first, ascending."""
    nk = cells.shape[-1]
    pos = torch.arange(nk, device=cells.device)
    key = (~cells).to(torch.int64) * nk + pos
    idx = torch.argsort(key, dim=-1).to(torch.int32).contiguous()
    return count_true(cells, -1).to(torch.int32).contiguous(), idx


def to_flex_block_mask(pattern):
    """FlexAttention ``BlockMask`` equivalent to the pattern with ``is_causal=pattern.is_causal``.

    ``BLOCK_SIZE = (block_size, block_size)``, ``seq_lengths = (query_len, key_len)``.
    Fully computed blocks (no causal cut, not on a ragged tail) go to ``full_kv_*`` (no
    mask_mod applied by Flex); the others to ``kv_*``, where the mask_mod (block lookup, and
    ``kv_idx <= q_idx`` when causal, and the pattern's ``kernel_rules``) applies. The
    mask_mod reads ``pattern.mask`` on its device, so the BlockMask lives where the pattern
    lives.
    """
    fa = _flex()
    m = pattern.mask
    bs, lq, lk = pattern.block_size, pattern.query_len, pattern.key_len
    nq, nk = pattern.num_blocks_q, pattern.num_blocks_k
    q0, q1 = block_ranges(nq, lq, bs, m.device)
    k0, k1 = block_ranges(nk, lk, bs, m.device)
    clean = ((q1 - q0 + 1) == bs)[:, None] & ((k1 - k0 + 1) == bs)[None, :]
    lookup = block_lookup_rule(pattern.mask, bs)
    rules = pattern.kernel_rules
    if rules:
        # The kernels apply these rules per token (with the causal rule): the mask_mod does
        # too, and a block is full only where the rules allow every pair of it.
        allows = kernel_allows(rules, pattern.is_causal, lq, lk, pattern.token_rule)
        _, _, every = evaluate_rule_on_active_blocks(m, allows, lq, lk, bs, False)
        full = m & clean & every
        kv_num, kv_idx = _ordered(m & ~full)
        full_num, full_idx = _ordered(full)

        def mask_mod(b, h, q_idx, kv_idx):
            return lookup(b, h, q_idx, kv_idx) & allows(b, h, q_idx, kv_idx)
        return fa.BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx,
                                           BLOCK_SIZE=(bs, bs), mask_mod=mask_mod,
                                           seq_lengths=(lq, lk))
    if pattern.is_causal:
        clean &= k1[None, :] <= q0[:, None]
        live = k0[None, :] <= q1[:, None]
        m = m & live
    full = m & clean
    partial = m & ~clean
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    if pattern.is_causal:
        def mask_mod(b, h, q_idx, kv_idx):
            return lookup(b, h, q_idx, kv_idx) & (kv_idx <= q_idx)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return lookup(b, h, q_idx, kv_idx)
    return fa.BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(bs, bs),
                                       mask_mod=mask_mod, seq_lengths=(lq, lk))


def flex_parts(block_mask) -> dict:
    """BlockPattern arguments (mask, block_size, query_len, key_len, token_rule) of a
    FlexAttention ``BlockMask``; see ``BlockPattern.from_flex_block_mask``."""
    fa = _flex()
    if not isinstance(block_mask, fa.BlockMask):
        raise InvalidProblem(f"expected a torch.nn.attention.flex_attention.BlockMask; got "
                             f"{type(block_mask).__name__}.")
    bq, bk = block_mask.BLOCK_SIZE
    if bq != bk:
        raise Unsupported(f"BlockMask has BLOCK_SIZE={tuple(block_mask.BLOCK_SIZE)}; block patterns "
                          "need square blocks. Fix: create_block_mask(..., BLOCK_SIZE=n).")
    lq, lk = block_mask.seq_lengths
    nq, nk = cdiv(lq, bq), cdiv(lk, bq)
    partial = _dense(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = None
    if block_mask.full_kv_num_blocks is not None:
        full = _dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    if partial.shape[-2] < nq or partial.shape[-1] < nk:
        raise InvalidProblem(f"BlockMask covers {partial.shape[-2]} x {partial.shape[-1]} blocks; "
                             f"expected at least {nq} x {nk} for seq_lengths={(lq, lk)} and "
                             f"block size {bq}.")
    partial = partial[..., :nq, :nk].contiguous()
    full = None if full is None else full[..., :nq, :nk].contiguous()
    mask = partial if full is None else partial | full
    while mask.dim() < 4:
        mask, partial = mask.unsqueeze(0), partial.unsqueeze(0)
        full = None if full is None else full.unsqueeze(0)
    mask_mod = block_mask.mask_mod
    part_rule = block_lookup_rule(partial, bq)
    full_rule = None if full is None else block_lookup_rule(full, bq)

    def rule(b, h, q, kv):
        out = part_rule(b, h, q, kv) & mask_mod(b, h, q, kv)
        return out if full_rule is None else out | full_rule(b, h, q, kv)

    return dict(mask=mask, block_size=bq, query_len=lq, key_len=lk, token_rule=rule)


def _dense(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """bool dense [..., rows, cols] of an ordered (num, indices) pair."""
    cols = idx.shape[-1]
    take = torch.arange(cols, device=idx.device) < num[..., None].to(torch.int64)
    out = torch.zeros(*idx.shape[:-1], cols + 1, dtype=torch.bool, device=idx.device)
    # Columns past num are undefined: send them to a spare column, then drop it.
    safe = torch.where(take, idx.to(torch.int64), torch.full_like(idx, cols, dtype=torch.int64))
    out.scatter_(-1, safe, True)
    return out[..., :cols]
