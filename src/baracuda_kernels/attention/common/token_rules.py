"""Per-token facts the kernels read in PARTIAL blocks: document ids and positions.

Two optional pairs of int32 tensors, ``[Bt, Nq]`` for queries and ``[Bt, Nk]`` for keys
(Bt = 1 or the batch), carry every token rule that depends on data rather than on indices:

* ids: query i and key j may meet only when ``q_ids[b, i] == k_ids[b, j]`` (documents of a
  packed batch, the sequences of a varlen pack). A negative id marks padding: a padded query
  (id -1) sees nothing (y = 0, lse = -inf, zero gradients) and a padded key (id -2) is seen by
  nobody; the kernels treat padded tokens like tokens past the end (their q/k/v rows are
  never read), so NaN or garbage in padding never reaches a valid output.
* positions: the causal rule and the window compare ``q_pos[b, i]`` with ``k_pos[b, j]``
  instead of i with j (query at position p sees key at position r iff r <= p + offset; the
  window likewise). Without positions, position = index. Prefix-LM and the per-sequence
  alignment of a varlen pack are positions.

* bits (``block_bits.BlockBits``): the pairs of the blocks a token mask cuts, any rule
  (``patterns.from_mask_fn`` / ``from_token_mask``); per pattern block, not per token row.

``TokenRules.build`` turns the user-level arguments (document ids, query/key ranges, prefix
lengths) into these tensors with torch ops only (no host synchronisation); the block lists
then classify blocks from per-block ranges of them (``block_ranges``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...core import InvalidProblem
from ..patterns.block_bits import BlockBits, check_block_bits
from .problem import causal_offset

Q_PAD, K_PAD = -1, -2  # ids of padding: never equal, so a padded pair is never allowed


@dataclass(frozen=True)
class TokenRules:
    """int32 ``[Bt, Nq]`` / ``[Bt, Nk]`` tensors on the attention's device (Bt in {1, B});
    either pair may be None (no documents or padding / position = index); ``bits``: the
    bits of cut blocks, or None."""

    q_ids: Optional[torch.Tensor] = None
    k_ids: Optional[torch.Tensor] = None
    q_pos: Optional[torch.Tensor] = None
    k_pos: Optional[torch.Tensor] = None
    bits: Optional[BlockBits] = None

    @property
    def batch(self) -> int:
        """Bt: 1 (shared by the batch) or B."""
        sizes = [t.shape[0] for t in self.tensors()]
        if self.bits is not None:
            sizes.append(self.bits.slots.shape[0])
        return max(sizes)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.q_ids, self.k_ids, self.q_pos, self.k_pos) if t is not None)

    @property
    def has_ids(self) -> bool:
        return self.q_ids is not None

    @property
    def has_positions(self) -> bool:
        return self.q_pos is not None

    @property
    def has_bits(self) -> bool:
        return self.bits is not None

    def kernel_args(self, query_len: int, key_len: int) -> tuple:
        """(Q_IDS, K_IDS, Q_POS, K_POS, stride of a query batch row, of a key batch row):
        absent tensors are passed as any int32 tensor, never read (HAS_IDS / HAS_POS off)."""
        some = (self.tensors() or (self.bits.slots,))[0]
        shared = max([1] + [t.shape[0] for t in self.tensors()]) == 1
        q_ids = self.q_ids if self.q_ids is not None else some
        k_ids = self.k_ids if self.k_ids is not None else some
        q_pos = self.q_pos if self.q_pos is not None else some
        k_pos = self.k_pos if self.k_pos is not None else some
        return (q_ids, k_ids, q_pos, k_pos, 0 if shared else query_len, 0 if shared else key_len)

    def rows(self, b: int):
        """(q_ids, k_ids, q_pos, k_pos) of batch row b (1-D, or None)."""
        pick = lambda t: None if t is None else t[b if t.shape[0] > 1 else 0]  # noqa: E731
        return pick(self.q_ids), pick(self.k_ids), pick(self.q_pos), pick(self.k_pos)

    def check_for(self, batch: int, query_len: int, key_len: int, device) -> None:
        """InvalidProblem unless these rules fit a problem of this batch and these lengths."""
        for name, t, n in (("q_ids", self.q_ids, query_len), ("k_ids", self.k_ids, key_len),
                           ("q_pos", self.q_pos, query_len), ("k_pos", self.k_pos, key_len)):
            if t is None:
                continue
            if t.dtype != torch.int32 or t.dim() != 2 or t.shape[0] not in (1, batch) \
                    or t.shape[1] != n or t.device != device or not t.is_contiguous():
                raise InvalidProblem(
                    f"token rules: {name} is {t.dtype} {tuple(t.shape)} on {t.device}; expected "
                    f"a contiguous int32 [1 or {batch}, {n}] tensor on {device}. Build the "
                    f"rules for this problem (TokenRules.build with its batch and lengths).")
        if self.bits is not None:
            self.bits.check_for(batch, query_len, key_len, device)

    @classmethod
    def build(cls, batch: int, query_len: int, key_len: int, device, *, document_ids=None,
              query_range=None, key_range=None, prefix_lengths=None, block_bits=None,
              block_size: Optional[int] = None,
              causal_offset: int = 0) -> Optional["TokenRules"]:
        """The rules of the user-level arguments, or None when none is given.

        Args:
            document_ids: int tensor ``[B|1, N]`` (queries and keys alike, Nq == Nk) or a
                pair ``(q_doc [B|1, Nq], k_doc [B|1, Nk])``; a pair is allowed only within one
                document; a negative id marks a padding token.
            query_range, key_range: ``(start, end)``: only tokens start <= index < end are
                valid (per batch row: ints or int tensors ``[B]``; None = 0 / the length).
                Keys outside are padding (seen by nobody); queries outside get y = 0,
                lse = -inf and zero gradients.
            prefix_lengths: int or int tensor ``[B]``: prefix-LM (causal only): every query
                also sees the keys [0, P) of its batch row (bidirectional inside the prefix).
            block_bits: a BlockBits (from a from_mask_fn / from_token_mask pattern), kept as
                the bits of the blocks of ``block_size`` tokens the kernels work with.
            causal_offset: the causal diagonal (query i sees j <= i + offset).
        """
        if document_ids is None and query_range is None and key_range is None \
                and prefix_lengths is None and block_bits is None:
            return None
        bits = None
        if block_bits is not None:
            bits = check_block_bits(block_bits).to(device)
            bits = bits.for_block_size(block_size or bits.block_size)
        q_ids = k_ids = q_pos = k_pos = None
        if document_ids is not None or query_range is not None or key_range is not None:
            q_doc, k_doc = _documents(document_ids, batch, query_len, key_len, device)
            q_ok = _in_range(query_range, "query_range", batch, query_len, device)
            k_ok = _in_range(key_range, "key_range", batch, key_len, device)
            q_ids = _ids(q_doc, q_ok, Q_PAD, query_len, device)
            k_ids = _ids(k_doc, k_ok, K_PAD, key_len, device)
        if prefix_lengths is not None:
            prefix = _per_batch(prefix_lengths, "prefix_lengths", batch, device)
            i = torch.arange(query_len, device=device, dtype=torch.int64)
            # Query i sees j <= max(i + offset, P - 1): its position moves up to P - 1 - offset.
            q_pos = torch.maximum(i[None, :], prefix[:, None] - 1 - causal_offset)
            q_pos = q_pos.clamp(max=2**30).to(torch.int32)
            k_pos = torch.arange(key_len, device=device, dtype=torch.int32)[None, :]
        bt = max([1] + [t.shape[0] for t in (q_ids, k_ids, q_pos, k_pos) if t is not None])
        rows = lambda t: None if t is None else t.expand(bt, -1).contiguous()  # noqa: E731
        return cls(rows(q_ids), rows(k_ids), rows(q_pos), rows(k_pos), bits)


def token_rules_for(batch: Optional[int], query_len: int, key_len: int, device, is_causal,
                    window_size, *, document_ids=None, query_range=None, key_range=None,
                    prefix_lengths=None, block_bits=None,
                    block_size: Optional[int] = None) -> Optional[TokenRules]:
    """``TokenRules.build`` for an attention problem, after checking that the rules fit its
    causal rule and window. batch None (a pattern prepared before the batch is known): the
    batch the tensors give (rows of 1 are shared)."""
    if prefix_lengths is not None:
        if not is_causal:
            raise InvalidProblem(
                "prefix_lengths was given without is_causal; expected is_causal=True (prefix-LM: "
                "bidirectional inside the prefix, causal after it).")
        if tuple(window_size) != (-1, -1):
            raise InvalidProblem(
                f"prefix_lengths was given with window_size={tuple(window_size)}; expected "
                f"(-1, -1): a prefix-LM with a sliding window is not a defined rule here.")
    if batch is None:
        batch = _given_batch(document_ids, query_range, key_range, prefix_lengths)
    return TokenRules.build(batch, query_len, key_len, device, document_ids=document_ids,
                            query_range=query_range, key_range=key_range,
                            prefix_lengths=prefix_lengths, block_bits=block_bits,
                            block_size=block_size,
                            causal_offset=causal_offset(is_causal, query_len, key_len))


def _given_batch(document_ids, query_range, key_range, prefix_lengths) -> int:
    """The batch of the per-batch tensors among the arguments (1 when all are shared):
    document ids [B, N] give B; range bounds and prefix lengths [B] give B."""
    docs = document_ids if isinstance(document_ids, (tuple, list)) else (document_ids,)
    sizes = {t.shape[0] for t in docs if isinstance(t, torch.Tensor) and t.dim() == 2}
    bounds = [r for r in (query_range, key_range) if isinstance(r, (tuple, list))]
    for v in (*(b for r in bounds for b in r), prefix_lengths):
        if isinstance(v, torch.Tensor):
            sizes.add(v.numel())
    sizes.discard(1)
    if len(sizes) > 1:
        raise InvalidProblem(f"token rules have per-batch tensors of {sorted(sizes)} rows; "
                             f"expected one batch size (or 1 for a shared row).")
    return sizes.pop() if sizes else 1


def check_token_rules(rules, batch: int, query_len: int, key_len: int, device) -> None:
    """InvalidProblem unless ``rules`` is a TokenRules that fits this problem."""
    if not isinstance(rules, TokenRules):
        raise InvalidProblem(
            f"token_rules is a {type(rules).__name__}; expected TokenRules (from "
            f"plan.token_rules(...) or a varlen pack) or None. Fix: pass document_ids / "
            f"query_range / key_range / prefix_lengths instead.")
    rules.check_for(batch, query_len, key_len, device)


def block_ranges(t: torch.Tensor, length: int, block_size: int):
    """(min, max) of a [Bt, N] token tensor over each block of ``block_size`` tokens:
    two int64 [Bt, ceil(N / block_size)] tensors (the last block may be ragged)."""
    n_blocks = -(-length // block_size)
    pad = n_blocks * block_size - length
    t = t.to(torch.int64)
    lo = torch.nn.functional.pad(t, (0, pad), value=2**40).view(t.shape[0], n_blocks, -1).amin(-1)
    hi = torch.nn.functional.pad(t, (0, pad), value=-2**40).view(t.shape[0], n_blocks, -1).amax(-1)
    return lo, hi


# ------------------------------------------------------------------------------ helpers
def _as_tokens(t, name: str, batch: int, length: int, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidProblem(f"{name} is a {type(t).__name__}; expected an int tensor "
                             f"[B, {length}] (or [1, {length}] / [{length}] for every row).")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise InvalidProblem(f"{name} has dtype {t.dtype}; expected an integer tensor "
                             f"(document ids, e.g. torch.int32).")
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[0] not in (1, batch) or t.shape[1] != length:
        raise InvalidProblem(f"{name} has shape {tuple(t.shape)}; expected [{batch}, {length}] "
                             f"(or [1, {length}] / [{length}] shared by the batch).")
    return t.to(device)


def _documents(document_ids, batch, query_len, key_len, device):
    if document_ids is None:
        return None, None
    if isinstance(document_ids, (tuple, list)):
        if len(document_ids) != 2:
            raise InvalidProblem(f"document_ids is a sequence of {len(document_ids)}; expected "
                                 f"one tensor, or a pair (query ids, key ids).")
        q_doc, k_doc = document_ids
    else:
        if query_len != key_len:
            raise InvalidProblem(
                f"document_ids is one tensor but Nq={query_len} != Nk={key_len}; expected a "
                f"pair (q_ids [B, {query_len}], k_ids [B, {key_len}]) when the lengths differ.")
        q_doc = k_doc = document_ids
    return (_as_tokens(q_doc, "document_ids (queries)", batch, query_len, device),
            _as_tokens(k_doc, "document_ids (keys)", batch, key_len, device))


def _per_batch(value, name: str, batch: int, device) -> torch.Tensor:
    """int64 [B or 1] from an int or an int tensor [B] / [1] / []."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)):
        raise InvalidProblem(f"{name} is {value!r}; expected an int or an int tensor [{batch}].")
    if isinstance(value, int):
        if value < 0:
            raise InvalidProblem(f"{name} is {value}; expected an int >= 0.")
        return torch.tensor([value], device=device, dtype=torch.int64)
    if value.dtype.is_floating_point or value.dtype == torch.bool or value.dim() > 1 \
            or value.numel() not in (1, batch):
        raise InvalidProblem(f"{name} is a {value.dtype} tensor of shape {tuple(value.shape)}; "
                             f"expected an int tensor [{batch}] (one value per batch row).")
    return value.reshape(-1).to(device=device, dtype=torch.int64)


