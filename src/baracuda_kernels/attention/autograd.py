"""Autograd glue: one torch.autograd.Function over a selected plan's forward and backward."""

from __future__ import annotations

import torch

from .block_lists import BlockLists


class BlockSparseAttentionFunction(torch.autograd.Function):
    """y, lse = f(q, k, v) for a fixed plan and pattern; gradients flow to q, k and v.

    lse is returned as a non-differentiable output (its gradient is not supported).
    """

    @staticmethod
    def forward(ctx, q, k, v, plan, lists: BlockLists):
        desc = plan.descriptor
        y = torch.empty(desc.output_shape(), dtype=q.dtype, device=q.device)
        lse = torch.empty(desc.lse_shape(), dtype=desc.lse_dtype, device=q.device)
        plan._forward(q, k, v, lists, y, lse)
        ctx.save_for_backward(q, k, v, y, lse)
        ctx.plan = plan
        ctx.lists = lists
        ctx.mark_non_differentiable(lse)
        return y, lse

    @staticmethod
    def backward(ctx, dy, _dlse):
        q, k, v, y, lse = ctx.saved_tensors
        dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
        if dy is None:
            dy = torch.zeros_like(y)
        ctx.plan._backward(q, k, v, y, lse, dy, ctx.lists, dq, dk, dv)
        # One gradient per forward input: q, k, v, then none for the plan and the lists.
        return dq, dk, dv, None, None
