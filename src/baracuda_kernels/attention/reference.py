"""Reference backend: block-sparse attention in plain PyTorch, on any device.

This is the readable statement of the semantics and the CPU backend. It never builds a
score matrix for the whole sequence: block rows are processed in groups, each row gathering
only its own active blocks, so time and memory grow with the number of active blocks.

* Forward and dQ walk query-block rows, gathering each row's active key blocks.
* dK/dV walk key-block rows, gathering the query blocks that attend them (the transposed
  pattern), so every gradient row is written once with index_copy_: no scatter-add, hence
  deterministic on every device.

A group stacks G rows padded to the longest row of the group (padding is masked out); G is
chosen so a group's score tile stays under ``_GROUP_BUDGET`` elements. Accumulation is
float32 for f16/bf16/f32 inputs and float64 for f64 inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .block_lists import SKIP, BlockLists

_GROUP_BUDGET = 1 << 22  # score-tile elements per group (16 MiB in float32)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _groups(active: torch.Tensor, block_size: int, row_len: int, col_len: int,
            batch_heads: int, device) -> Iterator[_Group]:
    """Group the block rows of ``active`` (bool [n_rows, n_cols], on CPU) that have work."""
    counts = active.sum(1)
    offsets = torch.arange(block_size)
    rows = [r for r in range(active.shape[0]) if counts[r] > 0]
    start = 0
    while start < len(rows):
        stop, widest = start, 0
        while stop < len(rows):
            w = max(widest, int(counts[rows[stop]]))
            tile = (stop - start + 1) * w * block_size * block_size * batch_heads
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
        row_tok = (torch.tensor(chunk)[:, None] * block_size + offsets).flatten()
        yield _Group(row_tok.clamp(max=row_len - 1).to(device), (row_tok < row_len).to(device),
                     cols.clamp(max=col_len - 1).to(device), col_ok.to(device))
        start = stop


def _active_blocks(lists: BlockLists) -> torch.Tensor:
    """bool [Bp, Hp, nq, nk] on the CPU: the blocks the reference walks (on the host)."""
    if lists.block_class is None:
        raise RuntimeError("reference backend got block lists without block_class (built by "
                           "the Triton builder); internal error: build them with use_triton=False")
    return (lists.block_class != SKIP).cpu()


def _slices(lists: BlockLists):
    """(batch slice, head slice, pattern slice index) per pattern slice; size-1 pattern dims
    cover every batch/head at once."""
    Bp, Hp = lists.kv_index.shape[:2]
    for bp in range(Bp):
        for hp in range(Hp):
            yield (slice(None) if Bp == 1 else slice(bp, bp + 1),
                   slice(None) if Hp == 1 else slice(hp, hp + 1), bp, hp)


def _gather(t: torch.Tensor, tokens: torch.Tensor, acc) -> torch.Tensor:
    """t [b, h, N, D] -> [b, h, *tokens.shape, D] in the accumulator dtype."""
    return t.index_select(2, tokens.flatten()).to(acc).unflatten(2, tokens.shape)


def _allowed(g: _Group, block_size: int, is_causal: bool, rows_are_queries: bool) -> torch.Tensor:
    """bool [G, bs, L]: which (row token, column token) pairs count."""
    rows = g.rows.view(g.cols.shape[0], block_size)
    ok = g.col_ok[:, None, :].expand(-1, block_size, -1)
    if is_causal:
        q_tok, k_tok = (rows[:, :, None], g.cols[:, None, :]) if rows_are_queries else \
            (g.cols[:, None, :], rows[:, :, None])
        ok = ok & (k_tok <= q_tok)
    return ok


def _probs(scores, lse, allowed=None):
    """exp(scores - lse), 0 where not allowed; lse = -inf (rows that see nothing) gives 0.

    Only -inf means "nothing allowed": a NaN or +inf lse comes from NaN/inf in the inputs
    and must reach the row's outputs and gradients (as in torch SDPA), so it is kept."""
    seen = lse != float("-inf")
    p = torch.exp(scores - torch.where(seen, lse, torch.zeros_like(lse)))
    keep = seen if allowed is None else allowed & seen
    return p.masked_fill(~keep, 0.0)


