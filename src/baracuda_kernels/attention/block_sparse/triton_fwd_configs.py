"""Kernel configurations of the Triton block-sparse attention forward.

* ``ForwardConfig``: a frozen tile/launch configuration (what the plan reports in its
  ``KernelSku.config``).
* ``default_forward_config``: the per-(head dim, dtype, block size, arch) default table.
  The table is plain data below (``_HALF_TABLE`` and friends) so that numbers measured on a
  card can be pasted in; shared-memory limits per arch shrink an entry that cannot fit.
* ``candidate_forward_configs``: the candidates of the opt-in (``PlanPreference.FASTEST``) search that times a few
  candidate configs once on the caller's real tensors and caches the winner per problem key.

How the kernel maps a config onto a pattern block of ``block_size`` rows/columns: a program
owns ``block_m`` query rows of one pattern query block (``ceil(block_size / block_m)``
programs per block), and walks each active key block in ``ceil(block_size / block_n)``
column steps. Any block size works; sizes that are multiples of ``block_n`` need no column
masks in FULL blocks (the fast path).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional

import torch

from ...core import ArchSku, InvalidProblem
from ..common.numerics import head_dim_tile, next_pow2

_POW2_TILES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ForwardConfig:
    """Tile and launch parameters of one forward kernel instance.

    block_m: query rows per program (power of two, 16..256).
    block_n: key columns per inner step (power of two, 16..256).
    num_warps / num_stages: Triton launch options (software-pipelining depth).
    use_tma: experimental, opt-in: load K/V tiles with Hopper's tensor memory accelerator
        through Triton tensor descriptors (attention/triton_tma.py). Honoured only for
        f16/bf16 on sm90+ with TMA-legal layouts; elsewhere the launcher silently uses the
        pointer path.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value not in _POW2_TILES:
                raise InvalidProblem(
                    f"ForwardConfig.{name} is {value}; expected one of {_POW2_TILES}. "
                    f"Fix: pick a power-of-two tile between 16 and 256.")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise InvalidProblem(
                f"ForwardConfig.num_warps is {self.num_warps}; expected 1, 2, 4, 8 or 16.")
        if not 1 <= self.num_stages <= 8:
            raise InvalidProblem(
                f"ForwardConfig.num_stages is {self.num_stages}; expected 1..8.")
        if not isinstance(self.use_tma, bool):
            raise InvalidProblem(
                f"ForwardConfig.use_tma is {self.use_tma!r}; expected True or False.")

    def describe(self) -> str:
        return (f"BM={self.block_m},BN={self.block_n},"
                f"warps={self.num_warps},stages={self.num_stages}"
                + (",tma" if self.use_tma else ""))


# ----------------------------------------------------------------------------------------
# Default tables, written for H100/H200 (sm90). Key: padded head-dim bucket (64, 128, 256)
# -> pattern block size -> (block_m, block_n, num_warps, num_stages).
# Other archs start from the same entries and are shrunk to their shared memory below.
# Edit these with measured numbers; every entry must keep block_m, block_n in 16..256.
# ----------------------------------------------------------------------------------------

# f16 / bf16 inputs (tensor-core dots, f32 accumulation): (block_m, block_n, warps, stages,
# use_tma). The 64/128-bucket entries for block sizes 64/128/256 were measured on an H200
# (bf16, B=2, H=16, N=8192 (D=128) / 32768 (D=64); scripts/tune_forward.py, 2026-11-27),
# same run: D=128 block 128 dense 509 TFLOP/s at (128, 128, 8, 3, tma) vs 508 without TMA,
# causal 478 vs 459; D=128 block 64 random 25% 442 at (64, 64, 4, 3, tma) vs 415; D=64
# block 128 causal 424 at (128, 64, 4, 3, tma) (300 with 8 warps in an earlier run). TMA is
# used only on sm90+ and where the tensors' layout allows it (else the pointer path runs).
_HALF_TABLE = {
    64: {16: (16, 16, 1, 3), 32: (32, 32, 2, 3), 64: (64, 64, 4, 3, True),
         128: (128, 64, 4, 3, True), 256: (128, 64, 4, 3, True)},
    128: {16: (16, 16, 2, 3), 32: (32, 32, 2, 3), 64: (64, 64, 4, 3, True),
          128: (128, 128, 8, 3, True), 256: (128, 128, 8, 3, True)},
    256: {16: (16, 16, 4, 2), 32: (32, 32, 4, 2), 64: (64, 64, 8, 2),
          128: (128, 32, 8, 2), 256: (128, 32, 8, 2)},
}

