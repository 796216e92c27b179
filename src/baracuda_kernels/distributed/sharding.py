"""Which tokens of a sequence each rank of a context-parallel group holds.

A sequence of N tokens is cut into equal chunks; each rank holds some of them, concatenated
in sequence order, as its shard (the sequence dim of its q, k, v):

* ``"contiguous"``: W chunks of N / W tokens; rank r holds chunk r. Simple, but with a
  causal pattern the last rank does W times the work of the first.
* ``"zigzag"`` (the default): 2W chunks of N / (2W) tokens; rank r holds chunks r and
  2W - 1 - r (one early, one late), so every rank has the same causal work (the load
  balancing of ring-flash-attn and torchtitan's context parallel). With W = 2 and N = 8:
  rank 0 holds tokens 0 1 6 7 and rank 1 holds 2 3 4 5.

Chunks are whole pattern blocks (N divisible by chunks * block_size), so every block of
the global pattern lives on exactly one rank. ``Sharding.positions(rank)`` gives the global
index of every local token; ``shard`` / ``unshard`` move whole tensors between the global
and the per-rank views, and ``gather`` all-gathers a sharded tensor back in sequence order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import InvalidProblem

LAYOUTS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class Sharding:
    """The split of ``seq_len`` tokens over ``world_size`` ranks (see the module doc).

    ``block_size``: the chunks must be whole blocks of the attention pattern."""

    seq_len: int
    world_size: int
    layout: str = "zigzag"
    block_size: int = 1

    def __post_init__(self):
        for name in ("seq_len", "world_size", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidProblem(f"{name} is {value!r}; expected an int >= 1.")
        if self.layout not in LAYOUTS:
            raise InvalidProblem(f"layout is {self.layout!r}; expected one of {LAYOUTS}.")
        unit = self.num_chunks * self.block_size
        if self.seq_len % unit:
            raise InvalidProblem(
                f"seq_len {self.seq_len} does not split into {self.num_chunks} chunks of whole "
                f"{self.block_size}-token blocks ({self.layout} over {self.world_size} ranks); "
                f"expected a multiple of {unit}. Pad the sequence to "
                f"{-(-self.seq_len // unit) * unit} tokens and mark the padding with document "
                f"id -1 (document_ids), which no query sees.")

    @property
    def num_chunks(self) -> int:
        return 2 * self.world_size if self.layout == "zigzag" else self.world_size

    @property
    def chunk_len(self) -> int:
        return self.seq_len // self.num_chunks

    @property
    def local_len(self) -> int:
        """Tokens per rank (the same on every rank)."""
        return self.seq_len // self.world_size

    def chunks(self, rank: int) -> tuple[int, ...]:
        """The chunk indices rank ``rank`` holds, in the order of its shard."""
        self._check_rank(rank)
        if self.layout == "zigzag":
            return (rank, 2 * self.world_size - 1 - rank)
        return (rank,)

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """int64 [local_len]: the global token index of every token of ``rank``'s shard."""
        c = self.chunk_len
        return torch.cat([torch.arange(i * c, (i + 1) * c, device=device)
                          for i in self.chunks(rank)])

    def block_positions(self, rank: int) -> torch.Tensor:
        """int64 [local_len / block_size]: the global block index of each local block."""
        per_chunk = self.chunk_len // self.block_size
        return torch.cat([torch.arange(i * per_chunk, (i + 1) * per_chunk)
                          for i in self.chunks(rank)])

    def shard(self, x: torch.Tensor, rank: int, dim: int = 2) -> torch.Tensor:
        """Rank ``rank``'s shard of a global tensor whose dim ``dim`` is the sequence (a
        copy; q/k/v [B, H, N, D] use dim=2, document ids [B, N] dim=1)."""
        self._check_len(x, dim)
        c = self.chunk_len
        return torch.cat([x.narrow(dim, i * c, c) for i in self.chunks(rank)], dim=dim)

    def unshard(self, shards, dim: int = 2) -> torch.Tensor:
        """The global tensor from every rank's shard (a sequence ordered by rank)."""
        if len(shards) != self.world_size:
            raise InvalidProblem(f"unshard got {len(shards)} shards; expected one per rank "
                                 f"({self.world_size}), ordered by rank.")
        pieces = [None] * self.num_chunks
        c = self.chunk_len
        for rank, x in enumerate(shards):
            if x.shape[dim] != self.local_len:
                raise InvalidProblem(
                    f"shard {rank} has {x.shape[dim]} tokens in dim {dim}; expected "
                    f"{self.local_len} (seq_len {self.seq_len} over {self.world_size} ranks).")
            for j, i in enumerate(self.chunks(rank)):
                pieces[i] = x.narrow(dim, j * c, c)
        return torch.cat(pieces, dim=dim)

    def gather(self, x: torch.Tensor, group=None, dim: int = 2) -> torch.Tensor:
        """All-gather a sharded tensor over ``group`` and return the global tensor in
        sequence order (on every rank; not differentiable)."""
        import torch.distributed as dist
        shards = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(shards, x.contiguous(), group=group)
        return self.unshard(shards, dim=dim)

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise InvalidProblem(f"rank is {rank!r}; expected an int in [0, {self.world_size}).")

    def _check_len(self, x: torch.Tensor, dim: int) -> None:
        if x.shape[dim] != self.seq_len:
            raise InvalidProblem(
                f"the tensor has {x.shape[dim]} tokens in dim {dim}; expected seq_len "
                f"{self.seq_len}. Pass dim= the sequence dim (2 for [B, H, N, D], 1 for [B, N]).")


def block_tokens(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Token indices of whole blocks (block b: tokens b * block_size ..), in block order."""
    return (blocks[:, None] * block_size
            + torch.arange(block_size, device=blocks.device)).flatten()


def shard_sequence(x: torch.Tensor, world_size: int, rank: int, *, dim: int = 2,
                   layout: str = "zigzag", block_size: int = 1) -> torch.Tensor:
    """Rank ``rank``'s shard of the global ``x`` (see ``Sharding``)."""
    return Sharding(x.shape[dim], world_size, layout, block_size).shard(x, rank, dim)


def unshard_sequence(shards, *, dim: int = 2, layout: str = "zigzag") -> torch.Tensor:
    """The global tensor from the shards of every rank, ordered by rank."""
    world = len(shards)
    return Sharding(shards[0].shape[dim] * world, world, layout).unshard(shards, dim)