def _in_range(value, name: str, batch: int, length: int, device) -> Optional[torch.Tensor]:
    """bool [B|1, N]: token index inside [start, end) of its row, or None (all valid)."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InvalidProblem(f"{name} is {value!r}; expected a pair (start, end) of ints or int "
                             f"tensors [{batch}] (None for 0 / the length).")
    start, end = value
    for bound, label in ((start, "start"), (end, "end")):
        if isinstance(bound, int) and not isinstance(bound, bool) and bound > length:
            raise InvalidProblem(f"{name} {label} is {bound}; expected at most the length "
                                 f"{length} (tokens start <= index < end are valid).")
    if all(isinstance(b, int) and not isinstance(b, bool) for b in value) and start > end:
        raise InvalidProblem(f"{name} is {tuple(value)}; expected start <= end (tokens start "
                             f"<= index < end are valid; an empty range is (n, n)).")
    idx = torch.arange(length, device=device, dtype=torch.int64)[None, :]
    ok = torch.ones(1, length, dtype=torch.bool, device=device)
    if start is not None:
        ok = ok & (idx >= _per_batch(start, f"{name}[0] (start)", batch, device)[:, None])
    if end is not None:
        ok = ok & (idx < _per_batch(end, f"{name}[1] (end)", batch, device)[:, None])
    return ok


def _ids(doc, ok, pad: int, length: int, device) -> torch.Tensor:
    """int32 [B|1, N]: the document id of each valid token, ``pad`` for padding."""
    ids = torch.zeros(1, length, dtype=torch.int64, device=device) if doc is None \
        else doc.to(torch.int64)
    valid = ids >= 0
    if ok is not None:
        valid = valid & ok
    ids = torch.where(valid, ids.clamp(max=2**31 - 1), torch.full_like(ids, pad))
    return ids.to(torch.int32)
