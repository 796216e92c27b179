"""Builders for sparse-transformer, BigBird, random and per-head patterns.

Same conventions as ``builders``: token-level parameters, a stated token rule, blocks active
when any of their pairs is allowed, ``is_causal`` hint on causal patterns, and
``extra_token_pairs`` / ``exact`` reporting the coarsening.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from baracuda_kernels.core import InvalidProblem

from .block_pattern import BlockPattern
from .builders import Positions, dilated_sliding_window, ranges_to_mask, sliding_window
from .checks import broadcast_dim, check_block_size, check_geometry, check_int
from .counting import block_lookup_rule, block_ranges, cdiv


def _check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1:
        raise InvalidProblem(f"density must be a number in [0, 1]; got {density!r}.")
    return float(density)


def random_blocks(query_len: int, key_len: Optional[int] = None, *, block_size: int,
                  density: float, seed: int = 0, batch: int = 1, num_heads: int = 1,
                  causal: bool = False) -> BlockPattern:
    """Uniformly random blocks with an exact density per (batch, head) slice, seeded.

    Each slice activates ``round(density * n)`` of its ``n`` candidate blocks, drawn
    without replacement from ``torch.Generator().manual_seed(seed)`` (same seed, same
    pattern, on every machine). Candidates are all ``nq * nk`` blocks, or, when
    ``causal``, the blocks on or below the diagonal (``is_causal=True``).
    The token rule is the block pattern itself, so the pattern is exact by definition.

    ``random_blocks(16, block_size=2, density=0.25, seed=0)``::

        ··██····
        ····██··
        ··█·····
        ···██···
        █·██····
        ···██···
        ·······█
        ·██···█·
        (exact)
    """
    bs, lq, lk = check_geometry(block_size, query_len, key_len)
    density = _check_density(density)
    batch = check_int("batch", batch, 1)
    num_heads = check_int("num_heads", num_heads, 1)
    nq, nk = cdiv(lq, bs), cdiv(lk, bs)
    gen = torch.Generator().manual_seed(int(seed))
    scores = torch.rand(batch * num_heads, nq * nk, generator=gen)
    if causal:
        _, q1 = block_ranges(nq, lq, bs)
        allowed = (torch.arange(nk)[None, :] * bs <= q1[:, None]).reshape(-1)
    else:
        allowed = torch.ones(nq * nk, dtype=torch.bool)
    scores[:, ~allowed] = 2.0                     # rand() < 1, so never among the smallest
    k = int(round(density * int(allowed.sum())))
    mask = torch.zeros(batch * num_heads, nq * nk, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return BlockPattern(mask.view(batch, num_heads, nq, nk), block_size=bs, query_len=lq,
                        key_len=lk, is_causal=causal,
                        description=f"random_blocks(density={density}, seed={seed}, causal={causal})")


def per_head(patterns: Sequence[Union[BlockPattern, Callable[[], BlockPattern]]]) -> BlockPattern:
    """Stack single-head patterns into one pattern with a different pattern per head.

    ``patterns[h]`` is a ``BlockPattern`` (or a zero-argument callable returning one) with
    one head; all must share block size, lengths and ``is_causal`` (the kernel takes one
    causal flag per call). Batch dims broadcast. Head ``h`` keeps pattern ``h``'s token rule,
    so exactness and ``extra_token_pairs`` are the per-head ones summed.
    To wrap an already stacked tensor ``[B, H, nq, nk]``, use ``BlockPattern(tensor, ...)``.
    """
    pats = [p() if callable(p) and not isinstance(p, BlockPattern) else p for p in patterns]
    if not pats:
        raise InvalidProblem("per_head needs at least one pattern; got an empty list.")
    first = pats[0]
    for i, p in enumerate(pats):
        if not isinstance(p, BlockPattern):
            raise InvalidProblem(f"per_head: item {i} is {type(p).__name__}; expected BlockPattern.")
        if p.num_heads != 1:
            raise InvalidProblem(f"per_head: pattern {i} has {p.num_heads} heads; expected 1.")
        geo = (p.block_size, p.query_len, p.key_len)
        if geo != (first.block_size, first.query_len, first.key_len):
            raise InvalidProblem(f"per_head: pattern {i} has (block_size, query_len, key_len) "
                                 f"{geo}; expected {(first.block_size, first.query_len, first.key_len)}.")
        if p.is_causal != first.is_causal:
            raise InvalidProblem(f"per_head: pattern {i} has is_causal={p.is_causal} but pattern 0 "
                                 f"has {first.is_causal}; the kernel applies one causal flag to all "
                                 "heads. Fix: make all heads causal (e.g. p & causal(...)).")
        if p.device != first.device:
            raise InvalidProblem(f"per_head: patterns are on {first.device} and {p.device}.")
    b = 1
    for p in pats:
        b = broadcast_dim("batch", b, p.batch)
    mask = torch.cat([p.mask.expand(b, 1, -1, -1) for p in pats], dim=1)
    rules = [(p.token_rule, p.batch) for p in pats]

    def rule(bi, h, q, kv):
        out = torch.zeros((), dtype=torch.bool, device=q.device)
        for k, (r, pb) in enumerate(rules):
            sub_b = torch.zeros_like(bi) if pb == 1 else bi
            out = out | ((h == k) & r(sub_b, torch.zeros_like(h), q, kv))
        return out

    return BlockPattern(mask, block_size=first.block_size, query_len=first.query_len,
                        key_len=first.key_len, is_causal=first.is_causal, token_rule=rule,
                        description="per_head[" + ", ".join(p.description for p in pats) + "]",
                        _rule_pairs=lambda: sum(p.rule_token_pairs() * (b // p.batch) for p in pats))


def _union(a: BlockPattern, b: BlockPattern, description: str, rule_pairs) -> BlockPattern:
    ra, rb = a.token_rule, b.token_rule
    return BlockPattern(a.mask | b.mask, block_size=a.block_size, query_len=a.query_len,
                        key_len=a.key_len, is_causal=a.is_causal and b.is_causal,
                        token_rule=lambda bi, h, q, kv: ra(bi, h, q, kv) | rb(bi, h, q, kv),
                        description=description, _rule_pairs=rule_pairs)


def sparse_transformer_strided(seq_len: int, stride: int, *, block_size: int,
                               split_heads: bool = False) -> BlockPattern:
    """Strided pattern of the Sparse Transformer (Child et al., 2019), causal.

    Two token rules (with ``j <= i``): *local* ``i - j < stride`` and *strided*
    ``(i - j) % stride == 0``. ``split_heads=False`` gives their union on every head;
    ``split_heads=True`` gives a 2-head pattern (head 0 local, head 1 strided) to use with
    H = 2 (or build per-head layouts with ``per_head``).
    Coarsened: the strided part touches every key block whenever ``stride < block_size``
    (then the pattern is as dense as causal); it is sparse at block level only for
    ``stride`` of several blocks.

    ``sparse_transformer_strided(16, stride=6, block_size=2)``::

        █·······
        ██······
        ███·····
        ████····
        ·████···
        ··████··
        █··████·
        ·█··████
        (coarsened: 9 extra token pairs)
    """
    bs = check_block_size(block_size)
    n = check_int("seq_len", seq_len, 1)
    stride = check_int("stride", stride, 1)
    local = sliding_window(n, stride, block_size=bs, causal=True)
    strided = dilated_sliding_window(n, (n - 1) // stride + 1, stride, block_size=bs, causal=True)
    if split_heads:
        return per_head([local, strided])
    # The two rules share exactly the pair j == i, once per query row.
    return _union(local, strided, f"sparse_transformer_strided(stride={stride})",
                  lambda: local.rule_token_pairs() + strided.rule_token_pairs() - n)


def _summary_count(x: torch.Tensor, stride: int, summary: int) -> torch.Tensor:
    """How many j in [0, x] have j % stride >= stride - summary (0 for x < 0)."""
    y = x + 1
    return (torch.div(y, stride, rounding_mode="floor") * summary
            + torch.clamp(y % stride - (stride - summary), min=0))


def sparse_transformer_fixed(seq_len: int, stride: int, *, block_size: int, summary: int = 1,
                             causal: bool = True, split_heads: bool = False) -> BlockPattern:
    """Fixed pattern of the Sparse Transformer (Child et al., 2019).

    Token rules (with ``j <= i`` when ``causal``): *chunk* ``i // stride == j // stride``
    (attend within the own chunk of ``stride`` tokens) and *summary*
    ``j % stride >= stride - summary`` (the last ``summary`` tokens of every chunk are
    visible to all queries). ``split_heads`` as in ``sparse_transformer_strided``.
    Exact for the chunk part when ``stride`` is a multiple of ``block_size`` (non-causal,
    or causal thanks to ``is_causal``); summary columns narrower than a block coarsen.

    ``sparse_transformer_fixed(16, stride=4, block_size=2)``::

        █·······
        ██······
        ·██·····
        ·███····
        ·█·██···
        ·█·███··
        ·█·█·██·
        ·█·█·███
        (coarsened: 24 extra token pairs)
    """
    bs = check_block_size(block_size)
    n = check_int("seq_len", seq_len, 1)
    stride = check_int("stride", stride, 1)
    summary = check_int("summary", summary, 1)
    if summary > stride:
        raise InvalidProblem(f"summary must be <= stride={stride}; got {summary}.")
    nb = cdiv(n, bs)
    q0, q1 = block_ranges(nb, n, bs)
    k0, k1 = q0, q1
    lo = torch.div(q0, stride, rounding_mode="floor") * stride
    hi = torch.clamp(torch.div(q1, stride, rounding_mode="floor") * stride + stride - 1, max=n - 1)
    chunk_mask = ranges_to_mask(lo, torch.minimum(hi, q1) if causal else hi, nb, bs)
    r = k0 % stride
    first_summary = torch.where(r >= stride - summary, k0, k0 + (stride - summary - r))
    has = first_summary <= k1
    summ_mask = (has[None, :] & (first_summary[None, :] <= q1[:, None])) if causal else \
        has[None, :].expand(nb, nb)

    i = torch.arange(n, dtype=torch.int64)
    chunk_start = torch.div(i, stride, rounding_mode="floor") * stride
    chunk_end = i if causal else torch.clamp(chunk_start + stride - 1, max=n - 1)
    limit = i if causal else torch.full_like(i, n - 1)
    chunk_pairs = int((chunk_end - chunk_start + 1).sum())
    summ_pairs = int(_summary_count(limit, stride, summary).sum())
    both = int((_summary_count(chunk_end, stride, summary)
                - _summary_count(chunk_start - 1, stride, summary)).sum())

    chunk = BlockPattern(chunk_mask, block_size=bs, query_len=n, is_causal=causal,
                         token_rule=lambda b, h, q, kv: (q // stride) == (kv // stride),
                         description=f"fixed_chunk(stride={stride})", _rule_pairs=chunk_pairs)
    summ = BlockPattern(summ_mask, block_size=bs, query_len=n, is_causal=causal,
                        token_rule=lambda b, h, q, kv: (kv % stride) >= stride - summary,
                        description=f"fixed_summary(stride={stride}, summary={summary})",
                        _rule_pairs=summ_pairs)
    if split_heads:
        return per_head([chunk, summ])
    return _union(chunk, summ, f"sparse_transformer_fixed(stride={stride}, summary={summary}, "
                               f"causal={causal})", chunk_pairs + summ_pairs - both)


def bigbird(seq_len: int, *, block_size: int, window: int, global_tokens: Positions,
            num_random_blocks: int, seed: int = 0, num_heads: int = 1) -> BlockPattern:
    """BigBird attention (Zaheer et al., 2020): window + global tokens + random blocks.

    Token rule (not causal): ``|i - j| < window``; or ``i`` or ``j`` in ``global_tokens``
    (token positions); or the pair's block is one of the random blocks. Every query block
    row gets ``num_random_blocks`` distinct key blocks drawn uniformly (they may coincide
    with window/global blocks), from ``torch.Generator().manual_seed(seed)``, independently
    per head when ``num_heads > 1``. The random part is exact by construction; the window
    and global parts coarsen as in ``sliding_window``.

    ``bigbird(16, block_size=2, window=2, global_tokens=[0, 1], num_random_blocks=1)``::

        ████████
        ███·····
        ████·█··
        █·███···
        █··███··
        █···███·
        █··█·███
        █···█·██
        (coarsened: 27 extra token pairs)
    """
    bs = check_block_size(block_size)
    n = check_int("seq_len", seq_len, 1)
    num_heads = check_int("num_heads", num_heads, 1)
    nb = cdiv(n, bs)
    r = check_int("num_random_blocks", num_random_blocks, 0)
    if r > nb:
        raise InvalidProblem(f"num_random_blocks={r} exceeds the {nb} key blocks of "
                             f"seq_len={n} / block_size={bs}.")
    local = sliding_window(n, window, block_size=bs, causal=False, global_tokens=global_tokens)
    gen = torch.Generator().manual_seed(int(seed))
    rnd = torch.zeros(num_heads, nb, nb, dtype=torch.bool)
    if r:
        idx = torch.topk(torch.rand(num_heads, nb, nb, generator=gen), r, dim=-1).indices
        rnd.scatter_(-1, idx, True)
    rnd = rnd[None]                                                       # [1, H, nb, nb]
    r_local, r_rand = local.token_rule, block_lookup_rule(rnd, bs)
    return BlockPattern(local.mask | rnd, block_size=bs, query_len=n, is_causal=False,
                        token_rule=lambda b, h, q, kv: r_local(b, h, q, kv) | r_rand(b, h, q, kv),
                        description=f"bigbird(window={window}, global_tokens="
                                    f"{len(global_tokens) if global_tokens is not None else 0}, "
                                    f"random_blocks={r}, seed={seed})")
