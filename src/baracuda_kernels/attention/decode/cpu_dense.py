"""CPU decode against a plain cache: one call of PyTorch's fused flash CPU kernel.

A decode step on the CPU whose rows all hold L keys (known on the host), with no window,
modifier, pattern or key mask, is dense attention of the new queries over the cache's first
L keys. The general path turns it into a block-sparse call (a pattern tensor, block lists,
row groups: about half a millisecond of Python and small tensor ops per call, more than the
arithmetic of a 2k-key step); this path hands the cache's views straight to
``aten._scaled_dot_product_flash_attention_for_cpu``. GQA rides as rows: the Hkv groups'
query heads become G * Nq query rows of their K/V head (no K/V copy), which is exact when
no causal rule tells the rows apart (Nq = 1, or is_causal False).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def cpu_dense_decode_takes(q, keys, values, L: int, is_causal, backend, window_size,
                           sink_tokens, softcap, alibi_slopes, sinks, scale) -> bool:
    """Whether this call is a plain CPU decode step (module docstring); anything else, and
    anything malformed, takes the general path (which names what is wrong)."""
    if backend not in (None, "cpu") or q.device.type != "cpu" or L < 1 or q.numel() == 0:
        return False
    if window_size is not None or sink_tokens or softcap or alibi_slopes is not None \
            or sinks is not None:
        return False
    if is_causal and q.shape[1] != 1:
        return False  # bottom-right causal rows differ: the general path places the diagonal
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        return False
    if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)) \
            or q.dtype not in _DTYPES or keys.dtype != q.dtype or values.dtype != q.dtype \
            or keys.device.type != "cpu" or values.device.type != "cpu":
        return False
    B, _, H, D = q.shape
    if keys.dim() != 4 or values.dim() != 4 or keys.shape[0] != B or values.shape[0] != B \
            or keys.shape[1] != values.shape[1] or H % keys.shape[1] \
            or keys.shape[3] != D or values.shape[3] != D or keys.shape[2] < L:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad
                                    or values.requires_grad):
        return False  # the block-sparse path carries the gradient
    return True


def cpu_dense_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, L: int,
                     scale: Optional[float], return_lse: bool):
    """y [B, Nq, H, D] (and lse [B, H, Nq], float32; float64 for float64) of q [B, Nq, H, D]
    over keys / values [B, Hkv, >= L, D] (the cache's head-major views), keys 0 .. L-1."""
    B, Nq, H, D = q.shape
    Hkv = keys.shape[1]
    G = H // Hkv
    # [B, Nq, Hkv, G, D] -> [B, Hkv, G * Nq, D]: query head h = kv * G + g (h // G reads kv).
    rows = q.reshape(B, Nq, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Nq, D)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        rows, keys[:, :, :L], values[:, :, :L], 0.0, False,
        scale=D ** -0.5 if scale is None else float(scale))
    y = out.view(B, Hkv, G, Nq, D).permute(0, 3, 1, 2, 4).reshape(B, Nq, H, D)
    if not return_lse:
        return y
    lse = lse.reshape(B, H, Nq)
    return y, (lse if q.dtype == torch.float64 else lse.float())
