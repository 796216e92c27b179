"""The cpu backend's banded path: a sliding window's K/V read in place, not gathered.

In a sliding window (with or without sink tokens) a long run of consecutive block rows
sees the same key blocks relative to the row: block row r sees the contiguous band of key
blocks [r + shift, r + shift + width) and a fixed set of earlier blocks (the sinks). The
general path (cpu_fused) gathers every row's active K/V blocks into a copy, duplicating K
and V width times (~15% of the forward at 8k tokens). Here:

* the band's K/V of all the run's rows is one overlapping strided view of K/V (as_strided:
  problem p starts one block after problem p - 1), the queries and outputs of consecutive
  rows are plain views (a gather / scatter only for GQA groups, whose g query heads of one
  K/V head are rows of one problem);
* the fixed blocks are gathered once and broadcast over the rows (stride 0);
* band and fixed blocks are two fused calls whose partial outputs merge through their
  log-sum-exp (the split-KV merge).

The backward walks the same run with the final y and lse (both parts' gradients use the
row's whole softmax): the band through PyTorch's fused backward kernel, two block rows per
problem (the union of their bands, each row's outside blocks masked: the kernel runs ~10%
faster on 128 queries than on 64), its key gradients added back through strided views of
one problem's step; the fixed blocks (a few keys seen by every row) by plain batched
matmuls over all of a chunk's queries at once. (A first banded backward, one row per
problem and the sinks in a second fused call of 64-query x 64-key problems, was no faster
than the general path.)

The token rule is evaluated in PARTIAL cells only, as in the general path. Rows outside the
run (the start of the sequence, where the window is cut short, a ragged last block) stay
with the general path. Additive modifiers (ALiBi, a bias) keep the whole call there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..common.numerics import accumulator_dtype, merge_by_lse
from .block_lists import PARTIAL, SKIP
from .cpu_pieces import (_as_problems, _from_problems, _group_allowed, _kernel_lse, _mask,
                         _seen, _store_rows)
from .reference import _Group

# Score-tile elements (all heads) per fused call, a chunk of the run's rows: the chunk's
# outputs, its gathered queries (GQA) and its mask scale with it. 4M: 12 rows per call at
# 8k tokens (H=8, D=64, window 512 + 64 sinks), ~1.5 MiB of outputs each; 16M measured the
# same speed with ~20 MiB more peak RSS in the forward (2-core machine, 1 and 2 threads).
BAND_BUDGET = 1 << 22
# Shorter runs are left to the general path (nothing to gain from a view of 1-2 rows).
MIN_ROWS = 3
# The backward's chunks (its per-chunk key gradients, [rows, heads, band, D] in the input
# dtype, dominate its memory) and block rows per fused problem. 2M: 6 rows of the
# benchmark's window (8 heads, 10 blocks of 64 tokens), ~17 MiB of gradients at a time.
BAND_BWD_BUDGET = 1 << 21
BWD_ROWS_PER_PROBLEM = 2


@dataclass(frozen=True)
class Band:
    """A run of block rows first .. first + count - 1; row r sees key blocks r + shift ..
    r + shift + width - 1 and the ``fixed`` key blocks (int64, all before the band)."""

    first: int
    count: int
    shift: int
    width: int
    fixed: torch.Tensor


def find_band(classes: torch.Tensor, block_size: int, Nq: int, Nk: int) -> Optional[Band]:
    """The longest banded run of ``classes`` (int8 [nq, nk] block classes, CPU) whose rows
    are whole query blocks and whose bands end inside the keys, or None (< MIN_ROWS rows)."""
    active = classes != SKIP
    nq, nk = active.shape
    if nq < MIN_ROWS:
        return None
    col = torch.arange(nk)
    last = torch.where(active, col, -1).amax(1)                            # [nq]
    start = torch.where(~active & (col < last[:, None]), col, -1).amax(1) + 1
    fixed = active & (col < start[:, None])
    r = torch.arange(nq)
    ok = (last >= 0) & ((r + 1) * block_size <= Nq) & ((last + 1) * block_size <= Nk)
    step = ok[1:] & ok[:-1] & (start[1:] - start[:-1] == 1) & (last[1:] - last[:-1] == 1) \
        & (fixed[1:] == fixed[:-1]).all(1)
    best, best_at, run = 0, 0, 0
    for i, same in enumerate(step.tolist()):  # the longest run of rows that step alike
        run = run + 1 if same else 0
        if run > best:
            best, best_at = run, i + 1 - run
    if best + 1 < MIN_ROWS:
        return None
    first = best_at
    return Band(first, best + 1, int(start[first]) - first, int(last[first] - start[first]) + 1,
                torch.nonzero(fixed[first]).flatten())


def _run_view(t: torch.Tensor, first_token: int, count: int, step: int, rows: int):
    """[count, b*hk, rows, D] view of t [b, hk, 1, N, D]: problem p reads token rows
    first_token + p * step .. + rows - 1 (overlapping when step < rows). None when the
    batch and head dims do not merge into one stride."""
    b, hk, _, _, d = t.shape
    sb, sh, _, sn, sd = t.stride()
    if b > 1 and hk > 1 and sb != hk * sh:
        return None
    head = sb if hk == 1 else sh
    return t.as_strided((count, b * hk, rows, d), (step * sn, head, sn, sd),
                        t.storage_offset() + first_token * sn)


def _chunks(band: Band, heads: int, block_size: int, budget: Optional[int] = None,
            multiple: int = 1) -> Iterator[tuple[int, int]]:
    """(first block row, rows) of the run in chunks whose score tiles over ``heads`` query
    heads stay under ``budget`` (default BAND_BUDGET), a multiple of ``multiple`` rows (at
    least one multiple) but for the run's last chunk."""
    per_row = heads * block_size * (band.width + band.fixed.numel()) * block_size
    size = max(1, (budget or BAND_BUDGET) // per_row // multiple) * multiple
    for first in range(band.first, band.first + band.count, size):
        yield first, min(size, band.first + band.count - first)


class _RunAllowed:
    """Which keys the run's rows see, computed once per call: the band's [count | 1, bs,
    width*bs] and the fixed blocks' [count | 1, bs, F*bs] (None: nothing cut; one broadcast
    row when every row cuts alike), and the chunks' masks built from them, shared by the
    chunks whose rows cut alike (one row's mask broadcast)."""

    def __init__(self, band: Band, classes, rule, block_size: int, g: int, dtype):
        bs = block_size
        rows = torch.arange(band.first, band.first + band.count)
        tokens = rows[:, None] * bs + torch.arange(bs)
        blocks = rows[:, None] + band.shift + torch.arange(band.width)
        self.band = _allowed_of(blocks, rows, tokens, classes, rule, bs)
        self.fixed = _allowed_of(band.fixed.expand(band.count, -1), rows, tokens, classes,
                                 rule, bs) if band.fixed.numel() else None
        self.first, self.width, self.bs, self.g, self.dtype = band.first, band.width, bs, g, dtype
        # Every row cuts alike (one broadcast row each): chunks of one shape share masks.
        self.alike = all(a is None or a.shape[0] == 1 for a in (self.band, self.fixed))
        self._shared: dict = {}

    @classmethod
    def of(cls, kept: Optional[dict], band: Band, classes, rule, block_size: int, g: int,
           dtype) -> "_RunAllowed":
        """The run's masks, from ``kept`` (a dict kept on prepared lists, or None) when an
        earlier call left them there. Only runs whose rows all cut alike are kept: their
        masks are one broadcast row (a few hundred KiB), while per-row masks (token ids)
        would hold a pattern-sized tensor for the pattern's lifetime."""
        key = (g, dtype)
        if kept is not None and key in kept:
            return kept[key]
        made = cls(band, classes, rule, block_size, g, dtype)
        if kept is not None and made.alike:
            kept[key] = made
        return made

    def masks(self, first: int, n: int, m: int):
        """(band mask, band rows seen, fixed mask, fixed rows seen) of n problems of m rows
        from block row ``first`` (_Chunk._mask's layout)."""
        if self.alike and (n, m) in self._shared:
            return self._shared[(n, m)]
        bs, w = self.bs, self.width
        idx = first - self.first + torch.arange(n)[:, None] * m + torch.arange(m)   # [n, m]

        def rows_of(allowed, j):
            return allowed if allowed is None or allowed.shape[0] == 1 else allowed[idx[:, j]]
        band = [rows_of(self.band, j) for j in range(m)]
        if m > 1:  # the union's columns: sub-row j's band is columns j*bs .. (j+width)*bs
            union = torch.zeros(n, m * bs, (w + m - 1) * bs, dtype=torch.bool)
            for j, allowed in enumerate(band):
                union[:, j * bs:(j + 1) * bs, j * bs:(j + w) * bs] = \
                    True if allowed is None else allowed
            band = [union]
        out = _Chunk._mask(_stacked(band), n, self.g, self.dtype) + (
            (None, None) if self.fixed is None else
            _Chunk._mask(_stacked([rows_of(self.fixed, j) for j in range(m)]), n, self.g,
                         self.dtype))
        if self.alike:
            self._shared[(n, m)] = out
        return out


class _Chunk:
    """One chunk of a run in one pattern slice: tokens, K/V views, masks (None: nothing cut).

    ``per_problem`` consecutive block rows make one problem of the fused kernel (the
    backward's kernel runs faster on 128-query problems than on 64-query ones): problem p
    holds rows first + p*m .. + m - 1 (``count`` a multiple of m) and reads the union of
    their bands, width + m - 1 blocks, each sub-row's blocks outside its own band masked."""

    def __init__(self, band: Band, first: int, count: int, ks, vs, allowed: _RunAllowed,
                 block_size: int, per_problem: int = 1):
        # The views read K/V rows (first + shift) * bs .. up to the band's end, which
        # find_band keeps inside the keys.
        bs, m = block_size, per_problem
        n = count // m                                                   # problems
        self.m, self.row0 = m, first * bs                                 # first query token
        self.tokens = self.row0 + torch.arange(n)[:, None] * (m * bs) + torch.arange(m * bs)
        self.k0 = (first + band.shift) * bs
        self.k_band = _run_view(ks, self.k0, n, m * bs, (band.width + m - 1) * bs)
        self.v_band = _run_view(vs, self.k0, n, m * bs, (band.width + m - 1) * bs)
        self.mask_band, self.seen_band, self.mask_fixed, self.seen_fixed = \
            allowed.masks(first, n, m)

    @staticmethod
    def _mask(allowed, n: int, g: int, dtype):
        """(additive mask [n, 1, g*rows, L], rows seeing a key [n | 1, 1, g*rows] bool) of
        allowed [n | 1, rows, L], or (None, None) when nothing is cut."""
        if allowed is None:
            return None, None
        seen = allowed.any(-1).repeat(1, g).unsqueeze(1)
        return _mask(allowed, g, dtype).expand(n, -1, -1, -1), seen

    def rows_in(self, t: torch.Tensor) -> torch.Tensor:
        """The chunk's query rows of t [b, hk, g, N, D] as [n, b*hk, g*m*bs, D]."""
        if t.shape[2] == 1:
            rows = self.tokens.shape[1]
            view = _run_view(t, self.row0, self.tokens.shape[0], rows, rows)
            if view is not None:
                return view
        return _as_problems(t, self.tokens)

    def rows_out(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst [b, hk, g, N, ...] rows of the chunk = src [n, b*hk, g*m*bs, ...]."""
        b, hk, g = dst.shape[:3]
        flat = src.dim() == 3
        if g == 1:
            rows = self.tokens.shape[1]
            view = _run_view(dst.unsqueeze(-1) if flat else dst, self.row0,
                             self.tokens.shape[0], rows, rows)
            if view is not None:
                view.copy_(src.unsqueeze(-1) if flat else src)
                return
        _store_rows(dst, self.tokens.flatten(), None, True, _from_problems(src, b, hk, g))

    def add_band_keys(self, acc: torch.Tensor, grad: torch.Tensor, block_size: int) -> None:
        """acc [b, hk, 1, N, D] += the band's key gradients grad [n, b*hk, L, D] (problem p
        read keys k0 + p*step .., step = m*bs): one strided view per ``step`` rows of L,
        non-overlapping within it (consecutive problems start ``step`` keys apart), so a
        plain add; index_add_ when acc's batch and heads do not merge."""
        n, step = self.tokens.shape[0], self.m * block_size
        L = grad.shape[2]
        for start in range(0, L, step):
            rows = min(step, L - start)
            view = _run_view(acc, self.k0 + start, n, step, rows)
            part = grad[:, :, start:start + rows]
            if view is not None:
                view.add_(part)
                continue
            b, hk = acc.shape[:2]
            cols = (self.k0 + start + torch.arange(n)[:, None] * step
                    + torch.arange(rows)).flatten()
            acc[:, :, 0].index_add_(2, cols, _from_problems(part, b, hk, 1)[:, :, 0].to(acc.dtype))


def _allowed_of(blocks, block_rows, tokens, classes, rule, bs: int):
    """bool [n | 1, bs, w*bs]: which keys of ``blocks`` [n, w] the query block rows
    ``block_rows`` [n] (tokens [n, bs]) see, or None when nothing is cut. When every row
    cuts alike (a window or causal rule relative to the band, no per-token ids) it is one
    row's, broadcast: nothing row-sized is built and the kernel reads one small mask."""
    partial = classes[block_rows[:, None], blocks] == PARTIAL
    if not bool(partial.any()):
        return None
    cols = (blocks[:, :, None] * bs + torch.arange(bs)).flatten(1)
    grp = _Group(tokens.flatten(), torch.ones(tokens.numel(), dtype=torch.bool),
                 cols, torch.ones(cols.shape, dtype=torch.bool))
    allowed = _group_allowed(grp, torch.nonzero(partial, as_tuple=True), bs, bs, rule)
    if bool(allowed.all()):
        return None
    if allowed.shape[0] > 1 and bool((allowed == allowed[:1]).all()):
        allowed = allowed[:1]
    return allowed


def _stacked(parts: list):
    """Sub-rows' allowed [n | 1, bs, L] (None: all allowed) stacked along the rows, or None
    when none is cut."""
    if all(a is None for a in parts):
        return None
    if len(parts) == 1:
        out = parts[0]
    else:
        n = max(a.shape[0] for a in parts if a is not None)
        out = torch.cat([torch.ones(n, p.shape[1], p.shape[2], dtype=torch.bool) if p is None
                         else p.expand(n, -1, -1) for p in parts], 1)
    return out[:1] if out.shape[0] > 1 and bool((out == out[:1]).all()) else out


def _fixed_tokens(band: Band, block_size: int) -> torch.Tensor:
    """The key tokens of the fixed blocks, in block order [F*bs]."""
    return (band.fixed[:, None] * block_size + torch.arange(block_size)).flatten()


def _fixed_kv(ks, vs, band: Band, block_size: int):
    """The fixed blocks' K / V as [1, b*hk, F*bs, D] (gathered once), or None."""
    if not band.fixed.numel():
        return None
    cols = _fixed_tokens(band, block_size)
    b, hk = ks.shape[:2]
    return tuple(t[:, :, 0].index_select(2, cols).reshape(1, b * hk, cols.numel(), -1)
                 for t in (ks, vs))


def _viewable(*ts):
    """K/V whose batch and head dims do not merge into one stride (a [B, N, H, D] tensor
    seen as [B, H, N, D], with B and H > 1) are copied once: the band is a view of that."""
    return tuple(t if _run_view(t, 0, 1, 1, 1) is not None else t.contiguous() for t in ts)


def band_forward(qs, ks, vs, ys, lses, band: Band, classes, rule, block_size: int,
                 scale: float, kept: Optional[dict] = None) -> None:
    """y and lse of the run's rows in one pattern slice: qs [b, hk, g, N, D], ks / vs [b,
    hk, 1, N, D], ys [b, hk, g, N, Dv], lses [b, hk, g, N] (views of the outputs).
    ``kept``: where prepared lists keep the run's masks across calls (_RunAllowed.of)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    g = qs.shape[2]
    ks, vs = _viewable(ks, vs)
    fixed_kv = _fixed_kv(ks, vs, band, block_size)
    allowed = _RunAllowed.of(kept, band, classes, rule, block_size, g, qs.dtype)
    for first, count in _chunks(band, qs.shape[0] * qs.shape[1] * g, block_size):
        c = _Chunk(band, first, count, ks, vs, allowed, block_size)
        qt = c.rows_in(qs)
        out, lse = flash(qt, c.k_band, c.v_band, 0.0, False, attn_mask=c.mask_band,
                         scale=scale)
        lse = _seen(lse, c.seen_band)
        if fixed_kv is not None:
            out2, lse2 = _fixed_forward(qt, fixed_kv, c.mask_fixed, scale)
            out, lse = merge_by_lse(out, lse, out2, _seen(lse2, c.seen_fixed))
        c.rows_out(ys, out)
        c.rows_out(lses, lse)


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """A chunk's problems t [n, h, r, ...] as [h, n*r, ...]: each head's queries of all the
    chunk's problems in one row block (a view for the run views of single-member groups)."""
    n, h, r = t.shape[:3]
    return t.transpose(0, 1).reshape(h, n * r, *t.shape[3:])


def _problems_first(t: torch.Tensor, n: int) -> torch.Tensor:
    """_heads_first undone: [h, n*r, ...] as the view [n, h, r, ...]."""
    return t.view(t.shape[0], n, -1, *t.shape[2:]).transpose(0, 1)


def _fixed_forward(qt, fixed_kv, mask, scale: float):
    """(y [n, bh, r, D], lse [n, bh, r]) of a chunk's queries qt [n, bh, r, D] against the
    fixed blocks alone: one fused problem per head holding all n*r queries (n problems of
    r queries against a few keys cost the kernel more than their arithmetic)."""
    n = qt.shape[0]
    if mask is not None:  # [n | 1, 1, r, F] -> [1, 1, n*r, F]
        mask = _heads_first(mask.expand(n, -1, -1, -1)).unsqueeze(0)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _heads_first(qt).unsqueeze(0), fixed_kv[0], fixed_kv[1], 0.0, False, attn_mask=mask,
        scale=scale)
    return _problems_first(out[0], n), _problems_first(lse[0], n)


