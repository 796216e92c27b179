"""What a block-sparse attention problem is: the frozen descriptor and the per-call tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ...core import ElementKind, InvalidProblem


def kernel_block_size(block_size: int, query_len: int, key_len: int) -> int:
    """``block_size`` clipped to the longer sequence: what kernels and block lists work with.
    A block longer than both sequences covers them in one block either way (nq = nk = 1), so
    this changes nothing but keeps tiles and temporaries bounded for a huge ``block_size``."""
    return max(1, min(block_size, max(query_len, key_len)))


def check_head_counts(num_heads: int, num_kv_heads: int) -> None:
    """InvalidProblem unless H query heads can share Hkv K/V heads in equal groups."""
    if num_heads == 0 and num_kv_heads == 0:
        return
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise InvalidProblem(
            f"q has {num_heads} heads and k/v have {num_kv_heads}; expected the query heads to "
            f"be a multiple of the K/V heads (grouped-query attention: query head h reads K/V "
            f"head h // (H // Hkv)). Give k and v a head count that divides {num_heads}.")


@dataclass(frozen=True)
class SdpaBlockSparseDescriptor:
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
        num_kv_heads: Hkv, heads of k and v (None: H). Grouped-query attention when
            1 < H / Hkv (MQA when Hkv = 1): query head h reads K/V head h // (H // Hkv), as
            in torch SDPA's ``enable_gqa=True`` and flash-attn. H must be a multiple of Hkv.
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

    def __post_init__(self):
        object.__setattr__(self, "element", ElementKind.coerce(self.element))
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for name in ("batch_size", "num_heads", "query_len", "key_len", "d_k", "d_v", "block_size",
                     "num_kv_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidProblem(f"{name} is {value!r} ({type(value).__name__}); expected an int.")
            if value < 0:
                raise InvalidProblem(f"{name} is {value}; expected a non-negative extent.")
        if self.block_size < 1:
            raise InvalidProblem(
                f"block_size is {self.block_size}; expected an int >= 1 (e.g. 64 or 128).")
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

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.d_k)

    @property
    def group_size(self) -> int:
        """Query heads per K/V head, H // Hkv (1 without GQA)."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 1

    @property
    def num_blocks_q(self) -> int:
        return -(-self.query_len // self.block_size)

    @property
    def num_blocks_k(self) -> int:
        return -(-self.key_len // self.block_size)

    @property
    def lse_dtype(self) -> torch.dtype:
        return self.element.accumulator.torch_dtype

    @property
    def is_empty(self) -> bool:
        """True when no query meets a key (outputs are y = 0, lse = -inf). A zero d_v is
        not empty: y has no columns, but lse (and its gradient) still have values."""
        return 0 in (self.batch_size, self.num_heads, self.query_len, self.key_len)

    @property
    def kernel_block_size(self) -> int:
        """The block size the kernels and lists work with (see ``kernel_block_size``)."""
        return kernel_block_size(self.block_size, self.query_len, self.key_len)

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

    @classmethod
    def from_tensors(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int,
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
        return cls(B, H, Nq, k.shape[2], Dk, v.shape[3], block_size, scale, is_causal,
                   ElementKind.from_torch(q.dtype), num_kv_heads=k.shape[1])


@dataclass
class SdpaBlockSparseArgs:
    """The tensors of one call.

    q [B,H,Nq,Dk], k [B,Hkv,Nk,Dk], v [B,Hkv,Nk,Dv] of the descriptor's dtype;
    block_pattern: bool/uint8 [B|1, H|Hkv|1, nq, nk] or [B|1, H|Hkv|1, nq*nk], a BlockPattern
    or a PreparedPattern (see ``block_sparse_attention`` for how pattern heads are read);
    y [B,H,Nq,Dv] and lse [B,H,Nq] (float32; float64 for f64) are outputs: pass
    preallocated tensors, or leave None and ``plan.run`` allocates them.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    block_pattern: Any
    y: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
