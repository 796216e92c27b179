"""The ``cpu`` backend: block-sparse attention on the CPU through PyTorch's fused flash kernel.

The reference backend states the semantics in plain tensor ops (scores, masked_fill,
logsumexp, exp, matmul: several passes over every score tile). This backend keeps the
reference's walk (block rows in groups, each row gathering only its own active key blocks,
reference.py) but hands each group to ``aten._scaled_dot_product_flash_attention_for_cpu``:
one tiled, multi-threaded pass that returns the output and the log-sum-exp, and its
backward twin. Every active key block of a query block row is in the same call, so the
call's output and lse are the row's final ones: nothing is merged across calls -- except
in a banded run (a sliding window's rows, cpu_band.py), which reads the band's K/V through
a strided view instead of gathered copies and merges the sinks' call by lse (the backward:
the band's and the sinks' gradients from the final y and lse).

* A group of G block rows becomes a batch of G problems; the K/V head's query heads (GQA)
  and the batch slice ride along as "heads" ([G, b*Hkv, g*bs, D] queries against
  [G, b*Hkv, L, D] gathered keys), so K/V are gathered once per group.
* Only groups with a cut (the causal diagonal, a window, token rules, ragged tails or
  padding to the group's widest row) pass an additive mask, and the token rule is evaluated
  in their PARTIAL blocks only; the others run mask-free. Groups are consecutive block rows
  (the argsort that lists each row's active blocks runs once per pattern slice).
* Rows with no allowed key come back as y = 0, lse = -inf (the kernel gives 0 / 0 there).
* ALiBi and an additive bias are additive score terms: they join the group's additive mask
  (per head, in the accumulator dtype), built by the reference's modifier code on the
  group's pairs, so both backends apply one definition. A bias that needs its gradient
  takes the reference backward (the fused backward kernel does not return dS).
* Softcap is not an additive term: softcapped calls run the same walk with matmuls and
  in-place ops in the fused kernel's place (cpu_capped.py), every group, no banded run.
* dK/dV of the gathered copies are added back with index_add_ (a fixed order on the CPU:
  deterministic). An lse gradient (``dlse``) is not an input of PyTorch's backward kernel:
  such calls take the reference backward.
* NaN / inf: the fused kernel masks a pair by adding -inf to its score, so a non-finite key
  that a problem holds but a row must not see (the causal diagonal, a window edge, a slot
  padding the row to its group's width) still turns that row into NaN, and a non-finite
  value leaks through 0 * inf. Outputs are checked (one sum each); a call whose output or
  gradients are not all finite is redone by the reference, which applies the exact rule
  (the triton kernels' too). Finite calls pay a sum over y (forward) or the gradients.

A call that is dense (causal) attention skips the walk: one fused call (cpu_whole.py).

Memory is bounded by GROUP_BUDGET (score-tile elements per fused call).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..common.numerics import accumulator_dtype, all_finite
from ..common.problem import WindowRule, causal_offset
from .block_lists import PARTIAL, SKIP, BlockLists
from ..common.score_mods import ScoreMods, alibi_offset, fold_sinks
from .cpu_band import Band, band_backward, band_forward, find_band
from .cpu_capped import capped_attention, capped_attention_backward
from .cpu_whole import whole_backward, whole_forward, whole_rule
from .cpu_pieces import (_as_problems, _from_problems, _group_allowed, _kernel_lse, _mask,
                         _seen, _store_rows)
from .reference import (_Group, _grouped, _live_rows, _Mods, _slice_bits, _slices,
                        _token_rows, _without_padding, row_block,
                        block_sparse_attention_backward_reference,
                        block_sparse_attention_forward_reference)

# Score-tile elements per group of block rows (one fused call). Gathered K/V, masks and
# gradients of a group scale with it. Measured on the CPU benchmark's N=8192 problem (2
# cores, two runs, fwd / bwd s, peak MiB above the inputs; group_budget.log): 4M 0.27 /
# 0.86-0.87, 285; 1M 0.28-0.31 / 0.78-0.95, 176-180; 512K 0.40 / 0.96-0.98, 138-141 (SDPA
# causal: 1.02 / 2.65, 136). 1M: within the noise of 4M's speed, 100 MiB less.
GROUP_BUDGET = 1 << 20


def fused_cpu_unavailable_reason() -> Optional[str]:
    """Why this torch has no fused CPU flash kernel (None when it has one)."""
    ops = torch.ops.aten
    if not (hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu")
            and hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward")):
        return (f"torch {torch.__version__} has no aten._scaled_dot_product_flash_attention_for_cpu "
                f"(torch >= 2.2)")
    return None


def _row_groups(classes: torch.Tensor, block_size: int, Nq: int, Nk: int, heads: int):
    """Block rows of ``classes`` (int8 [nq, nk], CPU) with work, in groups of consecutive rows
    whose score tiles stay under GROUP_BUDGET. Yields (_Group, partial cells
    (group row index, slot) or None, needs_mask): slots hold each row's active key blocks,
    padded to the group's widest row with masked-out slots."""
    active = classes != SKIP
    counts = active.sum(1)
    # Active blocks first, ascending (a stable sort of "inactive" flags), once for all rows.
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)
    offsets = torch.arange(block_size)
    rb = row_block(block_size, Nq)
    live = torch.nonzero(counts > 0).flatten().tolist()
    per_row = rb * block_size * heads
    start = 0
    while start < len(live):
        stop, widest = start, 0
        while stop < len(live):
            w = max(widest, int(counts[live[stop]]))
            if stop > start and (stop - start + 1) * w * per_row > GROUP_BUDGET:
                break
            widest, stop = w, stop + 1
        chunk = torch.tensor(live[start:stop])
        blocks = order[chunk, :widest]
        valid = torch.arange(widest)[None, :] < counts[chunk][:, None]
        partial = (classes[chunk[:, None], blocks] == PARTIAL) & valid
        cols = (blocks[:, :, None] * block_size + offsets).flatten(1)
        col_ok = valid[:, :, None].expand(-1, -1, block_size).flatten(1) & (cols < Nk)
        row_tok = (chunk[:, None] * block_size + offsets[:rb]).flatten()
        grp = _Group(row_tok.clamp(max=Nq - 1), row_tok < Nq, cols.clamp(max=Nk - 1), col_ok)
        cells = torch.nonzero(partial, as_tuple=True) if bool(partial.any()) else None
        yield grp, cells, cells is not None or not bool(col_ok.all())
        start = stop


