"""baracuda_kernels: fast block-sparse attention for PyTorch behind a plan-based API.

Functional:  y = baracuda_kernels.block_sparse_attention(q, k, v, pattern, block_size=128)
Varlen:      y = baracuda_kernels.block_sparse_attention_varlen(q, k, v, cu_q, cu_k)
KV cache:    y = baracuda_kernels.block_sparse_attention_with_kvcache(q, k_cache, v_cache, lens)
             (plan: SdpaDecodePlan)
Module:      attn = baracuda_kernels.BlockSparseAttention(pattern_fn, layout="bnhd")
Plan API:    plan = SdpaBlockSparsePlan.select(SdpaBlockSparseDescriptor(...)); plan.run(args)
Bias / mask: y = baracuda_kernels.masked_sdpa(q, k, v, attn_mask)  (plan: SdpaMaskedPlan)
"""

from .attention import (AttentionKind, BlockSparseAttention, FlashSdpaArgs,
                        FlashSdpaDescriptor, FlashSdpaPlan, PreparedPattern,
                        SdpaBlockSparseArgs, SdpaBlockSparseDescriptor, SdpaBlockSparsePlan,
                        SdpaDecodeArgs, SdpaDecodeDescriptor, SdpaDecodePlan,
                        SdpaMaskedArgs, SdpaMaskedDescriptor, SdpaMaskedPlan, TokenRules,
                        block_sparse_attention,
                        block_sparse_attention_varlen, block_sparse_attention_with_kvcache,
                        flash_sdpa, masked_sdpa, prepare_pattern)
from .core import (ArchSku, BackendKind, ElementKind, Error, InvalidProblem,
                   KernelSku, MathPrecision, OpCategory, PlanPreference, PrecisionGuarantee,
                   Unsupported)

__version__ = "0.1.0"

__all__ = [
    "ArchSku", "AttentionKind", "BackendKind", "BlockSparseAttention", "ElementKind", "Error", "FlashSdpaArgs",
    "FlashSdpaDescriptor", "FlashSdpaPlan", "InvalidProblem", "KernelSku", "MathPrecision",
    "OpCategory", "PlanPreference", "PrecisionGuarantee",
    "PreparedPattern", "SdpaBlockSparseArgs", "SdpaBlockSparseDescriptor", "SdpaBlockSparsePlan",
    "SdpaDecodeArgs", "SdpaDecodeDescriptor", "SdpaDecodePlan",
    "SdpaMaskedArgs", "SdpaMaskedDescriptor", "SdpaMaskedPlan", "TokenRules", "Unsupported",
    "block_sparse_attention", "block_sparse_attention_varlen",
    "block_sparse_attention_with_kvcache", "flash_sdpa", "masked_sdpa",
    "prepare_pattern", "__version__",
]
