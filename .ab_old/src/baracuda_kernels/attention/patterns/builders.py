"""Builders for local and structured patterns: token-level parameters in, BlockPattern out.

Every builder states its *token rule* (which query token ``i`` may attend key token ``j``),
builds the block mask from block index arithmetic (never an N x N token tensor), and marks
a block active when at least one of its token pairs is allowed. A pattern is *exact* when
every pair the kernel computes is allowed; otherwise it is *coarsened* and
``pattern.extra_token_pairs`` says how many pairs coarsening adds.

Causal builders return ``is_causal=True``: pass ``is_causal=True`` to the attention call,
the kernel applies the diagonal inside blocks (the block mask alone cannot).

Pictures: ``█`` active block, ``·`` skipped block; rows are query blocks, columns key blocks.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from baracuda_kernels.core import InvalidProblem

from .block_pattern import BlockPattern
from .checks import check_block_size, check_geometry, check_int
from .counting import block_range_mask, block_ranges, causal_pairs, cdiv, interval_count

Positions = Union[Sequence[int], torch.Tensor, range, None]


def token_positions(values: Positions, limit: int, name: str) -> torch.Tensor:
    """Sorted unique int64 token positions in [0, limit)."""
    if values is None:
        return torch.zeros(0, dtype=torch.int64)
    if isinstance(values, (int, bool)):
        raise InvalidProblem(f"{name} must be a sequence of token positions; got the int {values!r}. "
                             f"Fix: pass range({values}) for the first {values} tokens, or "
                             f"[{values}] for that single token.")
    t = torch.as_tensor(list(values) if isinstance(values, range) else values)
    if t.is_floating_point() or t.dim() > 1:
        raise InvalidProblem(f"{name} must be a 1-D sequence of int token positions; got "
                             f"shape {tuple(t.shape)} dtype {t.dtype}.")
    t = t.reshape(-1).to(torch.int64).cpu()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= limit):
        raise InvalidProblem(f"{name} must lie in [0, {limit}); got values in "
                             f"[{int(t.min())}, {int(t.max())}].")
    return torch.unique(t)


def ranges_to_mask(lo: torch.Tensor, hi: torch.Tensor, nk: int, block_size: int) -> torch.Tensor:
    """bool [R, nk]: block kb active iff the token interval [lo, hi] of its row touches it."""
    lo_b = lo // block_size
    hi_b = torch.where(lo <= hi, hi // block_size, lo_b - 1)
    return block_range_mask(lo_b, hi_b, nk)


def _on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.device == like.device else t.to(like.device)


# ----------------------------------------------------------------------------------------
def causal(query_len: int, key_len: Optional[int] = None, *, block_size: int) -> BlockPattern:
    """Causal attention as blocks: token rule ``j <= i`` (top-left aligned).

    Exact (``extra_token_pairs == 0``) provided the call passes ``is_causal=True``: blocks
    crossing the diagonal are active and the kernel masks their upper part.
    ``causal(8, block_size=2)``::

        █···
        ██··
        ███·
        ████
        (exact)
    """
    bs, lq, lk = check_geometry(block_size, query_len, key_len)
    q0, q1 = block_ranges(cdiv(lq, bs), lq, bs)
    kb = torch.arange(cdiv(lk, bs), dtype=torch.int64)
    mask = kb[None, :] * bs <= q1[:, None]
    return BlockPattern(mask, block_size=bs, query_len=lq, key_len=lk, is_causal=True,
                        token_rule=lambda b, h, q, kv: kv <= q,
                        description=f"causal(block_size={bs})", _rule_pairs=causal_pairs(lq, lk))


# ----------------------------------------------------------------------------------------
def _window_rule_pairs(lq, lk, window, is_causal, sinks, glob) -> int:
    """Closed-form count of pairs allowed by the sliding-window rule, O(N log G)."""
    i = torch.arange(lq, dtype=torch.int64)
    jmax = torch.clamp(i, max=lk - 1) if is_causal else torch.full_like(i, lk - 1)
    a = torch.clamp(i - window + 1, min=0)
    b = jmax if is_causal else torch.clamp(i + window - 1, max=lk - 1)
    e = torch.clamp(torch.full_like(i, min(sinks, lk) - 1), max=jmax)
    ws_hi = torch.minimum(b, e)
    w = torch.clamp(b - a + 1, min=0)
    s = torch.clamp(e + 1, min=0)
    ws = torch.clamp(ws_hi - a + 1, min=0)
    count = w + s - ws
    if glob.numel():
        gk = glob[glob < lk]
        zero = torch.zeros_like(i)
        count = (count + interval_count(gk, zero, jmax) - interval_count(gk, a, b)
                 - interval_count(gk, zero, e) + interval_count(gk, a, ws_hi))
        count = torch.where(torch.isin(i, glob), jmax + 1, count)
    return int(count.sum())


def sliding_window(seq_len: int, window: int, *, block_size: int, causal: bool = True,
                   sinks: int = 0, global_tokens: Positions = None,
                   key_len: Optional[int] = None) -> BlockPattern:
    """Sliding-window (local) attention, with optional attention sinks and global tokens.

    Token rule (``i`` query, ``j`` key; all ``j < key_len``), OR of:
      * window: ``0 <= i - j < window`` when ``causal`` (each query sees itself and the
        ``window - 1`` previous keys), ``|i - j| < window`` otherwise;
      * sinks: ``j < sinks`` (the first ``sinks`` keys are visible to every query);
      * global tokens ``g``: query ``g`` sees every key and key ``g`` is seen by every query;
    and, when ``causal``, ``j <= i`` on top (the pattern has ``is_causal=True``).

    Coarsened: the window's edges cut blocks diagonally, and sinks / global tokens that do
    not fill whole blocks make their block rows / columns active. Inspect
    ``pattern.extra_token_pairs`` (closed form, cheap even at 1M tokens).
    Cost: O(nq * nk) bool work and memory (8192 x 8192 blocks = 64 MiB at 1M tokens / 128).

    ``sliding_window(16, window=4, block_size=2, sinks=1)`` (causal)::

        █·······
        ██······
        ███·····
        ████····
        █·███···
        █··███··
        █···███·
        █····███
        (coarsened: 26 extra token pairs)
    """
    bs, lq, lk = check_geometry(block_size, seq_len, key_len, "seq_len")
    window = check_int("window", window, 1)
    sinks = check_int("sinks", sinks, 0)
    glob = token_positions(global_tokens, max(lq, lk), "global_tokens")
    nq, nk = cdiv(lq, bs), cdiv(lk, bs)
    q0, q1 = block_ranges(nq, lq, bs)
    lo = torch.clamp(q0 - window + 1, min=0)
    hi = torch.clamp(q1 if causal else q1 + window - 1, max=lk - 1)
    mask = ranges_to_mask(lo, hi, nk, bs)
    zeros = torch.zeros_like(q1)
    if sinks:
        sink_last = torch.full_like(q1, min(sinks, lk) - 1)
        if causal:
            sink_last = torch.minimum(sink_last, q1)
        mask |= ranges_to_mask(zeros, sink_last, nk, bs)
    if glob.numel():
        # Global query rows: the whole row (up to the diagonal when causal).
        g_rows = glob[glob < lq]
        reach = torch.clamp(g_rows, max=lk - 1) if causal else torch.full_like(g_rows, lk - 1)
        row_reach = torch.full((nq,), -1, dtype=torch.int64).scatter_reduce(
            0, g_rows // bs, reach, reduce="amax")
        mask |= ranges_to_mask(zeros, row_reach, nk, bs)
        # Global key columns: seen by every query (from the global token on when causal),
        # so column kb is active on query blocks first_g // bs .. nq - 1.
        g_cols = glob[glob < lk]
        first_g = torch.full((nk,), lq, dtype=torch.int64).scatter_reduce(
            0, g_cols // bs, g_cols, reduce="amin")
        cols = torch.nonzero(first_g < lq).reshape(-1)
        start = first_g[cols] // bs if causal else torch.zeros_like(cols)
        sub = block_range_mask(start, torch.full_like(cols, nq - 1), nq)   # [n_cols, nq]
        mask[:, cols] |= sub.T

    def rule(b, h, q, kv):
        d = q - kv
        ok = ((d >= 0) & (d < window)) if causal else (d.abs() < window)
        if sinks:
            ok = ok | (kv < sinks)
        if glob.numel():
            g = _on(glob, q)
            ok = ok | torch.isin(q, g) | torch.isin(kv, g)
        return ok

    parts = [f"window={window}", f"causal={causal}"]
    if sinks:
        parts.append(f"sinks={sinks}")
    if glob.numel():
        parts.append(f"global_tokens={glob.numel()}")
    return BlockPattern(mask, block_size=bs, query_len=lq, key_len=lk, is_causal=causal,
                        token_rule=rule, description=f"sliding_window({', '.join(parts)})",
                        _rule_pairs=lambda: _window_rule_pairs(lq, lk, window, causal, sinks, glob))


def longformer(seq_len: int, window: int, global_tokens: Positions, *,
               block_size: int) -> BlockPattern:
    """Longformer attention: symmetric sliding window plus global tokens (not causal).

    Token rule: ``|i - j| < window``, or ``i`` or ``j`` is one of ``global_tokens`` (token
    positions, e.g. ``[0]`` for a CLS token or ``range(n)`` for the first n tokens).
    Same as ``sliding_window(seq_len, window, causal=False, global_tokens=...)``; coarsened
    at the window edges and around global tokens.

    ``longformer(16, window=3, global_tokens=[0], block_size=2)``::

        ████████
        ███·····
        ████····
        █·███···
        █··███··
        █···███·
        █····███
        █·····██
        (coarsened: 36 extra token pairs)
    """
    p = sliding_window(seq_len, window, block_size=block_size, causal=False,
                       global_tokens=global_tokens)
    return BlockPattern(p.mask, block_size=p.block_size, query_len=p.query_len,
                        key_len=p.key_len, token_rule=p.token_rule,
                        description=p.description.replace("sliding_window", "longformer"),
                        _rule_pairs=p.rule_token_pairs)


# ----------------------------------------------------------------------------------------
def _dilated_rule_pairs(lq, lk, window, dilation, is_causal) -> int:
    i = torch.arange(lq, dtype=torch.int64)
    k_max = torch.clamp(torch.div(i, dilation, rounding_mode="floor"), max=window - 1)
    k_min = -torch.div(-(i - lk + 1), dilation, rounding_mode="floor")      # ceil
    k_min = torch.clamp(k_min, min=0 if is_causal else -(window - 1))
    return int(torch.clamp(k_max - k_min + 1, min=0).sum())


def dilated_blocks(lq, lk, bs, offsets: torch.Tensor) -> torch.Tensor:
    """bool [nq, nk]: blocks touched by keys ``j = i - off`` for any offset in ``offsets``.

    For one offset, the keys of a query block form an interval no longer than a block, so
    they touch at most two key blocks; offsets are processed in chunks to bound memory.
    """
    nq, nk = cdiv(lq, bs), cdiv(lk, bs)
    q0, q1 = block_ranges(nq, lq, bs)
    mask = torch.zeros(nq, nk, dtype=torch.bool)
    rows = torch.arange(nq, dtype=torch.int64)[:, None]
    step = max(1, (1 << 22) // nq)
    for c in range(0, offsets.numel(), step):
        off = offsets[c:c + step][None, :]
        lo = torch.clamp(q0[:, None] - off, min=0)
        hi = torch.clamp(q1[:, None] - off, max=lk - 1)
        ok = lo <= hi
        r = rows.expand_as(lo)[ok]
        mask[r, (lo[ok] // bs)] = True
        mask[r, (hi[ok] // bs)] = True
    return mask


def dilated_sliding_window(seq_len: int, window: int, dilation: int, *, block_size: int,
                           causal: bool = True, key_len: Optional[int] = None) -> BlockPattern:
    """Dilated sliding window: each query sees ``window`` keys spaced ``dilation`` apart.

    Token rule: ``j = i - k * dilation`` for an integer ``0 <= k < window`` when ``causal``,
    ``-window < k < window`` otherwise. ``dilation=1`` is ``sliding_window``.
    Coarsened: blocks are active when any dilated key falls in them; with
    ``dilation < block_size`` the whole reach ``(window - 1) * dilation`` becomes a dense band.
    Exact at block level only when ``dilation`` and ``block_size`` align the keys to whole
    blocks, which the builder reports through ``extra_token_pairs``.

    ``dilated_sliding_window(16, window=3, dilation=4, block_size=2)``::

        █·······
        ·█······
        █·█·····
        ·█·█····
        █·█·█···
        ·█·█·█··
        ··█·█·█·
        ···█·█·█
        (coarsened: 28 extra token pairs)
    """
    bs, lq, lk = check_geometry(block_size, seq_len, key_len, "seq_len")
    window = check_int("window", window, 1)
    dilation = check_int("dilation", dilation, 1)
    k = torch.arange(0 if causal else -(window - 1), window, dtype=torch.int64)
    mask = dilated_blocks(lq, lk, bs, k * dilation)

    def rule(b, h, q, kv):
        d = q - kv
        if not causal:
            d = d.abs()
        return (d >= 0) & (d % dilation == 0) & (d < window * dilation)

    return BlockPattern(mask, block_size=bs, query_len=lq, key_len=lk, is_causal=causal,
                        token_rule=rule,
                        description=f"dilated_sliding_window(window={window}, dilation={dilation}, "
                                    f"causal={causal})",
                        _rule_pairs=lambda: _dilated_rule_pairs(lq, lk, window, dilation, causal))


# ----------------------------------------------------------------------------------------
def _lengths_per_batch(seq_lens) -> list[list[int]]:
    if isinstance(seq_lens, torch.Tensor):
        seq_lens = seq_lens.tolist()
    seq_lens = list(seq_lens)
    if not seq_lens:
        raise InvalidProblem("seq_lens is empty; expected a list of positive document lengths.")
    nested = [list(x) if isinstance(x, (list, tuple, range, torch.Tensor)) else None
              for x in seq_lens]
    rows = [[int(v) for v in x] for x in nested] if all(x is not None for x in nested) else \
        [[v for v in seq_lens]] if all(x is None for x in nested) else None
    if rows is None:
        raise InvalidProblem("seq_lens mixes ints and lists; expected a list of ints (one "
                             "packed sequence) or a list of lists (one per batch element).")
    for row in rows:
        for v in row:
            check_int("each document length", v, 1)
    totals = {sum(r) for r in rows}
    if len(totals) != 1:
        raise InvalidProblem(f"packed sequences have different total lengths {sorted(totals)}; "
                             "expected the same total per batch element. Fix: pad with a "
                             "final dummy document.")
    return rows


def document_mask(seq_lens, *, block_size: int, causal: bool = False) -> BlockPattern:
    """Block-diagonal (document / packed-sequence) mask from a list of sequence lengths.

    ``seq_lens``: ``[L0, L1, ...]`` for one packed sequence (broadcast over the batch), or
    one such list per batch element (all with the same total). Token rule: ``i`` and ``j``
    are in the same document (and ``j <= i`` when ``causal``).
    Exact when every document boundary is a multiple of ``block_size`` (and the blocks
    crossing the diagonal are handled by ``is_causal``); otherwise the blocks that straddle
    a boundary are coarsened (tokens of neighbouring documents see each other there).

    ``document_mask([4, 6, 6], block_size=2)``::

        ██······
        ██······
        ··███···
        ··███···
        ··███···
        ·····███
        ·····███
        ·····███
        (exact)
    """
    bs = check_block_size(block_size)
    rows = _lengths_per_batch(seq_lens)
    n = sum(rows[0])
    nb = cdiv(n, bs)
    doc = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r))
                       for r in rows])                                    # [B, N]
    q0, q1 = block_ranges(nb, n, bs)
    masks = []
    for bi, r in enumerate(rows):
        lens = torch.tensor(r, dtype=torch.int64)
        ends = torch.cumsum(lens, 0) - 1
        starts = ends - lens + 1
        lo = starts[doc[bi, q0]]
        hi = ends[doc[bi, q1]]
        if causal:
            hi = torch.minimum(hi, q1)
        masks.append(ranges_to_mask(lo, hi, nb, bs))
    mask = torch.stack(masks)[:, None]                                    # [B, 1, nb, nb]

    def rule(b, h, q, kv):
        d = _on(doc, q)
        b = b if d.shape[0] > 1 else torch.zeros_like(b)      # broadcast over the batch
        return d[b, q] == d[b, kv]

    def rule_pairs() -> int:
        t = torch.tensor([v for r in rows for v in r], dtype=torch.int64)
        return int((t * (t + 1) // 2).sum() if causal else (t * t).sum())

    return BlockPattern(mask, block_size=bs, query_len=n, is_causal=causal, token_rule=rule,
                        description=f"document_mask({len(rows[0])} documents"
                                    f"{'' if len(rows) == 1 else f' x batch {len(rows)}'}, "
                                    f"causal={causal})",
                        _rule_pairs=rule_pairs)


def prefix_lm(seq_len: int, prefix_len, *, block_size: int) -> BlockPattern:
    """Prefix-LM mask: bidirectional over the prefix, causal after it.

    ``prefix_len``: an int, or one int per batch element (then the pattern has B > 1).
    Token rule: ``j <= i`` or ``j < prefix_len``. The pattern is **not** causal
    (``is_causal=False``: the prefix must see later prefix tokens), so the blocks on the
    diagonal after the prefix are computed whole: coarsened by about ``block_size / 2`` key
    tokens per query after the prefix (see ``extra_token_pairs``).

    ``prefix_lm(16, prefix_len=6, block_size=2)``::

        ███·····
        ███·····
        ███·····
        ████····
        █████···
        ██████··
        ███████·
        ████████
        (coarsened: 5 extra token pairs)
    """
    bs = check_block_size(block_size)
    n = check_int("seq_len", seq_len, 1)
    plist = [prefix_len] if isinstance(prefix_len, int) else list(
        prefix_len.tolist() if isinstance(prefix_len, torch.Tensor) else prefix_len)
    for p in plist:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= n:
            raise InvalidProblem(f"prefix_len must be int(s) in [0, seq_len={n}]; got {p!r}.")
    p = torch.tensor(plist, dtype=torch.int64)                            # [B]
    nb = cdiv(n, bs)
    q0, q1 = block_ranges(nb, n, bs)
    reach = torch.maximum(q1[None, :], p[:, None] - 1)                   # [B, nq]
    kb_first = torch.arange(nb, dtype=torch.int64) * bs
    mask = (kb_first[None, None, :] <= reach[:, :, None])[:, None]        # [B, 1, nq, nk]

    def rule(b, h, q, kv):
        b = b if p.numel() > 1 else torch.zeros_like(b)       # broadcast over the batch
        return (kv <= q) | (kv < _on(p, q)[b])

    rule_pairs = int((p * p + n * (n + 1) // 2 - p * (p + 1) // 2).sum())
    return BlockPattern(mask, block_size=bs, query_len=n, is_causal=False, token_rule=rule,
                        description=f"prefix_lm(prefix_len={plist if len(plist) > 1 else plist[0]})",
                        _rule_pairs=rule_pairs)
