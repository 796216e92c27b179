"""The functional, autograd-aware entry point: masked_sdpa(q, k, v, attn_mask, ...)."""

from __future__ import annotations

from typing import Optional

import torch

from ...core import InvalidProblem, PlanCache, resolve_device
from ..block_sparse.functional import block_sparse_attention
from ..block_sparse.prepared import prepare_pattern
from ..common.problem import causal_mode
from ..patterns.checks import check_block_size

# (Nq, Nk, block_size, is_causal, device) -> the all-active PreparedPattern of that geometry
_ALL_ACTIVE = PlanCache(max_plans=16)


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor, *,
                block_pattern=None, block_size: int = 128, is_causal=False,
                scale: Optional[float] = None, softcap: Optional[float] = None,
                return_lse: bool = False, backend: Optional[str] = None):
    """Scaled-dot-product attention with an additive mask, differentiable in q, k, v and a
    float mask: y = softmax(scale * q @ k^T + attn_mask) @ v.

    Args:
        q: [B, H, Nq, Dk] float16, bfloat16, float32 or float64; k: [B, Hkv, Nk, Dk],
            v: [B, Hkv, Nk, Dv] (GQA when Hkv < H, as ``block_sparse_attention``).
        attn_mask: broadcastable to [B, H, Nq, Nk] (B, H, Nq may be 1; the key dim full).
            Float (float32 or q's dtype): added to the scores, -inf masks a pair (T5 /
            relative-position biases, ALiBi tables, padding masks); it gets a gradient when
            it requires one. Bool: True = the pair takes part (torch SDPA's convention),
            turned into a 0 / -inf float mask of q's dtype on every call (for masks with
            structure, block patterns and token rules cost far less: see
            ``block_sparse_attention``).
        block_pattern: None (every block) or a block pattern over blocks of ``block_size``
            (as ``block_sparse_attention`` takes it): blocks it leaves out are skipped, so
            a bias over a sparse layout costs only its active blocks.
        block_size: the pattern's block (and the tile of the all-active pattern).
        is_causal: False, True (top-left) or "bottom_right", ANDed with the mask.
        scale: softmax scale, default 1 / sqrt(Dk).
        softcap: float > 0: scores are capped (softcap * tanh(s / softcap)) before the mask
            is added.
        return_lse: also return lse [B, H, Nq] (float32; float64 for float64 inputs).
        backend: None (triton on CUDA, else reference), "triton" or "reference".

    Returns:
        y [B, H, Nq, Dv] (and lse). A row whose every pair is masked gives y = 0, lse = -inf
        and zero gradients.

    Example:
        >>> q = k = v = torch.randn(2, 4, 100, 32)
        >>> rel_bias = torch.randn(1, 4, 100, 100, requires_grad=True)   # learned, per head
        >>> y = masked_sdpa(q, k, v, rel_bias, is_causal=True)
        >>> keep = torch.rand(2, 1, 1, 100) > 0.2                           # bool: True = attend
        >>> y = masked_sdpa(q, k, v, keep)
    """
    if not isinstance(attn_mask, torch.Tensor):
        raise InvalidProblem(f"attn_mask is a {type(attn_mask).__name__}; expected a float or "
                             f"bool tensor broadcastable to [B, H, Nq, Nk].")
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=attn_mask.device) \
            .masked_fill_(~attn_mask, float("-inf"))
    pattern = block_pattern
    if pattern is None:
        check_block_size(block_size)
        pattern = _all_active(q.shape[-2], k.shape[-2], block_size, causal_mode(is_causal),
                              q.device)
    return block_sparse_attention(q, k, v, pattern, block_size=block_size, is_causal=is_causal,
                                  scale=scale, return_lse=return_lse, backend=backend,
                                  softcap=softcap, bias=attn_mask)


def _all_active(Nq: int, Nk: int, block_size: int, is_causal, device):
    """The all-active PreparedPattern of a geometry, prepared once (no pattern work per call)."""
    def build():
        nq, nk = max(1, -(-Nq // block_size)), max(1, -(-Nk // block_size))
        ones = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device)
        return prepare_pattern(ones, query_len=Nq, key_len=Nk, block_size=block_size,
                               is_causal=is_causal, device=device)
    return _ALL_ACTIVE.get((Nq, Nk, block_size, is_causal, resolve_device(device)), build)