def _keys_of(t: torch.Tensor, grp: _Group, trim_tail: bool = False) -> torch.Tensor:
    """The group's key rows of t [b, hk, 1, N, D] as [G, b*hk, L, D]: a view when the group
    is one row whose keys are one contiguous, fully valid range (a decode step, a dense row),
    else a gather. ``trim_tail``: a contiguous row whose only invalid columns are its last
    ones (keys past Nk: a ragged tail, a KV cache's length) is a view too, of its valid
    L' < L columns (the caller trims its mask to match)."""
    cols, ok = grp.cols, grp.col_ok
    if cols.shape[0] == 1:
        valid = int(ok[0].sum())
        whole = valid == cols.shape[1]
        if valid and (whole or (trim_tail and bool(ok[0, :valid].all()))):
            c0 = int(cols[0, 0])
            if bool((cols[0, 1:valid] - cols[0, :valid - 1] == 1).all()):
                b, hk = t.shape[:2]
                return t[:, :, 0, c0:c0 + valid].reshape(1, b * hk, valid, t.shape[-1])
    return _as_problems(t, cols)


def _group_problems(q, k, v, lists: BlockLists, block_size: int, is_causal, window, Nq: int,
                    Nk: int, trim_tail: bool = False, mods=None, bands: Optional[list] = None):
    """Per pattern slice and group: (slice indices, the slice's queries, group, query tokens
    [G, bs], the additive mask [G, 1 | b*hk, g*bs, L] (b, hk: the slice's batch rows and
    K/V heads) or None (nothing cut, no additive modifier), gathered K, V [G, b*Hkv, L, D]). ``trim_tail`` (the forward): a one-row
    group may come with fewer key columns than L (``_keys_of``), and its mask trimmed
    alike. ``mods``: ScoreMods whose ALiBi / bias join the mask (sinks are not read).
    ``bands``: a list to which each slice's banded run (cpu_band) is appended as (slice
    indices, band, the slice's block classes, rule, a dict kept on prepared lists for the
    run's masks, else None); its rows are not in the groups. None, or an additive
    modifier: no banded runs."""
    H, Hkv = q.shape[1], k.shape[1]
    offset = causal_offset(is_causal, Nq, Nk)
    acc = accumulator_dtype(q.dtype)
    additive = None
    if mods is not None and (mods.alibi_slopes is not None or mods.bias is not None):
        additive = ScoreMods(mods.alibi_slopes, None, mods.bias)
    q5 = _grouped(q, Hkv)
    k4, v4 = k.unsqueeze(2), v.unsqueeze(2)
    classes = lists.block_class.cpu()
    for bsl, ksl, gsl, bp, hp in _slices(lists, H, Hkv):
        qs = q5[bsl, ksl, gsl]
        bh = qs.shape[0] * qs.shape[1] * qs.shape[2]
        rule = (is_causal, True, offset, window, _token_rows(lists, bp),
                _slice_bits(lists, bp, hp))
        rb = row_block(block_size, Nq)
        cls = classes[bp, hp]
        band = _band_of(lists, cls, bp, hp, block_size, Nq, Nk) \
            if bands is not None and additive is None else None
        if band is not None:
            # The run's masks depend on the lists and the call's rule only: prepared lists
            # keep them across calls (and from the forward to the backward).
            kept = None if lists.mean_row_blocks is None else lists.memo(
                ("cpu-band-masks", bp, hp, block_size, Nq, Nk, is_causal, offset, window), dict)
            bands.append(((bsl, ksl, gsl), band, cls, rule, kept))
            cls = cls.clone()
            cls[band.first:band.first + band.count] = SKIP  # the band's rows run there
        groups = _row_groups(cls, block_size, Nq, Nk, bh)
        if lists.mean_row_blocks is not None:  # prepared lists: group them once (a decode
            # step spends a fifth of its call there), keep the index tensors on the lists
            groups = lists.memo(("cpu-row-groups", bp, hp, block_size, Nq, Nk, bh,
                                 band is not None), lambda groups=groups: list(groups))
        md = _Mods.of_slice(0.0, additive, (bsl, ksl, gsl), Hkv,
                            alibi_offset(is_causal, Nq, Nk), acc, q.shape[0], H) \
            if additive is not None else None
        for grp, cells, needs_mask in groups:
            rows = grp.rows.view(-1, rb)
            allowed = _group_allowed(grp, cells, block_size, rb, rule) if needs_mask else None
            if allowed is not None and bool(allowed.all()):
                # PARTIAL by block class but nothing cut for these rows (a decode row at the
                # end of the keys under bottom-right causal): the kernel runs mask-free.
                allowed = None
            if md is None:
                mask = _mask(allowed, qs.shape[2], q.dtype)
            else:
                mask = _with_mods(allowed, md, grp, rb, _token_rows(lists, bp), qs.shape, acc)
            kt = _keys_of(k4[bsl, ksl], grp, trim_tail)
            vt = _keys_of(v4[bsl, ksl], grp, trim_tail)
            if mask is not None and kt.shape[2] < mask.shape[-1]:
                mask = mask[..., :kt.shape[2]]
            yield (bsl, ksl, gsl), qs, grp, rows, mask, kt, vt


