"""Context parallelism: one sequence's attention over the ranks of a torch.distributed group.

    >>> sharding = Sharding(seq_len, world_size, "zigzag", block_size)
    >>> cp = prepare_context_parallel(pattern, seq_len=seq_len, world_size=world_size,
    ...                               rank=rank, block_size=block_size, is_causal=True)
    >>> y = context_parallel_attention(q_shard, k_shard, v_shard, cp)

``sharding.py``: which tokens each rank holds (zigzag / contiguous) and the shard / unshard /
gather helpers; ``prepared.py``: the global pattern turned into this rank's parts and
messages, once; ``exchange.py``: the point-to-point messages; ``attention.py``: the
autograd function (forward and backward on the single-device kernels, merged through lse).
"""

from .attention import context_parallel_attention
from .prepared import ContextParallelPattern, prepare_context_parallel
from .sharding import Sharding, shard_sequence, unshard_sequence

__all__ = ["ContextParallelPattern", "Sharding", "context_parallel_attention",
           "prepare_context_parallel", "shard_sequence", "unshard_sequence"]
