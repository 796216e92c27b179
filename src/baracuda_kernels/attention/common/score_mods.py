"""Score modifiers: logit soft-capping, ALiBi, learnable attention sinks, an additive bias.

With all four, a computed score and a row's softmax are

    s_ij = scale * q_i . k_j
    s_ij <- softcap * tanh(s_ij / softcap)                  (softcap > 0; Gemma 2, Grok)
    s_ij <- s_ij + bias[b, h, i, j]                         (additive bias / float mask)
    s_ij <- s_ij - slope[b, h] * |j - i - off|              (ALiBi; off: the causal diagonal)
    lse_i = log(sum_j exp(s_ij) + exp(sink[h]))             (sinks; gpt-oss)
    y_i  = sum_j exp(s_ij - lse_i) v_j

The sink is one extra logit per head in every row's denominator with no value: it takes
probability mass without adding to y. A valid row with no allowed key gets y = 0 and
lse = sink[h] (padding rows, which take part in nothing, keep lse = -inf). ALiBi measures
the distance from the same diagonal as the sliding window: off = 0 with ``is_causal=True``
(top-left), else Nk - Nq (bottom-right, flash-attn's convention, which is bottom-right
always; the two agree when Nq == Nk); with token positions (varlen, prefix-LM) positions
replace indices. The gradient of a softcapped score goes through the tanh; sinks get a
gradient (``sinks_grad``); ALiBi slopes do not (as in flash-attn). The bias is added after
the cap (a mask must not be capped) and is read only in the blocks the pattern computes; its
gradient is dS, the gradient of the score (``BiasGradTarget``), summed over the dims the
bias broadcasts. A -inf bias masks the pair; a row whose every pair is -inf is empty
(y = 0, lse = -inf, or lse = sink with sinks), as under the block pattern.

Each modifier is a compile-time flag of the kernels: a call without it runs the kernel it
ran before. The descriptor states which are present (``ScoreModFlags``); the tensors travel
with the call (``ScoreMods``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...core import InvalidProblem
from .numerics import scale_args


def check_softcap(softcap) -> float:
    """softcap as a float: 0.0 (off) or a finite value > 0."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) \
            or not math.isfinite(softcap) or softcap < 0:
        raise InvalidProblem(
            f"softcap is {softcap!r}; expected a finite float > 0 (scores become "
            f"softcap * tanh(score / softcap), e.g. 50.0 for Gemma 2) or None / 0 for none.")
    return float(softcap)


@dataclass(frozen=True)
class ScoreMods:
    """The tensors of the modifiers of one call (None: absent).

    alibi_slopes: float32 ``[H]`` or ``[B, H]`` (per query head).
    sinks: ``[H]`` (any float dtype; computed in float32, float64 for f64 inputs), may
        require grad.
    bias: float32 or the inputs' dtype, broadcastable to ``[B, H, Nq, Nk]`` with any of
        B, H, Nq of size 1 (the key dim is full); may require grad. After ``check_for``:
        a 4-d view with a unit key stride.
    """

    alibi_slopes: Optional[torch.Tensor] = None
    sinks: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None

    @property
    def empty(self) -> bool:
        return self.alibi_slopes is None and self.sinks is None and self.bias is None

    def check_for(self, batch: int, heads: int, device, dtype, query_len: int = 0,
                  key_len: int = 0) -> "ScoreMods":
        """These modifiers checked for a problem (alibi as float32 [B|1, H], sinks as the
        accumulator dtype [H], bias as a 4-d view); typed errors that say the expected
        shape."""
        slopes = self.alibi_slopes
        if slopes is not None:
            if not isinstance(slopes, torch.Tensor) or slopes.dtype != torch.float32 \
                    or slopes.dim() not in (1, 2) or slopes.shape[-1] != heads \
                    or (slopes.dim() == 2 and slopes.shape[0] not in (1, batch)):
                raise InvalidProblem(
                    f"alibi_slopes is {_describe(slopes)}; expected a float32 tensor [{heads}] "
                    f"or [{batch}, {heads}] (one slope per query head, or per batch row and "
                    f"head), as flash-attn takes them.")
            if slopes.device != device:
                raise InvalidProblem(f"alibi_slopes is on {slopes.device}; expected {device} "
                                     f"like q. Fix: alibi_slopes.to(q.device).")
            slopes = slopes.reshape(-1, heads).contiguous()
        sinks = self.sinks
        if sinks is not None:
            if not isinstance(sinks, torch.Tensor) or not sinks.dtype.is_floating_point \
                    or tuple(sinks.shape) != (heads,):
                raise InvalidProblem(
                    f"sinks is {_describe(sinks)}; expected a float tensor [{heads}] (one "
                    f"learnable sink logit per query head, as gpt-oss).")
            if sinks.device != device:
                raise InvalidProblem(f"sinks is on {sinks.device}; expected {device} like q. "
                                     f"Fix: sinks.to(q.device).")
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            sinks = sinks.detach().to(acc).contiguous()
        bias = self.bias
        if bias is not None:
            bias = check_bias(bias, (batch, heads, query_len, key_len), device, dtype)
        return ScoreMods(slopes, sinks, bias)


