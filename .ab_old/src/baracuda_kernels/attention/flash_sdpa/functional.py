"""The functional, autograd-aware entry point: flash_sdpa(q, k, v, ...).

Two doors, chosen by the cached plan's backend:

* triton / reference: ``block_sparse_attention`` with the plan's prepared all-active
  pattern (its autograd boundary: any dy strides, lse differentiable, needs_input_grad,
  double backward refused, torch.compile through its custom op).
* torch_cudnn / torch_flash: ``library_autograd.library_attention`` (the library's own
  backward, on the graph its forward kept: no recomputation).
"""

from __future__ import annotations

from typing import Optional

import torch

from ...core import BackendKind, PlanCache, PlanPreference, resolve_device
from ..block_sparse.functional import block_sparse_attention
from ..common.autograd_pieces import autocast_inputs
from .descriptor import FlashSdpaDescriptor
from .library_autograd import library_attention
from ..common.problem import check_qkv
from .plan import FlashSdpaPlan
from .torch_sdpa import determinism_requested

_PLANS = PlanCache()  # (descriptor, device, backend, deterministic, need_lse) -> plan

def flash_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal=False,
               scale: Optional[float] = None, return_lse: bool = False,
               backend: Optional[str] = None, deterministic: Optional[bool] = None):
    """Dense scaled-dot-product attention with GQA, differentiable in q, k and v.

    y = softmax(scale * q @ k^T + mask) @ v with mask = -inf where key j > query i when
    ``is_causal`` (top-left, like torch SDPA's is_causal), on the fastest backend that can
    run the problem as asked: torch SDPA's cuDNN, then its flash kernel (CUDA, f16/bf16),
    then our Triton kernels (CUDA), then the pure-PyTorch reference.

    Args:
        q: [B, H, Nq, Dk] float16, bfloat16, float32 or float64.
        k: [B, Hkv, Nk, Dk], same dtype and device; H must be a multiple of Hkv (query head
            h reads K/V head h // (H // Hkv); Hkv = 1 is multi-query attention).
        v: [B, Hkv, Nk, Dv]. Any strides with a unit last stride.
        is_causal: True: query i attends key j only when j <= i (top-left);
            "bottom_right": only when j <= i + Nk - Nq (flash-attn's alignment; with
            Nq != Nk only our kernels run it).
        scale: softmax scale, default 1 / sqrt(Dk).
        return_lse: also return lse [B, H, Nq] (natural log, float32; float64 for float64),
            differentiable. Library backends cannot give it, so this picks triton/reference.
        backend: None (automatic) or "torch_cudnn", "torch_flash", "triton", "reference".
            A forced backend that cannot run the problem raises Unsupported with its reason.
        deterministic: True: bitwise-reproducible backends only (triton, reference), also
            implied by torch.use_deterministic_algorithms(True). None/False: any backend.

    Returns:
        y [B, H, Nq, Dv] in q's dtype, and lse when ``return_lse``.

    Example:
        >>> q = torch.randn(2, 8, 256, 64); k = v = torch.randn(2, 2, 256, 64)
        >>> y = flash_sdpa(q, k, v, is_causal=True)          # GQA: 4 query heads per K/V head
    """
    q, k, v, no_autocast = autocast_inputs(q, k, v)
    desc = FlashSdpaDescriptor.from_tensors(q, k, v, scale=scale, is_causal=is_causal)
    device = check_qkv(desc, q, k, v)
    kind = BackendKind.coerce(backend)
    with no_autocast:
        plan = plan_for(desc, device, kind, deterministic, bool(return_lse))
        if plan.computes_lse:
            y, lse = block_sparse_attention(q, k, v, plan.prepared_pattern, scale=desc.scale,
                                            backend=plan.backend.value, return_lse=True)
            return (y, lse) if return_lse else y
        return library_attention(plan, q, k, v)


def plan_for(desc: FlashSdpaDescriptor, device, backend: Optional[BackendKind],
             deterministic: Optional[bool], need_lse: bool) -> FlashSdpaPlan:
    """The cached plan of the functional API. The key holds whether determinism is asked for
    now (torch's global flag included), so flipping the flag selects again."""
    wants = determinism_requested(deterministic)
    return _PLANS.get((desc, device, backend, wants, need_lse), lambda: FlashSdpaPlan.select(
        desc, PlanPreference.DEFAULT, device=resolve_device(device), backend=backend,
        deterministic=True if wants else None, need_lse=need_lse))
