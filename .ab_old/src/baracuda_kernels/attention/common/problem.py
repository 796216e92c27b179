"""What every attention descriptor shares: field validation, the GQA head rule, and the
derived facts (softmax scale, group size, lse dtype, tensor shapes)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...core import ElementKind, InvalidProblem, check_tensor

_EXTENTS = ("batch_size", "num_heads", "query_len", "key_len", "d_k", "d_v", "num_kv_heads")


def check_head_counts(num_heads: int, num_kv_heads: int) -> None:
    """InvalidProblem unless H query heads can share Hkv K/V heads in equal groups."""
    if num_heads == 0 and num_kv_heads == 0:
        return
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise InvalidProblem(
            f"q has {num_heads} heads and k/v have {num_kv_heads}; expected the query heads to "
            f"be a multiple of the K/V heads (grouped-query attention: query head h reads K/V "
            f"head h // (H // Hkv)). Give k and v a head count that divides {num_heads}.")


CAUSAL_MODES = (False, True, "bottom_right")


def causal_mode(value):
    """The canonical causal rule: False (none), True (top-left: query i sees key j iff
    j <= i, as torch SDPA's is_causal) or "bottom_right" (query i sits at key position
    i + Nk - Nq: it sees key j iff j <= i + Nk - Nq, flash-attn's alignment; a decode step,
    Nq = 1, sees every key). "top_left" is accepted for True. Same as True when Nq == Nk."""
    if value is True or value is False:
        return value
    if isinstance(value, str) and value.lower() in ("bottom_right", "top_left"):
        return "bottom_right" if value.lower() == "bottom_right" else True
    raise InvalidProblem(
        f"is_causal is {value!r}; expected False, True (top-left, like torch SDPA), "
        f"'top_left' or 'bottom_right' (queries aligned to the end of the keys, as flash-attn "
        f"and a KV cache need).")


def causal_offset(is_causal, query_len: int, key_len: int) -> int:
    """The diagonal of the causal rule: query i sees key j iff j <= i + offset (0 top-left,
    Nk - Nq bottom-right; meaningless when not causal, 0 then)."""
    return key_len - query_len if is_causal == "bottom_right" else 0


UNBOUNDED = 1 << 30  # a window edge that never binds (positions stay below 2^30 + 2^30)


@dataclass(frozen=True)
class WindowRule:
    """A sliding window with sink tokens, in key-minus-query offsets: query i sees key j iff
    lo <= j - i <= hi, or j < sinks (the first keys stay visible), AND the causal rule.
    Built by ``window_rule``; unbounded edges are -UNBOUNDED / UNBOUNDED."""

    lo: int
    hi: int
    sinks: int

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """bool mask of the window rule alone for broadcastable query / key positions."""
        d = j - i
        return ((d >= self.lo) & (d <= self.hi)) | (j < self.sinks)


def window_args(window: Optional[WindowRule]) -> tuple[int, int, int]:
    """(lo, hi, sinks) as kernels take them; unused when window is None."""
    return (window.lo, window.hi, window.sinks) if window is not None else (0, 0, 0)


def check_window(window_size, sink_tokens) -> tuple[tuple[int, int], int]:
    """Validated ((left, right), sinks): flash-attn's window_size convention, -1 = unbounded."""
    ok = isinstance(window_size, (tuple, list)) and len(window_size) == 2 and all(
        isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)
    if not ok:
        raise InvalidProblem(
            f"window_size is {window_size!r}; expected a pair (left, right) of ints >= -1 "
            f"(-1 = unbounded on that side), e.g. (1023, 0) for a causal 1024-token window.")
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise InvalidProblem(f"sink_tokens is {sink_tokens!r}; expected an int >= 0 (the number "
                             f"of first keys every query sees besides its window).")
    return (int(window_size[0]), int(window_size[1])), int(sink_tokens)


def window_rule(window_size, sink_tokens: int, is_causal, query_len: int,
                key_len: int) -> Optional[WindowRule]:
    """The window of ``window_size=(left, right)`` (flash-attn's convention, -1 = unbounded)
    with ``sink_tokens``, or None when it restricts nothing. The window is centred on the
    causal diagonal: top-left (j - i in [-left, right]) with is_causal=True, else
    bottom-right as flash-attn (j - i - (Nk - Nq) in [-left, right])."""
    left, right = window_size
    if left < 0 and right < 0:
        return None
    off = 0 if is_causal is True else key_len - query_len
    return WindowRule(off - left if left >= 0 else -UNBOUNDED,
                      off + right if right >= 0 else UNBOUNDED, sink_tokens)


