"""Attention op family: block-sparse scaled-dot-product attention.

Layers, top to bottom: functional.py (public function) -> autograd.py -> plan.py
(validation, backend and config choice) -> launchers (reference.py, triton_fwd.py,
triton_bwd.py) -> @triton.jit kernels. block_lists.py (with triton_lists.py) turns a pattern
into compact lists of active blocks for every backend; prepared.py holds them for reuse.
"""

from .descriptor import SdpaBlockSparseArgs, SdpaBlockSparseDescriptor
from .functional import block_sparse_attention
from .plan import SdpaBlockSparsePlan
from .prepared import PreparedPattern, prepare_pattern

__all__ = ["PreparedPattern", "SdpaBlockSparseArgs", "SdpaBlockSparseDescriptor",
           "SdpaBlockSparsePlan", "block_sparse_attention", "prepare_pattern"]
