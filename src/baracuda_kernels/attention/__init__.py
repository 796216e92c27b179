"""Attention op family. One folder per op, shared pieces in ``common``:

* ``block_sparse/``: block-sparse scaled-dot-product attention (functional.py -> autograd.py
  -> plan.py -> launchers reference.py, triton_fwd.py, triton_bwd.py -> @triton.jit kernels;
  block_lists.py / triton_lists.py / prepared.py turn a pattern into block lists; varlen.py
  runs a packed variable-length batch through it).
* ``decode/``: new tokens against a KV cache (kvcache.py), contiguous or paged, through a
  split-KV decode kernel with the GQA group packed into one tile (triton_decode.py).
* ``flash_sdpa/``: dense (optionally causal) SDPA behind the same plan surface.
* ``masked_sdpa/``: SDPA with an additive mask / score bias (the block-sparse kernels'
  bias modifier), plan and functional.
* ``patterns/``: BlockPattern and its builders.
* ``common/``: op kinds, kernel pieces, TMA loads, the Triton availability rule, and the
  per-token rules (document ids, padding, positions) the kernels apply.
"""

from .block_sparse.descriptor import SdpaBlockSparseArgs, SdpaBlockSparseDescriptor
from .block_sparse.functional import block_sparse_attention
from .decode.descriptor import SdpaDecodeArgs, SdpaDecodeDescriptor
from .decode.kvcache import block_sparse_attention_with_kvcache
from .decode.plan import SdpaDecodePlan
from .block_sparse.module import BlockSparseAttention
from .block_sparse.plan import SdpaBlockSparsePlan
from .block_sparse.prepared import PreparedPattern, prepare_pattern
from .block_sparse.varlen import block_sparse_attention_varlen
from .common.kinds import AttentionKind
from .common.token_rules import TokenRules
from .flash_sdpa.descriptor import FlashSdpaArgs, FlashSdpaDescriptor
from .flash_sdpa.functional import flash_sdpa
from .flash_sdpa.plan import FlashSdpaPlan
from .masked_sdpa import SdpaMaskedArgs, SdpaMaskedDescriptor, SdpaMaskedPlan, masked_sdpa

__all__ = ["AttentionKind", "BlockSparseAttention", "FlashSdpaArgs", "FlashSdpaDescriptor", "FlashSdpaPlan",
           "PreparedPattern", "SdpaBlockSparseArgs", "SdpaBlockSparseDescriptor",
           "SdpaBlockSparsePlan", "SdpaDecodeArgs", "SdpaDecodeDescriptor", "SdpaDecodePlan",
           "SdpaMaskedArgs", "SdpaMaskedDescriptor", "SdpaMaskedPlan",
           "TokenRules", "block_sparse_attention", "block_sparse_attention_varlen",
           "block_sparse_attention_with_kvcache",
           "flash_sdpa", "masked_sdpa", "prepare_pattern"]