def band_backward(qs, ks, vs, ys, lses, dys, dqs, dks, dvs, band: Band, classes, rule,
                  block_size: int, scale: float, kept: Optional[dict] = None) -> None:
    """Gradients of the run's rows in one pattern slice, given the final y and lse (sinks,
    learnable or fixed blocks, included): dqs [b, hk, g, N, D] (a view of dq, or None)
    gets the rows' dQ; dks / dvs [b, hk, 1, N, D] (accumulators in the accumulator dtype,
    or None) get their dK / dV added. Inputs as in band_forward, dys like ys.

    The band runs through the fused backward kernel on BWD_ROWS_PER_PROBLEM block rows per
    problem (the kernel is ~10% faster on 128 queries than on 64), its key gradients added
    back through strided views (_Chunk.add_band_keys; no index_add_). The fixed blocks
    (sinks) are a few keys against many queries: plain matmuls (_fixed_backward) instead of
    a second fused call, whose small per-row problems cost more than their arithmetic."""
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    g = qs.shape[2]
    acc = accumulator_dtype(qs.dtype)  # (dks / dvs hold it)
    ks, vs = _viewable(ks, vs)
    fixed_kv = _fixed_kv(ks, vs, band, block_size)
    fixed_grads = None if fixed_kv is None or dks is None else [
        torch.zeros(fixed_kv[0].shape, dtype=acc), torch.zeros(fixed_kv[1].shape, dtype=acc)]
    m = BWD_ROWS_PER_PROBLEM
    allowed = _RunAllowed.of(kept, band, classes, rule, block_size, g, qs.dtype)
    for first, count in _chunks(band, qs.shape[0] * qs.shape[1] * g, block_size,
                                BAND_BWD_BUDGET, multiple=m):
        paired = count - count % m
        for sub_first, sub_count, per in ((first, paired, m), (first + paired, count - paired, 1)):
            if sub_count == 0:
                continue
            c = _Chunk(band, sub_first, sub_count, ks, vs, allowed, block_size,
                       per_problem=per)
            qt, ot, dot = c.rows_in(qs), c.rows_in(ys), c.rows_in(dys)
            lt = _kernel_lse(c.rows_in(lses.unsqueeze(-1)).squeeze(-1))
            gq, gk, gv = flash_bwd(dot, qt, c.k_band, c.v_band, ot, lt, 0.0, False,
                                   attn_mask=c.mask_band, scale=scale)
            if fixed_kv is not None:
                gq = _fixed_backward(qt, ot, dot, lt, c.mask_fixed, fixed_kv, fixed_grads, gq,
                                     scale, acc)
            if dqs is not None:
                c.rows_out(dqs, gq)
            if dks is not None:
                c.add_band_keys(dks, gk, block_size)
                c.add_band_keys(dvs, gv, block_size)
            # Free this chunk's gradients before the next chunk's kernel allocates its own
            # (the names would hold them through that call: 4 chunk-sized buffers, not 2).
            del gq, gk, gv, qt, ot, dot, lt, c
    if fixed_grads is not None:
        cols = _fixed_tokens(band, block_size)
        b, hk = dks.shape[:2]
        for acc_t, grad in zip((dks, dvs), fixed_grads):
            acc_t[:, :, 0].index_add_(2, cols, grad.reshape(b, hk, cols.numel(), -1))


