"""What an additive-mask attention problem is: the frozen descriptor and the per-call tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ...core import ElementKind, InvalidProblem
from ..block_sparse.descriptor import SdpaBlockSparseDescriptor
from ..common.problem import AttentionProblem, qkv_dims
from ..common.score_mods import check_softcap


@dataclass(frozen=True)
class SdpaMaskedDescriptor(AttentionProblem):
    """Attention with an additive score bias (a float mask), independent of any tensor.

    y[b,h] = softmax(scale * q[b,h] @ k[b,g]^T + bias[b,h] + mask) @ v[b,g], g = h // (H // Hkv),
    where bias broadcasts to [B, H, Nq, Nk] and mask is -inf above the diagonal when
    ``is_causal`` and outside the active blocks of an optional block pattern. A -inf bias
    masks a pair; a row with nothing left gives y = 0, lse = -inf.

    Fields:
        batch_size, num_heads, query_len, key_len, d_k, d_v: B, H, Nq, Nk, Dk, Dv.
        scale: softmax scale; None means 1/sqrt(d_k).
        is_causal: False, True (top-left) or "bottom_right" (flash-attn's alignment).
        element: dtype of q, k, v, y (an ElementKind, a torch.dtype or a name like 'bf16').
        num_kv_heads: Hkv (None: H); grouped-query attention as in SdpaBlockSparseDescriptor.
        bias_shape: the bias's 4-d shape, each of B, H, Nq either full or 1 and Nk full
            (e.g. (1, H, Nq, Nk) for a learned per-head bias); None accepts any of these
            per call.
        softcap: 0.0 (none) or > 0: scores are capped before the bias is added.
        block_size: the block of ``SdpaMaskedArgs.block_pattern`` (a pattern lets a bias
            over a sparse layout cost only its active blocks); without a pattern, the tile
            of the all-active pattern the kernels walk.
    """

    batch_size: int
    num_heads: int
    query_len: int
    key_len: int
    d_k: int
    d_v: int
    scale: Optional[float] = None
    is_causal: Any = False
    element: ElementKind = ElementKind.BF16
    num_kv_heads: Optional[int] = None
    bias_shape: Optional[tuple] = None
    softcap: float = 0.0
    block_size: int = 128

    def __post_init__(self):
        self._validate(extra_extents=("block_size",))
        object.__setattr__(self, "softcap", check_softcap(self.softcap))
        if self.block_size < 1:
            raise InvalidProblem(
                f"block_size is {self.block_size}; expected an int >= 1 (e.g. 128).")
        if self.bias_shape is not None:
            shape = tuple(self.bias_shape)
            full = (self.batch_size, self.num_heads, self.query_len, self.key_len)
            if len(shape) != 4 or shape[3] != full[3] or \
                    any(n not in (1, f) for n, f in zip(shape[:3], full)):
                raise InvalidProblem(
                    f"bias_shape is {self.bias_shape}; expected 4 dims ({full[0]}|1, "
                    f"{full[1]}|1, {full[2]}|1, {full[3]}) or None (any such shape per call).")
            object.__setattr__(self, "bias_shape", shape)

    def as_block_sparse(self) -> SdpaBlockSparseDescriptor:
        """The same problem as block-sparse attention with a bias (the plan runs it so)."""
        return SdpaBlockSparseDescriptor(
            self.batch_size, self.num_heads, self.query_len, self.key_len, self.d_k, self.d_v,
            self.block_size, self.scale, self.is_causal, self.element,
            num_kv_heads=self.num_kv_heads, softcap=self.softcap, bias=True)

    @classmethod
    def from_tensors(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, *, scale: Optional[float] = None,
                     is_causal=False, softcap: Optional[float] = None, block_size: int = 128):
        """Descriptor for q [B,H,Nq,Dk], k [B,Hkv,Nk,Dk], v [B,Hkv,Nk,Dv] and (optional) the
        bias whose shape it fixes (left-padded with 1s to 4 dims)."""
        B, H, Hkv, Nq, Nk, Dk, Dv = qkv_dims(q, k, v)
        shape = None if bias is None else (1,) * (4 - bias.dim()) + tuple(bias.shape)
        return cls(B, H, Nq, Nk, Dk, Dv, scale, is_causal, ElementKind.from_torch(q.dtype),
                   num_kv_heads=Hkv, bias_shape=shape, softcap=check_softcap(softcap),
                   block_size=block_size)


@dataclass
class SdpaMaskedArgs:
    """The tensors of one call.

    q [B,H,Nq,Dk], k [B,Hkv,Nk,Dk], v [B,Hkv,Nk,Dv] of the descriptor's dtype; bias float32
    or that dtype, broadcastable to [B, H, Nq, Nk] (B, H, Nq may be 1; the descriptor's
    ``bias_shape`` when it states one); block_pattern: None (every block) or a pattern as
    ``SdpaBlockSparseArgs.block_pattern`` takes it, in blocks of the descriptor's
    ``block_size``; y [B,H,Nq,Dv] and lse [B,H,Nq] (float32; float64 for f64): outputs,
    preallocated or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor
    block_pattern: Any = None
    y: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