def _band_of(lists: BlockLists, classes, bp: int, hp: int, block_size: int, Nq: int,
             Nk: int) -> Optional[Band]:
    """The slice's banded run (cpu_band.find_band), found once per prepared lists."""
    if lists.mean_row_blocks is None:
        return find_band(classes, block_size, Nq, Nk)
    return lists.memo(("cpu-band", bp, hp, block_size, Nq, Nk),
                      lambda: find_band(classes, block_size, Nq, Nk))


def _with_mods(allowed, md: _Mods, grp: _Group, rb: int, tokens, slice_shape, acc):
    """The additive mask [G, b*hk, g*rb, L] of a group: ALiBi and the bias on its pairs
    (the reference's definition, _Mods.scores on zero scores), -inf where ``allowed``
    [G, rb, L] (None: everywhere allowed) is False -- whatever the bias holds there: a
    padded slot reads the bias at a clamped column outside the pattern, which may be
    anything, NaN included, and must never reach the result."""
    b, hk, g = slice_shape[:3]
    G, L = grp.cols.shape
    zero = torch.zeros((b, hk, g, G, rb, L), dtype=acc)
    add, _ = md.scores(zero, grp, rb, True, tokens)                   # [b, hk, g, G, rb, L]
    add = add.permute(3, 0, 1, 2, 4, 5).reshape(G, b * hk, g * rb, L)
    if allowed is None:
        return add
    cut = ~allowed.unsqueeze(1).repeat(1, 1, g, 1)                   # [G, 1, g*rb, L]
    return add.masked_fill_(cut, float("-inf"))