# f32 inputs with TF32 products (opt-in): operands twice the bytes of bf16.
_TF32_TABLE = {
    64: {16: (16, 16, 1, 3), 32: (32, 32, 2, 3), 64: (64, 32, 4, 3),
         128: (128, 32, 8, 3), 256: (128, 32, 8, 3)},
    128: {16: (16, 16, 2, 2), 32: (32, 32, 4, 2), 64: (64, 32, 8, 2),
          128: (128, 32, 8, 2), 256: (128, 32, 8, 2)},
    256: {16: (16, 16, 4, 2), 32: (32, 16, 4, 2), 64: (64, 16, 8, 2),
          128: (64, 16, 8, 2), 256: (64, 16, 8, 2)},
}

# True f32 (ieee products): CUDA-core (FMA) dots hold whole operand rows in registers, so
# tiles stay small and warps many (configs checked spill-free with ptxas for sm90).
_F32_TABLE = {
    64: {16: (16, 16, 4, 2), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2),
         128: (32, 32, 4, 2), 256: (32, 32, 4, 2)},
    128: {16: (16, 16, 4, 2), 32: (32, 16, 8, 2), 64: (32, 16, 8, 2),
          128: (32, 16, 8, 2), 256: (32, 16, 8, 2)},
    256: {16: (16, 16, 8, 1), 32: (32, 16, 8, 1), 64: (32, 16, 8, 1),
          128: (32, 16, 8, 1), 256: (32, 16, 8, 1)},
}

# f64: f64 dots and accumulators.
_F64_TABLE = {
    64: {16: (16, 16, 4, 2), 32: (32, 32, 4, 2), 64: (64, 32, 8, 2),
         128: (64, 32, 8, 2), 256: (64, 32, 8, 2)},
    128: {16: (16, 16, 4, 2), 32: (32, 32, 8, 2), 64: (32, 32, 8, 2),
          128: (32, 32, 8, 2), 256: (32, 32, 8, 2)},
    256: {16: (16, 16, 8, 1), 32: (16, 16, 8, 1), 64: (16, 16, 8, 1),
          128: (16, 16, 8, 1), 256: (16, 16, 8, 1)},
}

# Usable shared memory per block (bytes) by arch; None = no limit (interpreter).
_SHARED_LIMIT = {
    ArchSku.SM80: 163 * 1024, ArchSku.SM86: 99 * 1024, ArchSku.SM89: 99 * 1024,
    ArchSku.SM90: 227 * 1024, ArchSku.SM100: 227 * 1024, ArchSku.SM120: 99 * 1024,
    ArchSku.CUDA_OTHER: 99 * 1024, ArchSku.CPU: None,
}


def _table_for(dtype: torch.dtype, allow_tf32: bool):
    if dtype in (torch.float16, torch.bfloat16):
        return _HALF_TABLE
    if dtype == torch.float32:
        return _TF32_TABLE if allow_tf32 else _F32_TABLE
    return _F64_TABLE


def estimate_shared_bytes(cfg: ForwardConfig, d_k: int, d_v: int, elem_bytes: int,
                          arch: ArchSku | None = None) -> int:
    """Rough shared-memory need: the query tile plus num_stages K and V tiles, plus (before
    sm90) a layout-conversion scratch for the score tile. On sm90 the P @ V product takes P
    from registers (wgmma), so no scratch is counted: (128, 128, 8, 3) at D=128 bf16 needs
    224 KiB and compiles and runs on an H200. The TMA path adds its mbarriers (1 KiB after
    alignment: 225 KiB for the same config, compiled offline for sm90 with triton 3.6)."""
    dk, dv = head_dim_tile(d_k), head_dim_tile(d_v)
    operands = cfg.block_m * dk + cfg.num_stages * cfg.block_n * (dk + dv)
    scratch = 0 if arch is ArchSku.SM90 else cfg.block_m * cfg.block_n * 4
    barriers = 1024 if cfg.use_tma else 0
    return operands * elem_bytes + scratch + barriers


def _shrink_to_fit(cfg: ForwardConfig, d_k: int, d_v: int, elem_bytes: int,
                   limit: int | None, arch: ArchSku | None = None) -> ForwardConfig:
    """Lower stages, then block_n, then block_m until the estimate fits in ``limit``."""
    if limit is None:
        return cfg
    bm, bn, warps, stages = cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages
    while True:
        cur = ForwardConfig(bm, bn, warps, stages, cfg.use_tma)
        if estimate_shared_bytes(cur, d_k, d_v, elem_bytes, arch) <= limit:
            return cur
        if stages > 2:
            stages -= 1
        elif bn > 16:
            bn //= 2
        elif bm > 16:
            bm //= 2
        elif stages > 1:
            stages -= 1
        else:
            return cur  # smallest possible tile; let the compiler decide


