"""The transformers mask side of the drop-in: a rule object instead of an Nq x Nk mask.

transformers builds one attention mask per forward (per mask type: full / sliding) through
``AttentionMaskInterface[config._attn_implementation](**kwargs)`` and hands it to every
attention layer. For sdpa and eager that is a dense ``[B, 1, Nq, Nk]`` tensor. Here it is an
``HFMaskRule``: the causal diagonal, the sliding window, the valid keys of a padded batch and
the documents of a packed batch -- everything ``block_sparse_attention`` evaluates per token
by itself, in O(B * Nk) memory.

How the rule is found. transformers passes its rule as a composed mask function
(``and_masks(sliding_window_overlay(w), causal_mask_function)``, packed sequences, ...). We
recognise its building blocks by the identity of their code objects (the closures of the
installed ``transformers.masking_utils``: no name guessing) and read their parameters from
the closure cells. A block we do not know (chunked attention, an ``or_mask_function``,
blockwise image tokens, a future overlay) is never guessed: the mask is then built by
transformers' own sdpa mask function (exact, dense) and runs as an additive bias.

Positions (transformers' convention, the one we reproduce exactly): query row i sits at
absolute index ``q_offset + i`` and key column j at ``kv_offset + j``; causal means
key index <= query index, the sliding window ``w`` means query index - key index < w, and
padding removes keys (``attention_mask[b, kv_offset + j] == 0``) without shifting indices.
With a DynamicCache ``kv_offset = 0`` and ``q_offset = Nk - Nq``: bottom-right causal.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..core import InvalidProblem


@dataclasses.dataclass(frozen=True, eq=False)
class HFMaskRule:
    """The attention rule of one transformers mask, for ``query [B, H, Nq, D]`` against
    ``key [B, Hkv, Nk, D]``.

    Attributes:
        batch_size, q_length, kv_length: B, Nq, Nk the rule was built for.
        offset: q_offset - kv_offset: query i sits at key index i + offset.
        causal: key j is seen by query i only when j <= i + offset.
        window: transformers' sliding window w (keys with i + offset - j < w), or None.
        key_ids: int32 [B, Nk], 0 for a real key and -1 for padding, or None (no 2D mask).
        documents: int32 [B, N] packed-sequence ids (N = Nq = Nk, offset 0), or None.
    """

    batch_size: int
    q_length: int
    kv_length: int
    offset: int
    causal: bool
    window: Optional[int] = None
    key_ids: Optional[torch.Tensor] = None
    documents: Optional[torch.Tensor] = None

    @property
    def shape(self) -> tuple:
        """The shape the equivalent dense mask would have, [B, 1, Nq, Nk]."""
        return (self.batch_size, 1, self.q_length, self.kv_length)

    @property
    def ndim(self) -> int:
        """4, as the dense mask: ``generate`` with a static cache prepares the masks once
        per step and hands them to the model, whose mask helpers test ``mask.ndim == 2``
        (a padding mask to process) before passing a prepared mask on."""
        return 4

    def valid_keys(self, keep: int, device) -> torch.Tensor:
        """bool [B, keep]: the first ``keep`` keys that are not padding, on ``device``.
        Worked out once per (keep, device): transformers builds one rule per forward and
        hands it to every layer, so a decode step's layers share one mask."""
        if torch.compiler.is_compiling():  # traced once per graph anyway; no state
            return self.key_ids[:, :keep].to(device) >= 0
        store = self.__dict__.setdefault("_valid_keys", {})
        key = (keep, torch.device(device))
        if key not in store:
            store[key] = self.key_ids[:, :keep].to(device) >= 0
        return store[key]

    def dense(self, device=None) -> torch.Tensor:
        """The rule as a bool [B, 1, Nq, Nk] mask (True = attend). Only the fallback path
        (eager / sdpa for what the library declines) builds it."""
        if device is None:
            device = self.key_ids.device if self.key_ids is not None else \
                self.documents.device if self.documents is not None else "cpu"
        i = torch.arange(self.q_length, device=device)[:, None] + self.offset
        j = torch.arange(self.kv_length, device=device)[None, :]
        ok = torch.ones(self.q_length, self.kv_length, dtype=torch.bool, device=device)
        if self.causal:
            ok = ok & (j <= i)
        if self.window is not None:
            ok = ok & (i - j < self.window)
        ok = ok[None, None].expand(self.batch_size, 1, -1, -1)
        if self.key_ids is not None:
            ok = ok & (self.key_ids.to(device) >= 0)[:, None, None, :]
        if self.documents is not None:
            d = self.documents.to(device)
            ok = ok & (d[:, None, :, None] == d[:, None, None, :])
        return ok


