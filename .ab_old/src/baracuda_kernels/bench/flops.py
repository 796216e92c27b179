"""The FLOP convention of the project (DESIGN.md, "Measuring on the GPU").

Forward FLOPs = 2 * (d_k + d_v) * P, where P is the number of (query, key) token pairs inside
the *computed* blocks: active pattern blocks, minus blocks the causal mask empties entirely,
with ragged tails cut (a last block of r < block_size rows/columns counts r). A block that
the causal diagonal crosses counts in full: the kernel computes it whole and masks inside.
With d_k = d_v = D that is 4 * D * P (QK^T and PV, 2 FLOPs per multiply-add).

Backward = 2.5 x forward (five block matmuls instead of two), a training step (forward +
backward, eager ``step`` or replayed ``step-graph``) = 3.5 x; ``unprepared`` is a forward.
Effective TFLOP/s = these FLOPs / measured time, for every implementation of the same case,
so ratios of TFLOP/s are ratios of time.
"""

from __future__ import annotations

import torch

from ..attention.block_sparse.block_lists import SKIP, classify_blocks

MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "step": 3.5, "step-graph": 3.5, "unprepared": 1.0}


def computed_pairs(pattern: torch.Tensor, query_len: int, key_len: int, block_size: int,
                   is_causal: bool, batch: int, heads: int) -> int:
    """Token pairs inside computed blocks, summed over all ``batch x heads`` slices.

    Args:
        pattern: bool ``[Bp, Hp, nq, nk]`` with Bp in {1, batch}, Hp in {1, heads}
            (a broadcast dim counts ``batch`` or ``heads`` times).
    """
    if pattern.dim() != 4:
        raise ValueError(f"pattern has shape {tuple(pattern.shape)}; expected [Bp, Hp, nq, nk].")
    bp, hp, nq, nk = pattern.shape
    cls = classify_blocks(pattern.to(torch.bool), query_len, key_len, block_size, is_causal)
    dev = pattern.device
    rows = torch.clamp(query_len - torch.arange(nq, device=dev, dtype=torch.int64) * block_size,
                       min=0, max=block_size)                             # [nq]
    cols = torch.clamp(key_len - torch.arange(nk, device=dev, dtype=torch.int64) * block_size,
                       min=0, max=block_size)                             # [nk]
    sizes = rows[:, None] * cols[None, :]                                 # [nq, nk]
    stored = int(((cls != SKIP).to(torch.int64) * sizes).sum())
    return stored * (batch // bp) * (heads // hp)


def forward_flops(pairs: int, d_k: int, d_v: int) -> float:
    return 2.0 * (d_k + d_v) * pairs


def mode_flops(pairs: int, d_k: int, d_v: int, mode: str) -> float:
    """FLOPs of ``mode`` (a key of MODE_FACTOR) for ``pairs`` computed token pairs."""
    return MODE_FACTOR[mode] * forward_flops(pairs, d_k, d_v)


def tflops(flops: float, ms: float) -> float:
    """Effective TFLOP/s of ``flops`` done in ``ms`` milliseconds."""
    return flops / (ms * 1e-3) / 1e12 if ms and ms > 0 else float("nan")
