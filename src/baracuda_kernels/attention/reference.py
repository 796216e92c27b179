"""Reference backend: block-sparse attention in plain PyTorch, on any device.

This is the readable statement of the semantics and the CPU backend. It walks the pattern
one query block at a time and gathers only that block's active key blocks, so time and
memory grow with the number of active blocks: the largest temporary is
[B, H, block_size, active_keys_of_one_block_row], never [Nq, Nk].

Accumulation is float32 for f16/bf16/f32 inputs and float64 for f64 inputs.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .block_lists import SKIP, BlockLists


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_rows(lists: BlockLists, batch: int, heads: int, block_size: int, query_len: int,
                key_len: int, device) -> Iterator[tuple]:
    """Yield (batch slice, head slice, q0, q1, key token indices) per active block row.

    Rows with no active key block are yielded with an empty index tensor. Broadcast pattern
    dims (size 1) cover every batch/head at once, so a shared pattern costs one pass.
    """
    active = (lists.block_class != SKIP).cpu()
    Bp, Hp, nq, _ = active.shape
    offsets = torch.arange(block_size, device=device)
    for bp in range(Bp):
        bsl = slice(None) if Bp == 1 else slice(bp, bp + 1)
        for hp in range(Hp):
            hsl = slice(None) if Hp == 1 else slice(hp, hp + 1)
            for qb in range(nq):
                blocks = active[bp, hp, qb].nonzero().flatten().to(device)
                tokens = (blocks[:, None] * block_size + offsets[None, :]).flatten()
                tokens = tokens[tokens < key_len]
                q0 = qb * block_size
                yield bsl, hsl, q0, min(q0 + block_size, query_len), tokens


def _probabilities(qt, kt, tokens, q0, scale, is_causal, lse_rows=None):
    """Scores -> (p, lse) for one block row, in the accumulator dtype.

    qt [b, h, m, Dk], kt [b, h, n, Dk], tokens [n]. If lse_rows is given (backward) it is
    used instead of recomputing the log-sum-exp. Rows with no allowed key get p = 0.
    """
    s = torch.matmul(qt, kt.transpose(-1, -2)) * scale
    if is_causal:
        rows = torch.arange(q0, q0 + qt.shape[-2], device=qt.device)
        s = s.masked_fill(tokens[None, :] > rows[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1) if lse_rows is None else lse_rows
    dead = torch.isinf(lse) & (lse < 0)
    p = torch.exp(s - torch.where(dead, torch.zeros_like(lse), lse)[..., None])
    p = p.masked_fill(dead[..., None], 0.0)
    return p, lse


def block_sparse_attention_forward_reference(q, k, v, lists: BlockLists, *, block_size: int,
                                             scale: float, is_causal: bool, y, lse) -> None:
    """Writes y [B,H,Nq,Dv] and lse [B,H,Nq] for q [B,H,Nq,Dk], k [B,H,Nk,Dk], v [B,H,Nk,Dv]."""
    acc = _accumulator(q.dtype)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    for bsl, hsl, q0, q1, tokens in _block_rows(lists, B, H, block_size, Nq, Nk, q.device):
        if tokens.numel() == 0:
            y[bsl, hsl, q0:q1].zero_()
            lse[bsl, hsl, q0:q1].fill_(float("-inf"))
            continue
        qt = q[bsl, hsl, q0:q1].to(acc)
        kt = k[bsl, hsl].index_select(2, tokens).to(acc)
        vt = v[bsl, hsl].index_select(2, tokens).to(acc)
        p, row_lse = _probabilities(qt, kt, tokens, q0, scale, is_causal)
        y[bsl, hsl, q0:q1] = torch.matmul(p, vt).to(y.dtype)
        lse[bsl, hsl, q0:q1] = row_lse.to(lse.dtype)


def block_sparse_attention_backward_reference(q, k, v, y, lse, dy, lists: BlockLists, *,
                                              block_size: int, scale: float, is_causal: bool,
                                              dq, dk, dv) -> None:
    """Writes dq, dk, dv (shaped like q, k, v) from the upstream gradient dy [B,H,Nq,Dv].

    Uses the forward's lse to rebuild probabilities block row by block row; dk/dv are
    accumulated in the accumulator dtype with index_add_ over unique token indices per step
    (deterministic: each step adds every index at most once, steps run in a fixed order).
    """
    acc = _accumulator(q.dtype)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    dk_acc = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv_acc = torch.zeros(v.shape, dtype=acc, device=v.device)
    # delta_i = sum_d dy_id * y_id = sum_j p_ij dp_ij: the softmax-Jacobian correction.
    delta = (dy.to(acc) * y.to(acc)).sum(-1)
    for bsl, hsl, q0, q1, tokens in _block_rows(lists, B, H, block_size, Nq, Nk, q.device):
        if tokens.numel() == 0:
            dq[bsl, hsl, q0:q1].zero_()
            continue
        qt = q[bsl, hsl, q0:q1].to(acc)
        kt = k[bsl, hsl].index_select(2, tokens).to(acc)
        vt = v[bsl, hsl].index_select(2, tokens).to(acc)
        dyt = dy[bsl, hsl, q0:q1].to(acc)
        p, _ = _probabilities(qt, kt, tokens, q0, scale, is_causal, lse[bsl, hsl, q0:q1].to(acc))
        dv_acc[bsl, hsl].index_add_(2, tokens, torch.matmul(p.transpose(-1, -2), dyt))
        dp = torch.matmul(dyt, vt.transpose(-1, -2))
        ds = p * (dp - delta[bsl, hsl, q0:q1, None])
        dq[bsl, hsl, q0:q1] = (torch.matmul(ds, kt) * scale).to(dq.dtype)
        dk_acc[bsl, hsl].index_add_(2, tokens, torch.matmul(ds.transpose(-1, -2), qt) * scale)
    dk.copy_(dk_acc)
    dv.copy_(dv_acc)
