"""Bit masks of the blocks a token rule cuts: any token mask, exact, stored only where needed.

A token rule that none of the kernels' closed forms states (a mask function, a token mask)
is exact when every block it cuts carries its own bs x bs bits. ``BlockBits`` holds them:

* ``slots`` int32 ``[Bs, Hs, nq, nk]``: 0 for a block without bits (the rule allows every
  pair of it, or it is not active), s > 0 for the block whose bits are ``words[s]``;
* ``words`` int32 ``[1 + P, bs, W]`` (W = ceil(bs / 32)): bit ``c % 32`` of
  ``words[s, r, c // 32]`` says whether in-block query row r may see in-block key column c.
  ``words[0]`` is all ones, so a PARTIAL block cut only by the causal rule or a ragged tail
  reads "allowed" without a branch.

Memory: 4 * bs * W bytes per cut block (2 KiB at bs = 128), nothing for the others.
Broadcast dims (Bs or Hs = 1) follow the block pattern's rules. The kernels read the bits
of PARTIAL blocks only (``kernel_pieces.block_bits_tile``); the block lists treat every
block with bits as PARTIAL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core import InvalidProblem


def words_per_row(block_size: int) -> int:
    return -(-block_size // 32)


@dataclass(frozen=True)
class BlockBits:
    slots: torch.Tensor
    words: torch.Tensor

    @property
    def block_size(self) -> int:
        return self.words.shape[1]

    @property
    def num_cut_blocks(self) -> int:
        return self.words.shape[0] - 1

    @property
    def nbytes(self) -> int:
        return self.slots.numel() * 4 + self.words.numel() * 4

    def to(self, device) -> "BlockBits":
        return BlockBits(self.slots.to(device), self.words.to(device))

    def for_block_size(self, block_size: int) -> "BlockBits":
        """These bits for kernels whose block is ``block_size`` <= this block (the kernels
        clip a block longer than both sequences; the cropped rows and columns lie past the
        ends, where nothing is computed)."""
        if block_size == self.block_size:
            return self
        if block_size > self.block_size or self.slots.shape[2] != 1 or self.slots.shape[3] != 1:
            raise RuntimeError(f"BlockBits of block {self.block_size} cannot serve kernel block "
                               f"{block_size}: internal error")
        return BlockBits(self.slots, self.words[:, :block_size,
                                                :words_per_row(block_size)].contiguous())

    def check_for(self, batch: int, query_len: int, key_len: int, device) -> None:
        """InvalidProblem unless these bits fit a problem of this batch and these lengths."""
        bs = self.block_size
        nq, nk = -(-query_len // bs), -(-key_len // bs)
        s, w = self.slots, self.words
        if s.dtype != torch.int32 or s.dim() != 4 or s.shape[0] not in (1, batch) \
                or tuple(s.shape[2:]) != (nq, nk) or s.device != device or not s.is_contiguous() \
                or w.dtype != torch.int32 or w.dim() != 3 or w.shape[2] != words_per_row(bs) \
                or w.device != device or not w.is_contiguous():
            raise InvalidProblem(
                f"block bits: slots {s.dtype} {tuple(s.shape)}, words {w.dtype} "
                f"{tuple(w.shape)} on {s.device}; expected contiguous int32 slots "
                f"[1 or {batch}, heads, {nq}, {nk}] and words [n, {bs}, {words_per_row(bs)}] on "
                f"{device}. Build the pattern for this problem (from_mask_fn / from_token_mask "
                f"with its lengths and block size).")

    def allows(self, b, h, q_idx, k_idx) -> torch.Tensor:
        """bool: the bits of token pairs (q_idx, k_idx) of batch b, pattern head h
        (broadcastable int64 tensors; b / h are ignored where the slots broadcast). A block
        with slot 0 allows every pair."""
        slots, bs = self.slots, self.block_size
        b = b if slots.shape[0] > 1 else torch.zeros_like(b)
        h = h if slots.shape[1] > 1 else torch.zeros_like(h)
        slot = slots[b, h, q_idx // bs, k_idx // bs].long()
        col = k_idx % bs
        word = self.words[slot, q_idx % bs, col // 32]
        return ((word >> (col % 32)) & 1) != 0


def pack_rows(bits: torch.Tensor) -> torch.Tensor:
    """bool ``[P, R, C]`` -> int32 ``[P, R, ceil(C / 32)]``, bit c % 32 of word c // 32."""
    P, R, C = bits.shape
    W = words_per_row(C)
    padded = torch.nn.functional.pad(bits, (0, W * 32 - C)).view(P, R, W, 32).to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=bits.device) << torch.arange(
        32, dtype=torch.int64, device=bits.device)
    words = (padded * weights).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement in int32
    return words.to(torch.int32)


def all_ones_words(block_size: int, device) -> torch.Tensor:
    """The words of slot 0: int32 ``[1, bs, W]`` of ones (every pair allowed)."""
    return torch.full((1, block_size, words_per_row(block_size)), -1, dtype=torch.int32,
                      device=device)


def check_block_bits(bits) -> BlockBits:
    if not isinstance(bits, BlockBits):
        raise InvalidProblem(f"block_bits is a {type(bits).__name__}; expected a BlockBits "
                             f"(from patterns.from_mask_fn / from_token_mask).")
    return bits
