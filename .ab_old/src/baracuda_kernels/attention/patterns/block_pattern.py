"""BlockPattern: a per-block attention pattern together with its geometry.

What the kernel computes for a pattern ``p`` (``is_causal`` being the flag passed to the
attention call, which should be ``p.is_causal``): query token ``i`` attends key token ``j``
iff ``p.mask[b, h, i // bs, j // bs]`` and (when causal) ``j <= i``, with ``i < query_len``
and ``j < key_len``. Nothing finer than a block is applied: a builder whose token rule cuts
through a block makes the whole block active (*coarsening*), and says how many token pairs
that adds (``extra_token_pairs``; 0 means the pattern is *exact*).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from baracuda_kernels.core import InvalidProblem

from . import counting, drawing, from_mask, interop
from .checks import broadcast_dim, canonical_mask, check_int
from .counting import CoarseningReport, TokenRule

RulePairs = Union[int, Callable[[], int], None]


class BlockPattern:
    """An immutable block-sparse attention pattern with its block size and sequence lengths.

    Attributes:
        mask: bool ``[B, H, nq, nk]``; ``B`` and/or ``H`` may be 1 (broadcast over batch /
            heads). ``True`` = compute that (query block, key block) tile.
        block_size: tokens per block (same for queries and keys).
        query_len, key_len: sequence lengths in tokens; nq = ceil(query_len / block_size),
            nk = ceil(key_len / block_size). The last block row/column may be ragged.
        is_causal: hint that the pattern was built for causal attention. Pass
            ``is_causal=pattern.is_causal`` to the attention call: the kernel, not the
            pattern, applies the ``j <= i`` diagonal inside blocks.
        token_rule: vectorised ``f(b, h, q_idx, kv_idx) -> bool`` stating the token-level
            rule the pattern stands for (ANDed with causal when ``is_causal``). Patterns made
            from a raw block tensor use "the pair's block is active" (exact by definition).
        description: short text naming the builder and its parameters.

    Example (``sliding_window`` from this package)::

        >>> p = sliding_window(4096, window=512, block_size=128, sinks=4)
        >>> p.mask.shape, p.is_causal, p.exact, p.extra_token_pairs
        (torch.Size([1, 1, 32, 32]), True, False, 659206)

    Methods: ``density()``, ``row_counts()``, ``col_counts()``, ``num_active_blocks()``,
    ``nbytes``, ``prepare(device)``, ``computed_token_pairs()``, ``flop_token_pairs()``, ``exact`` /
    ``extra_token_pairs`` / ``exact_mask`` / ``coarsening_report()``,
    ``to_dense_token_mask()``, ``to(device)``, ``&`` ``|`` ``~``, ``to_bsr()`` /
    ``from_bsr()``, ``to_flex_block_mask()`` / ``from_flex_block_mask()``, ``draw()`` /
    ``str()``, ``plot()`` / ``save_png()``.

    The tensor must not be modified in place after construction.
    """

    __slots__ = ("_mask", "_block_size", "_query_len", "_key_len", "_is_causal", "_rule",
                 "_rule_is_default", "_description", "_rule_pairs_fn", "_cache")

    def __init__(self, mask: torch.Tensor, *, block_size: int, query_len: int,
                 key_len: Optional[int] = None, is_causal: bool = False,
                 token_rule: Optional[TokenRule] = None, description: Optional[str] = None,
                 _rule_pairs: RulePairs = None, _exact_mask: Optional[torch.Tensor] = None):
        block_size = check_int("block_size", block_size, 1)
        query_len = check_int("query_len", query_len, 1)
        key_len = query_len if key_len is None else check_int("key_len", key_len, 1)
        mask = canonical_mask(mask, block_size, query_len, key_len)
        if token_rule is not None and not callable(token_rule):
            raise InvalidProblem(f"token_rule must be callable f(b, h, q_idx, kv_idx) -> bool; "
                                 f"got {type(token_rule).__name__}.")
        set_ = object.__setattr__
        set_(self, "_mask", mask)
        set_(self, "_block_size", block_size)
        set_(self, "_query_len", query_len)
        set_(self, "_key_len", key_len)
        set_(self, "_is_causal", bool(is_causal))
        set_(self, "_rule_is_default", token_rule is None)
        set_(self, "_rule", token_rule if token_rule is not None
             else counting.block_lookup_rule(mask, block_size))
        set_(self, "_description", description or "block tensor")
        cache = {}
        if isinstance(_rule_pairs, int):
            cache["rule_pairs"] = _rule_pairs
            _rule_pairs = None
        if _exact_mask is not None:
            cache["exact_mask"] = _exact_mask.to(device=mask.device, dtype=torch.bool)
        set_(self, "_rule_pairs_fn", _rule_pairs)
        set_(self, "_cache", cache)

    def __setattr__(self, name, value):
        raise AttributeError("BlockPattern is immutable; build a new one (builders, &, |, ~).")

    # ---- geometry ---------------------------------------------------------------------
    @property
    def mask(self) -> torch.Tensor:
        return self._mask

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def query_len(self) -> int:
        return self._query_len

    @property
    def key_len(self) -> int:
        return self._key_len

    @property
    def num_blocks_q(self) -> int:
        return self._mask.shape[2]

    @property
    def num_blocks_k(self) -> int:
        return self._mask.shape[3]

    @property
    def batch(self) -> int:
        """Stored batch size (1 = broadcast over the batch)."""
        return self._mask.shape[0]

    @property
    def num_heads(self) -> int:
        """Stored head count (1 = broadcast over heads)."""
        return self._mask.shape[1]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self._mask.shape)

    @property
    def is_causal(self) -> bool:
        return self._is_causal

    @property
    def description(self) -> str:
        return self._description

    @property
    def device(self) -> torch.device:
        return self._mask.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the block mask."""
        return self._mask.numel() * self._mask.element_size()

    @property
    def token_rule(self) -> TokenRule:
        """The token rule, ANDed with ``j <= i`` when the pattern is causal."""
        rule = self._rule
        if not self._is_causal:
            return rule
        return lambda b, h, q, kv: rule(b, h, q, kv) & (kv <= q)

    # ---- introspection ----------------------------------------------------------------
    def num_active_blocks(self) -> int:
        return int(torch.count_nonzero(self._mask))

    def density(self) -> float:
        """Fraction of stored block cells that are active (over B*H*nq*nk stored cells)."""
        return self.num_active_blocks() / self._mask.numel()

    def row_counts(self) -> torch.Tensor:
        """Active key blocks per query block row: int64 ``[B, H, nq]``."""
        return counting.count_true(self._mask, -1)

    def col_counts(self) -> torch.Tensor:
        """Active query blocks per key block column: int64 ``[B, H, nk]``."""
        return counting.count_true(self._mask, -2)

    def computed_token_pairs(self) -> int:
        """Token pairs the kernel keeps with ``is_causal=self.is_causal``: inside active
        blocks, inside the lengths, on/below the diagonal when causal. Summed over stored
        B and H slices (multiply by B/H where they broadcast)."""
        if "computed" not in self._cache:
            self._cache["computed"] = counting.computed_pairs(
                self._mask, self._query_len, self._key_len, self._block_size, self._is_causal)
        return self._cache["computed"]

    def flop_token_pairs(self) -> int:
        """Token pairs of the project's FLOP convention: pairs inside active blocks after
        cutting ragged tails and dropping blocks the causal mask empties entirely, with
        blocks crossing the diagonal counted whole. Forward FLOPs = 4 * D * this (times
        B / H where the pattern broadcasts); backward = 2.5 x forward."""
        if "flop" not in self._cache:
            self._cache["flop"] = counting.computed_pairs(
                self._mask, self._query_len, self._key_len, self._block_size, self._is_causal,
                whole_diagonal=True)
        return self._cache["flop"]

    def _evaluate_rule(self) -> None:
        rule_pairs, computed, exact_mask = counting.evaluate_rule_on_active_blocks(
            self._mask, self.token_rule, self._query_len, self._key_len, self._block_size,
            self._is_causal)
        self._cache.setdefault("rule_pairs", rule_pairs)
        self._cache.setdefault("computed", computed)
        self._cache["exact_mask"] = exact_mask

    def rule_token_pairs(self) -> int:
        """Token pairs the token rule allows (summed over stored B and H slices). Uses the
        builder's closed form when it has one (O(N)), else evaluates the rule inside the
        active blocks (cost proportional to the computed pairs, bounded memory)."""
        if "rule_pairs" not in self._cache:
            if self._rule_is_default:                 # block rule: exact by definition
                self._cache["rule_pairs"] = self.computed_token_pairs()
            elif self._rule_pairs_fn is not None:
                self._cache["rule_pairs"] = int(self._rule_pairs_fn())
            else:
                self._evaluate_rule()
        return self._cache["rule_pairs"]

    @property
    def extra_token_pairs(self) -> int:
        """Token pairs computed although the token rule forbids them (0 = exact)."""
        return self.computed_token_pairs() - self.rule_token_pairs()

    @property
    def exact(self) -> bool:
        """True when every computed token pair is allowed by the token rule."""
        return self.extra_token_pairs == 0

    @property
    def exact_mask(self) -> torch.Tensor:
        """bool ``[B, H, nq, nk]``: active blocks whose computed pairs are all allowed by the
        token rule. ``mask & ~exact_mask`` are the coarsened blocks. Evaluates the rule in
        every active block on first use (cost proportional to the computed pairs)."""
        if "exact_mask" not in self._cache:
            self._evaluate_rule()
        return self._cache["exact_mask"]

    def coarsening_report(self, per_block: bool = True) -> CoarseningReport:
        """Summary of coarsening; ``per_block=False`` skips the per-block evaluation."""
        coarsened = int(torch.count_nonzero(self._mask & ~self.exact_mask)) if per_block else None
        return CoarseningReport(self.exact, self.extra_token_pairs, self.rule_token_pairs(),
                                self.computed_token_pairs(), self.num_active_blocks(), coarsened)

    def to_dense_token_mask(self, *, rule: bool = False,
                            max_elements: int = 1 << 28) -> torch.Tensor:
        """bool ``[B, H, query_len, key_len]`` token mask (for tests and small cases).

        ``rule=False``: what the kernel computes (block expansion, causal diagonal).
        ``rule=True``: what the token rule allows.
        """
        b, h = self.batch, self.num_heads
        n = b * h * self._query_len * self._key_len
        if n > max_elements:
            raise InvalidProblem(
                f"to_dense_token_mask would build {n} elements ([{b}, {h}, {self._query_len}, "
                f"{self._key_len}]); expected at most max_elements={max_elements}. Fix: raise "
                "max_elements, or use computed_token_pairs()/coarsening_report() instead.")
        dev = self.device
        bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
        hi = torch.arange(h, device=dev).view(1, h, 1, 1)
        qi = torch.arange(self._query_len, device=dev).view(1, 1, -1, 1)
        ki = torch.arange(self._key_len, device=dev).view(1, 1, 1, -1)
        fn = self.token_rule if rule else counting.block_lookup_rule(self._mask, self._block_size)
        out = torch.as_tensor(fn(bi, hi, qi, ki), device=dev).to(torch.bool)
        if self._is_causal:
            out = out & (ki <= qi)
        return out.expand(b, h, self._query_len, self._key_len).contiguous()

    # ---- conversion -------------------------------------------------------------------
    def _rebuild(self, mask, *, is_causal=None, token_rule=None, description=None,
                 rule_pairs: RulePairs = None, exact_mask=None) -> "BlockPattern":
        return BlockPattern(mask, block_size=self._block_size, query_len=self._query_len,
                            key_len=self._key_len,
                            is_causal=self._is_causal if is_causal is None else is_causal,
                            token_rule=token_rule, description=description or self._description,
                            _rule_pairs=rule_pairs, _exact_mask=exact_mask)

    def to(self, device) -> "BlockPattern":
        """The same pattern with its mask on ``device`` (token rules are device-agnostic)."""
        device = torch.device(device)
        if device == self.device:
            return self
        mask = self._mask.to(device)
        rule = None if self._rule_is_default else self._rule
        rule_pairs = self._cache.get("rule_pairs", self._rule_pairs_fn)
        if rule is None:
            rule_pairs = None
        out = self._rebuild(mask, token_rule=rule, rule_pairs=rule_pairs,
                            exact_mask=self._cache.get("exact_mask"))
        if "computed" in self._cache:
            out._cache["computed"] = self._cache["computed"]
        return out

    def prepare(self, device=None):
        """A ``PreparedPattern`` of this pattern on ``device`` (default: the pattern's): its
        block lists built once, so attention calls that take it do no pattern work."""
        # The one import of this package from the attention layer above it (a lazy one):
        # PreparedPattern lives with the kernels' block lists, and PreparedPattern.build only
        # duck-types the pattern, so nothing imports patterns back through it.
        # tests/test_layout.py allows exactly this edge (PATTERNS_UPWARD_EXCEPTIONS).
        from ..block_sparse.prepared import PreparedPattern
        return PreparedPattern.build(self, device=device)

    def cpu(self) -> "BlockPattern":
        return self.to("cpu")

    # ---- combinators ------------------------------------------------------------------
    def _check_compatible(self, other, op: str) -> None:
        if not isinstance(other, BlockPattern):
            raise InvalidProblem(f"cannot apply {op} to BlockPattern and {type(other).__name__}; "
                                 "expected another BlockPattern.")
        mine = (self._block_size, self._query_len, self._key_len)
        theirs = (other._block_size, other._query_len, other._key_len)
        if mine != theirs:
            raise InvalidProblem(
                f"cannot combine block patterns with (block_size, query_len, key_len) {mine} and "
                f"{theirs}; expected equal geometry. Fix: build both for the same lengths/block.")
        broadcast_dim("batch", self.batch, other.batch)
        broadcast_dim("heads", self.num_heads, other.num_heads)
        if other.device != self.device:
            raise InvalidProblem(f"cannot combine patterns on {self.device} and {other.device}. "
                                 "Fix: p.to(device) first.")

    def __and__(self, other: "BlockPattern") -> "BlockPattern":
        """Blocks active in both. Causal if either is causal; token rule = rule_a & rule_b."""
        self._check_compatible(other, "&")
        ra, rb = self.token_rule, other.token_rule
        return self._rebuild(self._mask & other._mask, is_causal=self._is_causal or other._is_causal,
                             token_rule=lambda b, h, q, kv: ra(b, h, q, kv) & rb(b, h, q, kv),
                             description=f"({self._description}) & ({other._description})")

    def __or__(self, other: "BlockPattern") -> "BlockPattern":
        """Blocks active in either. Causal only if both are; token rule = rule_a | rule_b
        (a causal part OR-ed with a non-causal part is coarsened on its diagonal blocks)."""
        self._check_compatible(other, "|")
        ra, rb = self.token_rule, other.token_rule
        return self._rebuild(self._mask | other._mask, is_causal=self._is_causal and other._is_causal,
                             token_rule=lambda b, h, q, kv: ra(b, h, q, kv) | rb(b, h, q, kv),
                             description=f"({self._description}) | ({other._description})")

    def __invert__(self) -> "BlockPattern":
        """Complement at block level. The result is not causal and its token rule is its own
        block mask (a complement of a coarsened rule cannot be represented by blocks)."""
        return BlockPattern(~self._mask, block_size=self._block_size, query_len=self._query_len,
                            key_len=self._key_len, is_causal=False,
                            description=f"~({self._description})")

    def __eq__(self, other) -> bool:
        """Same geometry, causal flag and (broadcast-expanded) active blocks."""
        if not isinstance(other, BlockPattern):
            return NotImplemented
        if (self._block_size, self._query_len, self._key_len, self._is_causal) != \
                (other._block_size, other._query_len, other._key_len, other._is_causal):
            return False
        try:
            b = broadcast_dim("batch", self.batch, other.batch)
            h = broadcast_dim("heads", self.num_heads, other.num_heads)
        except InvalidProblem:
            return False
        shape = (b, h, self.num_blocks_q, self.num_blocks_k)
        return bool(torch.equal(self._mask.expand(shape), other._mask.to(self.device).expand(shape)))

    __hash__ = object.__hash__

    # ---- interop and drawing (implemented in sibling modules below this one) ----------
    def to_bsr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indptr int64 [B*H*nq + 1], indices int64 [nnz])``; see ``interop.to_bsr``."""
        return interop.to_bsr(self)

    @classmethod
    def from_bsr(cls, indptr, indices, *, block_size: int, query_len: int,
                 key_len: Optional[int] = None, batch: int = 1, num_heads: int = 1,
                 is_causal: bool = False) -> BlockPattern:
        """Inverse of ``to_bsr``: ``indptr [batch * num_heads * nq + 1]``, ``indices [nnz]``."""
        parts = interop.bsr_parts(indptr, indices, block_size=block_size, query_len=query_len,
                                  key_len=key_len, batch=batch, num_heads=num_heads)
        return cls(**parts, is_causal=is_causal, description="from_bsr")

    def to_flex_block_mask(self):
        """A FlexAttention ``BlockMask`` computing the same thing; see ``interop``."""
        return interop.to_flex_block_mask(self)

    @classmethod
    def from_flex_block_mask(cls, block_mask, *, is_causal: bool = False) -> BlockPattern:
        """BlockPattern of a FlexAttention ``BlockMask`` (union of its partial and full blocks).

        Needs square blocks (``BLOCK_SIZE[0] == BLOCK_SIZE[1]``). The pattern's token rule is
        "full block, or partial block and ``mask_mod``", so ``extra_token_pairs`` reports what
        dropping the mask_mod inside partial blocks adds (``is_causal=True`` restores a causal
        cut). The mask_mod must accept broadcasting tensors for that report (most do).
        """
        return cls(**interop.flex_parts(block_mask), is_causal=is_causal,
                   description="from_flex_block_mask")

    @classmethod
    def from_token_mask(cls, token_mask: torch.Tensor, *, block_size: int,
                        is_causal: bool = False, chunk_pairs: int = 1 << 24) -> BlockPattern:
        """Block pattern covering a token-level mask.

        Args:
            token_mask: bool (or integer, nonzero = allowed) ``[Nq, Nk]``, ``[H, Nq, Nk]`` or
                ``[B, H, Nq, Nk]``; B/H of size 1 broadcast. Query ``i`` may attend key ``j``
                where it is True (ANDed with ``j <= i`` when ``is_causal``).
            block_size: tokens per block.
            is_causal: the pattern will be used with ``is_causal=True``: pairs above the
                diagonal are ignored when choosing blocks.
        Returns:
            BlockPattern with ``exact_mask`` = blocks whose computed pairs are all allowed (for
            ``is_causal=False``: the fully allowed blocks) and ``extra_token_pairs`` = allowed-
            by-kernel pairs that the token mask forbids. Work is done in chunks of query blocks
            (``chunk_pairs`` token pairs at a time), never on a second N x N copy.
        """
        return cls(**from_mask.token_mask_parts(token_mask, block_size=block_size,
                                                is_causal=is_causal, chunk_pairs=chunk_pairs))

    @classmethod
    def from_mask_fn(cls, fn: TokenRule, query_len: int, key_len: Optional[int] = None, *,
                     block_size: int, batch: int = 1, num_heads: int = 1, is_causal: bool = False,
                     device=None, chunk_pairs: int = 1 << 24) -> BlockPattern:
        """Block pattern from a vectorised mask function, in the spirit of FlexAttention's mask_mod.

        ``fn(b, h, q_idx, kv_idx) -> bool tensor`` receives int64 tensors shaped
        ``[B, 1, 1, 1]``, ``[1, H, 1, 1]``, ``[1, 1, rows, 1]``, ``[1, 1, 1, key_len]`` and must
        return something that broadcasts to ``[B, H, rows, key_len]``. Mask functions written
        with tensor ops (``q_idx >= kv_idx``, ``doc[q_idx] == doc[kv_idx]``, ...) work as they
        are; Python ``if`` on tensor values does not. No ``torch.compile`` is involved.

        The function is evaluated on every in-range pair, a chunk of query rows at a time
        (``chunk_pairs`` pairs per chunk), so memory is bounded and time is O(Nq * Nk). Use
        ``batch`` / ``num_heads`` > 1 only when ``fn`` depends on ``b`` / ``h`` (1 = broadcast).
        ``is_causal``: as in ``from_token_mask``. The pattern keeps ``fn`` as its token rule,
        records fully allowed blocks in ``exact_mask`` and the coarsening in
        ``extra_token_pairs``.
        """
        return cls(**from_mask.mask_fn_parts(
            fn, query_len, key_len, block_size=block_size, batch=batch, num_heads=num_heads,
            is_causal=is_causal, device=device, chunk_pairs=chunk_pairs))

    def draw(self, max_rows: int = 32, max_cols: int = 64, max_slices: int = 4) -> str:
        """Text picture: see ``drawing.to_text``."""
        return drawing.to_text(self, max_rows=max_rows, max_cols=max_cols, max_slices=max_slices)

    def __str__(self) -> str:
        return self.draw()

    def __repr__(self) -> str:
        return self.draw()

    def plot(self, ax=None, *, batch: int = 0, head: int = 0):
        """Draw one (batch, head) slice with matplotlib; returns the Axes."""
        return drawing.plot(self, ax=ax, batch=batch, head=head)

    def save_png(self, path, *, batch: int = 0, head: int = 0, dpi: int = 100) -> None:
        """Save a picture of one (batch, head) slice as PNG (needs matplotlib)."""
        drawing.save_png(self, path, batch=batch, head=head, dpi=dpi)


# The package's module-level constructors are these classmethods (one implementation, the
# same signatures and docs): ``from_bsr(indptr, indices, block_size=..., query_len=...)``.
from_bsr = BlockPattern.from_bsr
from_flex_block_mask = BlockPattern.from_flex_block_mask
from_token_mask = BlockPattern.from_token_mask
from_mask_fn = BlockPattern.from_mask_fn