def block_sparse_attention_forward_reference(q, k, v, lists: BlockLists, *, block_size: int,
                                             scale: float, is_causal: bool, y, lse) -> None:
    """Writes y [B,H,Nq,Dv] and lse [B,H,Nq] for q [B,H,Nq,Dk], k [B,H,Nk,Dk], v [B,H,Nk,Dv]."""
    acc = _accumulator(q.dtype)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    y.zero_()
    lse.fill_(float("-inf"))
    active_all = _active_blocks(lists)
    for bsl, hsl, bp, hp in _slices(lists):
        qs, ks, vs = q[bsl, hsl], k[bsl, hsl], v[bsl, hsl]
        bh = qs.shape[0] * qs.shape[1]
        for g in _groups(active_all[bp, hp], block_size, Nq, Nk, bh, q.device):
            G = g.cols.shape[0]
            qt = _gather(qs, g.rows.view(G, block_size), acc)            # [b,h,G,bs,Dk]
            s = torch.matmul(qt, _gather(ks, g.cols, acc).transpose(-1, -2)) * scale
            s = s.masked_fill(~_allowed(g, block_size, is_causal, True), float("-inf"))
            row_lse = torch.logsumexp(s, dim=-1)                         # [b,h,G,bs]
            p = _probs(s, row_lse[..., None])  # masked scores are -inf: exp gives 0
            out = torch.matmul(p, _gather(vs, g.cols, acc)).flatten(2, 3)
            keep = g.row_ok.nonzero().flatten()
            y[bsl, hsl].index_copy_(2, g.rows[keep], out[:, :, keep].to(y.dtype))
            lse[bsl, hsl].index_copy_(2, g.rows[keep], row_lse.flatten(2)[:, :, keep].to(lse.dtype))


def block_sparse_attention_backward_reference(q, k, v, y, lse, dy, lists: BlockLists, *,
                                              block_size: int, scale: float, is_causal: bool,
                                              dq, dk, dv, dlse=None) -> None:
    """Writes dq, dk, dv (shaped like q, k, v; None = not wanted, dk and dv go together) from
    the upstream gradients dy [B,H,Nq,Dv] and dlse [B,H,Nq] (None = 0), rebuilding
    probabilities from the forward's lse."""
    acc = _accumulator(q.dtype)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    for g in (dq, dk, dv):
        if g is not None:
            g.zero_()
    # delta_i = sum_d dy_id * y_id = sum_j p_ij dp_ij: the softmax-Jacobian correction. The
    # lse gradient enters the same place: d lse_i / d s_ij = p_ij, so dS = P * (dP - delta + dlse).
    delta = (dy.to(acc) * y.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    lse_acc = lse.to(acc)
    active_all = _active_blocks(lists)
    for bsl, hsl, bp, hp in _slices(lists):
        qs, ks, vs, dys = q[bsl, hsl], k[bsl, hsl], v[bsl, hsl], dy[bsl, hsl]
        ls, ds_ = lse_acc[bsl, hsl], delta[bsl, hsl]
        bh = qs.shape[0] * qs.shape[1]
        # dQ: query-block rows.
        for g in (_groups(active_all[bp, hp], block_size, Nq, Nk, bh, q.device)
                  if dq is not None else ()):
            G = g.cols.shape[0]
            rows = g.rows.view(G, block_size)
            kt, vt = _gather(ks, g.cols, acc), _gather(vs, g.cols, acc)
            s = torch.matmul(_gather(qs, rows, acc), kt.transpose(-1, -2)) * scale
            p = _probs(s, _gather_rows(ls, rows)[..., None], _allowed(g, block_size, is_causal, True))
            dp = torch.matmul(_gather(dys, rows, acc), vt.transpose(-1, -2))
            dsc = p * (dp - _gather_rows(ds_, rows)[..., None])
            out = (torch.matmul(dsc, kt) * scale).flatten(2, 3)
            keep = g.row_ok.nonzero().flatten()
            dq[bsl, hsl].index_copy_(2, g.rows[keep], out[:, :, keep].to(dq.dtype))
        # dK, dV: key-block rows over the transposed pattern.
        for g in (_groups(active_all[bp, hp].T, block_size, Nk, Nq, bh, q.device)
                  if dk is not None else ()):
            G = g.cols.shape[0]
            rows = g.rows.view(G, block_size)
            qt, dyt = _gather(qs, g.cols, acc), _gather(dys, g.cols, acc)
            s_t = torch.matmul(_gather(ks, rows, acc), qt.transpose(-1, -2)) * scale
            p_t = _probs(s_t, _gather_rows(ls, g.cols)[:, :, :, None, :],
                         _allowed(g, block_size, is_causal, False))
            dv_out = torch.matmul(p_t, dyt).flatten(2, 3)
            dp_t = torch.matmul(_gather(vs, rows, acc), dyt.transpose(-1, -2))
            ds_t = p_t * (dp_t - _gather_rows(ds_, g.cols)[:, :, :, None, :])
            dk_out = (torch.matmul(ds_t, qt) * scale).flatten(2, 3)
            keep = g.row_ok.nonzero().flatten()
            dk[bsl, hsl].index_copy_(2, g.rows[keep], dk_out[:, :, keep].to(dk.dtype))
            dv[bsl, hsl].index_copy_(2, g.rows[keep], dv_out[:, :, keep].to(dv.dtype))


def _gather_rows(t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """t [b, h, N] -> [b, h, *tokens.shape]."""
    return t.index_select(2, tokens.flatten()).unflatten(2, tokens.shape)
