"""Autograd glue: block-sparse attention as a torch.library custom op with its backward.

Registering a custom op (with a fake implementation for shape propagation) lets
torch.compile keep a model that calls block_sparse_attention in one graph, forward and
backward; eager mode goes through the same op. The op bodies look up the selected plan for
the problem (plans are cached per descriptor) and let it launch; the pattern's compacted
block lists are cached by the plan per pattern tensor, so forward and backward share them.
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
    desc = plan.descriptor
    y = torch.empty(desc.output_shape(), dtype=q.dtype, device=q.device)
    lse = torch.empty(desc.lse_shape(), dtype=desc.lse_dtype, device=q.device)
    plan._forward(q, k, v, plan.block_lists(pattern), y, lse)
    return y, lse


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
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    plan._backward(q, k, v, y, lse, dy, plan.block_lists(pattern), dq, dk, dv)
    return dq, dk, dv


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
