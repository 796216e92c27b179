"""Tile configurations of the Triton backward kernels (triton_bwd.py): the dataclass, the
measured per-(dtype, head dim, block) default tables, and the tile arithmetic the launcher
uses. Kept apart from the kernels so that the tables (data, with the measurements that chose
them) do not crowd the kernel file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton



@dataclass(frozen=True)
class BackwardConfig:
    """Tiles of the backward kernels (upper bounds: clipped to the pattern block).

    dK/dV kernel: ``kv_block_n`` keys per program, ``kv_block_m`` queries per step.
    dQ kernel: ``q_block_m`` queries per program, ``q_block_n`` keys per step.
    """

    kv_block_n: int
    kv_block_m: int
    kv_warps: int
    kv_stages: int
    q_block_m: int
    q_block_n: int
    q_warps: int
    q_stages: int
    # Launch order of both kernels (see _launch_order): "heavy-first", "head-major" or
    # "tile-major".
    launch_order: str = "heavy-first"
    # TMA loads (triton_tma) of the looped-over tiles: Q/dY in dK/dV, K/V in dQ. Taken where
    # the layout allows it and the tile divides the pattern block; pointer loads otherwise.
    use_tma: bool = False


# (element kind, head-dim bucket) -> tiles. f32 ("ieee") and f64 dots are FMA / DMMA loops
# that hold more operands in registers: smaller tiles, chosen spill-free for sm90 (ptxas).
# 16-bit entries load through TMA where the card and layout allow (see triton_tma); on an
# H200 (second sweep, same problem as below, all other settings equal) TMA took causal dense
# from 353 to 390 TFLOP/s, random 25% 348 -> 373, window 264 -> 289, random 5% 237 -> 248;
# block 64: 333 -> 354, 328 -> 347, 216 -> 235, 239 -> 253. With TMA, 2 or 4 stages in
# either kernel and 128 x 32 / 64 x 64 dK/dV tiles were no faster than these.
_DEFAULTS = {
    ("16bit", 64): BackwardConfig(128, 64, 8, 3, 128, 64, 8, 3, use_tma=True),
    # Measured on an H200 (bf16, B=2, H=16, N=8192, D=128, block 128; one run of
    # scripts/bench_triton_bwd.py --sweep, 2026-11-27), each kernel varied alone from
    # (128,64,8,2 | 128,64,8,2): dK/dV with 3 stages 328 / 337 / 256 TFLOP/s (causal dense /
    # random 25% / window) vs 324 / 325 / 246, although it spills ~112 B a thread; dQ with 3
    # stages 351 / 339 / 259. 128 x 32 dK/dV tiles (spill-free) were slower: 301 / 305 / 237.
    ("16bit", 128): BackwardConfig(128, 64, 8, 3, 128, 64, 8, 3, use_tma=True),
    ("16bit", 256): BackwardConfig(32, 64, 8, 2, 64, 32, 8, 2, use_tma=True),
    ("f32", 64): BackwardConfig(32, 32, 8, 2, 32, 32, 8, 2),
    ("f32", 128): BackwardConfig(32, 16, 8, 2, 32, 16, 8, 2),
    ("f32", 256): BackwardConfig(16, 16, 8, 2, 32, 16, 8, 2),
    ("f64", 64): BackwardConfig(32, 32, 8, 2, 32, 32, 8, 2),
    ("f64", 128): BackwardConfig(32, 16, 8, 2, 32, 16, 8, 2),
    ("f64", 256): BackwardConfig(16, 16, 8, 2, 16, 16, 8, 2),
}


# 16-bit, pattern blocks of 64 tokens or less (tiles clipped to the block). Measured at
# D=128, block 64 (same run as above): dK/dV 64 x 32 with 4 warps, 3 stages 319 / 308 / 197
# TFLOP/s (causal dense / random 25% / window) vs 216 / 203 / 137 with 64 x 64, 8 warps,
# 2 stages; dQ 64 x 32, 4 warps, 3 stages was the best dQ variant (229 / 217 / 146 vs
# 216 / 203 / 137). The D<=64 entry is unmeasured (spill-free in an sm90 compile check).
_SMALL_BLOCK_DEFAULTS = {
    64: BackwardConfig(64, 64, 4, 3, 64, 64, 4, 3, use_tma=True),
    128: BackwardConfig(64, 32, 4, 3, 64, 32, 4, 3, use_tma=True),
}


# Short rows (see triton_configs.SHORT_ROW_BLOCKS; prepared patterns only): 16-bit, head
# dims <= 128, block 128. Same H200 probe as the forward's short-row entry: 10% / 5% / 2%
# density, default 889 / 565 / 367 us, (64,64,4,2 | 64,64,4,2) 852 / 541 / 327 us,
# (64,32,4,3 | ...) 919 / 572 / 330, (64,64,4,3 | ...) 1010 / 666 / 446.
_SHORT_ROW_DEFAULTS = {128: BackwardConfig(64, 64, 4, 2, 64, 64, 4, 2, use_tma=True)}


def short_row_backward_config(dtype: torch.dtype, head_dim: int,
                              block_size: int) -> BackwardConfig | None:
    """The measured short-row tiles for this problem class, or None (keep the default)."""
    if dtype not in (torch.float16, torch.bfloat16) or block_size != 128 or head_dim > 128:
        return None
    return _SHORT_ROW_DEFAULTS.get(128 if head_dim > 64 else 64)


def default_backward_config(dtype: torch.dtype, head_dim: int,
                            block_size: int = 128) -> BackwardConfig:
    """Default tiles for ``dtype``, ``head_dim = max(d_k, d_v)`` (<= 256) and the pattern
    ``block_size`` (tiles are clipped to the block, so small blocks get their own entries)."""
    kind = {torch.float32: "f32", torch.float64: "f64"}.get(dtype, "16bit")
    bucket = 64 if head_dim <= 64 else (128 if head_dim <= 128 else 256)
    if kind == "16bit" and block_size <= 64 and bucket in _SMALL_BLOCK_DEFAULTS:
        return _SMALL_BLOCK_DEFAULTS[bucket]
    return _DEFAULTS[(kind, bucket)]


def _warps(configured: int, tile_area: int, dtype: torch.dtype, block_d: int) -> int:
    """Small blocks (16, 32) give small tiles: one warpgroup is enough for 16-bit dots."""
    small = tile_area <= 32 * 32 and block_d <= 128 and dtype in (torch.float16, torch.bfloat16)
    return 4 if small else configured


def _tile(limit: int, block_size: int) -> tuple[int, int, bool]:
    """(tile, tiles per block, tile divides block) for one dim of a pattern block."""
    tile = min(limit, max(16, triton.next_power_of_2(block_size)))
    return tile, -(-block_size // tile), block_size % tile == 0
