"""The cpu backend's softcapped problems: one group of block rows in matmuls and in-place ops.

A logit softcap (Gemma 2, Grok: score = cap * tanh(scale * q.k / cap)) is not an additive
term, so PyTorch's fused CPU kernel cannot apply it. These two functions take the fused
kernel's place for one group of the cpu backend's walk (cpu_fused._group_problems: same
gathered K/V, same additive mask of PARTIAL cells, ALiBi and bias included, same layout in
and out), so everything around them -- grouping, GQA packing, sinks folded in afterwards,
dK / dV added back, the non-finite check and its reference redo -- is shared.

Compared with the reference backend (which states the same math), a group's score tile is
computed once per direction: the backward takes dQ, dK and dV from one recomputed tile
(the reference walks query rows for dQ and key rows for dK / dV: two tiles), and the
elementwise passes run in place on the tile. Everything is in the accumulator dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common.numerics import accumulator_dtype


def _sigmoid_scores(q: torch.Tensor, k: torch.Tensor, scale: float,
                    softcap: float) -> torch.Tensor:
    """sigmoid(2 scale q.k / cap) as a new tile [n, M, L] for q [n, M, D], k [n, L, D].

    cap * tanh(x) = 2 cap * sigmoid(2x) - cap, and a softmax ignores the constant -cap (lse
    moves by it), so the capped scores are 2 cap * sigmoid(.) up to that shift. Why not
    tanh: PyTorch's CPU tanh_ takes ~2.8 ns per element on this project's machine, sigmoid_
    0.4 (exp_ 0.8): the cap's pass was most of the forward's elementwise time. The price: a
    score's absolute rounding error is ~cap * 1e-7 in float32 (sigmoid's resolution near
    1/2) instead of ~|score| * 1e-7; y stays within the float32 tests' bound at caps up to
    100 (Gemma 2 uses 50)."""
    return torch.bmm(q * (2.0 * scale / softcap), k.transpose(1, 2)).sigmoid_()


def _flat(t: torch.Tensor, acc) -> torch.Tensor:
    """[G, P, n, d] -> [G*P, n, d] in acc: a view when G and P merge (a KV cache's strided
    keys stay in place: bmm reads row strides), else one copy."""
    return t.to(acc).reshape(-1, *t.shape[2:])


def _add_mask(s: torch.Tensor, mask: Optional[torch.Tensor], G: int) -> None:
    """s [G*P, M, L] += mask [G, 1|P, M, L] (None: nothing)."""
    if mask is not None:
        s.view(G, -1, *s.shape[1:]).add_(mask)


def capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: Optional[torch.Tensor], scale: float,
                     softcap: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [G, P, M, Dv], lse [G, P, M]) of softmax(cap * tanh(scale q k^T / cap) + mask) v
    for q [G, P, M, D], k / v [G, P, L, D|Dv] and the additive mask [G, 1|P, M, L] (None:
    nothing cut), in the accumulator dtype. A row whose every score is -inf gets out = 0,
    lse = -inf; a NaN score makes its row NaN."""
    acc = accumulator_dtype(q.dtype)
    G, P, M = q.shape[:3]
    s = _sigmoid_scores(_flat(q, acc), _flat(k, acc), scale, softcap).mul_(2.0 * softcap)
    _add_mask(s, mask, G)
    top = s.amax(-1, keepdim=True)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)  # empty rows
    total = s.sub_(top).exp_().sum(-1, keepdim=True)
    out = torch.bmm(s, _flat(v, acc)).div_(torch.where(total == 0, torch.ones_like(total),
                                                       total))
    lse = (top + total.log()).sub_(softcap)  # back from the shifted scores (docstring above)
    return out.view(G, P, M, -1), lse.view(G, P, M)


def capped_attention_backward(dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor, y: torch.Tensor, lse: torch.Tensor,
                              mask: Optional[torch.Tensor], scale: float, softcap: float):
    """(dq, dk, dv) of capped_attention's problem in the accumulator dtype, from the final y
    [G, P, M, Dv] and lse [G, P, M] (sinks folded in: P is rebuilt from them, so the sinks'
    share of each row is already out of it) and the upstream dy. lse of a row that sees
    nothing: any finite value (its masked P is 0 whatever it is). dk / dv [G, P, L, D|Dv]:
    the gradients of each problem's gathered keys and values (the caller adds them back).

    dS = P * (dP - rowsum(dy * y)); through the cap, d score / d (q.k) = scale * (1 - t^2)
    with t = tanh(scale q.k / cap) = 2 sigma - 1, i.e. 4 scale * sigma (1 - sigma)."""
    acc = accumulator_dtype(q.dtype)
    G, P, M = q.shape[:3]
    q3, k3, v3, dy3 = (_flat(t, acc) for t in (q, k, v, dy))
    delta = (dy3 * _flat(y, acc)).sum(-1, keepdim=True)
    sig = _sigmoid_scores(q3, k3, scale, softcap)
    p = torch.mul(sig, 2.0 * softcap)
    _add_mask(p, mask, G)
    p.sub_(lse.to(acc).reshape(-1, M, 1) + softcap).exp_()
    ds = torch.bmm(dy3, v3.transpose(1, 2)).sub_(delta).mul_(p)
    ds.mul_(sig.addcmul_(sig, sig, value=-1.0))  # * sigma (1 - sigma)
    dq = torch.bmm(ds, k3).mul_(4.0 * scale)
    dk = torch.bmm(ds.transpose(1, 2), q3).mul_(4.0 * scale)
    dv = torch.bmm(p.transpose(1, 2), dy3)
    return (dq.view(G, P, M, -1), dk.view(G, P, *dk.shape[1:]),
            dv.view(G, P, *dv.shape[1:]))
