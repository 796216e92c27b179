"""Reference backend: block-sparse attention in plain PyTorch, on any device.

This is the readable statement of the semantics and the CPU backend. It never builds a
score matrix for the whole sequence: block rows are processed in groups, each row gathering
only its own active blocks, so time and memory grow with the number of active blocks.

* Forward and dQ walk query-block rows, gathering each row's active key blocks.
* dK/dV walk key-block rows, gathering the query blocks that attend them (the transposed
  pattern). Each gradient row gets one index_add_ per pattern slice, in a fixed order, with
  unique indices within a call: deterministic on every device.
* GQA: queries are viewed as [B, Hkv, G, N, D] and K/V as [B, Hkv, 1, N, D], so a group
  reads its K/V by broadcasting (no copy); dK/dV sum over the group dimension.

A group stacks G rows padded to the longest row of the group (padding is masked out); G is
chosen so a group's score tile stays under ``_GROUP_BUDGET`` elements. Accumulation is
float32 for f16/bf16/f32 inputs and float64 for f64 inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..common.numerics import accumulator_dtype
from ..common.problem import WindowRule, causal_offset
from ..common.score_mods import alibi_offset
from .block_lists import SKIP, BlockLists

_GROUP_BUDGET = 1 << 22  # score-tile elements per group (16 MiB in float32)


@dataclass
class _Group:
    """G block rows of one direction with their gathered column tokens.

    rows [G*bs] row token ids (clamped), row_ok [G*bs]; cols [G, L] column token ids
    (clamped), col_ok [G, L]; L = (longest active count in the group) * bs.
    """

    rows: torch.Tensor
    row_ok: torch.Tensor
    cols: torch.Tensor
    col_ok: torch.Tensor


def row_block(block_size: int, Nq: int) -> int:
    """Query rows per block row: the block, or Nq when the whole query is shorter (a decode
    step computes its 1 row, not a block of clamped copies)."""
    return min(block_size, Nq)


def _groups(active: torch.Tensor, block_size: int, row_len: int, col_len: int,
            batch_heads: int, device, rows_per_block: Optional[int] = None) -> Iterator[_Group]:
    """Group the block rows of ``active`` (bool [n_rows, n_cols], on CPU) that have work.
    ``rows_per_block``: rows a block row contributes (default: the block; the query walks
    pass ``row_block``)."""
    counts = active.sum(1)
    offsets = torch.arange(block_size)
    rb = rows_per_block or block_size
    rows = [r for r in range(active.shape[0]) if counts[r] > 0]
    start = 0
    while start < len(rows):
        stop, widest = start, 0
        while stop < len(rows):
            w = max(widest, int(counts[rows[stop]]))
            tile = (stop - start + 1) * w * block_size * rb * batch_heads
            if stop > start and tile > _GROUP_BUDGET:
                break
            widest, stop = w, stop + 1
        chunk = rows[start:stop]
        blocks = torch.full((len(chunk), widest), -1, dtype=torch.int64)
        for i, r in enumerate(chunk):
            ids = active[r].nonzero().flatten()
            blocks[i, :ids.numel()] = ids
        cols = (blocks.clamp(min=0)[:, :, None] * block_size + offsets).flatten(1)
        col_ok = (blocks[:, :, None] >= 0).expand(-1, -1, block_size).flatten(1) & (cols < col_len)
        row_tok = (torch.tensor(chunk)[:, None] * block_size + offsets[:rb]).flatten()
        yield _Group(row_tok.clamp(max=row_len - 1).to(device), (row_tok < row_len).to(device),
                     cols.clamp(max=col_len - 1).to(device), col_ok.to(device))
        start = stop


def _active_blocks(lists: BlockLists) -> torch.Tensor:
    """bool [Bp, Hp, nq, nk] on the CPU: the blocks the reference walks (on the host)."""
    if lists.block_class is None:
        raise RuntimeError("reference backend got block lists without block_class (built by "
                           "the Triton builder); internal error: build them with use_triton=False")
    return (lists.block_class != SKIP).cpu()


def _slices(lists: BlockLists, H: int, Hkv: int):
    """One entry per pattern slice: (batch slice, K/V-head slice, group slice, bp, hp).

    Queries are read as [B, Hkv, G, N, D] (query head h = hk * G + g) and K/V as
    [B, Hkv, 1, N, D], so that a group shares its K/V by broadcasting, never by a copy.
    Pattern heads: Hp = H (per query head: one K/V head, one group member), Hp = Hkv (per
    K/V head: the whole group), Hp = 1 (everything); size-1 dims cover all at once."""
    Bp, Hp = lists.kv_index.shape[:2]
    G = H // Hkv
    for bp in range(Bp):
        bsl = slice(None) if Bp == 1 else slice(bp, bp + 1)
        for hp in range(Hp):
            if Hp == 1:
                yield bsl, slice(None), slice(None), bp, hp
            elif Hp == H:
                yield bsl, slice(hp // G, hp // G + 1), slice(hp % G, hp % G + 1), bp, hp
            else:  # Hp == Hkv
                yield bsl, slice(hp, hp + 1), slice(None), bp, hp


def _grouped(t: torch.Tensor, Hkv: int) -> torch.Tensor:
    """[B, H, ...] -> the view [B, Hkv, H // Hkv, ...] (query head h = hk * G + g)."""
    return t.unflatten(1, (Hkv, t.shape[1] // Hkv))


def _gather(t: torch.Tensor, tokens: torch.Tensor, acc) -> torch.Tensor:
    """t [b, hk, g, N, D] -> [b, hk, g, *tokens.shape, D] in the accumulator dtype."""
    return t.index_select(3, tokens.flatten()).to(acc).unflatten(3, tokens.shape)


def _allowed(g: _Group, block_size: int, is_causal, rows_are_queries: bool,
             offset: int, window: Optional[WindowRule], tokens=None, bits=None) -> torch.Tensor:
    """bool [G, bs, L]: which (row token, column token) pairs count; causal: key j <= query
    i + offset (0 top-left, Nk - Nq bottom-right); window: ``WindowRule.allows``; tokens:
    this batch row's (q_ids, k_ids, q_pos, k_pos) (``TokenRules.rows``) or None: ids must
    match, and the causal rule and the window compare positions instead of indices; bits:
    (BlockBits, bp, hp) of this pattern slice (``_slice_bits``) or None."""
    ok = g.col_ok[:, None, :].expand(-1, block_size, -1)
    q_idx, k_idx = _pair_indices(g, block_size, rows_are_queries)
    q_tok, k_tok = _positions(q_idx, k_idx, tokens)
    if tokens is not None and tokens[0] is not None:
        q_ids, k_ids = tokens[:2]
        ok = ok & (q_ids[q_idx] == k_ids[k_idx])
    if is_causal:
        ok = ok & (k_tok <= q_tok + offset)
    if window is not None:
        ok = ok & window.allows(q_tok, k_tok)
    if bits is not None:
        block_bits, bp, hp = bits
        b, h = (torch.tensor(i, device=q_idx.device) for i in (bp, hp))
        ok = ok & block_bits.allows(b, h, q_idx, k_idx)
    return ok


def _pair_indices(g: _Group, block_size: int, rows_are_queries: bool):
    """(query token index, key token index) of the group's pairs, broadcastable to [G, bs, L]."""
    rows = g.rows.view(g.cols.shape[0], block_size)
    return (rows[:, :, None], g.cols[:, None, :]) if rows_are_queries else \
        (g.cols[:, None, :], rows[:, :, None])


def _positions(q_idx, k_idx, tokens):
    """Positions of the pairs: the token rules' positions where they have them, else the
    indices (what the causal rule, the window and ALiBi compare)."""
    if tokens is not None and tokens[2] is not None:
        return tokens[2][q_idx].long(), tokens[3][k_idx].long()
    return q_idx, k_idx


@dataclass
class _Mods:
    """Score modifiers of one pattern slice (common.score_mods): softcap (0 = none), slopes
    and sinks shaped [b, hk, g] of the slice (or None), ALiBi's diagonal offset, the bias
    as the slice's view [b, hk, g, Nq|1, Nk] (or None)."""

    softcap: float
    slopes: Optional[torch.Tensor]
    sinks: Optional[torch.Tensor]
    alibi_off: int
    bias: Optional[torch.Tensor] = None

    @classmethod
    def of_slice(cls, softcap, mods, sl, Hkv: int, alibi_off: int, acc,
                 B: int = 1, H: int = 1) -> Optional["_Mods"]:
        if softcap <= 0 and (mods is None or mods.empty):
            return None
        bsl, ksl, gsl = sl

        def per_head(t):  # [B|1, H] -> the slice's [b, hk, g]
            if t is None:
                return None
            t5 = _grouped(t.to(acc), Hkv)
            return t5[bsl if t5.shape[0] > 1 else slice(None), ksl, gsl]
        bias = None
        if mods is not None and mods.bias is not None:
            b5 = _grouped(mods.bias.expand(B, H, -1, -1), Hkv)
            bias = b5[bsl, ksl, gsl]
        return cls(softcap, per_head(mods.alibi_slopes if mods else None),
                   per_head(mods.sinks[None] if mods and mods.sinks is not None else None),
                   alibi_off, bias)

    def scores(self, s, g: _Group, block_size: int, rows_are_queries: bool, tokens):
        """(s after the cap, bias and ALiBi, the capped s (None without a cap));
        s [b,hk,g,G,bs,L]."""
        capped = None
        if self.softcap > 0:
            s = self.softcap * torch.tanh(s / self.softcap)
            capped = s
        if self.bias is not None:
            q_idx, k_idx = _pair_indices(g, block_size, rows_are_queries)
            if self.bias.shape[3] == 1:  # the same bias row for every query
                q_idx = torch.zeros_like(q_idx)
            s = s + self.bias[..., q_idx, k_idx].to(s.dtype)
        if self.slopes is not None:
            q_tok, k_tok = _positions(*_pair_indices(g, block_size, rows_are_queries), tokens)
            dist = (k_tok - q_tok - self.alibi_off).abs().to(s.dtype)             # [G, bs, L]
            s = s - self.slopes[..., None, None, None] * dist
        return s, capped

    def cap_grad(self, ds, capped):
        """dS through the cap: d cap*tanh(s/cap) / ds = 1 - (capped / cap)^2."""
        return ds if capped is None else ds * (1 - (capped / self.softcap) ** 2)


def _probs(scores, lse, allowed=None):
    """exp(scores - lse), 0 where not allowed; lse = -inf (rows that see nothing) gives 0.

    Only -inf means "nothing allowed": a NaN or +inf lse comes from NaN/inf in the inputs
    and must reach the row's outputs and gradients (as in torch SDPA), so it is kept."""
    seen = lse != float("-inf")
    p = torch.exp(scores - torch.where(seen, lse, torch.zeros_like(lse)))
    keep = seen if allowed is None else allowed & seen
    return p.masked_fill(~keep, 0.0)


def block_sparse_attention_forward_reference(q, k, v, lists: BlockLists, *, block_size: int,
                                             scale: float, is_causal: bool, y, lse,
                                             window: Optional[WindowRule] = None,
                                             softcap: float = 0.0, mods=None) -> None:
    """Writes y [B,H,Nq,Dv] and lse [B,H,Nq] for q [B,H,Nq,Dk], k [B,Hkv,Nk,Dk],
    v [B,Hkv,Nk,Dv] (query head h reads K/V head h // (H // Hkv)); softcap / mods: the
    score modifiers (common.score_mods)."""
    acc = accumulator_dtype(q.dtype)
    B, H, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    offset = causal_offset(is_causal, Nq, Nk)
    rb = row_block(block_size, Nq)  # query rows per block row (_groups)
    y.zero_()
    lse.fill_(float("-inf"))
    active_all = _active_blocks(lists)
    q, k, v = _without_padding(lists, q=q, k=k, v=v)
    q5, y5, lse5 = _grouped(q, Hkv), _grouped(y, Hkv), _grouped(lse, Hkv)
    k5, v5 = k.unsqueeze(2), v.unsqueeze(2)
    alibi_off = alibi_offset(is_causal, Nq, Nk)
    for bsl, ksl, gsl, bp, hp in _slices(lists, H, Hkv):
        qs, ks, vs = q5[bsl, ksl, gsl], k5[bsl, ksl], v5[bsl, ksl]
        bh = qs.shape[0] * qs.shape[1] * qs.shape[2]
        md = _Mods.of_slice(softcap, mods, (bsl, ksl, gsl), Hkv, alibi_off, acc, B, H)
        for g in _groups(active_all[bp, hp], block_size, Nq, Nk, bh, q.device, rb):
            G = g.cols.shape[0]
            qt = _gather(qs, g.rows.view(G, rb), acc)                # [b,hk,g,G,rb,Dk]
            s = torch.matmul(qt, _gather(ks, g.cols, acc).transpose(-1, -2)) * scale
            if md is not None:
                s, _ = md.scores(s, g, rb, True, _token_rows(lists, bp))
            allowed = _allowed(g, rb, is_causal, True, offset, window,
                               _token_rows(lists, bp), _slice_bits(lists, bp, hp))
            s = s.masked_fill(~allowed, float("-inf"))
            row_lse = torch.logsumexp(s, dim=-1)                     # [b,hk,g,G,bs]
            if md is not None and md.sinks is not None:  # the sink joins every valid row
                live = _live_rows(lists, g.rows, bp)
                live = live.view(G, rb) if live.dim() else live
                row_lse = torch.where(live, torch.logaddexp(row_lse, md.sinks[..., None, None]),
                                      row_lse)
            p = _probs(s, row_lse[..., None])  # masked scores are -inf: exp gives 0
            out = torch.matmul(p, _gather(vs, g.cols, acc)).flatten(3, 4)
            keep = g.row_ok.nonzero().flatten()
            y5[bsl, ksl, gsl].index_copy_(3, g.rows[keep], out[:, :, :, keep].to(y.dtype))
            lse5[bsl, ksl, gsl].index_copy_(
                3, g.rows[keep], row_lse.flatten(3)[:, :, :, keep].to(lse.dtype))
    if mods is not None and mods.sinks is not None:
        # Valid rows no block reached see only the sink: y = 0 (as written), lse = sink.
        live = _live_rows(lists, torch.arange(Nq, device=q.device))
        unseen = (lse == float("-inf")) & live
        lse.copy_(torch.where(unseen, mods.sinks.to(lse.dtype)[None, :, None], lse))


def block_sparse_attention_backward_reference(q, k, v, y, lse, dy, lists: BlockLists, *,
                                              block_size: int, scale: float, is_causal: bool,
                                              dq, dk, dv, dlse=None,
                                              window: Optional[WindowRule] = None,
                                              softcap: float = 0.0, mods=None,
                                              dbias=None) -> None:
    """Writes dq, dk, dv (shaped like q, k, v; None = not wanted, dk and dv go together) from
    the upstream gradients dy [B,H,Nq,Dv] and dlse [B,H,Nq] (None = 0), rebuilding
    probabilities from the forward's lse. With GQA, dk/dv of a K/V head sum the
    contributions of its query heads (in a fixed order, in the accumulator dtype).
    dbias: a score_mods.BiasGradTarget whose buffer receives dS (the bias's gradient before
    its broadcast dims are summed), or None."""
    acc = accumulator_dtype(q.dtype)
    B, H, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    offset = causal_offset(is_causal, Nq, Nk)
    rb = row_block(block_size, Nq)  # query rows per block row (_groups)
    if dq is not None:
        dq.zero_()
    # delta_i = sum_d dy_id * y_id = sum_j p_ij dp_ij: the softmax-Jacobian correction. The
    # lse gradient enters the same place: d lse_i / d s_ij = p_ij, so dS = P * (dP - delta + dlse).
    q, k, v, dy = _without_padding(lists, q=q, k=k, v=v, dy=dy)
    delta = (dy.to(acc) * y.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    lse5, delta5 = _grouped(lse.to(acc), Hkv), _grouped(delta, Hkv)
    q5, dy5 = _grouped(q, Hkv), _grouped(dy, Hkv)
    k5, v5 = k.unsqueeze(2), v.unsqueeze(2)
    dq5 = _grouped(dq, Hkv) if dq is not None else None
    db5 = _grouped(dbias.buffer, Hkv) if dbias is not None else None
    # dK/dV gather the group's contributions (several pattern slices may add to one K/V head).
    dk_acc = torch.zeros(k.shape, dtype=acc, device=k.device) if dk is not None else None
    dv_acc = torch.zeros(v.shape, dtype=acc, device=v.device) if dk is not None else None
    active_all = _active_blocks(lists)
    alibi_off = alibi_offset(is_causal, Nq, Nk)
    for bsl, ksl, gsl, bp, hp in _slices(lists, H, Hkv):
        md = _Mods.of_slice(softcap, mods, (bsl, ksl, gsl), Hkv, alibi_off, acc, B, H)
        capped = None
        qs, ks, vs, dys = q5[bsl, ksl, gsl], k5[bsl, ksl], v5[bsl, ksl], dy5[bsl, ksl, gsl]
        ls, ds_ = lse5[bsl, ksl, gsl], delta5[bsl, ksl, gsl]
        bh = qs.shape[0] * qs.shape[1] * qs.shape[2]
        # dQ (and d bias): query-block rows.
        for g in (_groups(active_all[bp, hp], block_size, Nq, Nk, bh, q.device, rb)
                  if dq is not None or dbias is not None else ()):
            G = g.cols.shape[0]
            rows = g.rows.view(G, rb)
            kt, vt = _gather(ks, g.cols, acc), _gather(vs, g.cols, acc)
            s = torch.matmul(_gather(qs, rows, acc), kt.transpose(-1, -2)) * scale
            if md is not None:
                s, capped = md.scores(s, g, rb, True, _token_rows(lists, bp))
            p = _probs(s, _gather_rows(ls, rows)[..., None],
                       _allowed(g, rb, is_causal, True, offset, window,
                                _token_rows(lists, bp), _slice_bits(lists, bp, hp)))
            dp = torch.matmul(_gather(dys, rows, acc), vt.transpose(-1, -2))
            dsc = p * (dp - _gather_rows(ds_, rows)[..., None])
            if dbias is not None:
                _add_bias_grad(db5[bsl, ksl, gsl], dsc, g, rows)
            if dq is None:
                continue
            if md is not None:
                dsc = md.cap_grad(dsc, capped)
            out = (torch.matmul(dsc, kt) * scale).flatten(3, 4)
            keep = g.row_ok.nonzero().flatten()
            dq5[bsl, ksl, gsl].index_copy_(3, g.rows[keep], out[:, :, :, keep].to(dq.dtype))
        # dK, dV: key-block rows over the transposed pattern, summed over the group (dim 2).
        for g in (_groups(active_all[bp, hp].T, block_size, Nk, Nq, bh, q.device)
                  if dk is not None else ()):
            G = g.cols.shape[0]
            rows = g.rows.view(G, block_size)
            qt, dyt = _gather(qs, g.cols, acc), _gather(dys, g.cols, acc)
            s_t = torch.matmul(_gather(ks, rows, acc), qt.transpose(-1, -2)) * scale
            if md is not None:
                s_t, capped = md.scores(s_t, g, block_size, False, _token_rows(lists, bp))
            p_t = _probs(s_t, _gather_rows(ls, g.cols)[..., None, :],
                         _allowed(g, block_size, is_causal, False, offset, window,
                                  _token_rows(lists, bp), _slice_bits(lists, bp, hp)))
            dv_out = torch.matmul(p_t, dyt).sum(2).flatten(2, 3)
            dp_t = torch.matmul(_gather(vs, rows, acc), dyt.transpose(-1, -2))
            ds_t = p_t * (dp_t - _gather_rows(ds_, g.cols)[..., None, :])
            if md is not None:
                ds_t = md.cap_grad(ds_t, capped)
            dk_out = (torch.matmul(ds_t, qt) * scale).sum(2).flatten(2, 3)
            keep = g.row_ok.nonzero().flatten()
            dk_acc[bsl, ksl].index_add_(2, g.rows[keep], dk_out[:, :, keep])
            dv_acc[bsl, ksl].index_add_(2, g.rows[keep], dv_out[:, :, keep])
    if dk is not None:
        dk.copy_(dk_acc)
        dv.copy_(dv_acc)
    return delta  # dy . y - dlse per row [B, H, Nq] (the sinks' gradient reuses it)


def _add_bias_grad(db: torch.Tensor, ds: torch.Tensor, g: _Group, rows: torch.Tensor) -> None:
    """Add a group's dS [b,hk,g,G,bs,L] (the bias gradient of its pairs) into the slice's
    buffer db [b,hk,g,Nq|1,Nk]. Rows past the end (clamped copies of the last row) add
    nothing; masked columns (clamped copies) have dS = 0 exactly, so their repeated indices
    add exact zeros and the sum is the same in any order (deterministic on CUDA too)."""
    ds = torch.where(g.row_ok.view(rows.shape)[:, :, None], ds, torch.zeros((), dtype=ds.dtype,
                                                                           device=ds.device))
    Nk = db.shape[-1]
    if db.shape[3] == 1:  # one bias row for all queries: sum this group's rows first
        flat, summed = db.flatten(3), ds.sum(-2)                     # [.., Nk], [.., G, L]
        for i in range(summed.shape[3]):  # block rows in order: a fixed summation order
            flat.index_add_(3, g.cols[i], summed[:, :, :, i].to(db.dtype))
        return
    lin = (rows[:, :, None] * Nk + g.cols[:, None, :]).flatten()     # [G * bs * L]
    db.flatten(3).index_add_(3, lin, ds.flatten(3).to(db.dtype))


def _gather_rows(t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """t [b, hk, g, N] -> [b, hk, g, *tokens.shape]."""
    return t.index_select(3, tokens.flatten()).unflatten(3, tokens.shape)


def _token_rows(lists: BlockLists, bp: int):
    """The token rules of list batch row bp (lists carry the token batch when it is > 1)."""
    return None if lists.tokens is None else lists.tokens.rows(bp)


def _live_rows(lists: BlockLists, rows: torch.Tensor, bp: Optional[int] = None) -> torch.Tensor:
    """bool: query tokens ``rows`` that are not padding (negative ids): of list batch row bp
    ([len(rows)]), or of every token batch row ([Bt, 1, len(rows)]) when bp is None; a True
    scalar tensor when the lists carry no ids."""
    tokens = lists.tokens
    if tokens is None or not tokens.has_ids:
        return torch.ones((), dtype=torch.bool, device=rows.device)
    if bp is None:
        return (tokens.q_ids[:, rows] >= 0)[:, None, :]
    return tokens.rows(bp)[0][rows] >= 0


def _slice_bits(lists: BlockLists, bp: int, hp: int):
    """(BlockBits, bp, hp) of list slice (bp, hp) when the lists carry bits, else None."""
    tokens = lists.tokens
    return None if tokens is None or tokens.bits is None else (tokens.bits, bp, hp)


def _without_padding(lists: BlockLists, **tensors):
    """The tensors with padded rows (negative document ids) zeroed: padding takes part in
    nothing, so NaN or garbage there must not reach valid outputs through 0 * NaN.
    q / dy rows follow the query ids, k / v rows the key ids. -> tuple in the given order."""
    tokens = lists.tokens
    if tokens is None or not tokens.has_ids:
        return tuple(tensors.values())
    out = []
    for name, t in tensors.items():
        ids = tokens.q_ids if name in ("q", "dy") else tokens.k_ids
        if ids.device.type == "cpu" and not bool((ids < 0).any()):
            out.append(t)  # no padding on this side: no copy (a test the CPU makes for free)
            continue
        valid = (ids >= 0)[:, None, :, None]  # [Bt, 1, N, 1]
        out.append(torch.where(valid, t, torch.zeros((), dtype=t.dtype, device=t.device)))
    return tuple(out)
