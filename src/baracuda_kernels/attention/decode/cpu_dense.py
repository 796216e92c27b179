"""CPU decode against a cache: one call of PyTorch's fused flash CPU kernel.

A step on the CPU whose rule does not depend on the query row -- one query per row (decode)
or a non-causal call -- is dense attention of the new queries over the cache's first
max(L_b) keys with a per-(row, key) mask: keys past the row's length L_b, keys its
``key_mask`` hides (padding kept in the cache), and, for one query at position L_b - 1, keys
outside its window (sink tokens excepted). The general path turns the same call into a
block-sparse call with token rules (a pattern tensor, block lists, row groups: a millisecond
or more of Python and small tensor ops per call, more than the arithmetic of a 2k-key step);
this path hands the cache's views and one broadcast [B, 1, 1, L] additive mask (none when
nothing is hidden) straight to ``aten._scaled_dot_product_flash_attention_for_cpu``. GQA
rides as rows: the Hkv groups' query heads become G * Nq query rows of their K/V head (no
K/V copy), exact because no rule tells the rows apart. Learnable sinks (one logit per head
in every row's denominator) are folded in after the call. A softcap (not an additive term)
replaces the fused call by the cpu backend's capped matmuls (block_sparse.cpu_capped) on
the same views, one batch row at a time (a KV cache's batch and heads do not merge into one
bmm batch without a copy of the cache). ALiBi and block patterns take the general path.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ...core import InvalidProblem
from ..block_sparse.cpu_capped import capped_attention
from ..common.numerics import accumulator_dtype, all_finite
from ..common.score_mods import check_softcap, fold_sinks

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def cpu_dense_decode_takes(q, keys, values, is_causal, backend, window_size, softcap,
                           alibi_slopes, sinks, scale, block_pattern) -> bool:
    """Whether this call runs as one fused CPU call (module docstring); anything else, and
    anything malformed, takes the general path (which names what is wrong)."""
    if backend not in (None, "cpu") or q.device.type != "cpu" or q.numel() == 0:
        return False
    if block_pattern is not None or alibi_slopes is not None:
        return False
    try:
        check_softcap(softcap)
    except InvalidProblem:
        return False  # the general path names what is wrong
    if sinks is not None and not (isinstance(sinks, torch.Tensor) and sinks.is_floating_point()
                                  and sinks.device.type == "cpu"
                                  and tuple(sinks.shape) == (q.shape[2],)):
        return False  # the general path names what is wrong
    if q.shape[1] != 1 and (is_causal or window_size is not None):
        return False  # the rule differs per query row: the general path places it
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        return False
    if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)) \
            or q.dtype not in _DTYPES or keys.dtype != q.dtype or values.dtype != q.dtype \
            or keys.device.type != "cpu" or values.device.type != "cpu":
        return False
    B, _, H, D = q.shape
    if keys.dim() != 4 or values.dim() != 4 or keys.shape[0] != B or values.shape[0] != B \
            or keys.shape[1] != values.shape[1] or H % keys.shape[1] \
            or keys.shape[3] != D or values.shape[3] != D or keys.shape[2] != values.shape[2]:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad
                                    or values.requires_grad
                                    or (sinks is not None and sinks.requires_grad)):
        return False  # the block-sparse path carries the gradient
    return True


def cpu_dense_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, total,
                     key_mask: Optional[torch.Tensor], window_size, sink_tokens: int,
                     scale: Optional[float], return_lse: bool,
                     sinks: Optional[torch.Tensor] = None, softcap: Optional[float] = None):
    """y [B, Nq, H, D] (and lse [B, H, Nq], float32; float64 for float64) of q [B, Nq, H, D]
    over keys / values [B, Hkv, Ncache, D] (the cache's head-major views), row b holding
    ``total[b]`` keys (an int: every row), ``key_mask`` bool [B, Ncache] or None, the window
    ``window_size`` (validated (left, right), -1 unbounded; one query per row) with
    ``sink_tokens``, learnable ``sinks`` [H] or None, ``softcap`` (None / 0: none). Rows that
    see no key: y = 0, lse = -inf (lse = sink with sinks)."""
    B, Nq, H, D = q.shape
    Hkv = keys.shape[1]
    G = H // Hkv
    if isinstance(total, int):
        L, lengths = total, None
    else:
        L, lengths = int(total.max()), total
    L = min(L, keys.shape[2])
    ok = None  # bool [B, L]: the keys each row sees (None: all of them)
    j = torch.arange(L) if lengths is not None or window_size is not None else None
    if lengths is not None and bool((lengths < L).any()):
        ok = j[None, :] < lengths[:, None]
    if key_mask is not None:
        ok = key_mask[:, :L] if ok is None else ok & key_mask[:, :L]
    if window_size is not None:
        left, right = window_size
        pos = (lengths if lengths is not None else torch.full((B,), L)) - 1  # the one query
        d = j[None, :] - pos[:, None]
        inside = torch.ones_like(d, dtype=torch.bool)
        if left >= 0:
            inside &= d >= -left
        if right >= 0:
            inside &= d <= right
        inside |= j[None, :] < sink_tokens
        ok = inside if ok is None else ok & inside
    acc = accumulator_dtype(q.dtype)
    mask = None
    if ok is not None and not bool(ok.all()):
        mask = torch.zeros((B, 1, 1, L), dtype=acc).masked_fill_(~ok[:, None, None, :],
                                                                  float("-inf"))
    # [B, Nq, Hkv, G, D] -> [B, Hkv, G * Nq, D]: query head h = kv * G + g (h // G reads kv).
    rows = q.reshape(B, Nq, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Nq, D)
    if L == 0:
        out = rows.new_zeros(rows.shape)
        lse = torch.full(rows.shape[:3], float("-inf"), dtype=acc)
    elif softcap:
        scale = D ** -0.5 if scale is None else float(scale)
        parts = [capped_attention(rows[b:b + 1], keys[b:b + 1, :, :L], values[b:b + 1, :, :L],
                                  None if mask is None else mask[b:b + 1], scale, softcap)
                 for b in range(B)]
        out = torch.cat([o for o, _ in parts]).to(q.dtype)
        lse = torch.cat([row_lse for _, row_lse in parts])
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            rows, keys[:, :, :L], values[:, :, :L], 0.0, False, attn_mask=mask,
            scale=D ** -0.5 if scale is None else float(scale))
        if mask is not None:  # rows that see nothing: lse = -inf (the kernel gives 0 / 0)
            lse = torch.where(ok.any(-1)[:, None, None], lse, float("-inf"))
    if mask is not None and not all_finite(out):
        # A key or value the mask hides is NaN / inf (e.g. never-written cache slots of a
        # shorter row): the kernel's -inf is added to the score (NaN stays NaN) and 0 * inf
        # is NaN. The caller's block-sparse path applies the exact rule.
        return None
    y = out.view(B, Hkv, G, Nq, D).permute(0, 3, 1, 2, 4).reshape(B, Nq, H, D)
    lse = lse.reshape(B, H, Nq)
    if sinks is not None:
        fold_sinks(y.transpose(1, 2), lse, sinks)
    if not return_lse:
        return y
    return y, (lse if q.dtype == torch.float64 else lse.float())