def check_bias(bias, shape: tuple, device, dtype) -> torch.Tensor:
    """``bias`` as a 4-d view broadcastable to ``shape`` = (B, H, Nq, Nk) with a unit key
    stride (a copy only when the key dim is strided), detached; InvalidProblem otherwise."""
    B, H, Nq, Nk = shape
    want = f"[{B}|1, {H}|1, {Nq}|1, {Nk}]"
    if not isinstance(bias, torch.Tensor) or bias.dtype not in (torch.float32, dtype) \
            or not 1 <= bias.dim() <= 4:
        raise InvalidProblem(
            f"bias is {_describe(bias)}; expected a float32 or {dtype} tensor broadcastable "
            f"to [B, H, Nq, Nk] = {want} (an additive score bias; for a boolean mask use "
            f"torch.zeros(...).masked_fill(~mask, float('-inf'))).")
    view = bias.detach().reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)) \
        if bias.dim() < 4 else bias.detach()
    if view.shape[-1] != Nk or any(n not in (1, full) for n, full in zip(view.shape[:3], shape)):
        raise InvalidProblem(
            f"bias has shape {tuple(bias.shape)}; expected a shape broadcastable to [B, H, Nq, "
            f"Nk] = {want}: B, H and Nq may be 1, the key dim must be {Nk} (a bias constant "
            f"over keys changes no attention weight; fold it into the values instead).")
    if view.device != device:
        raise InvalidProblem(f"bias is on {view.device}; expected {device} like q. "
                             f"Fix: bias.to(q.device).")
    if Nk > 1 and view.stride(-1) != 1:
        view = view.contiguous()
    return view


def bias_kernel_args(mods: Optional["ScoreMods"], placeholder: torch.Tensor) -> tuple:
    """(bias, (batch, head, query strides)) for the kernels: 0 on broadcast (size-1) dims;
    a placeholder that is never read without a bias."""
    bias = mods.bias if mods is not None else None
    if bias is None:
        return placeholder, (0, 0, 0)
    return bias, tuple(bias.stride(i) if bias.shape[i] > 1 else 0 for i in range(3))


class BiasGradTarget:
    """Where the dK/dV kernel writes d bias, and how it becomes the gradient of the bias.

    The gradient of the bias is dS (d loss / d score) summed over the dims the bias
    broadcasts. The kernel writes, deterministically and without atomics:
    * mode 1 (a bias with a query dim): dS itself per (b, h, i, j), every computed pair
      once, into a buffer [B, H, Nq, Nk] in the accumulator dtype (float32; float64 for
      f64 inputs) zeroed first (pairs never computed keep 0).
    * mode 2 (a bias [.., 1, Nk], the same for every query): per (b, h, j) the sum over
      queries, accumulated in registers by the program that owns key tile j: [B, H, 1, Nk].
    ``finish`` then sums over broadcast batch / head dims (torch, fixed order) and casts to
    the bias's dtype. Mode 1 with a bias broadcast over B or H needs the B x H x Nq x Nk
    buffer: that memory is the price of a deterministic reduction without atomics.
    """

    def __init__(self, bias: torch.Tensor, batch: int, heads: int, acc: torch.dtype):
        Bb, Hb, Nqb, Nk = bias.shape
        self.bias = bias
        self.mode = 2 if Nqb == 1 else 1
        self.reduce_dims = tuple(d for d, (n, full) in enumerate(((Bb, batch), (Hb, heads)))
                                 if n != full)
        self.buffer = torch.zeros((batch, heads, Nqb, Nk), dtype=acc, device=bias.device)

    def strides(self) -> tuple:
        return self.buffer.stride(0), self.buffer.stride(1), self.buffer.stride(2)

    def finish(self) -> torch.Tensor:
        """The gradient of the bias (shaped like its 4-d view, in its dtype)."""
        grad = self.buffer
        if self.reduce_dims:
            grad = grad.sum(self.reduce_dims, keepdim=True)
        return grad.to(self.bias.dtype)


