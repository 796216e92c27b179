"""Token rules a builder hands to the kernels, in the attention call's own arguments.

A builder whose token rule the kernels can evaluate per token (a sliding window with sinks,
document ids, a prefix, the bits of the blocks a token mask cuts) attaches it to its
BlockPattern as ``kernel_rules``: a dict with some of ``window_size``, ``sink_tokens``,
``document_ids``, ``prefix_lengths`` (see ``block_sparse_attention`` for their meaning) and
``block_bits`` (``patterns.block_bits.BlockBits``, from ``from_mask_fn`` / ``from_token_mask``). The attention call applies them inside the
blocks the pattern activates, so such a pattern is exact: what the kernels compute is what
the token rule allows.

This module states what those arguments allow, token by token, for the pattern's own
accounting (``to_dense_token_mask``); the kernels' statement of the same rules lives with
them (attention.common), and the tests check the two against each other through the oracle.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from baracuda_kernels.core import InvalidProblem

from .block_bits import BlockBits, check_block_bits

KERNEL_RULE_NAMES = ("window_size", "sink_tokens", "document_ids", "prefix_lengths",
                     "block_bits")


def check_kernel_rules(rules: Optional[dict]) -> Optional[dict]:
    """A copy of ``rules`` with only known names (None stays None; an empty dict is None)."""
    if rules is None:
        return None
    unknown = set(rules) - set(KERNEL_RULE_NAMES)
    if unknown:
        raise InvalidProblem(f"kernel_rules has {sorted(unknown)}; expected names among "
                             f"{KERNEL_RULE_NAMES}.")
    rules = {k: v for k, v in rules.items() if v is not None}
    if "block_bits" in rules:
        check_block_bits(rules["block_bits"])
    return rules or None


def kernel_rules_to(rules: Optional[dict], device) -> Optional[dict]:
    """``rules`` with their tensors on ``device``."""
    if rules is None:
        return None
    return {k: v.to(device) if isinstance(v, (torch.Tensor, BlockBits)) else v
            for k, v in rules.items()}


def kernel_allows(rules: dict, is_causal: bool, query_len: int, key_len: int,
                  token_rule=None) -> Callable[..., torch.Tensor]:
    """f(b, h, q, kv) -> bool: the pairs the kernels keep under ``rules`` and the causal rule
    (top-left: j <= i; a prefix P also keeps j < P). Windows: flash-attn's (left, right),
    centred on the top-left diagonal when causal, on the bottom-right one otherwise; sinks
    (the first keys) stay visible inside the causal rule; block bits: the bits of the
    blocks they cut, or ``token_rule`` (the mask function the bits were built from, for a
    FlexAttention mask_mod that states the rule rather than looks it up) when given."""
    left, right = rules.get("window_size", (-1, -1))
    sinks = rules.get("sink_tokens", 0)
    docs = rules.get("document_ids")
    prefix = rules.get("prefix_lengths")
    bits = rules.get("block_bits")
    off = 0 if is_causal else key_len - query_len

    prefix = None if prefix is None else torch.as_tensor(prefix).reshape(-1)
    docs = None if docs is None else (docs if docs.dim() == 2 else docs[None])

    def row(t, b):  # a per-batch tensor's row b (row 0 when shared); vmap-friendly indexing
        return t[b] if t.shape[0] > 1 else t[torch.zeros_like(b)]

    def allows(b, h, q, kv):
        ok = (q >= 0) & (kv >= 0)  # all True, broadcast over q and kv
        if is_causal:
            causal = kv <= q
            if prefix is not None:
                causal = causal | (kv < row(prefix.to(q.device), b))
            ok = ok & causal
        if left >= 0 or right >= 0:
            d = kv - q - off
            inside = ((d >= -left) | (left < 0)) & ((d <= right) | (right < 0))
            ok = ok & (inside | (kv < sinks))
        if docs is not None:
            d = docs.to(q.device)
            bb = b if d.shape[0] > 1 else torch.zeros_like(b)
            ok = ok & (d[bb, q] == d[bb, kv]) & (d[bb, q] >= 0)
        if bits is not None and token_rule is not None:
            ok = ok & token_rule(b, h, q, kv)
        elif bits is not None:
            ok = ok & bits.to(q.device).allows(b, h, q, kv)
        return ok

    return allows