def qkv_dims(q, k, v) -> tuple[int, int, int, int, int, int, int]:
    """(B, H, Hkv, Nq, Nk, Dk, Dv) of 4-D q [B,H,Nq,Dk], k [B,Hkv,Nk,Dk], v [B,Hkv,Nk,Dv]
    (their agreement is checked against the descriptor afterwards)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InvalidProblem(f"{name} is a {type(t).__name__}; expected a torch.Tensor.")
        if t.dim() != 4:
            raise InvalidProblem(
                f"{name} has shape {tuple(t.shape)}; expected 4 dims [B, H, N, D]. "
                f"For [B, N, H, D] layouts pass {name}.transpose(1, 2) (no copy is made).")
    B, H, Nq, Dk = q.shape
    return B, H, k.shape[1], Nq, k.shape[2], Dk, v.shape[3]


class AttentionProblem:
    """Mixin of the frozen attention descriptors (fields batch_size, num_heads, query_len,
    key_len, d_k, d_v, scale, is_causal, element, num_kv_heads): ``_validate`` from their
    ``__post_init__``, and the facts derived from the fields."""

    def _validate(self, extra_extents: tuple = ()) -> None:
        object.__setattr__(self, "element", ElementKind.coerce(self.element))
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for name in _EXTENTS + tuple(extra_extents):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidProblem(f"{name} is {value!r} ({type(value).__name__}); expected an int.")
            if value < 0:
                raise InvalidProblem(f"{name} is {value}; expected a non-negative extent.")
        check_head_counts(self.num_heads, self.num_kv_heads)
        if self.d_k < 1:
            raise InvalidProblem(
                f"d_k is {self.d_k}; expected >= 1: a zero-width query/key has no scores.")
        if self.scale is not None:
            if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
                raise InvalidProblem(f"scale is {self.scale!r}; expected a finite float or None.")
            if not math.isfinite(self.scale):
                raise InvalidProblem(
                    f"scale is {self.scale}; expected a finite float (or None for 1/sqrt(d_k)).")
            object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "is_causal", causal_mode(self.is_causal))

    @property
    def causal_offset(self) -> int:
        """Query i sees key j iff j <= i + causal_offset (when causal; see ``causal_mode``)."""
        return causal_offset(self.is_causal, self.query_len, self.key_len)

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.d_k)

    @property
    def group_size(self) -> int:
        """Query heads per K/V head, H // Hkv (1 without GQA)."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 1

    @property
    def is_gqa(self) -> bool:
        """True when K/V have fewer heads than q (grouped-query or multi-query attention)."""
        return self.num_kv_heads != self.num_heads

    @property
    def lse_dtype(self) -> torch.dtype:
        return self.element.accumulator.torch_dtype

    @property
    def is_empty(self) -> bool:
        """True when no query meets a key (outputs are y = 0, lse = -inf). A zero d_v is
        not empty: y has no columns, but lse (and its gradient) still have values."""
        return 0 in (self.batch_size, self.num_heads, self.query_len, self.key_len)

    def problem_text(self) -> str:
        """The problem in one line, for reprs and messages."""
        return (f"B={self.batch_size}, H={self.num_heads}, Hkv={self.num_kv_heads}, "
                f"Nq={self.query_len}, Nk={self.key_len}, d_k={self.d_k}, d_v={self.d_v}, "
                f"causal={self.is_causal}, element={self.element.value}")

    def query_shape(self):
        return (self.batch_size, self.num_heads, self.query_len, self.d_k)

    def key_shape(self):
        return (self.batch_size, self.num_kv_heads, self.key_len, self.d_k)

    def value_shape(self):
        return (self.batch_size, self.num_kv_heads, self.key_len, self.d_v)

    def output_shape(self):
        return (self.batch_size, self.num_heads, self.query_len, self.d_v)

    def lse_shape(self):
        return (self.batch_size, self.num_heads, self.query_len)


def check_qkv(desc: "AttentionProblem", q, k, v) -> torch.device:
    """InvalidProblem unless q, k, v match ``desc`` (shapes, dtype, one device, unit last
    stride); returns their device."""
    dtype = desc.element.torch_dtype
    if not isinstance(q, torch.Tensor):
        raise InvalidProblem(f"q is a {type(q).__name__}; expected a torch.Tensor.")
    device = q.device
    check_tensor("q", q, desc.query_shape(), dtype, device)
    check_tensor("k", k, desc.key_shape(), dtype, device)
    check_tensor("v", v, desc.value_shape(), dtype, device)
    return device


def check_outputs(desc: "AttentionProblem", device, y, lse) -> None:
    """InvalidProblem unless the preallocated y / lse (None: allocated later) match ``desc``."""
    if y is not None:
        check_tensor("y", y, desc.output_shape(), desc.element.torch_dtype, device)
    if lse is not None:
        check_tensor("lse", lse, desc.lse_shape(), desc.lse_dtype, device,
                     fix_dtype=f"lse is always {desc.lse_dtype} for {desc.element.torch_dtype} inputs.")
