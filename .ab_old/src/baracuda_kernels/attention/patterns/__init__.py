"""Block patterns for block-sparse attention: builders, combinators, interop, pictures.

A ``BlockPattern`` holds a bool block mask ``[B, H, nq, nk]`` (B/H may be 1 = broadcast)
with its ``block_size``, ``query_len`` and ``key_len``, an ``is_causal`` hint, and the
token-level rule it stands for, so it can report whether the block mask is exact or
coarsened (``exact``, ``extra_token_pairs``, ``coarsening_report()``).

Builders take token-level parameters::

    from baracuda_kernels.attention.patterns import sliding_window
    p = sliding_window(8192, window=1024, block_size=128, sinks=4)   # causal
    y = block_sparse_attention(q, k, v, p, block_size=128, is_causal=p.is_causal)

The kernel knows only blocks, the causal flag and ragged tails: a token rule that cuts
through a block is *coarsened* to the whole block. Which builders are exact:

================================  =========================================================
builder                           exact at block granularity?
================================  =========================================================
causal                            yes (with ``is_causal=True`` in the attention call)
random_blocks, BlockPattern(t),   yes, by definition (their rule is the block mask)
from_bsr, ~p
document_mask                     yes iff every document boundary is a block multiple
sparse_transformer_fixed          chunk part iff stride is a block multiple; summary
                                  columns narrower than a block coarsen
sliding_window, longformer,       no: window edges cut blocks; sinks / global tokens not
dilated_sliding_window            filling whole blocks coarsen their block rows/columns
sparse_transformer_strided        no (the strided part touches every block if stride < bs)
bigbird                           random part yes; window / global parts as sliding_window
prefix_lm                         no: not causal, so diagonal blocks after the prefix are whole
from_token_mask, from_mask_fn     iff every active block is fully allowed (``exact_mask``)
p & q, p | q                      from their combined token rules
================================  =========================================================

``pattern.extra_token_pairs`` counts the pairs coarsening adds (0 = exact); causal
builders return ``is_causal=True``, and the call must pass ``is_causal=True`` too.

This package imports only ``baracuda_kernels.core`` and torch, except ``BlockPattern.prepare()``,
which lazily imports ``block_sparse.prepared`` (the one exception ``tests/test_layout.py``
allows). Inside it, imports go one way: ``counting`` and ``checks`` (leaves) <- ``interop``,
``from_mask``, ``drawing`` (tensors and duck-typed patterns in, constructor arguments out)
<- ``block_pattern`` <- ``builders`` <- ``composite``.
"""

from .block_pattern import (BlockPattern, from_bsr, from_flex_block_mask, from_mask_fn,
                            from_token_mask)
from .builders import (causal, dilated_sliding_window, document_mask, longformer, prefix_lm,
                       sliding_window)
from .composite import (bigbird, per_head, random_blocks, sparse_transformer_fixed,
                        sparse_transformer_strided)
from .counting import CoarseningReport, TokenRule
from .interop import flex_available, to_bsr, to_flex_block_mask

__all__ = [
    "BlockPattern", "CoarseningReport", "TokenRule",
    "causal", "sliding_window", "dilated_sliding_window", "longformer", "bigbird",
    "sparse_transformer_strided", "sparse_transformer_fixed", "document_mask", "prefix_lm",
    "random_blocks", "per_head", "from_token_mask", "from_mask_fn",
    "to_bsr", "from_bsr", "to_flex_block_mask", "from_flex_block_mask", "flex_available",
]
