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

The forward only: the backward stays with the general path. A banded backward (the same
views, both calls handed the final y and lse, the band's dK / dV added back one block
offset at a time) measured no faster there (2-core CPU, N=8192, window 512: 0.55 / 0.55 s
without sinks, 0.67 / 0.58 s with them, banded / general): PyTorch's backward kernel takes
~85% of it either way, and the sinks' second call costs more than the gathers it saves.

The token rule is evaluated in PARTIAL cells only, as in the general path. Rows outside the
run (the start of the sequence, where the window is cut short, a ragged last block) stay
with the general path. Additive modifiers (ALiBi, a bias) keep the whole call there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..common.numerics import merge_by_lse
from .block_lists import PARTIAL, SKIP
from .cpu_pieces import (_as_problems, _from_problems, _group_allowed, _mask, _seen,
                         _store_rows)
from .reference import _Group

# Score-tile elements (all heads) per fused call, a chunk of the run's rows: the chunk's
# outputs, its gathered queries (GQA) and its mask scale with it. 16M: a few calls at 8k
# tokens (H=8, D=64, window 512), ~6 MiB of outputs each.
BAND_BUDGET = 1 << 24
# Shorter runs are left to the general path (nothing to gain from a view of 1-2 rows).
MIN_ROWS = 3


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


def _chunks(band: Band, heads: int, block_size: int) -> Iterator[tuple[int, int]]:
    """(first block row, rows) of the run in chunks whose score tiles over ``heads`` query
    heads stay under BAND_BUDGET."""
    per_row = heads * block_size * (band.width + band.fixed.numel()) * block_size
    size = max(1, BAND_BUDGET // per_row)
    for first in range(band.first, band.first + band.count, size):
        yield first, min(size, band.first + band.count - first)


class _Chunk:
    """One chunk of a run in one pattern slice: tokens, K/V views, masks (None: nothing cut)."""

    def __init__(self, band: Band, first: int, count: int, ks, vs, fixed_kv, classes, rule,
                 block_size: int, g: int, dtype):
        # The views read K/V rows (first + shift) * bs .. up to the band's end, which
        # find_band keeps inside the keys.
        bs = block_size
        self.first, self.count = first, count
        self.tokens = (torch.arange(first, first + count)[:, None] * bs + torch.arange(bs))
        k0 = (first + band.shift) * bs
        self.k_band = _run_view(ks, k0, count, bs, band.width * bs)
        self.v_band = _run_view(vs, k0, count, bs, band.width * bs)
        block_rows = torch.arange(first, first + count)
        band_blocks = block_rows[:, None] + band.shift + torch.arange(band.width)
        self.mask_band, self.seen_band = self._mask(band_blocks, block_rows, classes, rule,
                                                    bs, g, dtype)
        self.k_fixed = self.v_fixed = self.mask_fixed = self.seen_fixed = None
        if fixed_kv is not None:
            self.k_fixed, self.v_fixed = (t.expand(count, -1, -1, -1) for t in fixed_kv)
            self.mask_fixed, self.seen_fixed = self._mask(band.fixed.expand(count, -1),
                                                          block_rows, classes, rule, bs, g,
                                                          dtype)

    def _mask(self, blocks, block_rows, classes, rule, bs: int, g: int, dtype):
        """(additive mask [count, 1, g*bs, L], rows seeing a key [count, 1, g*bs] bool) of
        key blocks ``blocks`` [count, w], or (None, None) when nothing is cut. When every
        row of the chunk cuts alike (a window or causal rule relative to the band, no
        per-token ids), the mask is one row's, broadcast: nothing row-sized is built and
        the kernel reads one small mask."""
        partial = classes[block_rows[:, None], blocks] == PARTIAL
        if not bool(partial.any()):
            return None, None
        cols = (blocks[:, :, None] * bs + torch.arange(bs)).flatten(1)
        grp = _Group(self.tokens.flatten(), torch.ones(self.tokens.numel(), dtype=torch.bool),
                     cols, torch.ones(cols.shape, dtype=torch.bool))
        allowed = _group_allowed(grp, torch.nonzero(partial, as_tuple=True), bs, bs, rule)
        if bool(allowed.all()):
            return None, None
        if allowed.shape[0] > 1 and bool((allowed == allowed[:1]).all()):
            allowed = allowed[:1]
        seen = allowed.any(-1).repeat(1, g).unsqueeze(1)               # [count | 1, 1, g*bs]
        mask = _mask(allowed, g, dtype)
        return mask.expand(self.count, -1, -1, -1), seen

    def rows_in(self, t: torch.Tensor) -> torch.Tensor:
        """The chunk's query rows of t [b, hk, g, N, D] as [count, b*hk, g*bs, D]."""
        if t.shape[2] == 1:
            bs = self.tokens.shape[1]
            view = _run_view(t, self.first * bs, self.count, bs, bs)
            if view is not None:
                return view
        return _as_problems(t, self.tokens)

    def rows_out(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst [b, hk, g, N, ...] rows of the chunk = src [count, b*hk, g*bs, ...]."""
        b, hk, g = dst.shape[:3]
        flat = src.dim() == 3
        if g == 1:
            bs = self.tokens.shape[1]
            view = _run_view(dst.unsqueeze(-1) if flat else dst, self.first * bs, self.count,
                             bs, bs)
            if view is not None:
                view.copy_(src.unsqueeze(-1) if flat else src)
                return
        _store_rows(dst, self.tokens.flatten(), None, True, _from_problems(src, b, hk, g))


def band_forward(qs, ks, vs, ys, lses, band: Band, classes, rule, block_size: int,
                 scale: float) -> None:
    """y and lse of the run's rows in one pattern slice: qs [b, hk, g, N, D], ks / vs [b,
    hk, 1, N, D], ys [b, hk, g, N, Dv], lses [b, hk, g, N] (views of the outputs)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    g = qs.shape[2]
    # K/V whose batch and head dims do not merge into one stride (a [B, N, H, D] tensor
    # seen as [B, H, N, D], with B and H > 1) are copied once: the band is a view of that.
    ks, vs = (t if _run_view(t, 0, 1, 1, 1) is not None else t.contiguous() for t in (ks, vs))
    fixed_kv = None  # the fixed blocks' K / V [1, b*hk, F*bs, D], gathered once
    if band.fixed.numel():
        cols = (band.fixed[:, None] * block_size + torch.arange(block_size)).flatten()
        b, hk = ks.shape[:2]
        fixed_kv = tuple(t[:, :, 0].index_select(2, cols).reshape(1, b * hk, cols.numel(), -1)
                         for t in (ks, vs))
    for first, count in _chunks(band, qs.shape[0] * qs.shape[1] * g, block_size):
        c = _Chunk(band, first, count, ks, vs, fixed_kv, classes, rule, block_size, g,
                   qs.dtype)
        qt = c.rows_in(qs)
        out, lse = flash(qt, c.k_band, c.v_band, 0.0, False, attn_mask=c.mask_band,
                         scale=scale)
        lse = _seen(lse, c.seen_band)
        if c.k_fixed is not None:
            out2, lse2 = flash(qt, c.k_fixed, c.v_fixed, 0.0, False, attn_mask=c.mask_fixed,
                               scale=scale)
            out, lse = merge_by_lse(out, lse, out2, _seen(lse2, c.seen_fixed))
        c.rows_out(ys, out)
        c.rows_out(lses, lse)
