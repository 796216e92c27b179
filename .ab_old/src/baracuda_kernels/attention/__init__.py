"""Attention op family. One folder per op, shared pieces in ``common``:

* ``block_sparse/``: block-sparse scaled-dot-product attention (functional.py -> autograd.py
  -> plan.py -> launchers reference.py, triton_fwd.py, triton_bwd.py -> @triton.jit kernels;
  block_lists.py / triton_lists.py / prepared.py turn a pattern into block lists).
* ``flash_sdpa/``: dense (optionally causal) SDPA behind the same plan surface.
* ``patterns/``: BlockPattern and its builders.
* ``common/``: op kinds, kernel pieces, TMA loads, the Triton availability rule.
"""

from .block_sparse.descriptor import SdpaBlockSparseArgs, SdpaBlockSparseDescriptor
from .block_sparse.functional import block_sparse_attention
from .block_sparse.plan import SdpaBlockSparsePlan
from .block_sparse.prepared import PreparedPattern, prepare_pattern
from .common.kinds import AttentionKind
from .flash_sdpa.descriptor import FlashSdpaArgs, FlashSdpaDescriptor
from .flash_sdpa.functional import flash_sdpa
from .flash_sdpa.plan import FlashSdpaPlan

__all__ = ["AttentionKind", "FlashSdpaArgs", "FlashSdpaDescriptor", "FlashSdpaPlan",
           "PreparedPattern", "SdpaBlockSparseArgs", "SdpaBlockSparseDescriptor",
           "SdpaBlockSparsePlan", "block_sparse_attention", "flash_sdpa", "prepare_pattern"]
