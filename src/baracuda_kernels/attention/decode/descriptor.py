"""What a KV-cache attention problem is: the frozen descriptor and the per-call tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ...core import ElementKind, InvalidProblem
from ..common.problem import AttentionProblem, check_window
from ..common.score_mods import check_softcap


@dataclass(frozen=True)
class SdpaDecodeDescriptor(AttentionProblem):
    """Attention of Nq new queries per row against a KV cache, independent of any tensor
    (what ``block_sparse_attention_with_kvcache`` computes; forward only).

    Row b holds L_b = cache_seqlens[b] + new_tokens keys; query i sits at position
    L_b - Nq + i, and with ``is_causal`` sees keys j <= its position (bottom-right per row).

    Fields:
        batch_size, num_heads, query_len, d_k, d_v: B, H, Nq (1 for decode), Dk, Dv.
        key_len: the cache's capacity per row (Ncache, or pages_per_row * page_size).
        scale: softmax scale; None means 1/sqrt(d_k).
        is_causal: True (bottom-right per row) or False (every cached key).
        element: dtype of q and the cache (an ElementKind, a torch.dtype or 'bf16').
        num_kv_heads: Hkv of the cache (None: H); H a multiple of it.
        page_size: None for a contiguous cache [B, key_len, Hkv, D]; else tokens per page
            of a paged cache [num_pages, page_size, Hkv, D] with a block table
            [B, key_len // page_size].
        new_tokens: keys / values appended per call (0: none; else k, v [B, new_tokens, Hkv, D]).
        window_size, sink_tokens: flash-attn's (left, right) window around each query's
            position (-1 unbounded) and the first keys every query keeps.
        softcap: 0.0 (none) or > 0. alibi, sinks: whether ALiBi slopes / sink logits come
            with each call.
        block_size: None (every cached key) or the block of a per-call selection pattern
            [B|1, Hkv|1, 1, key_len / block_size] (a power of two >= 16).
    """

    batch_size: int
    num_heads: int
    query_len: int
    key_len: int
    d_k: int
    d_v: int
    scale: Optional[float] = None
    is_causal: Any = True
    element: ElementKind = ElementKind.BF16
    num_kv_heads: Optional[int] = None
    page_size: Optional[int] = None
    new_tokens: int = 0
    window_size: Optional[tuple] = None
    sink_tokens: int = 0
    softcap: float = 0.0
    alibi: bool = False
    sinks: bool = False
    block_size: Optional[int] = None

    def __post_init__(self):
        self._validate(extra_extents=("new_tokens",))
        if self.is_causal not in (True, False):
            raise InvalidProblem(f"is_causal is {self.is_causal!r}; expected True (bottom-right "
                                 f"per row, as flash-attn's KV-cache attention) or False.")
        object.__setattr__(self, "softcap", check_softcap(self.softcap))
        if self.window_size is not None:
            window, sinks = check_window(self.window_size, self.sink_tokens)
            object.__setattr__(self, "window_size", window)
            object.__setattr__(self, "sink_tokens", sinks)
        if self.page_size is not None and (isinstance(self.page_size, bool) or
                                           not isinstance(self.page_size, int)
                                           or self.page_size < 1
                                           or self.key_len % self.page_size):
            raise InvalidProblem(f"page_size is {self.page_size!r}; expected None (contiguous "
                                 f"cache) or an int >= 1 that divides key_len={self.key_len}.")
        if self.block_size is not None and (isinstance(self.block_size, bool) or
                                            not isinstance(self.block_size, int)
                                            or self.block_size < 16
                                            or self.block_size & (self.block_size - 1)):
            raise InvalidProblem(f"block_size is {self.block_size!r}; expected None (no "
                                 f"selection) or a power of two >= 16 (e.g. 128).")
        if self.new_tokens > self.key_len:
            raise InvalidProblem(f"new_tokens is {self.new_tokens}; expected at most key_len="
                                 f"{self.key_len} (the cache's capacity per row).")

    @property
    def paged(self) -> bool:
        return self.page_size is not None

    @classmethod
    def from_tensors(cls, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                     block_table: Optional[torch.Tensor] = None, new_tokens: int = 0,
                     **fields) -> "SdpaDecodeDescriptor":
        """Descriptor for q [B, Nq, H, D] and a contiguous cache [B, Ncache, Hkv, D] (or pages
        [num_pages, page_size, Hkv, D] with ``block_table`` [B, pages_per_row]); other fields
        (scale, is_causal, window_size, ...) as keywords."""
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise InvalidProblem(f"{name} has shape {tuple(getattr(t, 'shape', ()))}; "
                                     f"expected 4 dims (flash-attn's layout).")
        B, Nq, H, D = q.shape
        if block_table is not None:
            capacity, page = block_table.shape[1] * k_cache.shape[1], k_cache.shape[1]
        else:
            capacity, page = k_cache.shape[1], None
        return cls(B, H, Nq, capacity, D, v_cache.shape[3], element=q.dtype,
                   num_kv_heads=k_cache.shape[2], page_size=page, new_tokens=new_tokens,
                   **fields)


@dataclass
class SdpaDecodeArgs:
    """The tensors of one call (layouts of ``block_sparse_attention_with_kvcache``).

    q [B, Nq, H, Dk]; k_cache / v_cache [B, Ncache, Hkv, D] or pages [num_pages, page_size,
    Hkv, D] with block_table int32 [B, pages_per_row]; cache_seqlens: int or int tensor [B]
    (keys cached before this call); k / v [B, new_tokens, Hkv, D] appended in place (None
    when the descriptor's new_tokens is 0); alibi_slopes float32 [H] / [B, H] and sinks [H]
    when the descriptor says so; block_pattern bool [B|1, Hkv|1, 1, key_len / block_size]
    when it has a block_size; key_mask: None or bool [B, key_len] (False: a cached key no
    query sees, e.g. left padding kept in the cache).
    """

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: Any = None
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    block_table: Optional[torch.Tensor] = None
    alibi_slopes: Optional[torch.Tensor] = None
    sinks: Optional[torch.Tensor] = None
    block_pattern: Optional[torch.Tensor] = None
    key_mask: Optional[torch.Tensor] = None