def _padded(t: torch.Tensor, d: int) -> torch.Tensor:
    """t with its last dim zero-padded to d (itself when it is d already)."""
    return t if t.shape[-1] == d else torch.nn.functional.pad(t, (0, d - t.shape[-1]))


def block_sparse_attention_forward_cpu(q, k, v, lists: BlockLists, *, block_size: int,
                                       scale: float, is_causal, y, lse,
                                       window: Optional[WindowRule] = None,
                                       softcap: float = 0.0, mods=None) -> None:
    """Writes y [B,H,Nq,Dv] and lse [B,H,Nq] (see the reference forward: same contract).
    The fused kernel wants one head dim: d_k != d_v runs zero-padded to the larger (zero
    columns change neither q.k nor the kept columns of y). Learnable sinks (``mods.sinks``)
    are folded in after the walk (``fold_sinks``); ALiBi and the bias join the additive
    mask; softcap runs the walk through cpu_capped (module docstring)."""
    _forward_fused(q, k, v, lists, block_size, scale, is_causal, y, lse, window, softcap,
                   mods)
    if mods is not None and mods.sinks is not None:
        # After the fact (padding rows keep -inf). The backward then needs nothing more: the
        # fused backward kernel rebuilds P from lse' and its row term from y'.
        fold_sinks(y, lse, mods.sinks, _live_rows(lists, torch.arange(lse.shape[-1])))
    if not all_finite(y):  # NaN / inf somewhere: the exact rule (module docstring)
        block_sparse_attention_forward_reference(
            q, k, v, lists, block_size=block_size, scale=scale, is_causal=is_causal, y=y,
            lse=lse, window=window, softcap=softcap, mods=mods)


def _forward_fused(q, k, v, lists, block_size, scale, is_causal, y, lse, window, softcap,
                   mods) -> None:
    d = max(q.shape[-1], v.shape[-1])
    if q.shape[-1] != v.shape[-1]:
        y_pad = y.new_empty(y.shape[:-1] + (d,))
        _forward(_padded(q, d), _padded(k, d), _padded(v, d), lists, block_size, scale,
                 is_causal, y_pad, lse, window, softcap, mods)
        y.copy_(y_pad[..., :v.shape[-1]])
    else:
        _forward(q, k, v, lists, block_size, scale, is_causal, y, lse, window, softcap, mods)


