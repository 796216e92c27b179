"""Token-pair counting for block patterns, without ever building an N x N token tensor.

Two numbers describe how faithful a block pattern is to the token-level rule it was built
from (its *token rule*):

* ``computed pairs``: the (query, key) token pairs the kernel actually keeps: pairs inside
  active blocks, inside both sequence lengths, and on or below the diagonal when the
  pattern is causal (``j <= i``). (The project's FLOP convention counts blocks crossing the
  diagonal whole: ``computed_pairs(..., whole_diagonal=True)``.)
* ``rule pairs``: the pairs the token rule allows (ANDed with causal when the pattern is
  causal). Builders guarantee every rule pair lies in an active block, so
  ``extra = computed - rule >= 0`` is the number of pairs that block coarsening adds.

Builders that know a closed form for the rule count pass it along (cost O(N) or less);
otherwise ``evaluate_rule_on_active_blocks`` evaluates the rule inside active blocks only,
in chunks (cost proportional to the computed pairs, memory bounded by ``chunk_pairs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

# A vectorised token rule: f(b, h, q_idx, kv_idx) -> bool tensor. Arguments are int64
# tensors that broadcast against each other; the result must broadcast to their shape.
TokenRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Bound on the number of token pairs materialised at once by chunked evaluations.
DEFAULT_CHUNK_PAIRS = 1 << 22


@dataclass(frozen=True)
class CoarseningReport:
    """How faithfully a block pattern represents its token rule.

    ``computed_token_pairs``: pairs the kernel computes (active blocks, in range, causal cut).
    ``rule_token_pairs``: pairs the token rule allows. ``extra_token_pairs`` = difference,
    i.e. pairs computed although the rule forbids them. ``coarsened_blocks``: active blocks
    holding at least one such pair (None when not computed). All counts are summed over the
    stored batch and head slices (a broadcast dim counts once).
    """

    exact: bool
    extra_token_pairs: int
    rule_token_pairs: int
    computed_token_pairs: int
    active_blocks: int
    coarsened_blocks: Optional[int]

    def __str__(self) -> str:
        if self.exact:
            return f"exact at block granularity ({self.computed_token_pairs} token pairs computed)"
        frac = self.extra_token_pairs / max(1, self.computed_token_pairs)
        blocks = "" if self.coarsened_blocks is None else \
            f" in {self.coarsened_blocks}/{self.active_blocks} active blocks"
        return (f"coarsened: {self.extra_token_pairs} of {self.computed_token_pairs} computed "
                f"token pairs ({frac:.2%}) are outside the token rule{blocks}")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def count_true(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """int64 count of True along ``dim``. Summing a bool tensor directly converts it to
    int64 first (8x its size); summing its uint8 view into int32 does not."""
    return mask.view(torch.uint8).sum(dim, dtype=torch.int32).to(torch.int64)


def block_range_mask(lo: torch.Tensor, hi: torch.Tensor, ncols: int) -> torch.Tensor:
    """bool ``[R, ncols]`` with row r True on columns ``lo[r] .. hi[r]`` (none if hi < lo).

    Sparse rows (narrow bands, the common case) are written by scattering only the active
    cells; wide ones by one comparison per cell. Either way memory is the output only.
    """
    rows = lo.shape[0]
    width = torch.clamp(hi - lo + 1, min=0)
    total = int(width.sum())
    if total * 4 > rows * ncols:
        cols = torch.arange(ncols, dtype=torch.int64, device=lo.device)
        out = cols[None, :] >= lo[:, None]
        out &= cols[None, :] <= hi[:, None]
        return out
    out = torch.zeros(rows * ncols, dtype=torch.bool, device=lo.device)
    if total:
        r = torch.repeat_interleave(torch.arange(rows, device=lo.device), width)
        start = torch.cumsum(width, 0) - width
        offset = torch.arange(total, device=lo.device) - torch.repeat_interleave(start, width)
        out[r * ncols + lo[r] + offset] = True
    return out.view(rows, ncols)


def block_ranges(n_blocks: int, length: int, block_size: int, device=None):
    """First and last token index of each block: two int64 tensors ``[n_blocks]``."""
    first = torch.arange(n_blocks, dtype=torch.int64, device=device) * block_size
    last = torch.clamp(first + block_size, max=length) - 1
    return first, last


def _prefix_clamp_sum(x: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """P(x) = sum over integers u <= x of clamp(u, 0, width), elementwise (int64)."""
    x = x.to(torch.int64)
    tri = x * (x + 1) // 2
    over = width * (width + 1) // 2 + (x - width) * width
    return torch.where(x <= 0, torch.zeros_like(x), torch.where(x <= width, tri, over))


def pairs_with_offset_at_least(q0, q1, k0, k1, t) -> torch.Tensor:
    """Number of pairs (i, j) with q0 <= i <= q1, k0 <= j <= k1 and i - j >= t.

    All arguments are int64 tensors (or ints) that broadcast. Empty ranges give 0.
    For fixed i the count is clamp(i - t - k0 + 1, 0, width); summing that over i is a
    difference of the piecewise-quadratic prefix sum ``_prefix_clamp_sum``.
    """
    q0, q1, k0, k1, t = (torch.as_tensor(v, dtype=torch.int64) for v in (q0, q1, k0, k1, t))
    width = torch.clamp(k1 - k0 + 1, min=0)
    u1 = q1 - t - k0 + 1
    u0 = q0 - t - k0 + 1
    out = _prefix_clamp_sum(u1, width) - _prefix_clamp_sum(u0 - 1, width)
    return torch.where(q1 >= q0, out, torch.zeros_like(out))


def computed_pairs(mask: torch.Tensor, query_len: int, key_len: int, block_size: int,
                   is_causal: bool, chunk_rows: int = 1024, whole_diagonal: bool = False) -> int:
    """Token pairs the kernel computes for ``mask`` (bool ``[B, H, nq, nk]``), summed over
    the stored B and H slices. O(B*H*nq*nk) bool work, memory bounded by ``chunk_rows``.

    ``whole_diagonal``: count blocks crossing the causal diagonal as whole tiles (ragged
    tails still cut; blocks the causal mask empties still dropped), the FLOP convention.
    """
    nq, nk = mask.shape[-2], mask.shape[-1]
    dev = mask.device
    q_first, q_last = block_ranges(nq, query_len, block_size, dev)
    rows = q_last - q_first + 1                                           # [nq]
    last_cols = key_len - (nk - 1) * block_size
    total = 0
    for r0 in range(0, nq, chunk_rows):
        r1 = min(nq, r0 + chunk_rows)
        m = mask[..., r0:r1, :]
        if is_causal:
            # Blocks are aligned identically in q and k (both start at 0), so kb < qb is
            # entirely below the diagonal, kb == qb crosses it and kb > qb is empty.
            qb = torch.arange(r0, r1, device=dev)[:, None]
            kb = torch.arange(nk, device=dev)[None, :]
            m = m & ((kb <= qb) if whole_diagonal else (kb < qb))
        active = count_true(m, -1)                                        # [B, H, rows]
        cols = active * block_size - m[..., nk - 1].to(torch.int64) * (block_size - last_cols)
        total += int((cols * rows[r0:r1]).sum())
    if is_causal and not whole_diagonal:
        n_diag = min(nq, nk)
        diag = torch.diagonal(mask, dim1=-2, dim2=-1)[..., :n_diag]      # [B, H, n_diag]
        k_first, k_last = block_ranges(nk, key_len, block_size, dev)
        per_block = pairs_with_offset_at_least(q_first[:n_diag], q_last[:n_diag],
                                               k_first[:n_diag], k_last[:n_diag], 0)
        total += int((diag.to(torch.int64) * per_block).sum())
    return total


def causal_pairs(query_len: int, key_len: int) -> int:
    """Pairs (i, j) with j <= i inside a query_len x key_len problem."""
    return int(pairs_with_offset_at_least(0, query_len - 1, 0, key_len - 1, 0))


def interval_count(sorted_values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """How many of ``sorted_values`` (sorted, unique int64) lie in [lo, hi], elementwise."""
    if sorted_values.numel() == 0:
        return torch.zeros_like(lo)
    right = torch.searchsorted(sorted_values, hi, right=True)
    left = torch.searchsorted(sorted_values, lo, right=False)
    return torch.clamp(right - left, min=0)


def evaluate_rule_on_active_blocks(mask: torch.Tensor, rule: TokenRule, query_len: int,
                                   key_len: int, block_size: int, is_causal: bool,
                                   chunk_pairs: int = DEFAULT_CHUNK_PAIRS):
    """Evaluate ``rule`` on every computed pair of every active block.

    Returns ``(rule_pairs, computed, exact_mask)``: totals of allowed and computed pairs,
    and a bool ``[B, H, nq, nk]`` tensor that is True for active blocks whose computed
    pairs are all allowed by the rule (no coarsening there). The rule is called with
    indices clamped into range (out-of-range pairs are masked afterwards), so a rule
    that indexes a per-token tensor never reads past it.
    """
    dev = mask.device
    cells = mask.nonzero()                                                # [n, 4]
    exact_mask = torch.zeros_like(mask)
    offs = torch.arange(block_size, dtype=torch.int64, device=dev)
    per_chunk = max(1, chunk_pairs // (block_size * block_size))
    rule_total = 0
    computed_total = 0
    for c0 in range(0, cells.shape[0], per_chunk):
        c = cells[c0:c0 + per_chunk]
        b = c[:, 0, None, None]
        h = c[:, 1, None, None]
        q = c[:, 2, None, None] * block_size + offs[None, :, None]        # [n, bs, 1]
        kv = c[:, 3, None, None] * block_size + offs[None, None, :]       # [n, 1, bs]
        valid = (q < query_len) & (kv < key_len)
        if is_causal:
            valid = valid & (kv <= q)
        allowed = rule(b, h, torch.clamp(q, max=query_len - 1), torch.clamp(kv, max=key_len - 1))
        allowed = torch.as_tensor(allowed, device=dev).to(torch.bool) & valid
        n_allowed = count_true(allowed.reshape(allowed.shape[0], -1), -1)
        n_valid = count_true(valid.expand_as(allowed).reshape(allowed.shape[0], -1), -1)
        rule_total += int(n_allowed.sum())
        computed_total += int(n_valid.sum())
        exact_mask[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = n_allowed == n_valid
    return rule_total, computed_total, exact_mask


def block_lookup_rule(mask: torch.Tensor, block_size: int) -> TokenRule:
    """The token rule "the pair's block is active" for ``mask`` [B, H, nq, nk].

    Broadcast dims (size 1) ignore the b / h argument; indices are clamped so that the rule
    can be evaluated on padded positions (as FlexAttention does at ragged tails).
    """
    bp, hp, nq, nk = mask.shape

    def rule(b, h, q_idx, kv_idx):
        # Written with plain tensor ops only, so that it also runs under FlexAttention's vmap.
        m = mask if mask.device == q_idx.device else mask.to(q_idx.device)
        bi = torch.zeros_like(b) if bp == 1 else b
        hi = torch.zeros_like(h) if hp == 1 else h
        qb = torch.clamp(q_idx // block_size, max=nq - 1)
        kb = torch.clamp(kv_idx // block_size, max=nk - 1)
        return m[bi, hi, qb, kb]

    return rule
