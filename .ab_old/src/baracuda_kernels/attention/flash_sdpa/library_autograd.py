"""Autograd for plans on a library backend (torch SDPA forced to cuDNN or flash).

``LibrarySdpaFunction``'s forward runs torch SDPA under the forced backend *with autograd on*
(on detached aliases of the inputs that need a gradient) and keeps that small inner graph;
its backward asks torch for the gradients of that graph (``torch.autograd.grad``). So the
library's own backward kernel runs on the softmax statistics its forward saved: no
recomputation, and nothing extra is kept (the inner graph holds q, k, v and y, which alias
the caller's tensors and the output, plus the library's lse). The inner backward retains its
graph so that an outer ``backward(retain_graph=True)`` may run twice; it is freed with the
output's history. Used by ``flash_sdpa`` and by ``block_sparse_attention`` when it routes a
dense problem to a library backend.
"""

from __future__ import annotations

import torch

from ...core import Unsupported
from ..common.autograd_pieces import refuse_double_backward
from .plan import FlashSdpaPlan
from .torch_sdpa import torch_sdpa

DOUBLE_BACKWARD_MESSAGE = (
    "flash_sdpa is differentiable once: the backward of its library backends (torch SDPA "
    "cuDNN / flash) has no derivative of its own (double backward is not implemented). Use "
    "torch.nn.functional.scaled_dot_product_attention with the math backend for "
    "second-order gradients, or detach the attention output from the term you differentiate "
    "twice.")


def library_attention(plan: FlashSdpaPlan, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> torch.Tensor:
    """y of a library-backed plan (torch_cudnn / torch_flash), differentiable in q, k, v.
    The inputs must match the plan (``plan.can_implement(FlashSdpaArgs(q, k, v))``)."""
    if plan.computes_lse:
        raise Unsupported(f"library_attention runs library-backed plans; this plan runs on "
                          f"{plan.backend.value}. Call flash_sdpa, or plan.run.")
    keep_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return LibrarySdpaFunction.apply(q, k, v, plan, keep_graph)


class LibrarySdpaFunction(torch.autograd.Function):
    """y = torch SDPA(q, k, v) under the plan's forced library backend (see module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: FlashSdpaPlan, keep_graph: bool):
        ctx.set_materialize_grads(False)
        with plan.device_guard():
            if not keep_graph:
                return torch_sdpa(plan.backend, plan.descriptor, q, k, v)
            with torch.enable_grad():
                leaves = tuple(t.detach().requires_grad_(need)
                               for t, need in zip((q, k, v), ctx.needs_input_grad[:3]))
                y = torch_sdpa(plan.backend, plan.descriptor, *leaves)
        ctx.inner = (y, leaves)
        ctx.device_guard = plan.device_guard
        ctx.save_for_backward(q, k, v)  # only for the double-backward tie (no extra memory)
        return y.detach()

    @staticmethod
    def backward(ctx, dy):
        # One gradient per forward input: q, k, v, then none for the plan and keep_graph.
        if dy is None or not hasattr(ctx, "inner"):
            return None, None, None, None, None
        y, leaves = ctx.inner
        wanted = [t for t in leaves if t.requires_grad]
        if torch.is_grad_enabled():  # create_graph=True: refuse a second derivative clearly
            with torch.no_grad():
                grads = LibrarySdpaFunction.backward(ctx, dy)[:3]
            return refuse_double_backward(grads, (*ctx.saved_tensors, dy),
                                          DOUBLE_BACKWARD_MESSAGE) + (None, None)
        with ctx.device_guard():
            found = iter(torch.autograd.grad(y, wanted, dy, retain_graph=True))
        return tuple(next(found) if t.requires_grad else None for t in leaves) + (None, None)