# ------------------------------------------------------------------ recognising HF's rules
def _cells(fn) -> dict:
    """The closure variables of ``fn`` by name ({} for a plain function)."""
    code = getattr(fn, "__code__", None)
    if code is None or not fn.__closure__:
        return {}
    return dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__)))


class _KnownBlocks:
    """The code objects of transformers' mask-function building blocks, and whether each
    means what we translate it to (checked once on a few index pairs: a future change of,
    say, the window's inequality turns the block into "unknown", i.e. the exact dense path,
    instead of a silent off-by-one)."""

    def __init__(self, mu):
        def code(make):
            try:
                return make().__code__
            except Exception:  # the block does not exist in this version
                return None

        causal = getattr(mu, "causal_mask_function", None)
        self.causal = causal.__code__ if causal is not None else None
        bidir = getattr(mu, "bidirectional_mask_function", None)
        self.bidirectional = bidir.__code__ if bidir is not None else None
        self.and_ = code(lambda: mu.and_masks(causal))
        self.window = code(lambda: mu.sliding_window_overlay(4))
        self.packed = code(lambda: mu.packed_sequence_mask_function(torch.zeros(1, 1)))
        self.remap = code(lambda: mu.remap_positions_for_packed_sequence(
            causal, torch.zeros(1, 1, dtype=torch.long)))
        if not self._semantics_hold(mu):
            self.causal = self.window = None

    def _semantics_hold(self, mu) -> bool:
        z = torch.tensor(0)
        q, kv = torch.tensor(10), torch.tensor([6, 7, 10, 11])
        try:
            causal_ok = mu.causal_mask_function(z, z, q, kv).tolist() == [True, True, True, False]
            win = mu.sliding_window_overlay(4)(z, z, q, kv).tolist() == [False, True, True, True]
        except Exception:
            return False
        return causal_ok and win


_KNOWN: dict = {}


def _known_blocks() -> _KnownBlocks:
    import transformers.masking_utils as mu
    key = id(mu)
    if key not in _KNOWN:
        _KNOWN[key] = _KnownBlocks(mu)
    return _KNOWN[key]


