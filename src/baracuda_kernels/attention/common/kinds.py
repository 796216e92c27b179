"""The ops of the attention family (``KernelSku.op`` of an attention plan)."""

import enum


class AttentionKind(enum.Enum):
    FLASH_SDPA = "flash_sdpa"
    MASKED_SDPA = "masked_sdpa"
    BLOCK_SPARSE_ATTENTION = "block_sparse_attention"
    DECODE = "decode"  # new tokens against a KV cache (decode/)
