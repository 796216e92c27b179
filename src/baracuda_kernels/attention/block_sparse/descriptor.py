"""What a block-sparse attention problem is: the frozen descriptor and the per-call tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ...core import ElementKind, InvalidProblem
from ..common.problem import (AttentionProblem, WindowRule, check_window, qkv_dims,
                              window_rule)
from ..common.score_mods import ScoreModFlags, check_softcap


def kernel_block_size(block_size: int, query_len: int, key_len: int) -> int:
    """``block_size`` clipped to the longer sequence: what kernels and block lists work with.
    A block longer than both sequences covers them in one block either way (nq = nk = 1), so
    this changes nothing but keeps tiles and temporaries bounded for a huge ``block_size``."""
    return max(1, min(block_size, max(query_len, key_len)))


@dataclass(frozen=True)
class SdpaBlockSparseDescriptor(AttentionProblem):
    """A block-sparse scaled-dot-product attention problem, independent of any tensor.

    y[b,h] = softmax(scale * q[b,h] @ k[b,g]^T + mask) @ v[b,g] with g = h // (H // Hkv),
    where mask is -inf outside the active blocks of the pattern (and above the diagonal when
    ``is_causal``).

    Fields:
        batch_size, num_heads: B, H (query heads).
        query_len, key_len: Nq, Nk (any lengths; the last block may be partial).
        d_k, d_v: head dims of q/k and of v/y.
        block_size: side of a square pattern block, in tokens (>= 1).
        scale: softmax scale; None means 1/sqrt(d_k).
        is_causal: query i attends key j only when j <= i (top-left aligned).
        element: dtype of q, k, v, y (an ElementKind, a torch.dtype or a name like 'bf16').
        window_size: (left, right) sliding window in tokens, flash-attn's convention (-1 =
            unbounded): query i sees keys j with -left <= j - i - off <= right, off = 0 when
            is_causal is True (top-left) else Nk - Nq; exact per token.
        sink_tokens: the first keys every query sees besides its window (with a window).
        num_kv_heads: Hkv, heads of k and v (None: H). Grouped-query attention when
            1 < H / Hkv (MQA when Hkv = 1): query head h reads K/V head h // (H // Hkv), as
            in torch SDPA's ``enable_gqa=True`` and flash-attn. H must be a multiple of Hkv.
        softcap: 0.0 (none) or > 0: scores become softcap * tanh(score / softcap).
        alibi, sinks: whether the calls bring ALiBi slopes / learnable sink logits
            (``SdpaBlockSparseArgs.alibi_slopes`` / ``.sinks``; common.score_mods).
        bias: whether the calls bring an additive score bias (``SdpaBlockSparseArgs.bias``,
            broadcastable to [B, H, Nq, Nk]; added after the cap, before the softmax).
    """

    batch_size: int
    num_heads: int
    query_len: int
    key_len: int
    d_k: int
    d_v: int
    block_size: int
    scale: Optional[float] = None
    is_causal: bool = False
    element: ElementKind = ElementKind.BF16
    num_kv_heads: Optional[int] = None
    window_size: tuple = (-1, -1)
    sink_tokens: int = 0
    softcap: float = 0.0
    alibi: bool = False
    sinks: bool = False
    bias: bool = False

    def __post_init__(self):
        self._validate(extra_extents=("block_size",))
        object.__setattr__(self, "softcap", check_softcap(self.softcap))
        for name in ("alibi", "sinks", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidProblem(f"{name} is {getattr(self, name)!r}; expected a bool "
                                     f"(whether the calls bring {name} tensors).")
        window, sinks = check_window(self.window_size, self.sink_tokens)
        object.__setattr__(self, "window_size", window)
        object.__setattr__(self, "sink_tokens", sinks)
        if self.block_size < 1:
            raise InvalidProblem(
                f"block_size is {self.block_size}; expected an int >= 1 (e.g. 64 or 128).")

    @property
    def num_blocks_q(self) -> int:
        return -(-self.query_len // self.block_size)

    @property
    def num_blocks_k(self) -> int:
        return -(-self.key_len // self.block_size)

    @property
    def window(self) -> Optional[WindowRule]:
        """The token window the kernels apply (None: no window); see ``window_rule``."""
        return window_rule(self.window_size, self.sink_tokens, self.is_causal,
                           self.query_len, self.key_len)

    @property
    def kernel_block_size(self) -> int:
        """The block size the kernels and lists work with (see ``kernel_block_size``)."""
        return kernel_block_size(self.block_size, self.query_len, self.key_len)

    @property
    def score_mods(self) -> ScoreModFlags:
        """Which score modifiers the problem has."""
        return ScoreModFlags(self.softcap, self.alibi, self.sinks, self.bias)

    @classmethod
    def from_tensors(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int,
                     scale: Optional[float] = None, is_causal: bool = False,
                     window_size: tuple = (-1, -1), sink_tokens: int = 0,
                     softcap: Optional[float] = None, alibi: bool = False, sinks: bool = False,
                     bias: bool = False):
        """Descriptor for q [B,H,Nq,Dk], k [B,Hkv,Nk,Dk], v [B,Hkv,Nk,Dv] (H % Hkv == 0).

        Every call of the functional API builds one; the same arguments give back the same
        (immutable) descriptor from a small memo instead of validating them again (~12 us
        of a CPU decode step's ~55 us of host time). The key holds each argument's type
        too (and the window's items' types), so an argument that fails validation (64.0
        for 64, True for 1) never matches one that passed."""
        B, H, Hkv, Nq, Nk, Dk, Dv = qkv_dims(q, k, v)
        fields = (cls, B, H, Hkv, Nq, Nk, Dk, Dv, q.dtype, block_size, scale, is_causal,
                  window_size, sink_tokens, softcap, alibi, sinks, bias)
        key = fields + tuple(map(type, fields)) + tuple(map(type, window_size)) \
            if isinstance(window_size, tuple) else None
        try:
            hit = _FROM_TENSORS.get(key)
        except TypeError:  # an unhashable argument: validation below says what is wrong
            key = hit = None
        if hit is not None:
            return hit
        desc = cls(B, H, Nq, Nk, Dk, Dv, block_size, scale, is_causal,
                   ElementKind.from_torch(q.dtype), num_kv_heads=Hkv,
                   window_size=window_size, sink_tokens=sink_tokens,
                   softcap=check_softcap(softcap), alibi=alibi, sinks=sinks, bias=bias)
        if key is not None:
            if len(_FROM_TENSORS) >= _FROM_TENSORS_SIZE:
                _FROM_TENSORS.clear()
            _FROM_TENSORS[key] = desc
        return desc


# from_tensors' memo: argument key -> descriptor (cleared when full: the shapes of a model's
# calls are few, a growing set of shapes only rebuilds).
_FROM_TENSORS: dict = {}
_FROM_TENSORS_SIZE = 512


@dataclass
class SdpaBlockSparseArgs:
    """The tensors of one call.

    q [B,H,Nq,Dk], k [B,Hkv,Nk,Dk], v [B,Hkv,Nk,Dv] of the descriptor's dtype;
    block_pattern: bool/uint8 [B|1, H|Hkv|1, nq, nk] or [B|1, H|Hkv|1, nq*nk], a BlockPattern
    or a PreparedPattern (see ``block_sparse_attention`` for how pattern heads are read);
    y [B,H,Nq,Dv] and lse [B,H,Nq] (float32; float64 for f64) are outputs: pass
    preallocated tensors, or leave None and ``plan.run`` allocates them.
    token_rules: per-token document ids / padding / prefix (``plan.token_rules(...)``) for a
    raw pattern or BlockPattern; a PreparedPattern carries its own.
    alibi_slopes: float32 [H] or [B, H]; sinks: [H] learnable sink logits; bias: float32 or
    the inputs' dtype, broadcastable to [B, H, Nq, Nk] (B, H, Nq may be 1) (each required
    exactly when the descriptor says alibi / sinks / bias; common.score_mods).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    block_pattern: Any
    y: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    token_rules: Any = None
    alibi_slopes: Optional[torch.Tensor] = None
    sinks: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