def _factors(fn, known: _KnownBlocks, out: list) -> bool:
    """Append the AND-factors of mask function ``fn`` to ``out`` as ("causal",),
    ("window", w), ("documents", ids) or ("positions",) (a remap onto per-document
    positions); False when ``fn`` contains a block we do not know."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    if code is known.causal:
        out.append(("causal",))
        return True
    if code is known.bidirectional:
        return True                     # "q_idx >= 0": no constraint
    cells = _cells(fn)
    if code is known.and_:
        return all(_factors(f, known, out) for f in cells["mask_functions"])
    if code is known.window and isinstance(cells.get("sliding_window"), int):
        out.append(("window", cells["sliding_window"]))
        return True
    if code is known.packed:
        out.append(("documents", cells["packed_sequence_mask"]))
        return True
    if code is known.remap:
        # Causal / window on per-document positions equal the same rules on indices within
        # one document (positions are consecutive inside a detected document), so the remap
        # is exact once a documents factor is ANDed in; checked by the caller.
        out.append(("positions",))
        return _factors(cells["mask_function"], known, out)
    return False


def _query_offset(kwargs) -> Optional[int]:
    """q_offset as an int: transformers 5 passes q_offset (an int, or a 0-d tensor for a
    static cache); 4.5x passes cache_position (the query indices, consecutive)."""
    if "q_offset" in kwargs or "cache_position" not in kwargs:
        off = kwargs.get("q_offset", 0)
        return int(off) if isinstance(off, torch.Tensor) else off
    pos = kwargs["cache_position"]
    if pos.numel() == 0:
        return 0
    first, last = pos.reshape(-1)[[0, -1]].tolist()   # one host sync per forward
    if last - first + 1 != pos.numel():
        return None                                      # not consecutive: no offset rule
    return first


def _query_length(kwargs) -> int:
    if "q_length" in kwargs:
        return int(kwargs["q_length"])
    return int(kwargs["cache_position"].numel())


def mask_rule(**kwargs):
    """The mask function registered with ``transformers.AttentionMaskInterface``: called by
    ``create_causal_mask`` / ``create_sliding_window_causal_mask`` / ... with transformers'
    keyword arguments (batch_size, q_length + q_offset or cache_position, kv_length,
    kv_offset, mask_function, attention_mask [B, L] or None, ...).

    Returns an ``HFMaskRule`` when the mask function is made of blocks we translate exactly
    (causal, sliding window, padding, packed sequences, bidirectional); otherwise the dense
    bool mask of transformers' own sdpa mask function (or its None), which the attention
    function runs as an additive bias.
    """
    if isinstance(kwargs.get("attention_mask"), HFMaskRule):
        # Already prepared for this step (generate's create_masks_for_generate): passed on
        # as is, as transformers passes on a prepared 4D mask.
        return kwargs["attention_mask"]
    rule = _try_rule(kwargs)
    if rule is not None:
        return rule
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    dense_kwargs = dict(kwargs, allow_is_causal_skip=False)
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](**dense_kwargs)


def _try_rule(kwargs) -> Optional[HFMaskRule]:
    factors: list = []
    fn = kwargs.get("mask_function")
    if fn is None or not _factors(fn, _known_blocks(), factors):
        return None
    kinds = [f[0] for f in factors]
    documents = [f[1] for f in factors if f[0] == "documents"]
    windows = [f[1] for f in factors if f[0] == "window"]
    causal = "causal" in kinds
    if len(documents) > 1 or ("positions" in kinds and not documents) or (windows and not causal):
        return None
    q_offset, q_length = _query_offset(kwargs), _query_length(kwargs)
    kv_length, kv_offset = int(kwargs["kv_length"]), int(kwargs.get("kv_offset", 0) or 0)
    if q_offset is None:
        return None
    batch = int(kwargs["batch_size"])
    docs = None
    if documents:
        docs = documents[0]
        if q_offset != 0 or kv_offset != 0 or tuple(docs.shape[-1:]) != (q_length,) \
                or q_length != kv_length:
            return None
        docs = docs.expand(batch, -1).to(torch.int32).contiguous()
    return HFMaskRule(batch, q_length, kv_length, q_offset - kv_offset, causal,
                      min(windows) if windows else None,
                      _key_ids(kwargs.get("attention_mask"), batch, kv_length, kv_offset), docs)


def _key_ids(mask2d, batch: int, kv_length: int, kv_offset: int) -> Optional[torch.Tensor]:
    """int32 [B, Nk]: 0 for a key the 2D mask keeps, -1 for padding; None without a mask.
    Keys past the 2D mask's end are padding, as in transformers' prepare_padding_mask (a
    static cache's unused tail). No host sync: an all-ones mask costs nothing in the kernels
    (blocks whose ids all agree stay mask-free)."""
    if mask2d is None:
        return None
    if mask2d.dim() != 2:
        raise InvalidProblem(f"the 2D attention_mask handed to the mask function has shape "
                             f"{tuple(mask2d.shape)}; expected [batch, keys] (1 = token, 0 = "
                             f"padding). Pass a [B, L] padding mask to the model.")
    valid = mask2d[:, kv_offset:kv_offset + kv_length].to(torch.bool)
    if valid.shape[1] < kv_length:
        valid = torch.nn.functional.pad(valid, (0, kv_length - valid.shape[1]), value=False)
    ids = valid.to(torch.int32) - 1
    return ids.expand(batch, -1).contiguous()
