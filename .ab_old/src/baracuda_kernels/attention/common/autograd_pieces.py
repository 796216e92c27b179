"""Autograd pieces the attention ops share: autocast handled like torch SDPA, and a tie that
makes a second derivative raise instead of silently being zero."""

from __future__ import annotations

import contextlib

import torch

from ...core import Unsupported


def autocast_inputs(q, k, v):
    """Under torch.autocast on q's device type, cast floating q/k/v to the autocast dtype as
    torch SDPA does (float64 stays), and return a context that turns autocast off for the
    call, so that the reference backend's float32 accumulation is not downcast by it.
    -> (q, k, v, context)"""
    device_type = q.device.type if isinstance(q, torch.Tensor) else "cpu"
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        enabled = False
    if not enabled:
        return q, k, v, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible and t.dtype != dtype else t
    return cast(q), cast(k), cast(v), torch.autocast(device_type, enabled=False)


def refuse_double_backward(grads: tuple, sources, message: str) -> tuple:
    """``grads`` (None where absent) tied to ``sources`` (the tensors that require grad among
    the backward's inputs) through a node whose own backward raises Unsupported(message):
    for a backward run with create_graph=True that has no derivative of its own."""
    sources = [t for t in sources if isinstance(t, torch.Tensor) and t.requires_grad]
    if not sources:
        return grads
    present = [g for g in grads if g is not None]
    tied = iter(_RefuseDoubleBackward.apply(message, len(present), *present, *sources))
    return tuple(None if g is None else next(tied) for g in grads)


class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity on the gradients; its own backward raises Unsupported(message)."""

    @staticmethod
    def forward(ctx, message: str, n: int, *tensors):
        ctx.message = message
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *_):
        raise Unsupported(ctx.message)