def _fixed_backward(qt, ot, dot, lt, mask, fixed_kv, fixed_grads, gq, scale: float, acc):
    """The fixed blocks' share of the backward for one chunk, in the accumulator dtype:
    P = exp(q.k * scale + mask - lse) over all the chunk's queries of a head at once
    ([n, bh, r, D] problems seen as [bh, n*r, D]); returns gq + dS K, adds P^T dY and
    dS^T Q to ``fixed_grads`` ([1, bh, F, D] dK, dV; None: no K/V gradient wanted)."""
    n = qt.shape[0]
    q, y, dy, lse = (_heads_first(t).to(acc) for t in (qt, ot, dot, lt))
    kf, vf = (t[0].to(acc) for t in fixed_kv)                          # [bh, F, D]
    p = torch.bmm(q, kf.transpose(1, 2)).mul_(scale)                  # [bh, n*r, F]
    if mask is not None:
        p.add_(_heads_first(mask).to(acc))
    p.sub_(lse.unsqueeze(-1)).exp_()
    if fixed_grads is not None:
        fixed_grads[1][0].baddbmm_(p.transpose(1, 2), dy)
    ds = torch.bmm(dy, vf.transpose(1, 2))                             # dP
    ds.sub_((dy * y).sum(-1, keepdim=True)).mul_(p).mul_(scale)
    if fixed_grads is not None:
        fixed_grads[0][0].baddbmm_(ds.transpose(1, 2), q)
    dq = _problems_first(torch.bmm(ds, kf), n)
    return gq.to(acc).add_(dq)
