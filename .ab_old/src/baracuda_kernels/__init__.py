"""baracuda_kernels: fast block-sparse attention for PyTorch behind a plan-based API.

Functional:  y = baracuda_kernels.block_sparse_attention(q, k, v, pattern, block_size=128)
Plan API:    plan = SdpaBlockSparsePlan.select(SdpaBlockSparseDescriptor(...)); plan.run(args)
"""

from .attention import (AttentionKind, FlashSdpaArgs, FlashSdpaDescriptor, FlashSdpaPlan,
                        PreparedPattern, SdpaBlockSparseArgs, SdpaBlockSparseDescriptor,
                        SdpaBlockSparsePlan, block_sparse_attention, flash_sdpa, prepare_pattern)
from .core import (ArchSku, BackendKind, ElementKind, Error, InvalidProblem,
                   KernelSku, MathPrecision, OpCategory, PlanPreference, PrecisionGuarantee,
                   Unsupported)

__version__ = "0.1.0"

__all__ = [
    "ArchSku", "AttentionKind", "BackendKind", "ElementKind", "Error", "FlashSdpaArgs",
    "FlashSdpaDescriptor", "FlashSdpaPlan", "InvalidProblem", "KernelSku", "MathPrecision",
    "OpCategory", "PlanPreference", "PrecisionGuarantee",
    "PreparedPattern", "SdpaBlockSparseArgs", "SdpaBlockSparseDescriptor", "SdpaBlockSparsePlan",
    "Unsupported",
    "block_sparse_attention", "flash_sdpa", "prepare_pattern", "__version__",
]
