"""Checks of concrete tensors against a descriptor, and pattern canonicalisation.

Every function raises InvalidProblem with a message that says expected / got / fix, and
none of them writes to any tensor, so a failed call leaves preallocated outputs untouched.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...core import InvalidProblem
from .descriptor import SdpaBlockSparseDescriptor


def canonical_pattern(desc: SdpaBlockSparseDescriptor, pattern, device: Optional[torch.device]) -> torch.Tensor:
    """Validate a block pattern and return it as a 4-D view [Bp, Hp, nq, nk] (Bp in {1,B},
    Hp in {1, Hkv, H}), bool or uint8 as given (no copy: non-zero = active).

    Accepts a uint8/bool tensor in the flat layout [B|1, Hp, nq*nk] or as [B|1, Hp, nq, nk],
    or any object with a ``mask`` tensor and ``block_size`` / ``query_len`` / ``key_len``
    attributes (a BlockPattern), whose geometry must match the descriptor.
    """
    if hasattr(pattern, "mask") and hasattr(pattern, "block_size"):
        _check_pattern_geometry(desc, pattern)
        pattern = pattern.mask
    return pattern_view(pattern, desc.num_blocks_q, desc.num_blocks_k, desc.block_size,
                        (desc.query_len, desc.key_len), device, desc.batch_size,
                        pattern_head_counts(desc.num_heads, desc.num_kv_heads))


def pattern_head_counts(num_heads: int, num_kv_heads: int) -> tuple[int, ...]:
    """The head extents a pattern may have: one per query head (H), one per K/V head (Hkv,
    shared by the query heads of its group) or one for all (1). Where two coincide (H == Hkv,
    or Hkv == 1) they mean the same thing, so no reading is ambiguous."""
    return tuple(sorted({1, num_kv_heads, num_heads}))


def list_head_divisor(num_heads: int, pattern_heads: int) -> int:
    """Query head h reads the pattern (and list) head h // divisor: 1 per query head, the
    group size per K/V head, H (always head 0) when broadcast."""
    return max(1, num_heads // pattern_heads) if pattern_heads else 1


def pattern_view(pattern, nq: int, nk: int, block_size: int, lengths: tuple[int, int],
                 device: Optional[torch.device], batch: Optional[int] = None,
                 heads: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """A raw pattern tensor as a 4-D view [Bp, Hp, nq, nk], checked (dtype, device, shape).

    ``batch``: when given, Bp must be 1 or equal to it. ``heads``: when given, the head
    extents allowed (``pattern_head_counts``)."""
    if not isinstance(pattern, torch.Tensor):
        raise InvalidProblem(
            f"block_pattern is a {type(pattern).__name__}; expected a bool/uint8 tensor "
            f"[B, H, nq, nk] or [B, H, nq*nk], a BlockPattern or a PreparedPattern.")
    if pattern.dtype not in (torch.bool, torch.uint8):
        raise InvalidProblem(
            f"block_pattern has dtype {pattern.dtype}; expected torch.bool or torch.uint8. "
            f"Convert with block_pattern.bool() (non-zero = compute the block).")
    if device is not None and pattern.device != device:
        raise InvalidProblem(
            f"block_pattern is on {pattern.device}; expected {device} like q. "
            f"Move it with block_pattern.to(q.device) once, outside the training loop.")
    lead_ok = pattern.dim() in (3, 4) and \
        (batch is None or pattern.shape[0] in (1, batch)) and \
        (heads is None or pattern.shape[1] in heads)
    if lead_ok and pattern.dim() == 3 and pattern.shape[2] == nq * nk:
        return pattern.view(pattern.shape[0], pattern.shape[1], nq, nk) if pattern.is_contiguous() \
            else pattern.reshape(pattern.shape[0], pattern.shape[1], nq, nk)
    if lead_ok and pattern.dim() == 4 and tuple(pattern.shape[2:]) == (nq, nk):
        return pattern
    B = "B" if batch is None else batch
    H = "H" if heads is None else max(heads)
    others = "1" if heads is None else " or ".join(str(h) for h in sorted(heads, reverse=True)
                                                   if h != H)
    raise InvalidProblem(
        f"block_pattern has shape {tuple(pattern.shape)}; expected ({B}, {H}, {nq * nk}) = "
        f"[B, H, nq*nk] with nq={nq}, nk={nk} for block_size={block_size} "
        f"(Nq={lengths[0]}, Nk={lengths[1]}), or ({B}, {H}, {nq}, {nk}) = [B, H, nq, nk]. "
        f"B may be 1 to broadcast"
        + (f"; the head extent may also be {others} (one per K/V head under grouped-query "
           f"attention, or 1 for all heads)." if others else "."))


def _check_pattern_geometry(desc: SdpaBlockSparseDescriptor, pattern) -> None:
    got = (pattern.block_size, pattern.query_len, pattern.key_len)
    want = (desc.block_size, desc.query_len, desc.key_len)
    if got != want:
        raise InvalidProblem(
            f"BlockPattern has (block_size, query_len, key_len) = {got}; expected {want} from the "
            f"problem. Build the pattern for these lengths, or pass block_size={pattern.block_size}.")
    if getattr(pattern, "is_causal", False) and not desc.is_causal:
        raise InvalidProblem(
            "BlockPattern is causal (its blocks assume the diagonal is masked) but is_causal is "
            "False; expected is_causal=True. Pass is_causal=True (or None to follow the pattern), "
            "or build the pattern with causal=False.")


def with_pattern_rules(pattern, window_size, sink_tokens, token_kwargs: dict):
    """Merge the ``kernel_rules`` a BlockPattern carries (builders whose token rule the
    kernels apply: windows, documents, prefixes, block bits) into the call's arguments.

    Returns (window_size, sink_tokens, token_kwargs). A rule the call passes too must agree
    with the pattern's (window / sinks), or must not be passed twice (document ids, prefix)."""
    rules = getattr(pattern, "kernel_rules", None)
    if not rules:
        return window_size, sink_tokens, token_kwargs
    for name, given in (("window_size", window_size), ("sink_tokens", sink_tokens)):
        own = rules.get(name)
        if own is not None and given is not None and \
                (tuple(given) if name == "window_size" else given) != own:
            raise InvalidProblem(
                f"{name}={given} was passed with a BlockPattern whose rule has {name}={own} "
                f"({pattern.description}); expected them to agree. Leave {name} out.")
    window_size = rules.get("window_size", window_size)
    sink_tokens = rules.get("sink_tokens", sink_tokens)
    token_kwargs = dict(token_kwargs)
    for name in ("document_ids", "prefix_lengths", "block_bits"):
        if name in rules:
            if token_kwargs.get(name) is not None:
                raise InvalidProblem(
                    f"{name} was passed with a BlockPattern that carries its own "
                    f"({pattern.description}); expected one of them. Leave {name} out.")
            token_kwargs[name] = rules[name]
    return window_size, sink_tokens, token_kwargs
