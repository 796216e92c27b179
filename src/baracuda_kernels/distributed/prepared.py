"""A global block pattern prepared for one rank of a context-parallel group.

Every rank prepares the same global pattern (and the same document ids) for itself; the
preparation reads no data of other ranks, so all ranks agree on who sends what without a
message. From the exact block classes of the global problem (pattern AND causal rule AND
window AND documents, ``classify_blocks``) it decides, for this rank:

* ``local``: its queries against its own keys (a part that always runs);
* ``remote[src]``: its queries against the key blocks of rank ``src`` that some local query
  block needs (union over batch rows and heads). A rank none of whose key blocks is needed
  is absent: nothing travels from it;
* ``sends[dst]``: which of its own key blocks rank ``dst`` needs (the mirror of ``dst``'s
  ``remote[rank]``).

Each part is an ordinary single-device problem (local queries against a gathered set of key
blocks) whose token rules carry the global position of every token, so the causal rule,
the window, sink tokens, ALiBi and document ids hold exactly as in the single-device call.
Its block lists are built here, once (``PreparedPattern``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..attention.block_sparse.block_lists import SKIP, BlockLists, classify_blocks
from ..attention.block_sparse.descriptor import kernel_block_size
from ..attention.block_sparse.prepared import PreparedPattern
from ..attention.block_sparse.validation import pattern_view, with_pattern_rules
from ..attention.common.problem import causal_mode, check_window, window_rule
from ..attention.common.token_rules import TokenRules, token_rules_for
from ..core import InvalidProblem, Unsupported, resolve_device
from .sharding import Sharding, block_tokens


@dataclass(frozen=True)
class Part:
    """Local queries against ``key_blocks`` (block indices inside the source rank's shard,
    ascending) of rank ``source``; ``key_positions``: the global token index of each of its
    keys; ``prepared``: its pattern slice and block lists."""

    source: int
    key_blocks: torch.Tensor
    key_positions: torch.Tensor
    prepared: PreparedPattern

    @property
    def key_tokens(self) -> int:
        return self.prepared.key_len


class ContextParallelPattern:
    """What one rank computes and communicates (see the module doc). Build it with
    ``prepare_context_parallel``; pass it to ``context_parallel_attention`` on every call.

    Attributes: sharding, rank, block_size, is_causal, window_size, sink_tokens, device,
    local (a Part), remote {src: Part}, sends {dst: int64 block indices of this shard},
    has_ids (document ids / padding), q_valid (bool [Bt, local_len] or None: False for
    padded queries), stats (bytes and messages this rank has sent, by phase)."""

    def __init__(self, sharding: Sharding, rank: int, *, block_size: int, is_causal: bool,
                 window_size: tuple, sink_tokens: int, device: torch.device, local: Part,
                 remote: dict, sends: dict, q_valid: Optional[torch.Tensor],
                 has_prefix: bool = False):
        self.sharding, self.rank, self.block_size = sharding, rank, block_size
        self.is_causal, self.window_size, self.sink_tokens = is_causal, window_size, sink_tokens
        self.device, self.local, self.remote, self.sends = device, local, remote, sends
        self.q_valid = q_valid
        self.has_prefix = has_prefix
        self.group_ready = False  # set once the group's communicator has run a collective
        self.stats = {"forward_bytes": 0, "backward_bytes": 0, "messages": 0}

    @property
    def world_size(self) -> int:
        return self.sharding.world_size

    def send_bytes(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Bytes this rank sends in one forward for K/V shaped like ``k`` / ``v`` (the
        backward sends as many K/V bytes again, and returns the dK/dV of what it received)."""
        per_token = k.shape[0] * k.shape[1] * (k.shape[3] * k.element_size()
                                               + v.shape[3] * v.element_size())
        return sum(int(b.numel()) for b in self.sends.values()) * self.block_size * per_token

    def dense_ring_bytes(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """What dense ring attention sends per rank in one forward: its whole K/V shard to
        every other rank (W - 1 hops)."""
        return (self.world_size - 1) * (k.numel() * k.element_size()
                                        + v.numel() * v.element_size())

    def __repr__(self) -> str:
        sends = {d: int(b.numel()) for d, b in self.sends.items()}
        recvs = {s: int(p.key_blocks.numel()) for s, p in self.remote.items()}
        return (f"ContextParallelPattern(rank {self.rank} of {self.world_size}, "
                f"{self.sharding.layout}, {self.sharding.local_len} tokens per rank, "
                f"block_size={self.block_size}, receives blocks {recvs}, sends blocks {sends})")


def prepare_context_parallel(pattern, *, seq_len: int, world_size: int, rank: int,
                             block_size: Optional[int] = None, layout: str = "zigzag",
                             is_causal=None, window_size=None, sink_tokens=None,
                             document_ids=None, prefix_lengths=None, device=None,
                             exchange: str = "needed") -> ContextParallelPattern:
    """Prepare the global block pattern of a sequence of ``seq_len`` tokens for ``rank``.

    Args:
        pattern: bool/uint8 ``[B|1, Hp, nq, nk]`` over the global sequence (nq = nk =
            seq_len / block_size; Hp = H, Hkv or 1 as for ``block_sparse_attention``), a
            BlockPattern (its block_size, causality and window / documents apply), or None:
            every block (dense attention, with is_causal: causal).
        seq_len: global sequence length N (queries and keys alike: self-attention).
        world_size, rank: the context-parallel group's size and this process's rank in it.
        layout: "zigzag" (default: balanced causal work) or "contiguous" (``Sharding``).
        is_causal: True (or "top_left" / "bottom_right", the same when Nq == Nk) or False;
            None: the BlockPattern's, else False.
        window_size, sink_tokens: the token window and its sink tokens (see
            ``block_sparse_attention``); None: the BlockPattern's, else none.
        document_ids: int tensor ``[B|1, N]`` of the global sequence (packed documents; a
            negative id marks padding), or None.
        prefix_lengths: int or int tensor ``[B]`` with is_causal: prefix-LM (the first P
            tokens of the sequence are seen by every query; not with a window or ALiBi).
        device: where the attention runs (default: the pattern's device, or the CPU).
        exchange: "needed" (default): only the key blocks some local query block needs
            travel. "all": every shard goes to every rank, as in dense ring attention (the
            result is the same: blocks no query needs are skipped by the kernels); a
            baseline for benchmarks.
    Raises:
        InvalidProblem for a geometry that does not fit; Unsupported for the block bits of
        a ``from_mask_fn`` / ``from_token_mask`` pattern.
    """
    if pattern is not None and hasattr(pattern, "mask") and hasattr(pattern, "block_size"):
        if block_size not in (None, pattern.block_size) or pattern.query_len != seq_len \
                or pattern.key_len != seq_len:
            raise InvalidProblem(
                f"the BlockPattern is for {pattern.query_len} x {pattern.key_len} tokens in "
                f"{pattern.block_size}-token blocks; expected {seq_len} x {seq_len}"
                f"{'' if block_size is None else f' in {block_size}-token blocks'}.")
        block_size = pattern.block_size
        if is_causal is None:
            is_causal = pattern.is_causal
    window_size, sink_tokens, rules = with_pattern_rules(
        pattern, window_size, sink_tokens,
        dict(document_ids=document_ids, prefix_lengths=prefix_lengths))
    if rules.get("block_bits") is not None:
        raise Unsupported(
            "the pattern carries block bits (from_mask_fn / from_token_mask); the "
            "context-parallel path takes block patterns with causal, window + sink tokens, "
            "documents and prefix-LM rules. Run the single-device block_sparse_attention.")
    if block_size is None:
        raise InvalidProblem("block_size is None; expected an int (or a BlockPattern).")
    mask = getattr(pattern, "mask", pattern)
    # With Nq == Nk top-left and bottom-right are one rule: the parts use top-left.
    is_causal = False if is_causal is None else causal_mode(is_causal) is not False
    (window_size, sink_tokens) = check_window((-1, -1) if window_size is None else window_size,
                                              sink_tokens or 0)
    device = resolve_device(device if device is not None else
                            (mask.device if isinstance(mask, torch.Tensor) else "cpu"))
    sharding = Sharding(seq_len, world_size, layout, block_size)
    sharding._check_rank(rank)
    n = seq_len // block_size
    if mask is None:
        mask = torch.ones(1, 1, n, n, dtype=torch.bool, device=device)
    mask = pattern_view(mask, n, n, block_size, (seq_len, seq_len), None)
    mask = mask.to(device=device, dtype=torch.bool, copy=True)
    tokens = token_rules_for(None, seq_len, seq_len, device, is_causal, window_size,
                             document_ids=rules["document_ids"],
                             prefix_lengths=rules["prefix_lengths"]) \
        if rules["document_ids"] is not None or rules["prefix_lengths"] is not None else None
    if tokens is not None and tokens.batch not in (1, mask.shape[0]) and mask.shape[0] != 1:
        raise InvalidProblem(f"the token rules have {tokens.batch} rows and the pattern "
                             f"{mask.shape[0]}; expected equal batches (or 1 for a shared one).")
    window = window_rule(window_size, sink_tokens, is_causal, seq_len, seq_len)
    # Positions stated (indices, or a prefix-LM's): blocks are then judged from their
    # position ranges (O(nq * nk)) instead of row by row (O(N * nk)).
    if tokens is None or not tokens.has_positions:
        rows = 1 if tokens is None else tokens.batch
        index = torch.arange(seq_len, device=device, dtype=torch.int32)[None].expand(rows, -1)
        tokens = TokenRules(None if tokens is None else tokens.q_ids,
                            None if tokens is None else tokens.k_ids, index.contiguous(),
                            index.contiguous())
    alive = classify_blocks(mask, seq_len, seq_len, block_size, is_causal, window, tokens)
    alive = (alive != SKIP).any(1).any(0)                        # [n, n]: some row needs it
    if exchange not in ("needed", "all"):
        raise InvalidProblem(f"exchange is {exchange!r}; expected 'needed' or 'all'.")
    if exchange == "all":
        alive = torch.ones_like(alive)
    blocks = [sharding.block_positions(r).to(device) for r in range(world_size)]
    need = {(dst, src): alive[blocks[dst]][:, blocks[src]].any(0).nonzero().flatten()
            for dst in range(world_size) for src in range(world_size) if dst != src}
    geometry = _PartGeometry(sharding, rank, mask, tokens, blocks, is_causal, window_size,
                             sink_tokens)
    local = geometry.part(rank, torch.arange(blocks[rank].numel(), device=device))
    remote = {src: geometry.part(src, need[rank, src]) for src in range(world_size)
              if src != rank and need[rank, src].numel()}
    sends = {dst: need[dst, rank] for dst in range(world_size)
             if dst != rank and need[dst, rank].numel()}
    q_valid = None if not tokens.has_ids else geometry.local_tokens(tokens.q_ids) >= 0
    return ContextParallelPattern(sharding, rank, block_size=block_size, is_causal=is_causal,
                                  window_size=window_size, sink_tokens=sink_tokens,
                                  device=mask.device, local=local, remote=remote, sends=sends,
                                  q_valid=q_valid,
                                  has_prefix=rules["prefix_lengths"] is not None)


class _PartGeometry:
    """Builds the Parts of one rank: pattern slices, token rules with global positions
    (``tokens``: the global rules, positions always present)."""

    def __init__(self, sharding, rank, mask, tokens, blocks, is_causal, window_size,
                 sink_tokens):
        self.sharding, self.rank, self.mask, self.tokens = sharding, rank, mask, tokens
        self.blocks, self.is_causal = blocks, is_causal
        self.window_size, self.sink_tokens = window_size, sink_tokens
        self.q_tokens = block_tokens(blocks[rank], sharding.block_size)

    def local_tokens(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, self.q_tokens]

    def part(self, source: int, key_blocks: torch.Tensor) -> Part:
        bs = self.sharding.block_size
        k_global = self.blocks[source][key_blocks]
        k_tokens = block_tokens(k_global, bs)
        nq_len, nk_len = self.q_tokens.numel(), k_tokens.numel()
        sub = self.mask[:, :, self.blocks[self.rank]][:, :, :, k_global].contiguous()
        # Positions are the global ones (token indices, or a prefix-LM's); the part's window
        # and ALiBi measure from the diagonal Nk - Nq when not causal (bottom-right), so the
        # queries move back by it.
        shift = 0 if self.is_causal else nk_len - nq_len
        t = self.tokens
        q_pos, k_pos = t.q_pos[:, self.q_tokens] - shift, t.k_pos[:, k_tokens]
        q_ids = k_ids = None
        if t.has_ids:
            q_ids, k_ids = t.q_ids[:, self.q_tokens], t.k_ids[:, k_tokens]
        rows = t.batch
        as_rows = lambda x: None if x is None else \
            x.to(torch.int32).expand(rows, -1).contiguous()  # noqa: E731
        part_tokens = TokenRules(as_rows(q_ids), as_rows(k_ids), as_rows(q_pos),
                                 as_rows(k_pos))
        window = window_rule(self.window_size, self.sink_tokens, self.is_causal, nq_len, nk_len)
        kernel_block = kernel_block_size(bs, nq_len, nk_len)
        lists = BlockLists.build(sub, nq_len, nk_len, kernel_block, self.is_causal,
                                 window=window, tokens=part_tokens).measured()
        prepared = PreparedPattern(sub, lists, block_size=bs, query_len=nq_len, key_len=nk_len,
                                   is_causal=self.is_causal, window_size=self.window_size,
                                   sink_tokens=self.sink_tokens,
                                   description=f"context-parallel part from rank {source}")
        return Part(source, key_blocks, k_tokens, prepared)
