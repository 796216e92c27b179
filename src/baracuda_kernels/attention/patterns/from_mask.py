"""Block patterns from token-level masks and from vectorised mask functions.

A block is active when any of its (in-range, and causal when ``is_causal``) token pairs is
allowed. Both builders see every token pair anyway, so they also keep the bits of every
active block the mask cuts (``patterns.block_bits.BlockBits``, as the pattern's kernel rule
``block_bits``): the kernels apply them per token inside those blocks, and the pattern is
exact for any mask, with no dense Nq x Nk tensor kept and no compile step.

This module sits below ``block_pattern`` and does not import it: it returns the
``BlockPattern`` constructor arguments, and ``BlockPattern.from_token_mask`` /
``BlockPattern.from_mask_fn`` (exported as the package's ``from_token_mask`` /
``from_mask_fn``, where the arguments are documented) build the pattern from them.
"""

from __future__ import annotations

from typing import Optional

import torch

from baracuda_kernels.core import InvalidProblem

from .block_bits import BlockBits, all_ones_words, pack_rows
from .checks import check_block_size, check_geometry, check_int
from .counting import TokenRule, cdiv


def _reduce_rows(allowed: torch.Tensor, row0: int, query_len: int, key_len: int,
                 block_size: int, is_causal: bool):
    """Reduce a chunk of token rows to blocks.

    ``allowed``: bool ``[B, H, rows, key_len]`` for token rows ``row0 .. row0 + rows - 1``
    (``row0`` a multiple of ``block_size``). Returns (active, fully_allowed) bool
    ``[B, H, ceil(rows / bs), nk]``, the number of allowed in-range pairs, and the packed
    bits (int32 ``[P, bs, ceil(bs / 32)]``, ``pack_rows``) of the P active blocks that are not
    fully allowed, in ``(active & ~fully_allowed).nonzero()`` order.
    """
    bsz, heads, rows, _ = allowed.shape
    bs = block_size
    nr, nk = cdiv(rows, bs), cdiv(key_len, bs)
    dev = allowed.device
    q = torch.arange(row0, row0 + nr * bs, device=dev)[:, None]
    kv = torch.arange(nk * bs, device=dev)[None, :]
    valid = (q < query_len) & (kv < key_len)
    if is_causal:
        valid &= kv <= q
    padded = torch.nn.functional.pad(allowed, (0, nk * bs - key_len, 0, nr * bs - rows))
    hit = padded & valid
    count = int(torch.count_nonzero(hit))
    shape = (bsz, heads, nr, bs, nk, bs)
    active = hit.view(shape).any(-1).any(-2)
    full = (padded | ~valid).view(shape).all(-1).all(-2) & active
    cut = active & ~full
    cell_bits = hit.view(shape).permute(0, 1, 2, 4, 3, 5)[cut]            # [P, bs, bs]
    return active, full, count, pack_rows(cell_bits)