def _forward(q, k, v, lists, block_size, scale, is_causal, y, lse, window, softcap,
             mods) -> None:
    Nq, Nk = q.shape[2], k.shape[2]
    Hkv = k.shape[1]
    causal = None if softcap > 0 else whole_rule(lists, block_size, Nq, Nk, is_causal,
                                                 window, mods)
    if causal is not None:  # dense (causal) attention: one fused call (cpu_whole.py)
        whole_forward(q, k, v, y, lse, causal, scale)
        return
    y.zero_()
    lse.fill_(float("-inf"))
    q, k, v = _without_padding(lists, q=q, k=k, v=v)
    y5, lse5 = _grouped(y, Hkv), _grouped(lse, Hkv)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bands: list = []
    for sl, qs, grp, rows, mask, kt, vt in _group_problems(
            q, k, v, lists, block_size, is_causal, window, Nq, Nk, trim_tail=True, mods=mods,
            bands=None if softcap > 0 else bands):
        b, hk, g = qs.shape[:3]
        qt = _as_problems(qs, rows)
        if softcap > 0:
            out, row_lse = capped_attention(qt, kt, vt, mask, scale, softcap)
        else:
            out, row_lse = flash(qt, kt, vt, 0.0, False, attn_mask=mask, scale=scale)
        # Rows that see nothing: lse = -inf (the kernel gives 0). seen: [G, 1 | b*hk, g*bs]
        row_lse = _seen(row_lse, None if mask is None else (mask != float("-inf")).any(-1))
        rows_ok = bool(grp.row_ok.all())
        _store_rows(y5[sl], grp.rows, grp.row_ok, rows_ok, _from_problems(out, b, hk, g))
        _store_rows(lse5[sl], grp.rows, grp.row_ok, rows_ok, _from_problems(row_lse, b, hk, g))
    k4, v4 = k.unsqueeze(2), v.unsqueeze(2)
    for (bsl, ksl, gsl), band, cls, rule, kept in bands:
        sl = (bsl, ksl, gsl)
        band_forward(_grouped(q, Hkv)[sl], k4[bsl, ksl], v4[bsl, ksl], y5[sl], lse5[sl], band,
                     cls, rule, block_size, scale, kept)


def block_sparse_attention_backward_cpu(q, k, v, y, lse, dy, lists: BlockLists, *,
                                        block_size: int, scale: float, is_causal, dq, dk, dv,
                                        dlse=None, window: Optional[WindowRule] = None,
                                        softcap: float = 0.0, mods=None, dbias=None):
    """Writes dq, dk, dv (see the reference backward: same contract; d_k != d_v runs
    zero-padded as in the forward). Sinks need nothing here (lse and y include them).
    Returns the reference's row delta when it ran, else None."""
    reference = dict(block_size=block_size, scale=scale, is_causal=is_causal, dq=dq, dk=dk,
                     dv=dv, dlse=dlse, window=window, softcap=softcap, mods=mods, dbias=dbias)
    if dlse is not None or dbias is not None:  # PyTorch's backward kernel has no lse-
        # gradient input and returns no dS (the bias's gradient)
        return block_sparse_attention_backward_reference(q, k, v, y, lse, dy, lists,
                                                         **reference)
    dk_, dv_ = q.shape[-1], v.shape[-1]
    if dk_ == dv_:
        _backward(q, k, v, y, lse, dy, lists, block_size, scale, is_causal, dq, dk, dv, window,
                  softcap, mods)
    else:
        d = max(dk_, dv_)
        grads = [None if g is None else g.new_empty(g.shape[:-1] + (d,)) for g in (dq, dk, dv)]
        _backward(_padded(q, d), _padded(k, d), _padded(v, d), _padded(y, d), lse,
                  _padded(dy, d), lists, block_size, scale, is_causal, *grads, window, softcap,
                  mods)
        for out, g in zip((dq, dk, dv), grads):
            if out is not None:
                out.copy_(g[..., :out.shape[-1]])
    if not all_finite(dq, dk, dv):  # NaN / inf somewhere: the exact rule (module docstring)
        return block_sparse_attention_backward_reference(q, k, v, y, lse, dy, lists,
                                                         **reference)
    return None


