"""Autograd glue for block-sparse attention, two doors onto the same plan methods.

* ``block_sparse_attention_op``: a torch.library custom op (with a fake implementation for
  shape propagation and a registered backward), so torch.compile keeps a model that calls
  block_sparse_attention in one graph, forward and backward. Its bodies look up the cached
  plan for the problem and let it launch.
* ``BlockSparseAttentionFunction``: a plain autograd.Function for eager calls. The custom-op
  dispatcher costs a few hundred microseconds of host time per forward+backward on CPU,
  which shows on small or very sparse problems, so eager mode skips it.

Both cache the pattern's compacted block lists in the plan, so forward and backward share them.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core import PlanPreference
from .backends import resolve_device
from .descriptor import SdpaBlockSparseDescriptor
from .plan import SdpaBlockSparsePlan

_PLANS: dict = {}  # (descriptor, device, backend) -> plan; a plan is immutable once selected
_MAX_PLANS = 64


def plan_for(desc: SdpaBlockSparseDescriptor, device, backend: Optional[str]) -> SdpaBlockSparsePlan:
    """The cached plan of the functional API for this problem."""
    device = resolve_device(device)
    key = (desc, device, backend)
    plan = _PLANS.get(key)
    if plan is None:
        plan = SdpaBlockSparsePlan.select(desc, PlanPreference.DEFAULT, device=device, backend=backend)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan
    return plan


def _plan(q, k, v, block_size, scale, is_causal, backend) -> SdpaBlockSparsePlan:
    desc = SdpaBlockSparseDescriptor.from_tensors(q, k, v, block_size=block_size, scale=scale,
                                                  is_causal=is_causal)
    return plan_for(desc, q.device, backend or None)


@torch.library.custom_op("baracuda::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              pattern: torch.Tensor, block_size: int, scale: float,
                              is_causal: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, lse) for a validated problem; pattern is canonical bool [Bp, Hp, nq, nk]."""
    plan = _plan(q, k, v, block_size, scale, is_causal, backend)
    return plan._forward(q, k, v, plan.block_lists(pattern))


@block_sparse_attention_op.register_fake
def _(q, k, v, pattern, block_size, scale, is_causal, backend):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    y = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    return y, q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.custom_op("baracuda::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, y: torch.Tensor, lse: torch.Tensor,
        dy: torch.Tensor, pattern: torch.Tensor, block_size: int, scale: float, is_causal: bool,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the forward's y and lse and the upstream gradient dy."""
    plan = _plan(q, k, v, block_size, scale, is_causal, backend)
    return plan._backward(q, k, v, y, lse, dy, plan.block_lists(pattern))


@block_sparse_attention_backward_op.register_fake
def _(q, k, v, y, lse, dy, pattern, block_size, scale, is_causal, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, pattern, block_size, scale, is_causal, backend = inputs
    y, lse = output
    ctx.save_for_backward(q, k, v, y, lse, pattern)
    ctx.static = (block_size, scale, is_causal, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dy, _dlse):
    q, k, v, y, lse, pattern = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(y)
    dq, dk, dv = block_sparse_attention_backward_op(q, k, v, y, lse, dy, pattern, *ctx.static)
    # One gradient per op input: q, k, v, then none for pattern and the four static arguments.
    return dq, dk, dv, None, None, None, None, None


block_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


class BlockSparseAttentionFunction(torch.autograd.Function):
    """Eager (y, lse) = f(q, k, v) for a selected plan and its block lists."""

    @staticmethod
    def forward(ctx, q, k, v, plan: SdpaBlockSparsePlan, lists):
        y, lse = plan._forward(q, k, v, lists)
        ctx.save_for_backward(q, k, v, y, lse)
        ctx.plan, ctx.lists = plan, lists
        ctx.mark_non_differentiable(lse)
        return y, lse

    @staticmethod
    def backward(ctx, dy, _dlse):
        q, k, v, y, lse = ctx.saved_tensors
        dq, dk, dv = ctx.plan._backward(q, k, v, y, lse, dy, ctx.lists)
        # One gradient per forward input: q, k, v, then none for the plan and the lists.
        return dq, dk, dv, None, None
