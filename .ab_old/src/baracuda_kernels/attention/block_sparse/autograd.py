"""The autograd boundary of block-sparse attention: one contract, two doors.

Both doors call the same two functions, ``attention_forward`` and ``attention_backward``,
which hold the whole contract:

* the plan's device is made current around every launch (``plan.device_guard``);
* any upstream ``dy`` is accepted (the stride-0 expanded gradient of ``y.sum()`` included:
  it is made contiguous once), ``dy`` absent when only lse was used;
* lse is differentiable: its gradient enters the backward as a per-row term (no kernel of
  its own);
* ``needs_input_grad`` is respected: the dQ kernel runs only when q needs a gradient, the
  dK/dV kernel only when k or v does;
* outputs never alias inputs (fresh tensors);
* the backward is differentiable once: differentiating it again (double backward, e.g. a
  gradient penalty) raises ``Unsupported`` naming the limitation instead of a silent zero.

Autocast is handled before either door (functional.py): inputs are cast like torch SDPA
casts them and the internal float32 accumulation is never downcast.

Doors:

* ``BlockSparseAttentionFunction``: a plain autograd.Function for eager calls (the custom-op
  dispatcher costs host time, which shows at low density).
* ``block_sparse_attention_op``: a torch.library custom op with a fake implementation and a
  registered backward, so torch.compile keeps a model that calls block_sparse_attention in
  one graph, forward and backward. It takes the pattern tensor and rebuilds the lists from
  it (one Triton launch) in forward and backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...core import PlanCache, PlanPreference, Unsupported, resolve_device
from ..common.autograd_pieces import refuse_double_backward
from ..common.numerics import accumulator_dtype
from .descriptor import SdpaBlockSparseDescriptor
from .plan import SdpaBlockSparsePlan

_PLANS = PlanCache()  # (descriptor, device, backend) -> plan of the functional API

DOUBLE_BACKWARD_MESSAGE = (
    "block_sparse_attention is differentiable once: its backward has no derivative of its own "
    "(double backward, e.g. a gradient penalty through attention, is not implemented). Use "
    "torch.nn.functional.scaled_dot_product_attention with a dense mask for second-order "
    "gradients, or detach the attention output from the term you differentiate twice.")


def plan_for(desc: SdpaBlockSparseDescriptor, device, backend: Optional[str]) -> SdpaBlockSparsePlan:
    """The cached plan of the functional API for this problem."""
    return _PLANS.get((desc, device, backend), lambda: SdpaBlockSparsePlan.select(
        desc, PlanPreference.DEFAULT, device=resolve_device(device), backend=backend))


# ------------------------------------------------------------------------------ the contract
def attention_forward(plan: SdpaBlockSparsePlan, q, k, v, lists):
    """(y, lse) in fresh tensors, launched on the plan's device."""
    return plan._forward(q, k, v, lists)


def attention_backward(plan: SdpaBlockSparsePlan, lists, q, k, v, y, lse, dy, dlse,
                       needs_input_grad) -> tuple:
    """(dq, dk, dv), None where ``needs_input_grad`` (for q, k, v) says no gradient is wanted.

    dy / dlse: the upstream gradients of y and lse, either may be None (unused output)."""
    need_q, need_k, need_v = needs_input_grad[:3]
    if not (need_q or need_k or need_v) or (dy is None and dlse is None):
        return None, None, None
    if not torch.is_grad_enabled():
        dq, dk, dv = plan._backward(q, k, v, y, lse, dy, lists, dlse=dlse, need_dq=need_q,
                                    need_dkdv=need_k or need_v)
        return dq, (dk if need_k else None), (dv if need_v else None)
    # create_graph=True: compute the gradients without history, then tie them to the inputs
    # through a node that refuses to be differentiated (no silent zero second derivative).
    with torch.no_grad():
        grads = attention_backward(plan, lists, q, k, v, y, lse, dy, dlse, needs_input_grad)
    return refuse_double_backward(grads, (q, k, v, dy, dlse), DOUBLE_BACKWARD_MESSAGE)