def _rows_per_chunk(bsz: int, heads: int, key_len: int, block_size: int, chunk_pairs: int) -> int:
    per_block_row = bsz * heads * block_size * cdiv(key_len, block_size) * block_size
    return max(1, chunk_pairs // per_block_row) * block_size


class _Chunks:
    """Per-chunk reductions of ``_reduce_rows`` joined along the query blocks."""

    def __init__(self):
        self.active, self.full, self.slots, self.words, self.count, self.cut_blocks = \
            [], [], [], [], 0, 0

    def add(self, active, full, count, words) -> None:
        cut = active & ~full
        slots = torch.zeros(cut.shape, dtype=torch.int32, device=cut.device)
        slots[cut] = torch.arange(self.cut_blocks + 1, self.cut_blocks + 1 + words.shape[0],
                                  dtype=torch.int32, device=cut.device)
        self.cut_blocks += words.shape[0]
        self.active.append(active)
        self.full.append(full)
        self.slots.append(slots)
        self.words.append(words)
        self.count += count

    def finish(self, *, block_size, query_len, key_len, is_causal, rule, description) -> dict:
        active, full = torch.cat(self.active, 2), torch.cat(self.full, 2)
        kernel_rules = None
        if self.cut_blocks:
            words = torch.cat([all_ones_words(block_size, active.device), *self.words])
            kernel_rules = {"block_bits": BlockBits(torch.cat(self.slots, 2).contiguous(), words)}
        return dict(mask=active, block_size=block_size, query_len=query_len, key_len=key_len,
                    is_causal=is_causal, token_rule=rule, description=description,
                    _rule_pairs=self.count, _exact_mask=full, _kernel_rules=kernel_rules)


def token_mask_parts(token_mask: torch.Tensor, *, block_size: int, is_causal: bool = False,
                     chunk_pairs: int = 1 << 24) -> dict:
    """BlockPattern arguments of ``BlockPattern.from_token_mask`` (documented there)."""
    bs = check_block_size(block_size)
    if not isinstance(token_mask, torch.Tensor) or token_mask.dim() not in (2, 3, 4):
        got = tuple(token_mask.shape) if isinstance(token_mask, torch.Tensor) else type(token_mask).__name__
        raise InvalidProblem(f"token_mask must be a tensor [Nq, Nk], [H, Nq, Nk] or [B, H, Nq, Nk]; "
                             f"got {got}.")
    if token_mask.is_floating_point() or token_mask.is_complex():
        raise InvalidProblem(f"token_mask has dtype {token_mask.dtype}; expected bool or an integer "
                             "dtype (nonzero = allowed). Fix: token_mask = token_mask != 0 (or, for "
                             "an additive float mask, token_mask > float('-inf')).")
    tm = token_mask
    while tm.dim() < 4:
        tm = tm.unsqueeze(0)
    bsz, heads, lq, lk = tm.shape
    if lq == 0 or lk == 0:
        raise InvalidProblem(f"token_mask has an empty sequence dim: shape {tuple(tm.shape)}.")
    step = _rows_per_chunk(bsz, heads, lk, bs, chunk_pairs)
    chunks = _Chunks()
    for r0 in range(0, lq, step):
        chunks.add(*_reduce_rows(tm[:, :, r0:r0 + step] != 0, r0, lq, lk, bs, is_causal))

    def rule(b, h, q, kv):
        m = tm if tm.device == q.device else tm.to(q.device)
        bi = torch.zeros_like(b) if bsz == 1 else b
        hi = torch.zeros_like(h) if heads == 1 else h
        return m[bi, hi, q, kv] != 0

    return chunks.finish(block_size=bs, query_len=lq, key_len=lk, is_causal=is_causal,
                         rule=rule, description=f"from_token_mask(is_causal={is_causal})")


def mask_fn_parts(fn: TokenRule, query_len: int, key_len: Optional[int] = None, *,
                  block_size: int, batch: int = 1, num_heads: int = 1, is_causal: bool = False,
                  device=None, chunk_pairs: int = 1 << 24) -> dict:
    """BlockPattern arguments of ``BlockPattern.from_mask_fn`` (documented there)."""
    bs, lq, lk = check_geometry(block_size, query_len, key_len)
    batch = check_int("batch", batch, 1)
    num_heads = check_int("num_heads", num_heads, 1)
    if not callable(fn):
        raise InvalidProblem(f"fn must be callable f(b, h, q_idx, kv_idx) -> bool; got "
                             f"{type(fn).__name__}.")
    dev = torch.device("cpu") if device is None else torch.device(device)
    b = torch.arange(batch, device=dev).view(batch, 1, 1, 1)
    h = torch.arange(num_heads, device=dev).view(1, num_heads, 1, 1)
    kv = torch.arange(lk, device=dev).view(1, 1, 1, lk)
    step = _rows_per_chunk(batch, num_heads, lk, bs, chunk_pairs)
    chunks = _Chunks()
    for r0 in range(0, lq, step):
        rows = min(step, lq - r0)
        q = torch.arange(r0, r0 + rows, device=dev).view(1, 1, rows, 1)
        out = torch.as_tensor(fn(b, h, q, kv), device=dev)
        try:
            out = torch.broadcast_to(out, (batch, num_heads, rows, lk))
        except RuntimeError as exc:
            raise InvalidProblem(
                f"fn returned shape {tuple(out.shape)}, which does not broadcast to "
                f"[{batch}, {num_heads}, {rows}, {lk}] = [batch, num_heads, rows, key_len]. Fix: "
                "write fn with broadcasting tensor ops, and pass batch/num_heads matching the "
                "b/h it depends on.") from exc
        chunks.add(*_reduce_rows(out.to(torch.bool), r0, lq, lk, bs, is_causal))
    name = getattr(fn, "__name__", type(fn).__name__)
    return chunks.finish(block_size=bs, query_len=lq, key_len=lk, is_causal=is_causal, rule=fn,
                         description=f"from_mask_fn({name}, is_causal={is_causal})")
