"""Sweep forward kernel configs on the GPU for the benchmark's headline cases.

    PYTHONPATH=src python scripts/tune_forward.py [--quick] [--no-tma]

Prints, per case, effective TFLOP/s of each config (DESIGN.md FLOP convention) so the
default table in attention/triton_configs.py can be set from measured numbers. Every shape
runs twice: pointer K/V loads and TMA K/V loads (``,tma`` in the config name; on a card
without TMA that run silently takes the pointer path, so the two numbers then agree).
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

from baracuda_kernels.attention.block_sparse.block_lists import BlockLists
from baracuda_kernels.attention.block_sparse.triton_fwd_configs import ForwardConfig
from baracuda_kernels.attention.block_sparse.triton_fwd import block_sparse_attention_forward_triton
from baracuda_kernels.attention.common.triton_tma import tma_fallback_reason
from baracuda_kernels.patterns import random_blocks, sliding_window


def case_patterns(N, bs):
    nb = -(-N // bs)
    dense = torch.ones(1, 1, nb, nb, dtype=torch.bool)
    return {
        "dense": (dense, False),
        "causal": (dense, True),
        "window8+sink": (sliding_window(N, window=8 * bs, block_size=bs, sinks=bs).mask, True),
        "random25": (random_blocks(N, block_size=bs, density=0.25, seed=0, num_heads=16).mask, False),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-tma", action="store_true", help="sweep the pointer path only")
    args = parser.parse_args()
    dev = torch.device("cuda")
    geometries = [(8192, 128, 128), (8192, 128, 64), (32768, 64, 128)]
    # Shapes that came within reach of the best in the 2026-11-27 sweep (H200), each on the
    # pointer path and on the experimental TMA K/V path (use_tma; bf16 on sm90+).
    shapes = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 4, 3),
              (64, 64, 4, 3), (128, 128, 8, 2)]
    configs = [ForwardConfig(*shape, use_tma=tma) for shape in shapes
               for tma in ((False, True) if not args.no_tma else (False,))]
    for N, D, bs in geometries:
        q, k, v = (torch.randn(2, 16, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        if not args.no_tma and N == geometries[0][0] and D == geometries[0][1]:
            reason = tma_fallback_reason(q.dtype, q.device, k, v)
            print(f"# TMA K/V path: {'available' if reason is None else 'falls back: ' + reason}",
                  flush=True)
        y = torch.empty_like(q)
        lse = torch.empty(2, 16, N, device=dev)
        for name, (pattern, causal) in case_patterns(N, bs).items():
            if args.quick and name == "random25":
                continue
            lists = BlockLists.build(pattern.to(dev), N, N, bs, causal)
            # 4 * D FLOPs per query-key pair of an active block (N is a block multiple here).
            work = 4 * D * int((lists.block_class != 0).sum()) * bs * bs * 2 * 16 / (
                lists.block_class.shape[0] * lists.block_class.shape[1])
            row = []
            for cfg in configs:
                try:
                    fn = lambda: block_sparse_attention_forward_triton(  # noqa: E731
                        q, k, v, lists, block_size=bs, scale=D ** -0.5, is_causal=causal,
                        y=y, lse=lse, config=cfg)
                    ms = triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median")
                    row.append((work / ms / 1e9, cfg.describe()))
                except Exception as exc:  # a config that does not compile / fit
                    row.append((0.0, f"{cfg.describe()} failed: {type(exc).__name__}"))
            row.sort(reverse=True)
            best = ", ".join(f"{t:.0f} {c}" for t, c in row[:4])
            print(f"N={N} D={D} bs={bs} {name:13s} best: {best}", flush=True)
            print("   all: " + "; ".join(f"{c}={t:.0f}" for t, c in row), flush=True)
        del q, k, v, y, lse
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
