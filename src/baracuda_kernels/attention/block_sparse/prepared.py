"""PreparedPattern: a block pattern made ready for one problem geometry on one device.

Preparing does all the pattern work once: the pattern is validated and copied (a snapshot,
so later writes to the caller's tensor cannot change it), and its FULL/PARTIAL block lists
are built in both directions (forward/dQ rows and the transposed dK/dV rows). The
functional API and the plans accept a PreparedPattern wherever they take a pattern and then
do no pattern work per call: they check that the geometry matches (a few integer
comparisons) and hand the lists to the kernels. Backward launch orders derived from the
lists are memoised on them at the first backward.

Raw tensors and BlockPatterns passed directly stay correct in every case (their lists are
rebuilt on each call, by one Triton launch on CUDA), just not free: prepare a pattern that
is reused across calls.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...core import InvalidProblem, resolve_device
from ..common.problem import causal_mode, check_window, window_rule
from ..common.token_rules import TokenRules, token_rules_for
from .block_lists import BlockLists
from .descriptor import kernel_block_size
from ..patterns.checks import check_int
from .validation import pattern_head_counts, pattern_view, with_pattern_rules


class PreparedPattern:
    """Block lists of one pattern for (block_size, query_len, key_len, is_causal) on one
    device. Build with ``prepare_pattern(...)``, ``BlockPattern.prepare()`` or
    ``plan.prepare(pattern)``; pass it as the pattern of ``block_sparse_attention`` or of
    ``SdpaBlockSparseArgs``.

    Attributes:
        mask: bool ``[Bp, Hp, nq, nk]``, the snapshot the lists were built from (Bp, Hp may
            be 1: broadcast over batch / heads).
        lists: the ``BlockLists`` (kv_* rows per query block, q_* rows per key block).
        block_size, query_len, key_len, is_causal, device: the geometry it is valid for.

    >>> prep = prepare_pattern(torch.ones(1, 1, 4, 4, dtype=torch.bool), query_len=256,
    ...                        block_size=64, is_causal=True, device="cpu")
    >>> y = block_sparse_attention(q, k, v, prep)    # q, k, v [B, H, 256, D] on the CPU
    """

    __slots__ = ("mask", "lists", "block_size", "query_len", "key_len", "is_causal", "device",
                 "description", "window_size", "sink_tokens")

    def __init__(self, mask: torch.Tensor, lists: BlockLists, *, block_size: int, query_len: int,
                 key_len: int, is_causal: bool, description: str = "",
                 window_size: tuple = (-1, -1), sink_tokens: int = 0):
        self.mask, self.lists = mask, lists
        self.block_size, self.query_len, self.key_len = block_size, query_len, key_len
        self.is_causal, self.device, self.description = is_causal, mask.device, description
        self.window_size, self.sink_tokens = window_size, sink_tokens

    @property
    def token_rules(self) -> Optional[TokenRules]:
        """The document ids / padding / prefix the lists were built with (None: none)."""
        return self.lists.tokens

    @classmethod
    def build(cls, pattern, *, query_len: Optional[int] = None, key_len: Optional[int] = None,
              block_size: Optional[int] = None, is_causal: Optional[bool] = None,
              device=None, window_size: tuple = (-1, -1), sink_tokens: int = 0,
              document_ids=None, query_range=None, key_range=None,
              prefix_lengths=None, block_bits=None) -> "PreparedPattern":
        """Prepare ``pattern`` (bool/uint8 ``[B|1, Hp, nq, nk]`` or ``[B|1, Hp, nq*nk]`` with Hp
        one per query head, one per K/V head or 1 (checked against q, k, v at use), or
        a BlockPattern, whose block_size / lengths / causality are used).

        Args:
            query_len, key_len: token lengths (key_len defaults to query_len); required for
                raw tensors, checked against a BlockPattern's when given.
            block_size: tokens per block; required for raw tensors.
            is_causal: False, True (top-left) or "bottom_right" (default: the
                BlockPattern's, else False).
            device: where the attention will run (default: the pattern's device); the
                pattern is copied there.
            window_size, sink_tokens: the token window of the attention calls (see
                ``block_sparse_attention``); blocks it empties are skipped, blocks it cuts
                are masked per token.
            document_ids, query_range, key_range, prefix_lengths: the per-token rules of the
                attention calls (see ``block_sparse_attention``), built into the lists once.
            block_bits: the bits of cut blocks (``patterns.block_bits``) for a raw mask; a
                BlockPattern from ``from_mask_fn`` / ``from_token_mask`` brings its own.
        Raises:
            InvalidProblem for a missing or inconsistent geometry or a malformed pattern.
        """
        description = ""
        if hasattr(pattern, "mask") and hasattr(pattern, "block_size"):  # a BlockPattern
            given = dict(block_size=block_size, query_len=query_len, key_len=key_len)
            for name, value in given.items():
                own = getattr(pattern, name)
                if value is not None and value != own:
                    raise InvalidProblem(
                        f"{name}={value} was passed with a BlockPattern built for {name}={own}; "
                        f"expected them to agree. Leave {name} out (the pattern carries it).")
            if is_causal is False and pattern.is_causal:
                raise InvalidProblem(
                    "is_causal=False was passed with a causal BlockPattern (its blocks assume the "
                    "diagonal is masked); expected True or None. Build the pattern with "
                    "causal=False for non-causal attention.")
            block_size, query_len, key_len = pattern.block_size, pattern.query_len, pattern.key_len
            is_causal = pattern.is_causal if is_causal is None else is_causal
            description = getattr(pattern, "description", "") or ""
            window_size, sink_tokens, rules = with_pattern_rules(
                pattern, None if tuple(window_size) == (-1, -1) else window_size,
                sink_tokens or None, dict(document_ids=document_ids,
                                          prefix_lengths=prefix_lengths,
                                          block_bits=block_bits))
            window_size = (-1, -1) if window_size is None else window_size
            sink_tokens = sink_tokens or 0
            document_ids, prefix_lengths = rules["document_ids"], rules["prefix_lengths"]
            block_bits = rules["block_bits"]
            pattern = pattern.mask
        if block_size is None or query_len is None:
            raise InvalidProblem(
                f"block_size={block_size}, query_len={query_len}; expected both for a raw "
                f"pattern tensor. Pass prepare_pattern(mask, query_len=N, block_size=bs) or "
                f"prepare a BlockPattern, which carries them.")
        key_len = query_len if key_len is None else key_len
        check_int("block_size", block_size, 1)
        check_int("query_len", query_len, 0)
        check_int("key_len", key_len, 0)
        is_causal = causal_mode(is_causal) if is_causal is not None else False
        if not isinstance(pattern, torch.Tensor):
            raise InvalidProblem(f"pattern is a {type(pattern).__name__}; expected a bool/uint8 "
                                 f"tensor or a BlockPattern.")
        device = resolve_device(pattern.device if device is None else device)
        nq, nk = -(-query_len // block_size), -(-key_len // block_size)
        view = pattern_view(pattern, nq, nk, block_size, (query_len, key_len), None)
        # The snapshot: a private bool copy on the target device (also detaches it from any
        # later in-place write by the caller).
        mask = view.to(device=device, dtype=torch.bool, copy=True).contiguous()
        window_size, sink_tokens = check_window(window_size, sink_tokens)
        window = window_rule(window_size, sink_tokens, is_causal, query_len, key_len)
        kernel_block = kernel_block_size(block_size, query_len, key_len)
        tokens = token_rules_for(None, query_len, key_len, device, is_causal, window_size,
                                 document_ids=document_ids, query_range=query_range,
                                 key_range=key_range, prefix_lengths=prefix_lengths,
                                 block_bits=block_bits, block_size=kernel_block)
        lists = BlockLists.build(mask, query_len, key_len, kernel_block, is_causal,
                                 window=window, tokens=tokens).measured()
        return cls(mask, lists, block_size=block_size, query_len=query_len, key_len=key_len,
                   is_causal=is_causal, description=description, window_size=window_size,
                   sink_tokens=sink_tokens)

    # ------------------------------------------------------------------ use
    def check_matches(self, desc, device: torch.device) -> None:
        """InvalidProblem unless this was prepared for ``desc``'s geometry on ``device``."""
        got = (self.block_size, self.query_len, self.key_len, self.is_causal, self.window_size,
               self.sink_tokens)
        want = (desc.block_size, desc.query_len, desc.key_len, desc.is_causal, desc.window_size,
                desc.sink_tokens)
        if got != want:
            raise InvalidProblem(
                f"PreparedPattern was prepared for (block_size, query_len, key_len, is_causal, "
                f"window_size, sink_tokens) = "
                f"{got}; the problem is {want}. Prepare the pattern for this problem "
                f"(plan.prepare(pattern) or prepare_pattern(..., query_len=..., is_causal=...)).")
        if self.device != device:
            raise InvalidProblem(f"PreparedPattern is on {self.device}; expected {device} like q. "
                                 f"Prepare it with device={device}.")
        bp, hp = self.mask.shape[:2]
        tokens = self.lists.tokens
        if tokens is not None and tokens.batch not in (1, desc.batch_size):
            raise InvalidProblem(
                f"PreparedPattern's token rules (document ids / ranges / prefix) have batch "
                f"{tokens.batch}; the problem has batch {desc.batch_size}. Prepare it with "
                f"per-batch tensors of {desc.batch_size} rows (or 1 shared row).")
        heads = pattern_head_counts(desc.num_heads, desc.num_kv_heads)
        if bp not in (1, desc.batch_size) or hp not in heads:
            raise InvalidProblem(
                f"PreparedPattern has batch/heads ({bp}, {hp}); expected batch 1 or "
                f"{desc.batch_size} and heads one of {heads} (per query head, per K/V head, "
                f"or 1 for all) to match q, k and v.")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(Bp, Hp, nq, nk)."""
        return tuple(self.mask.shape)

    def density(self) -> float:
        """Fraction of active blocks (before the causal cut)."""
        return float(self.mask.float().mean()) if self.mask.numel() else 0.0

    def __repr__(self) -> str:
        what = f" {self.description}" if self.description else ""
        return (f"PreparedPattern{what}(shape={self.shape}, block_size={self.block_size}, "
                f"query_len={self.query_len}, key_len={self.key_len}, "
                f"is_causal={self.is_causal}, device={self.device})")


def prepare_pattern(pattern, *, query_len: Optional[int] = None, key_len: Optional[int] = None,
                    block_size: Optional[int] = None, is_causal: Optional[bool] = None,
                    device=None, window_size: tuple = (-1, -1), sink_tokens: int = 0,
                    document_ids=None, query_range=None, key_range=None,
                    prefix_lengths=None) -> PreparedPattern:
    """Prepare a block pattern once for many attention calls (see ``PreparedPattern.build``).

    >>> prep = prepare_pattern(mask, query_len=8192, block_size=128, is_causal=True,
    ...                        device="cuda")
    >>> y = block_sparse_attention(q, k, v, prep)
    """
    return PreparedPattern.build(pattern, query_len=query_len, key_len=key_len,
                                 block_size=block_size, is_causal=is_causal, device=device,
                                 window_size=window_size, sink_tokens=sink_tokens,
                                 document_ids=document_ids, query_range=query_range,
                                 key_range=key_range, prefix_lengths=prefix_lengths)
