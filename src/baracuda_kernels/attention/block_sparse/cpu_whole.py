"""The cpu backend's whole-problem path: a call that is dense attention runs as one call.

A block pattern whose every reachable block is active (all of them, or all on and below
the causal diagonal) under a plain rule -- no causal, or top-left causal (bottom-right with
Nq == Nk is the same diagonal; bottom-right with one query, a decode step, sees every
key) -- with no window, no token rules (documents, positions,
padding, bits) and no additive modifier (ALiBi, bias) is exactly dense (causal) attention.
The general path would still cut it into block-row groups, gather each row's K/V and mask
its diagonal blocks; PyTorch's fused CPU kernel does the whole problem in one call, with its
own causal skipping (2-core machine, H=8, N=2048, D=64, causal, 2 threads: forward 0.084 s
through the groups against 0.041 s in one call; backward 0.22 against 0.09). A transformers
model without a pattern on the CPU makes such calls on every layer.

Learnable sinks stay possible (folded in after the forward by the caller; the backward
reads the folded y and lse). GQA: one call per member g of the query-head group, the
queries of member g being a strided view [B, Hkv, Nq, D] of q (no K/V copy).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..common.numerics import accumulator_dtype
from ..common.problem import causal_offset
from .block_lists import SKIP, BlockLists
from .reference import _grouped


def whole_rule(lists: BlockLists, block_size: int, Nq: int, Nk: int, is_causal, window,
               mods) -> Optional[bool]:
    """The fused kernel's is_causal when this call is dense (causal) attention (module
    docstring), else None."""
    if window is not None or lists.tokens is not None or lists.block_class is None:
        return None
    if mods is not None and (mods.alibi_slopes is not None or mods.bias is not None):
        return None
    causal = bool(is_causal)
    offset = causal_offset(is_causal, Nq, Nk) if causal else 0
    if offset != 0:
        if Nq != 1 or offset < Nk - 1:
            return None
        causal = False  # one query after every key (a decode step): it sees them all
    if lists.mean_row_blocks is not None:  # prepared lists: decided once
        dense = lists.memo(("cpu-whole", block_size, Nq, Nk, causal),
                           lambda: _all_reachable_active(lists, block_size, Nq, causal))
    else:
        dense = _all_reachable_active(lists, block_size, Nq, causal)
    return causal if dense else None


def _all_reachable_active(lists: BlockLists, block_size: int, Nq: int, causal: bool) -> bool:
    """Every cell the rule reaches is active: under top-left causal, cell (i, j) is reached
    when key block j starts at or before query block i's last row."""
    classes = lists.block_class.cpu()
    active = classes != SKIP
    if not causal:
        return bool(active.all())
    nq, nk = classes.shape[-2:]
    last_row = torch.clamp((torch.arange(nq) + 1) * block_size - 1, max=Nq - 1)
    reached = torch.arange(nk)[None, :] * block_size <= last_row[:, None]
    return bool((active | ~reached).all())


def _members(Hkv: int, *tensors):
    """Per member g of the query-head groups: each [B, H, ...] tensor's heads g, g + G, ..
    as a [B, Hkv, ...] view (None stays None); the tensors themselves when H == Hkv."""
    if tensors[0].shape[1] == Hkv:
        yield tensors
        return
    grouped = [None if t is None else _grouped(t, Hkv) for t in tensors]
    for g in range(tensors[0].shape[1] // Hkv):
        yield tuple(None if t is None else t[:, :, g] for t in grouped)


def whole_forward(q, k, v, y, lse, causal: bool, scale: float) -> None:
    """y [B, H, Nq, D], lse [B, H, Nq] of q [B, H, Nq, D] over k / v [B, Hkv, Nk, D]."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    for qg, yg, lse_g in _members(k.shape[1], q, y, lse):
        out, row_lse = flash(qg, k, v, 0.0, causal, scale=scale)
        yg.copy_(out)
        lse_g.copy_(row_lse)


def whole_backward(q, k, v, y, lse, dy, dq, dk, dv, causal: bool, scale: float) -> None:
    """dq (or None) and dk / dv (or None: not wanted) of whole_forward's problem; y, lse the
    final ones (sinks folded in). dk / dv are written, not accumulated; a GQA group's
    members add up in the accumulator dtype."""
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    grouped = q.shape[1] != k.shape[1]
    sums = None
    if dk is not None and grouped:
        acc = accumulator_dtype(q.dtype)
        sums = (dk.zero_(), dv.zero_()) if dk.dtype == acc else \
            (torch.zeros(k.shape, dtype=acc), torch.zeros(v.shape, dtype=acc))
    for qg, yg, dyg, lse_g, dqg in _members(k.shape[1], q, y, dy, lse, dq):
        gq, gk, gv = flash_bwd(dyg, qg, k, v, yg, lse_g, 0.0, causal, scale=scale)
        if dqg is not None:
            dqg.copy_(gq)
        if sums is not None:
            sums[0].add_(gk)
            sums[1].add_(gv)
        elif dk is not None:
            dk.copy_(gk)
            dv.copy_(gv)
    if sums is not None and sums[0] is not dk:
        dk.copy_(sums[0])
        dv.copy_(sums[1])