@dataclass(frozen=True)
class ScoreModFlags:
    """Which modifiers a problem has: what a descriptor states and a plan compiles for."""

    softcap: float = 0.0
    alibi: bool = False
    sinks: bool = False
    bias: bool = False

    @classmethod
    def of(cls, softcap: float, mods: Optional[ScoreMods]) -> "ScoreModFlags":
        """The flags of a launch: its softcap and the tensors its mods carry."""
        if mods is None:
            return cls(softcap)
        return cls(softcap, mods.alibi_slopes is not None, mods.sinks is not None,
                   mods.bias is not None)

    @property
    def any(self) -> bool:
        return self.softcap > 0 or self.alibi or self.sinks or self.bias

    def check_mods(self, mods: Optional[ScoreMods]) -> None:
        """InvalidProblem unless the call's tensors are those the descriptor announced."""
        has_alibi = mods is not None and mods.alibi_slopes is not None
        has_sinks = mods is not None and mods.sinks is not None
        has_bias = mods is not None and mods.bias is not None
        for name, want, got in (("alibi_slopes", self.alibi, has_alibi),
                                ("sinks", self.sinks, has_sinks), ("bias", self.bias, has_bias)):
            if want != got:
                raise InvalidProblem(
                    f"{name} was {'given' if got else 'not given'}, but the plan's descriptor "
                    f"has {name.split('_')[0]}={want}. Select the plan with "
                    f"{name.split('_')[0]}={got}, or pass the tensor the descriptor announced.")


def kernel_mod_args(flags: ScoreModFlags, mods: Optional[ScoreMods], dtype: torch.dtype,
                    placeholder: torch.Tensor) -> tuple:
    """((SOFTCAP, SOFTCAP_LO), ALIBI, stride_ab, SINKS) for the kernels, in the kernels'
    exponent base (log2 units below f64, where scores carry log2(e); natural for f64): the
    softcap as ``numerics.scale_args`` passes the scale (softcap * log2(e); for f64 split
    into two float32 halves, rebuilt by ``kernel_scale``: a Python float reaches a kernel as
    float32, which would round the cap of an f64 problem); the slopes / sinks are scaled
    the same way by the kernels as they load them (``head_value``). Absent tensors:
    placeholders, never read."""
    slopes = mods.alibi_slopes if mods is not None else None
    sinks = mods.sinks if mods is not None else None
    return (scale_args(flags.softcap, dtype),
            slopes if slopes is not None else placeholder,
            (slopes.stride(0) if slopes.shape[0] > 1 else 0) if slopes is not None else 0,
            sinks if sinks is not None else placeholder)


def row_delta(y: torch.Tensor, dy: Optional[torch.Tensor], dlse: Optional[torch.Tensor],
              acc: torch.dtype) -> torch.Tensor:
    """delta [B,H,Nq] = dy . y - dlse per row (what the backward kernels compute too)."""
    delta = torch.zeros(y.shape[:-1], dtype=acc, device=y.device) if dy is None else \
        (dy.to(acc) * y.to(acc)).sum(-1)
    return delta if dlse is None else delta - dlse.to(acc)


def sinks_grad(sinks: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """d loss / d sinks [H] from the forward's lse [B,H,Nq] (which includes the sink) and the
    backward's delta = dy . y - dlse (``row_delta``, or the backward kernels' own): the
    sink's probability p_i = exp(sink - lse_i) takes mass from every key, so
    d sink = -sum_{b,i} p_i delta_i. Rows with lse = -inf (padding) take no part.
    Deterministic (torch reductions, fixed order)."""
    acc = lse.dtype
    delta = delta.to(acc)
    live = lse != float("-inf")
    p_sink = torch.exp(sinks.to(acc)[None, :, None] - torch.where(live, lse, 0.0))
    grad = -(torch.where(live, p_sink, 0.0) * delta).sum((0, 2))
    return grad.to(sinks.dtype)


def fold_sinks(y: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor, live=None) -> None:
    """In place, after an attention without sinks: one sink logit per head joins the
    denominator of every live row, lse' = logaddexp(lse, sink), y' = y * exp(lse - lse')
    (a row that saw nothing keeps y = 0 and gets lse' = sink). y [B, H, Nq, Dv] (any
    strides), lse [B, H, Nq] in the accumulator dtype, sinks [H]; live: bool broadcastable
    to lse, False for rows that take part in nothing (they keep lse = -inf), or None (all)."""
    total = torch.logaddexp(lse, sinks.to(lse.dtype)[None, :, None])
    if live is not None:
        total = torch.where(live, total, lse)
    scale = torch.exp(torch.where(torch.isinf(lse) & (lse < 0), float("-inf"), lse - total))
    y.copy_((y.to(lse.dtype) * scale[..., None]).to(y.dtype))
    lse.copy_(total)


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}"
    return f"{t.dtype} of shape {tuple(t.shape)}"


def alibi_offset(is_causal, query_len: int, key_len: int) -> int:
    """The diagonal ALiBi measures distances from: 0 with is_causal=True (top-left), else
    Nk - Nq (bottom-right), as the sliding window (problem.window_rule)."""
    return 0 if is_causal is True else key_len - query_len


def fast_tanh(q: torch.Tensor) -> bool:
    """Whether the kernels may take the GPU's approximate tanh for the soft-cap: bf16
    inputs (its ~2^-11 relative error is far below their 2^-8 rounding; f16 rounds at
    2^-11 itself, so it keeps the exact form) on a CUDA device (not the interpreter, which
    runs no inline assembly)."""
    return q.is_cuda and q.dtype == torch.bfloat16
