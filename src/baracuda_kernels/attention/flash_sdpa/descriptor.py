"""What a dense attention problem is: the frozen descriptor and the per-call tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...core import ElementKind, InvalidProblem
from ..block_sparse.descriptor import SdpaBlockSparseDescriptor, check_head_counts


@dataclass(frozen=True)
class FlashSdpaDescriptor:
    """A dense (optionally causal) scaled-dot-product attention problem, independent of any
    tensor.

    y[b,h] = softmax(scale * q[b,h] @ k[b,g]^T + mask) @ v[b,g] with g = h // (H // Hkv),
    lse[b,h] = logsumexp(scale * q[b,h] @ k[b,g]^T + mask) (natural log), where mask is -inf
    where key j > query i when ``is_causal`` (top-left, like torch SDPA) and 0 elsewhere.

    Fields:
        batch_size, num_heads: B, H (query heads).
        query_len, key_len: Nq, Nk.
        d_k, d_v: head dims of q/k and of v/y.
        scale: softmax scale; None means 1/sqrt(d_k).
        is_causal: query i attends key j only when j <= i (top-left aligned).
        element: dtype of q, k, v, y (an ElementKind, a torch.dtype or a name like 'bf16').
        num_kv_heads: Hkv, heads of k and v (None: H). Grouped-query attention when
            1 < H / Hkv (MQA when Hkv = 1): query head h reads K/V head h // (H // Hkv), as
            torch SDPA's ``enable_gqa=True``. H must be a multiple of Hkv.
    """

    batch_size: int
    num_heads: int
    query_len: int
    key_len: int
    d_k: int
    d_v: int
    scale: Optional[float] = None
    is_causal: bool = False
    element: ElementKind = ElementKind.BF16
    num_kv_heads: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "element", ElementKind.coerce(self.element))
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for name in ("batch_size", "num_heads", "query_len", "key_len", "d_k", "d_v",
                     "num_kv_heads"):
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
        if not isinstance(self.is_causal, bool):
            raise InvalidProblem(f"is_causal is {self.is_causal!r}; expected True or False.")

    # ------------------------------------------------------------------ derived facts
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
        """True when no query meets a key (outputs are y = 0, lse = -inf)."""
        return 0 in (self.batch_size, self.num_heads, self.query_len, self.key_len)

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

    def as_block_sparse(self, block_size: int = 128) -> SdpaBlockSparseDescriptor:
        """The same problem as block-sparse attention (with an all-active pattern it is
        exactly this dense problem; causal is applied per token by the kernels)."""
        return SdpaBlockSparseDescriptor(
            self.batch_size, self.num_heads, self.query_len, self.key_len, self.d_k, self.d_v,
            block_size, self.scale, self.is_causal, self.element, num_kv_heads=self.num_kv_heads)

    @classmethod
    def from_block_sparse(cls, desc: SdpaBlockSparseDescriptor) -> "FlashSdpaDescriptor":
        """The dense problem a block-sparse descriptor states when every block is active."""
        return cls(desc.batch_size, desc.num_heads, desc.query_len, desc.key_len, desc.d_k,
                   desc.d_v, desc.scale, desc.is_causal, desc.element,
                   num_kv_heads=desc.num_kv_heads)

    @classmethod
    def from_tensors(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     scale: Optional[float] = None, is_causal: bool = False):
        """Descriptor for q [B,H,Nq,Dk], k [B,Hkv,Nk,Dk], v [B,Hkv,Nk,Dv] (H % Hkv == 0)."""
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise InvalidProblem(f"{name} is a {type(t).__name__}; expected a torch.Tensor.")
            if t.dim() != 4:
                raise InvalidProblem(
                    f"{name} has shape {tuple(t.shape)}; expected 4 dims [B, H, N, D]. "
                    f"For [B, N, H, D] layouts pass {name}.transpose(1, 2) (no copy is made).")
        B, H, Nq, Dk = q.shape
        return cls(B, H, Nq, k.shape[2], Dk, v.shape[3], scale, is_causal,
                   ElementKind.from_torch(q.dtype), num_kv_heads=k.shape[1])


@dataclass
class FlashSdpaArgs:
    """The tensors of one call.

    q [B,H,Nq,Dk], k [B,Hkv,Nk,Dk], v [B,Hkv,Nk,Dv] of the descriptor's dtype (any strides
    with a unit last stride); y [B,H,Nq,Dv] and lse [B,H,Nq] (float32; float64 for f64) are
    outputs: pass preallocated tensors, or leave None and ``plan.run`` allocates them. A plan
    on a library backend (torch_cudnn / torch_flash) computes no lse: ``lse`` must be None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    y: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
