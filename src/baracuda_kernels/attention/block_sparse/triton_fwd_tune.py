"""Opt-in forward autotuning (``PlanPreference.FASTEST``): time the candidate configs of
triton_fwd_configs once on the caller's problem and cache the winner per problem class."""

from __future__ import annotations

import math

import torch

from ...core import ArchSku
from ..common.numerics import accumulator_dtype, next_pow2
from .triton_fwd import block_sparse_attention_forward_triton
from .triton_fwd_configs import (ForwardConfig, candidate_forward_configs,
                                 default_forward_config)

_AUTOTUNE_CACHE: dict[tuple, ForwardConfig] = {}


def clear_autotune_cache() -> None:
    """Forget every autotuned choice (tests, or after changing cards)."""
    _AUTOTUNE_CACHE.clear()


def _time_config(run, cfg: ForwardConfig, reps: int) -> float:
    """Median milliseconds of ``run(cfg)`` on the current CUDA stream (host syncs: select
    time only)."""
    run(cfg)  # compile + warm up
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run(cfg)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def autotune_forward_config(q, k, v, lists, *, block_size: int, scale: float,
                            is_causal: bool, allow_tf32: bool = False,
                            reps: int = 5, window=None) -> ForwardConfig:
    """Pick the fastest candidate config for this problem by timing it once; cached.

    Runs at plan-select time (it synchronises the device). The cache key is the problem
    class (head dims, dtype, block size, arch, causal, tf32) plus the power-of-two buckets
    of the lengths and of B*H; patterns are not part of the key. On CPU (interpreter) it
    returns the default config without timing.
    """
    B, H, Nq, d_k = q.shape
    Nk, d_v = k.shape[2], v.shape[3]
    arch = ArchSku.from_device(q.device)
    if q.device.type != "cuda":
        return default_forward_config(d_k, d_v, q.dtype, block_size, arch, allow_tf32)
    key = (d_k, d_v, q.dtype, block_size, arch, bool(is_causal), bool(allow_tf32),
           next_pow2(Nq), next_pow2(Nk), next_pow2(B * H), q.device.index)
    hit = _AUTOTUNE_CACHE.get(key)
    if hit is not None:
        return hit
    lse_dtype = accumulator_dtype(q.dtype)
    y = torch.empty(B, H, Nq, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Nq, dtype=lse_dtype, device=q.device)

    def run(cfg):
        block_sparse_attention_forward_triton(
            q, k, v, lists, block_size=block_size, scale=scale, is_causal=is_causal,
            y=y, lse=lse, config=cfg, allow_tf32=allow_tf32, window=window)

    best, best_ms = None, math.inf
    for cfg in candidate_forward_configs(d_k, d_v, q.dtype, block_size, arch, allow_tf32):
        try:
            ms = _time_config(run, cfg, reps)
        except Exception as exc:  # noqa: BLE001 - a candidate that fails to compile
            # (out of shared memory / registers) is simply not a candidate.
            if "out of resource" in str(exc).lower() or "OutOfResources" in type(exc).__name__:
                continue
            raise
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        best = default_forward_config(d_k, d_v, q.dtype, block_size, arch, allow_tf32)
    _AUTOTUNE_CACHE[key] = best
    return best
