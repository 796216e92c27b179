"""Score modifiers: logit soft-capping, ALiBi and learnable attention sinks.

With all three, a computed score and a row's softmax are

    s_ij = scale * q_i . k_j
    s_ij <- softcap * tanh(s_ij / softcap)                  (softcap > 0; Gemma 2, Grok)
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
gradient (``sinks_grad``); ALiBi slopes do not (as in flash-attn).

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

LOG2E = 1.4426950408889634


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
    """

    alibi_slopes: Optional[torch.Tensor] = None
    sinks: Optional[torch.Tensor] = None

    @property
    def empty(self) -> bool:
        return self.alibi_slopes is None and self.sinks is None

    def check_for(self, batch: int, heads: int, device, dtype) -> "ScoreMods":
        """These modifiers checked for a problem (alibi as float32 [B|1, H], sinks as the
        accumulator dtype [H]); typed errors that say the expected shape."""
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
        return ScoreMods(slopes, sinks)


@dataclass(frozen=True)
class ScoreModFlags:
    """Which modifiers a problem has: what a descriptor states and a plan compiles for."""

    softcap: float = 0.0
    alibi: bool = False
    sinks: bool = False

    @property
    def any(self) -> bool:
        return self.softcap > 0 or self.alibi or self.sinks

    def check_mods(self, mods: Optional[ScoreMods]) -> None:
        """InvalidProblem unless the call's tensors are those the descriptor announced."""
        has_alibi = mods is not None and mods.alibi_slopes is not None
        has_sinks = mods is not None and mods.sinks is not None
        for name, want, got in (("alibi_slopes", self.alibi, has_alibi),
                                ("sinks", self.sinks, has_sinks)):
            if want != got:
                raise InvalidProblem(
                    f"{name} was {'given' if got else 'not given'}, but the plan's descriptor "
                    f"has {name.split('_')[0]}={want}. Select the plan with "
                    f"{name.split('_')[0]}={got}, or pass the tensor the descriptor announced.")


def kernel_mod_args(flags: ScoreModFlags, mods: Optional[ScoreMods], is_f64: bool,
                    placeholder: torch.Tensor) -> tuple:
    """(SOFTCAP, ALIBI, stride_ab, SINKS) for the kernels, in the kernels' exponent base
    (log2 units below f64, where scores carry log2(e); natural for f64): softcap * log2(e),
    and the slopes / sinks are scaled the same way by the kernels as they load them
    (``mod_scale``). Absent tensors: placeholders, never read."""
    base = 1.0 if is_f64 else LOG2E
    slopes = mods.alibi_slopes if mods is not None else None
    sinks = mods.sinks if mods is not None else None
    return (flags.softcap * base,
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
