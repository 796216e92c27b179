"""What a dense attention problem is: the frozen descriptor and the per-call tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...core import ElementKind
from ..block_sparse.descriptor import SdpaBlockSparseDescriptor
from ..common.problem import AttentionProblem, qkv_dims


@dataclass(frozen=True)
class FlashSdpaDescriptor(AttentionProblem):
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
        self._validate()

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
        B, H, Hkv, Nq, Nk, Dk, Dv = qkv_dims(q, k, v)
        return cls(B, H, Nq, Nk, Dk, Dv, scale, is_causal, ElementKind.from_torch(q.dtype),
                   num_kv_heads=Hkv)


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
