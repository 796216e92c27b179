"""Per-sequence block patterns of a varlen pack, exact per token.

Sequence s of a pack may carry its own block pattern, in its own block coordinates: block
(i, j) covers the queries ``i*bs .. i*bs + bs - 1`` and the keys ``j*bs .. j*bs + bs - 1``
counted from the sequence's start. Sequences start at any token, so their blocks do not
line up with the pack's blocks: a pack block can hold parts of several sequence blocks. The
pack is therefore given (1) a pack-level block pattern: the pack blocks that hold an
allowed pair, and (2) the bits of the pack blocks the sequence blocks cut
(patterns.block_bits), which the kernels apply per token like any token mask.

Only pack blocks where some sequence has both queries and keys are evaluated (the blocks
along the pack's diagonal band of sequences), a chunk of them at a time: no Tq x Tk tensor.
Building them synchronises with the device once (the number of cut blocks sizes the bits).
"""

from __future__ import annotations

import torch

from ...core import InvalidProblem
from ..patterns.block_bits import BlockBits, all_ones_words, pack_rows

_CHUNK_PAIRS = 1 << 22  # token pairs (times heads) evaluated at a time


def check_sequence_pattern(pattern, n_seq: int, heads: tuple, max_q_blocks: int,
                           max_k_blocks: int, device) -> torch.Tensor:
    """bool [S, Hp, a, b] on ``device`` (a >= max_q_blocks, b >= max_k_blocks, Hp in heads)."""
    if not isinstance(pattern, torch.Tensor) or pattern.dim() != 4 \
            or pattern.dtype not in (torch.bool, torch.uint8):
        raise InvalidProblem(
            f"sequence_pattern is {getattr(pattern, 'dtype', type(pattern).__name__)} of shape "
            f"{tuple(getattr(pattern, 'shape', ()))}; expected a bool tensor [S, heads, "
            f"q_blocks, k_blocks], one block pattern per sequence in its own coordinates.")
    S, Hp, a, b = pattern.shape
    if S != n_seq or Hp not in heads or a < max_q_blocks or b < max_k_blocks:
        raise InvalidProblem(
            f"sequence_pattern has shape {tuple(pattern.shape)}; expected [{n_seq}, one of "
            f"{sorted(set(heads))}, >= {max_q_blocks}, >= {max_k_blocks}] ([sequences, "
            f"heads (per query head, per K/V head or 1), ceil(longest query sequence / "
            f"block_size), ceil(longest key sequence / block_size)]).")
    return pattern.to(device=device, dtype=torch.bool)


def sequence_pattern_rules(pattern: torch.Tensor, seq_q: torch.Tensor, seq_k: torch.Tensor,
                           pos_q: torch.Tensor, pos_k: torch.Tensor, block_size: int):
    """(pack block pattern bool [1, Hp, nq, nk], BlockBits) of per-sequence patterns.

    Args:
        pattern: bool [S, Hp, a, b] (``check_sequence_pattern``).
        seq_q, seq_k: int64 [Tq] / [Tk] sequence of every token (S: padding).
        pos_q, pos_k: int64 [Tq] / [Tk] index of every token inside its sequence.
        block_size: the pack's block (and the sequences' block) in tokens.
    """
    S, Hp, a, b = pattern.shape
    bs, dev = block_size, pattern.device
    Tq, Tk = seq_q.numel(), seq_k.numel()
    nq, nk = -(-Tq // bs), -(-Tk // bs)
    # Candidate pack blocks: a sequence has queries in the row block and keys in the column
    # block (per-block sequence ranges; sequences are contiguous and ascending).
    q_lo, q_hi = _block_range(seq_q, nq, bs, S)
    k_lo, k_hi = _block_range(seq_k, nk, bs, S)
    candidate = (q_lo[:, None] <= k_hi[None, :]) & (k_lo[None, :] <= q_hi[:, None]) \
        & (q_lo[:, None] < S) & (k_lo[None, :] < S)
    cells = candidate.nonzero()                                            # [P, 2]
    active = torch.zeros(Hp, nq, nk, dtype=torch.bool, device=dev)
    slots = torch.zeros(1, Hp, nq, nk, dtype=torch.int32, device=dev)
    words, n_cut = [all_ones_words(bs, dev)], 0
    r = torch.arange(bs, device=dev)
    flat = pattern.reshape(S * Hp, a * b)
    step = max(1, _CHUNK_PAIRS // (bs * bs * Hp))
    for c0 in range(0, cells.shape[0], step):
        cq, ck = cells[c0:c0 + step, 0], cells[c0:c0 + step, 1]
        i = cq[:, None] * bs + r                                            # [P, bs]
        j = ck[:, None] * bs + r
        i_ok, j_ok = i < Tq, j < Tk
        i, j = i.clamp(max=Tq - 1), j.clamp(max=Tk - 1)
        sq, sk = seq_q[i], seq_k[j]
        same = (sq[:, :, None] == sk[:, None, :]) & (sq < S)[:, :, None] \
            & i_ok[:, :, None] & j_ok[:, None, :]                           # [P, bs, bs]
        bq, bk = (pos_q[i] // bs).clamp(max=a - 1), (pos_k[j] // bs).clamp(max=b - 1)
        seq = sq.clamp(max=S - 1)
        cell = (bq[:, :, None] * b + bk[:, None, :])                        # [P, bs, bs]
        rows = (seq[:, :, None] * Hp)[None] + torch.arange(Hp, device=dev)[:, None, None, None]
        allowed = flat[rows, cell[None].expand(Hp, -1, -1, -1)] & same[None]  # [Hp,P,bs,bs]
        hit = allowed.flatten(2).any(-1)                                      # [Hp, P]
        full = (allowed | ~same[None]).flatten(2).all(-1) & hit
        active[:, cq, ck] = hit
        cut = hit & ~full
        n_new = int(cut.sum())
        if n_new:
            h_idx, p_idx = cut.nonzero(as_tuple=True)
            slots[0, h_idx, cq[p_idx], ck[p_idx]] = torch.arange(
                n_cut + 1, n_cut + 1 + n_new, dtype=torch.int32, device=dev)
            words.append(pack_rows(allowed[h_idx, p_idx]))
            n_cut += n_new
    return active[None], BlockBits(slots, torch.cat(words).contiguous())


def _block_range(seq: torch.Tensor, n_blocks: int, bs: int, pad: int):
    """(min, max) sequence index over each block of tokens (padding tokens count as ``pad``,
    the block tail past the end as neither)."""
    n = seq.numel()
    extra = n_blocks * bs - n
    lo = torch.nn.functional.pad(seq, (0, extra), value=pad + 1).view(n_blocks, bs).amin(-1)
    hi = torch.nn.functional.pad(seq, (0, extra), value=-1).view(n_blocks, bs).amax(-1)
    return lo, hi
