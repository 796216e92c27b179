"""Independent dense oracle for block-sparse attention, used only by tests.

It expands the block pattern to a token mask and runs plain masked softmax attention.
Run in float64 it is the ground truth; run in the input dtype it gives the error a
same-dtype PyTorch computation makes, which sets the tolerance (FlashAttention's rule).
"""

from __future__ import annotations

import math

import torch


def token_mask(pattern4d: torch.Tensor, query_len: int, key_len: int, block_size: int,
               is_causal: bool, window_size=(-1, -1), sink_tokens: int = 0) -> torch.Tensor:
    """bool [Bp, Hp, Nq, Nk]: True where query i may attend key j. is_causal: False, True
    (top-left: j <= i) or "bottom_right" (j <= i + Nk - Nq). window_size (left, right),
    flash-attn's convention (-1 unbounded), centred on the top-left diagonal when is_causal is
    True and on the bottom-right one otherwise; the first ``sink_tokens`` keys stay visible."""
    rows = torch.arange(query_len, device=pattern4d.device) // block_size
    cols = torch.arange(key_len, device=pattern4d.device) // block_size
    mask = pattern4d.bool()[:, :, rows][:, :, :, cols]
    if is_causal:
        i = torch.arange(query_len, device=pattern4d.device)[:, None]
        j = torch.arange(key_len, device=pattern4d.device)[None, :]
        offset = key_len - query_len if is_causal == "bottom_right" else 0
        mask = mask & (j <= i + offset)
    left, right = window_size
    if left >= 0 or right >= 0:
        i = torch.arange(query_len, device=pattern4d.device)[:, None]
        j = torch.arange(key_len, device=pattern4d.device)[None, :]
        d = j - i - (0 if is_causal is True else key_len - query_len)
        inside = ((d >= -left) | (left < 0)) & ((d <= right) | (right < 0))
        mask = mask & (inside | (j < sink_tokens))
    return mask


def token_rule_mask(batch: int, query_len: int, key_len: int, is_causal=False, *,
                    document_ids=None, query_range=None, key_range=None,
                    prefix_lengths=None) -> torch.Tensor:
    """bool [B, 1, Nq, Nk] of the per-token rules, stated directly from their definitions:
    equal non-negative document ids; query and key indices inside [start, end) of their batch
    row; and the causal rule (j <= i + offset), which prefix_lengths P relaxes to
    (j <= i + offset or j < P). Without is_causal the causal term is all True."""
    i = torch.arange(query_len)[None, :, None]
    j = torch.arange(key_len)[None, None, :]
    ok = torch.ones(batch, query_len, key_len, dtype=torch.bool)
    if document_ids is not None:
        qd, kd = document_ids if isinstance(document_ids, (tuple, list)) else \
            (document_ids, document_ids)
        qd, kd = (d.cpu().long().reshape(-1, d.shape[-1]) for d in (qd, kd))
        ok = ok & (qd[:, :, None] == kd[:, None, :]) & (qd[:, :, None] >= 0) & \
            (kd[:, None, :] >= 0)

    def per_batch(x, default):
        x = default if x is None else x
        return torch.as_tensor(x).cpu().long().reshape(-1)[:, None, None]
    for rng, idx, n in ((query_range, i, query_len), (key_range, j, key_len)):
        if rng is not None:
            ok = ok & (idx >= per_batch(rng[0], 0)) & (idx < per_batch(rng[1], n))
    if is_causal:
        offset = key_len - query_len if is_causal == "bottom_right" else 0
        causal = j <= i + offset
        if prefix_lengths is not None:
            causal = causal | (j < per_batch(prefix_lengths, 0))
        ok = ok & causal
    return ok[:, None]


def as_4d(pattern: torch.Tensor, query_len: int, key_len: int, block_size: int) -> torch.Tensor:
    nq = -(-query_len // block_size)
    nk = -(-key_len // block_size)
    if pattern.dim() == 3:
        pattern = pattern.reshape(pattern.shape[0], pattern.shape[1], nq, nk)
    return pattern


def dense_attention(q, k, v, pattern, block_size, is_causal=False, scale=None, dtype=None,
                    window_size=(-1, -1), sink_tokens=0, extra_mask=None, softcap=0.0,
                    alibi_slopes=None, sinks=None, live_rows=None, bias=None):
    """Returns (y, lse) computed densely in `dtype` (default float64).

    Fully masked rows give y = 0 and lse = -inf. q/k/v are [B, H, N, D]. extra_mask: bool
    broadcastable to [B, H, Nq, Nk], ANDed with the pattern's token mask.
    Score modifiers, from their definitions (common.score_mods): softcap: s = c tanh(s / c);
    alibi_slopes [H] / [B, H]: s -= slope |j - i - off| (off = 0 for is_causal=True, else
    Nk - Nq); sinks [H]: one more logit per row in the denominator (rows of ``live_rows``,
    bool [B|1, Nq], all by default), so an empty live row gets y = 0, lse = sink; bias
    (broadcastable to [B, H, Nq, Nk]): added after the cap.
    """
    dtype = dtype or torch.float64
    Nq, Nk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = token_mask(as_4d(pattern, Nq, Nk, block_size), Nq, Nk, block_size, is_causal,
                      window_size, sink_tokens)
    if extra_mask is not None:  # more token rules, ANDed (e.g. token_rule_mask)
        mask = mask & extra_mask.to(mask.device)
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    s = (qd @ kd.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(s.device, dtype)
    if alibi_slopes is not None:
        i = torch.arange(Nq, device=s.device)[:, None]
        j = torch.arange(Nk, device=s.device)[None, :]
        off = 0 if is_causal is True else Nk - Nq
        slopes = alibi_slopes.to(s.device, dtype).reshape(-1, q.shape[1], 1, 1)
        s = s - slopes * (j - i - off).abs().to(dtype)
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.to(s.device, dtype).view(1, -1, 1, 1).expand(s.shape[0], -1, Nq, 1)
        if live_rows is not None:
            live = live_rows.to(s.device).reshape(-1, 1, Nq, 1)
            sink = torch.where(live, sink, float("-inf"))
        s = torch.cat([s, sink], -1)
    # Stable softmax that stays differentiable (and NaN-free) on fully masked rows.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    if sinks is not None:
        p = p[..., :-1]  # the sink's probability has no value
    y = p @ vd
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    lse = (torch.log(denom.to(lse_dtype)) + m.to(lse_dtype)).squeeze(-1)
    return y, lse


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max-abs error over max(reference max-abs, 1) (NaN -> inf).

    Test inputs are O(1) random normals, so outputs and gradients are O(1); the floor of 1
    keeps an all-zero reference (e.g. dq of a row that sees a single key) from turning
    rounding noise into an infinite relative error.
    """
    out = out.double()
    ref = ref.double()
    if torch.isnan(out).any():
        return float("inf")
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(out)) or not torch.equal(out[~finite], ref[~finite]):
        return float("inf")
    diff = (out[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
    return diff / max(ref[finite].abs().max().item() if finite.any() else 1.0, 1.0)


ROUNDING_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def assert_matches_oracle(out, ref64, same_dtype, *, factor=2.0, what="y"):
    """Kernel error vs float64 <= factor * (same-dtype PyTorch error) + rounding floor."""
    err = rel_error(out, ref64)
    base = rel_error(same_dtype, ref64)
    floor = ROUNDING_FLOOR[out.dtype if out.dtype in ROUNDING_FLOOR else torch.float32]
    bound = factor * base + floor
    assert err <= bound, f"{what}: relative error {err:.3e} > bound {bound:.3e} (pytorch same-dtype {base:.3e})"
