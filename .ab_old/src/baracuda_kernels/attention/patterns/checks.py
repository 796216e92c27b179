"""Argument checks shared by the pattern modules (and by ``block_sparse.prepared``).

A leaf module: it imports ``baracuda_kernels.core``, ``counting`` and torch only, so every
module of the package (and the attention layer above it) can use it without a cycle.
"""

from __future__ import annotations

import torch

from baracuda_kernels.core import InvalidProblem

from .counting import cdiv


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidProblem(f"{name} must be an int >= {minimum}; got {value!r}.")
    return value


def check_block_size(block_size) -> int:
    return check_int("block_size", block_size, 1)


def check_geometry(block_size, query_len, key_len, query_name: str = "query_len"):
    """(block size, query length, key length) checked; the key length defaults to the
    query length. ``query_name`` is the caller's parameter name, for the error message."""
    bs = check_block_size(block_size)
    lq = check_int(query_name, query_len, 1)
    return bs, lq, lq if key_len is None else check_int("key_len", key_len, 1)


def broadcast_dim(name: str, a: int, b: int) -> int:
    """The combined size of a batch/head dim of two patterns (equal, or one of them 1)."""
    if a != b and a != 1 and b != 1:
        raise InvalidProblem(f"cannot combine block patterns with {name} {a} and {b}; expected equal "
                             "sizes or 1 (broadcast). Fix: build both for the same batch/heads.")
    return max(a, b)


def canonical_mask(mask, block_size: int, query_len: int, key_len: int) -> torch.Tensor:
    """A block pattern mask checked against its geometry, as contiguous bool [B, H, nq, nk]."""
    if not isinstance(mask, torch.Tensor):
        raise InvalidProblem(f"block pattern mask must be a torch.Tensor; got {type(mask).__name__}. "
                             "Fix: pass a bool/uint8 tensor [B, H, nq, nk], or use a builder.")
    nq, nk = cdiv(query_len, block_size), cdiv(key_len, block_size)
    if mask.dim() not in (2, 3, 4) or tuple(mask.shape[-2:]) != (nq, nk):
        raise InvalidProblem(
            f"block pattern mask has shape {tuple(mask.shape)}; expected [B, H, {nq}, {nk}] "
            f"(or [H, {nq}, {nk}] / [{nq}, {nk}]) for query_len={query_len}, key_len={key_len}, "
            f"block_size={block_size} (nq = ceil(query_len / block_size)). Fix: rebuild the "
            "mask for these lengths or pass the lengths it was built for.")
    if mask.is_floating_point() or mask.is_complex():
        raise InvalidProblem(f"block pattern mask has dtype {mask.dtype}; expected torch.bool or "
                             "an integer dtype (nonzero = active). Fix: mask = mask != 0.")
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask if mask.dtype == torch.bool else mask != 0
    return mask.contiguous()