def fit_token_loads(cfg: ForwardConfig, d_k: int, d_v: int, dtype: torch.dtype, arch: ArchSku,
                    vectors: int) -> ForwardConfig:
    """``cfg`` shrunk (as ``_shrink_to_fit``) to leave room for ``vectors`` int32 token
    vectors (document ids, positions: common.token_rules) that the pipeliner stages with
    every K/V tile. The dense bf16 D=128 tile leaves 2 KiB of an H200's 227 KiB: ids and
    positions together (3 KiB at 3 stages) did not fit (measured: OutOfResources by 48 bytes)."""
    limit = _SHARED_LIMIT.get(arch)
    if limit is None or not vectors:
        return cfg
    return _shrink_to_fit(cfg, d_k, d_v, dtype.itemsize,
                          limit - cfg.num_stages * cfg.block_n * 4 * vectors, arch)


def fit_bias_loads(cfg: ForwardConfig, d_k: int, d_v: int, dtype: torch.dtype, arch: ArchSku,
                   bias_bytes: int) -> ForwardConfig:
    """``cfg`` shrunk to leave room for the score-bias tiles ([block_m, block_n] of
    ``bias_bytes`` each) the pipeliner stages with every K/V tile: counted as num_stages - 1
    tiles (measured on an H200, bf16 D=128: the (128, 128, 8, 3) tile needed 263168 bytes
    with a bf16 bias, one 32 KiB tile over its 230400 without). Shrinks until the tiles
    and the reserve fit together."""
    limit = _SHARED_LIMIT.get(arch)
    if limit is None or not bias_bytes:
        return cfg
    while True:
        reserve = max(1, cfg.num_stages - 1) * cfg.block_m * cfg.block_n * bias_bytes
        fitted = _shrink_to_fit(cfg, d_k, d_v, dtype.itemsize, limit - reserve, arch)
        if fitted == cfg:
            return cfg
        cfg = fitted


def _table_block_key(block_size: int) -> int:
    """Table column for a block size: itself on the fast path, else the nearest power of two
    at or above it, clamped to 16..256 (a generic block is covered by masked tiles)."""
    return min(256, max(16, next_pow2(block_size)))


@lru_cache(maxsize=512)
def default_forward_config(d_k: int, d_v: int, dtype: torch.dtype, block_size: int,
                           arch: ArchSku, allow_tf32: bool = False) -> ForwardConfig:
    """Default config for one problem class.

    Args:
        d_k, d_v: head dims of q/k and v (any values up to 256).
        dtype: element dtype of q, k, v.
        block_size: pattern block size (any value >= 1).
        arch: where the kernel runs (``ArchSku.CPU`` = interpreter, no memory limit).
        allow_tf32: f32 inputs may use TF32 products.
    """
    table = _table_for(dtype, allow_tf32)
    bucket = min(256, max(64, head_dim_tile(max(d_k, d_v))))
    cfg = ForwardConfig(*table[bucket][_table_block_key(block_size)])
    if cfg.use_tma and arch not in _TMA_ARCHS:
        cfg = replace(cfg, use_tma=False)
    return _shrink_to_fit(cfg, d_k, d_v, dtype.itemsize, _SHARED_LIMIT.get(arch, 99 * 1024), arch)


_TMA_ARCHS = (ArchSku.SM90, ArchSku.SM100)

# Patterns whose rows hold at most this many active blocks on average ("short rows") are
# latency-bound: a program loads Q, walks 1-7 blocks and stores Y, and the 8-warp, 3-stage
# tile that is best on long rows leaves one program per SM. Only prepared patterns know their
# row lengths (measured once, at prepare time), so only they take these entries.
SHORT_ROW_BLOCKS = 7.0

# (16-bit, head-dim bucket, block key) -> short-row tile, sm90 (TMA). Measured on an H200
# (bf16, B=2, H=16, N=8192, D=128, block 128, random per-head patterns; CUDA-graph GPU time,
# scripts/probe_low_density.py, 2026-12-01): 10% / 5% / 2% density
# (128,128,8,3) 286 / 183 / 122 us, (128,64,4,2) 273 / 171 / 110 us, (64,64,4,3) 286 / 172 / 102.
_SHORT_ROW_SM90 = {(128, 128): ForwardConfig(128, 64, 4, 2, True)}


