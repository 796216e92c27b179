"""BlockSparseAttention: block-sparse attention as a torch.nn.Module for model code.

It holds the pattern (or how to build one per sequence length) and prepares it once per
(query length, key length, device), so a model calling it every step pays no pattern work
after the first call at a length; it takes q/k/v in either [B, H, N, D] or [B, N, H, D]
layout and returns y in the same layout (no copies for the transposed layout).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ...core import InvalidProblem
from ..common.problem import causal_mode, check_window
from ..patterns.checks import check_block_size, check_int
from .functional import block_sparse_attention
from .prepared import PreparedPattern, prepare_pattern

_LAYOUTS = ("bhnd", "bnhd")


class BlockSparseAttention(torch.nn.Module):
    """Block-sparse scaled-dot-product attention with a fixed sparsity layout.

    Args:
        pattern: what to attend, one of:
            None: every block (dense, or causal with ``is_causal``);
            a BlockPattern (baracuda_kernels.patterns) for one geometry: its block size,
                lengths and token rules (window, documents, prefix) are used as they are;
            a callable ``(query_len, key_len) -> BlockPattern or bool tensor [B|1, H|Hkv|1,
                nq, nk]``, called once per new pair of lengths (e.g. ``lambda nq, nk:
                sliding_window(nq, window=4096, block_size=128, sinks=4)``).
        block_size: block of raw tensor patterns and of ``pattern=None`` (default 128).
        is_causal: False, True (top-left) or "bottom_right", for raw tensors and None
            (a BlockPattern brings its own).
        window_size, sink_tokens: a token window for raw tensors and None (see
            ``block_sparse_attention``).
        layout: "bhnd" (q [B, H, N, D], the default) or "bnhd" (q [B, N, H, D], as most
            model code holds it after the projections); y comes back in the same layout.
        scale: softmax scale (default 1 / sqrt(D)); softcap: a logit cap (or None).
        num_sink_heads: when given, a learnable sink logit per query head
            (``self.sinks``, an nn.Parameter [H] initialised to 0; gpt-oss-style).

    Forward: ``module(q, k, v, bias=None)`` with k, v holding Hkv heads (GQA when Hkv < H);
    returns y. Prepared patterns live in ``self.prepared`` (a plain dict, not state: they
    are rebuilt after loading, on first use at each length).

    Example:
        >>> attn = BlockSparseAttention(lambda nq, nk: sliding_window(nq, window=1024,
        ...                             block_size=128, sinks=4), layout="bnhd")
        >>> y = attn(q, k, v)        # q [B, N, H, D], k / v [B, N, Hkv, D]
    """

    def __init__(self, pattern: Union[None, Callable, object] = None, *, block_size: int = 128,
                 is_causal=False, window_size: Optional[tuple] = None, sink_tokens: int = 0,
                 layout: str = "bhnd", scale: Optional[float] = None,
                 softcap: Optional[float] = None, num_sink_heads: Optional[int] = None):
        super().__init__()
        if layout not in _LAYOUTS:
            raise InvalidProblem(f"layout is {layout!r}; expected one of {_LAYOUTS} "
                                 f"([B, H, N, D] or [B, N, H, D]).")
        if isinstance(pattern, torch.Tensor):
            raise InvalidProblem("pattern is a raw tensor; expected None, a BlockPattern or a "
                                 "callable (query_len, key_len) -> pattern (a raw tensor "
                                 "fixes no lengths: wrap it, lambda nq, nk: tensor).")
        # Checked here, not at the first call: a bad option fails where it was written.
        self.pattern, self.block_size = pattern, check_block_size(block_size)
        self.is_causal = causal_mode(is_causal)
        self.window_size, self.sink_tokens = check_window(
            (-1, -1) if window_size is None else window_size, sink_tokens)
        self.layout, self.scale, self.softcap = layout, scale, softcap
        self.sinks = None if num_sink_heads is None else \
            torch.nn.Parameter(torch.zeros(check_int("num_sink_heads", num_sink_heads, 1)))
        self.prepared: dict = {}

    def extra_repr(self) -> str:
        what = "all blocks" if self.pattern is None else getattr(
            self.pattern, "description", type(self.pattern).__name__)
        return f"pattern={what}, layout={self.layout}, block_size={self.block_size}"

    def prepared_pattern(self, query_len: int, key_len: int, device) -> PreparedPattern:
        """The prepared pattern of these lengths on ``device`` (built on first use)."""
        key = (query_len, key_len, torch.device(device))
        found = self.prepared.get(key)
        if found is None:
            found = self.prepared[key] = self._prepare(query_len, key_len, device)
        return found

    def _prepare(self, query_len: int, key_len: int, device) -> PreparedPattern:
        pattern = self.pattern
        if callable(pattern) and not hasattr(pattern, "block_size"):
            pattern = pattern(query_len, key_len)
        if pattern is None:
            nq, nk = -(-query_len // self.block_size), -(-key_len // self.block_size)
            pattern = torch.ones(1, 1, max(nq, 1), max(nk, 1), dtype=torch.bool)
        if hasattr(pattern, "block_size"):  # a BlockPattern: its own geometry and rules
            if (pattern.query_len, pattern.key_len) != (query_len, key_len):
                raise InvalidProblem(
                    f"the pattern {getattr(pattern, 'description', '')} is for query_len="
                    f"{pattern.query_len}, key_len={pattern.key_len}; the call has "
                    f"{query_len}, {key_len}. Pass a callable (query_len, key_len) -> pattern "
                    f"to serve several lengths.")
            return PreparedPattern.build(pattern, device=device)
        return prepare_pattern(pattern, query_len=query_len, key_len=key_len,
                               block_size=self.block_size, is_causal=self.is_causal,
                               device=device, window_size=self.window_size,
                               sink_tokens=self.sink_tokens)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.layout == "bnhd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        prepared = self.prepared_pattern(q.shape[-2], k.shape[-2], q.device)
        y = block_sparse_attention(q, k, v, prepared, scale=self.scale, softcap=self.softcap,
                                   sinks=self.sinks, bias=bias)
        return y.transpose(1, 2) if self.layout == "bnhd" else y