def _backward(q, k, v, y, lse, dy, lists, block_size, scale, is_causal, dq, dk, dv,
              window, softcap, mods) -> None:
    Nq, Nk = q.shape[2], k.shape[2]
    Hkv = k.shape[1]
    causal = None if softcap > 0 else whole_rule(lists, block_size, Nq, Nk, is_causal,
                                                 window, mods)
    if causal is not None:
        whole_backward(q, k, v, y, lse, dy, dq, dk, dv, causal, scale)
        return
    acc = accumulator_dtype(q.dtype)
    if dq is not None:
        dq.zero_()
    q, k, v, dy = _without_padding(lists, q=q, k=k, v=v, dy=dy)
    y5, dy5, lse5 = _grouped(y, Hkv), _grouped(dy, Hkv), _grouped(lse, Hkv)
    dq5 = _grouped(dq, Hkv) if dq is not None else None
    # dK / dV accumulate in the accumulator dtype: straight into dk / dv when they have it
    # (float32 / float64 inputs: no second pair of K/V-sized buffers), else into buffers.
    direct = dk is not None and dk.dtype == acc and dv.dtype == acc
    if direct:
        dk_acc, dv_acc = dk.zero_(), dv.zero_()
    else:
        dk_acc = torch.zeros(k.shape, dtype=acc) if dk is not None else None
        dv_acc = torch.zeros(v.shape, dtype=acc) if dk is not None else None
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    bands: list = []
    for sl, qs, grp, rows, mask, kt, vt in _group_problems(
            q, k, v, lists, block_size, is_causal, window, Nq, Nk, mods=mods,
            bands=None if softcap > 0 else bands):
        b, hk, g = qs.shape[:3]
        bsl, ksl, gsl = sl
        qt = _as_problems(qs, rows)
        ot = _as_problems(y5[sl], rows)
        dot = _as_problems(dy5[sl], rows)
        # Rows past Nq are clamped copies of the last row: their upstream gradient is 0, so
        # they add nothing to dK / dV (only the last group has such rows).
        rows_ok = bool(grp.row_ok.all())
        if not rows_ok:
            dot = dot * grp.row_ok.view(-1, 1, rows.shape[1]).repeat(1, 1, g)[..., None].to(
                dot.dtype)
        lt = _kernel_lse(_as_problems(lse5[sl].unsqueeze(-1), rows).squeeze(-1))
        if softcap > 0:
            gq, gk, gv = capped_attention_backward(dot, qt, kt, vt, ot, lt, mask, scale,
                                                   softcap)
        else:
            gq, gk, gv = flash_bwd(dot, qt, kt, vt, ot, lt, 0.0, False, attn_mask=mask,
                                   scale=scale)
        if dq5 is not None:
            _store_rows(dq5[sl], grp.rows, grp.row_ok, rows_ok, _from_problems(gq, b, hk, g))
        if dk_acc is not None:
            cols, col_ok = grp.cols.flatten(), grp.col_ok.flatten()
            all_cols = bool(col_ok.all())
            ok = None if all_cols else col_ok.nonzero().flatten()
            for acc_t, grad in ((dk_acc, gk), (dv_acc, gv)):
                flat = _from_problems(grad, b, hk, 1)[:, :, 0].to(acc)  # [b, hk, G*L, D]
                if all_cols:  # no padded slot: no gather of the gradient
                    acc_t[bsl, ksl].index_add_(2, cols, flat)
                else:
                    acc_t[bsl, ksl].index_add_(2, cols[ok], flat[:, :, ok])
                del flat
        # Free the group's buffers before the next group's kernel call (cpu_band: same).
        del gq, gk, gv, qt, ot, dot, kt, vt, mask
    k4, v4 = k.unsqueeze(2), v.unsqueeze(2)
    for (bsl, ksl, gsl), band, cls, rule, kept in bands:
        sl = (bsl, ksl, gsl)
        band_backward(_grouped(q, Hkv)[sl], k4[bsl, ksl], v4[bsl, ksl], y5[sl], lse5[sl],
                      dy5[sl], None if dq5 is None else dq5[sl],
                      None if dk_acc is None else dk_acc[bsl, ksl].unsqueeze(2),
                      None if dv_acc is None else dv_acc[bsl, ksl].unsqueeze(2), band, cls,
                      rule, block_size, scale, kept)
    if dk is not None and not direct:
        dk.copy_(dk_acc)
        dv.copy_(dv_acc)