def short_row_forward_config(d_k: int, d_v: int, dtype: torch.dtype, block_size: int,
                             arch: ArchSku) -> Optional[ForwardConfig]:
    """The measured short-row tile for this problem class, or None (keep the default)."""
    if dtype not in (torch.float16, torch.bfloat16) or arch not in _TMA_ARCHS:
        return None
    bucket = min(256, max(64, head_dim_tile(max(d_k, d_v))))
    return _SHORT_ROW_SM90.get((bucket, _table_block_key(block_size)))


# ----------------------------------------------------------------------------------------
# Candidates of the opt-in autotuning (PlanPreference.FASTEST, triton_fwd_tune.py).
# ----------------------------------------------------------------------------------------

def candidate_forward_configs(d_k: int, d_v: int, dtype: torch.dtype, block_size: int,
                              arch: ArchSku, allow_tf32: bool = False) -> list[ForwardConfig]:
    """Small candidate set around the default (default first): tiles no taller or wider than
    the (padded) block, filtered by the arch's shared memory. About 10-20 configs, plus on
    sm90 for f16/bf16 a TMA twin (``use_tma=True``) of each 64/128-row tile with
    block_n >= 64 and 2-3 stages (about 8 more)."""
    default = default_forward_config(d_k, d_v, dtype, block_size, arch, allow_tf32)
    span = _table_block_key(block_size)
    d_pad = head_dim_tile(max(d_k, d_v))
    tensor_core = dtype in (torch.float16, torch.bfloat16) or (dtype == torch.float32
                                                                and allow_tf32)
    if tensor_core:
        ms = [m for m in (16, 32, 64, 128) if m <= span and m >= min(span, 64)]
        ns = [n for n in (16, 32, 64, 128) if n <= span and n >= min(span, 32)
              and not (d_pad >= 256 and n > 64)]
        shapes = [(bm, bn, 8 if bm == 128 else 4 if bm == 64 else 2, st)
                  for bm in ms for bn in ns for st in (2, 3, 4)]
        shapes += [(64, bn, 8, 3) for bn in ns if 64 in ms]
    else:
        ms = [m for m in (16, 32, 64) if m <= span]
        ns = [n for n in (16, 32) if n <= span]
        shapes = [(bm, bn, w, 2 if d_pad < 256 else 1) for bm in ms for bn in ns for w in (4, 8)]
    elem_bytes = dtype.itemsize
    limit = _SHARED_LIMIT.get(arch, 99 * 1024)
    out = [default]
    for shape in shapes:
        cfg = ForwardConfig(*shape)
        if cfg in out:
            continue
        if limit is not None and estimate_shared_bytes(cfg, d_k, d_v, elem_bytes, arch) > limit:
            continue
        out.append(cfg)
    if arch is ArchSku.SM90 and dtype in (torch.float16, torch.bfloat16):
        twins = [replace(c, use_tma=not c.use_tma) for c in list(out)
                 if c.block_m >= 64 and c.block_n >= 64 and c.num_stages in (2, 3)]
        out += [c for c in twins if c not in out]
    return out


def pack_gqa_tiles(group: int, list_div: int, rows_in_block: int, block_m: int,
                   requested: bool | None) -> tuple[int, int] | None:
    """(tile rows, query positions per head) of a pack-GQA launch, or None for the plain one.

    Packing needs a group (G > 1) that shares its pattern (list head = query head // a
    multiple of G: per-K/V-head or broadcast patterns) and G <= block_m. Automatically
    (``requested`` None) it is used only where a pattern block has at most a quarter of a
    tile's query rows: then the plain launch leaves most tile rows idle and reads every K/V
    tile once per query head, while the packed tile holds G heads' rows and reads it once per
    group. Measured on an H200 (H=32, Hkv=8, D=128, bf16, Nk=8192, block 128, 128-row tiles;
    bench/results/h200-2026-12-01-gqa/probe_gqa.log): packed / plain GPU time 0.51 at Nq=1,
    0.64 at Nq=16, but 1.01 at Nq=64 and 1.04 at Nq=128 (full blocks: both launches read K/V
    once per block row of each head, and the packed tile's mixed heads cost a little)."""
    if group <= 1 or list_div % group or group > block_m or requested is False:
        return None
    if requested is None and rows_in_block * 4 > block_m:
        return None
    tile = min(block_m, max(16, 1 << (rows_in_block * group - 1).bit_length()))
    return tile, max(1, tile // group)
