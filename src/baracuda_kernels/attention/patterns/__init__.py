"""Block patterns for block-sparse attention: builders, combinators, interop, pictures.

A ``BlockPattern`` holds a bool block mask ``[B, H, nq, nk]`` (B/H may be 1 = broadcast)
with its ``block_size``, ``query_len`` and ``key_len``, an ``is_causal`` hint, and the
token-level rule it stands for, so it can report whether the block mask is exact or
coarsened (``exact``, ``extra_token_pairs``, ``coarsening_report()``).

Builders take token-level parameters::

    from baracuda_kernels.attention.patterns import sliding_window
    p = sliding_window(8192, window=1024, block_size=128, sinks=4)   # causal
    y = block_sparse_attention(q, k, v, p, block_size=128, is_causal=p.is_causal)

The kernels know blocks, the causal flag, ragged tails, and the token rules of the attention
call (a window with sinks, document ids, a prefix). A builder whose rule is one of those
hands it to the call through ``pattern.kernel_rules``: the kernels apply it per token in the
blocks it cuts, so the pattern is *exact*. Any other token rule that cuts through a block
is *coarsened* to the whole block. Which builders are exact:

================================  =========================================================
builder                           exact?
================================  =========================================================
causal                            yes (with ``is_causal=True`` in the attention call)
random_blocks, BlockPattern(t),   yes, by definition (their rule is the block mask)
from_bsr, ~p
sliding_window                    yes (kernel rules: window_size, sink_tokens), except with
                                  global tokens or a non-causal window with key_len != seq_len
document_mask                     yes (kernel rules: document_ids)
prefix_lm                         yes (causal; kernel rules: prefix_lengths)
longformer, dilated_sliding_      no: global tokens / dilation cut blocks and coarsen
window, sparse_transformer_*
bigbird                           random part yes; window / global parts coarsen
from_token_mask, from_mask_fn     iff every active block is fully allowed (``exact_mask``)
p & q                             p's kernel rules survive when q is a plain block pattern
p | q, per_head                   from their combined token rules (kernel rules dropped)
================================  =========================================================

``pattern.extra_token_pairs`` counts the pairs coarsening adds (0 = exact); causal
builders return ``is_causal=True``, and the call must pass ``is_causal=True`` too (None, the
default, follows the pattern).

This package imports only ``baracuda_kernels.core`` and torch, except ``BlockPattern.prepare()``,
which lazily imports ``block_sparse.prepared`` (the one exception ``tests/test_layout.py``
allows). Inside it, imports go one way: ``counting`` and ``checks`` (leaves) <- ``interop``,
``from_mask``, ``drawing`` (tensors and duck-typed patterns in, constructor arguments out)
<- ``block_pattern`` <- ``builders`` <- ``composite``. ``key_selection`` (KV-cache block
selection for decode: ``key_block_bounds``, ``select_key_blocks``) stands alone.
"""

from .block_pattern import (BlockPattern, from_bsr, from_flex_block_mask, from_mask_fn,
                            from_token_mask)
from .builders import (causal, dilated_sliding_window, document_mask, longformer, prefix_lm,
                       sliding_window)
from .composite import (bigbird, per_head, random_blocks, sparse_transformer_fixed,
                        sparse_transformer_strided)
from .counting import CoarseningReport, TokenRule
from .interop import flex_available, to_bsr, to_flex_block_mask
from .key_selection import KeyBlockBounds, key_block_bounds, select_key_blocks

__all__ = [
    "BlockPattern", "CoarseningReport", "TokenRule",
    "causal", "sliding_window", "dilated_sliding_window", "longformer", "bigbird",
    "sparse_transformer_strided", "sparse_transformer_fixed", "document_mask", "prefix_lm",
    "random_blocks", "per_head", "from_token_mask", "from_mask_fn",
    "to_bsr", "from_bsr", "to_flex_block_mask", "from_flex_block_mask", "flex_available",
    "KeyBlockBounds", "key_block_bounds", "select_key_blocks",
]