# ------------------------------------------------------------------------------ eager door
class BlockSparseAttentionFunction(torch.autograd.Function):
    """Eager (y, lse) = f(q, k, v) for a selected plan and its block lists."""

    @staticmethod
    def forward(ctx, q, k, v, plan: SdpaBlockSparsePlan, lists):
        y, lse = attention_forward(plan, q, k, v, lists)
        ctx.save_for_backward(q, k, v, y, lse)
        ctx.plan, ctx.lists = plan, lists
        ctx.set_materialize_grads(False)  # an unused y or lse arrives as None: no zeros made
        return y, lse

    @staticmethod
    def backward(ctx, dy, dlse):
        q, k, v, y, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(ctx.plan, ctx.lists, q, k, v, y, lse, dy, dlse,
                                        ctx.needs_input_grad)
        # One gradient per forward input: q, k, v, then none for the plan and the lists.
        return dq, dk, dv, None, None


# ------------------------------------------------------------------------------ compiled door
def causal_arg(is_causal) -> str:
    """The causal rule as the custom ops carry it (a string: their schema has no union)."""
    return {False: "none", True: "top_left"}.get(is_causal, is_causal)


def _plan(q, k, v, block_size, scale, causal: str, backend, window_left=-1, window_right=-1,
          sink_tokens=0) -> SdpaBlockSparsePlan:
    is_causal = False if causal == "none" else causal
    desc = SdpaBlockSparseDescriptor.from_tensors(
        q, k, v, block_size=block_size, scale=scale, is_causal=is_causal,
        window_size=(window_left, window_right), sink_tokens=sink_tokens)
    return plan_for(desc, q.device, backend or None)


@torch.library.custom_op("baracuda::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              pattern: torch.Tensor, block_size: int, scale: float,
                              is_causal: str, backend: str, window_left: int = -1,
                              window_right: int = -1, sink_tokens: int = 0
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, lse) for a validated problem; pattern is a checked bool/uint8 [Bp, Hp, nq, nk]."""
    plan = _plan(q, k, v, block_size, scale, is_causal, backend, window_left, window_right,
                 sink_tokens)
    return attention_forward(plan, q, k, v, plan.block_lists(pattern))


@block_sparse_attention_op.register_fake
def _(q, k, v, pattern, block_size, scale, is_causal, backend, window_left=-1, window_right=-1,
      sink_tokens=0):
    lse_dtype = accumulator_dtype(q.dtype)
    y = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    return y, q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.custom_op("baracuda::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, y: torch.Tensor, lse: torch.Tensor,
        dy: Optional[torch.Tensor], dlse: Optional[torch.Tensor], pattern: torch.Tensor,
        block_size: int, scale: float, is_causal: str, backend: str, need_dq: bool,
        need_dkdv: bool, window_left: int = -1, window_right: int = -1,
        sink_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv); a gradient that is not needed comes back as an empty tensor."""
    plan = _plan(q, k, v, block_size, scale, is_causal, backend, window_left, window_right,
                 sink_tokens)
    grads = attention_backward(plan, plan.block_lists(pattern), q, k, v, y, lse, dy, dlse,
                               (need_dq, need_dkdv, need_dkdv))
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@block_sparse_attention_backward_op.register_fake
def _(q, k, v, y, lse, dy, dlse, pattern, block_size, scale, is_causal, backend, need_dq,
      need_dkdv, window_left=-1, window_right=-1, sink_tokens=0):
    def grad(ref, needed):
        return torch.empty_like(ref, memory_format=torch.contiguous_format) if needed \
            else q.new_empty(0)
    return grad(q, need_dq), grad(k, need_dkdv), grad(v, need_dkdv)


def _refuse(ctx, *grads):
    raise Unsupported(DOUBLE_BACKWARD_MESSAGE)


def _keep_nothing(ctx, inputs, output):
    pass


block_sparse_attention_backward_op.register_autograd(_refuse, setup_context=_keep_nothing)


def _setup_context(ctx, inputs, output):
    q, k, v, pattern, block_size, scale, is_causal, backend, *window = inputs
    y, lse = output
    ctx.save_for_backward(q, k, v, y, lse, pattern)
    ctx.static = (block_size, scale, is_causal, backend)
    ctx.window = tuple(window)  # (window_left, window_right, sink_tokens) as given


def _backward(ctx, dy, dlse):
    q, k, v, y, lse, pattern = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    dq, dk, dv = block_sparse_attention_backward_op(q, k, v, y, lse, dy, dlse, pattern,
                                                    *ctx.static, need_q, need_k or need_v,
                                                    *ctx.window)
    # One gradient per op input: q, k, v, then none for the pattern, the four static
    # arguments and the window arguments that were passed.
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None,
            None, None, None, None, None) + (None,) * len(ctx.window)


block_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)
