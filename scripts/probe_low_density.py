"""Where the time goes at low density: kernel configs (GPU time, CUDA-graph replay) and the
host profile of an eager training step.

    PYTHONPATH=src python scripts/probe_low_density.py

Problem: bf16, B=2, H=16, N=8192, D=128, block 128, ``random_blocks`` per head (the
bench's random patterns) at 10 / 5 / 2 % density, prepared once.
"""
import cProfile
import dataclasses
import io
import pstats
import time

import torch

from baracuda_kernels import block_sparse_attention
from baracuda_kernels.attention.block_sparse import triton_bwd
from baracuda_kernels.attention.block_sparse.triton_bwd import (BackwardConfig,
                                                   block_sparse_attention_backward_triton)
from baracuda_kernels.attention.block_sparse.triton_fwd import (ForwardConfig,
                                                   block_sparse_attention_forward_triton)
from baracuda_kernels.patterns import random_blocks
from probe_common import graph_ms, host_us

B, H, N, D, BS = 2, 16, 8192, 128, 128

FWD = [ForwardConfig(128, 128, 8, 3, True), ForwardConfig(128, 128, 8, 2, True),
       ForwardConfig(128, 64, 8, 2, True), ForwardConfig(128, 64, 4, 2, True),
       ForwardConfig(64, 128, 4, 3, True), ForwardConfig(64, 128, 4, 2, True),
       ForwardConfig(64, 64, 4, 3, True), ForwardConfig(64, 64, 4, 2, True),
       ForwardConfig(128, 64, 4, 2, False)]
BWD = [BackwardConfig(128, 64, 8, 3, 128, 64, 8, 3, use_tma=True),
       BackwardConfig(128, 64, 8, 2, 128, 64, 8, 2, use_tma=True),
       BackwardConfig(64, 64, 4, 3, 64, 64, 4, 3, use_tma=True),
       BackwardConfig(64, 64, 4, 2, 64, 64, 4, 2, use_tma=True),
       BackwardConfig(64, 32, 4, 3, 64, 32, 4, 3, use_tma=True),
       BackwardConfig(128, 32, 8, 2, 64, 64, 4, 2, use_tma=True),
       BackwardConfig(64, 64, 4, 2, 64, 64, 4, 2, use_tma=False)]


def main():
    gen = torch.Generator().manual_seed(0)
    q, k, v, dy = (torch.randn(B, H, N, D, generator=gen).to("cuda", torch.bfloat16)
                   for _ in range(4))
    xs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    dense = graph_ms(lambda: block_sparse_attention(q, k, v, torch.ones(1, 1, 64, 64, dtype=torch.bool,
                                                                       device="cuda"),
                                                  block_size=BS), repeats_inside=2)
    print(f"dense fwd {dense:.3f} ms")
    for density in (1.0, 0.1, 0.05, 0.02):
        prepared = random_blocks(N, block_size=BS, density=density, num_heads=H).to("cuda").prepare()
        fwd_configs, bwd_configs = (FWD[:1], BWD[:1]) if density == 1.0 else (FWD, BWD)
        lists = prepared.lists
        y = torch.empty_like(q)
        lse = torch.empty(B, H, N, device="cuda")
        print(f"\n== density {density}: target fwd <= {1.5 * density * dense:.3f} ms "
              f"(1.5 x d x dense)")
        for cfg in fwd_configs:
            ms = graph_ms(lambda: block_sparse_attention_forward_triton(
                q, k, v, lists, block_size=BS, scale=D ** -0.5, is_causal=False, y=y, lse=lse,
                config=cfg))
            print(f"  fwd {cfg.describe():<40} {ms * 1e3:7.1f} us", flush=True)
        y_ref, lse_ref = block_sparse_attention(q, k, v, prepared, return_lse=True)
        grads = [torch.empty_like(t) for t in (q, k, v)]
        for cfg in bwd_configs:
            ms = graph_ms(lambda: block_sparse_attention_backward_triton(
                q, k, v, y_ref, lse_ref, dy, lists, block_size=BS, scale=D ** -0.5,
                is_causal=False, dq=grads[0], dk=grads[1], dv=grads[2], config=cfg),
                repeats_inside=10)
            print(f"  bwd {str(dataclasses.astuple(cfg)):<50} {ms * 1e3:7.1f} us", flush=True)

        def step():
            return torch.autograd.grad(block_sparse_attention(*xs, prepared), xs, dy)
        step()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(100):
            step()
        prof.disable()
        host = (time.perf_counter() - t0) / 100 * 1e3
        torch.cuda.synchronize()
        if density == 0.02:
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
            print(f"  eager step host {host:.3f} ms (under cProfile)\n{text.getvalue()}")
    # Host breakdown of one step at the last density (GPU kept ahead: no sync in the loops).
    from baracuda_kernels.attention.block_sparse.autograd import plan_for
    from baracuda_kernels import SdpaBlockSparseDescriptor
    plan = plan_for(SdpaBlockSparseDescriptor.from_tensors(q, k, v, block_size=BS),
                    q.device, None)
    y_s, lse_s = block_sparse_attention(*xs, prepared, return_lse=True)
    pieces = {
        "functional forward (autograd)": lambda: block_sparse_attention(*xs, prepared),
        "functional forward (no grad)": lambda: block_sparse_attention(q, k, v, prepared),
        "autograd.grad only": lambda: torch.autograd.grad(y_s, xs, dy, retain_graph=True),
        "plan._forward": lambda: plan._forward(q, k, v, lists),
        "plan._backward": lambda: plan._backward(q, k, v, y_s, lse_s, dy, lists),
        "full step": step,
    }
    for name, fn in pieces.items():
        print(f"  host {name:<32} {host_us(fn):7.1f} us", flush=True)
    # Triton launch alone: the forward kernel with the same arguments, many times.
    t0 = time.perf_counter()
    for _ in range(200):
        block_sparse_attention_forward_triton(q, k, v, lists, block_size=BS, scale=D ** -0.5,
                                              is_causal=False, y=y, lse=lse, config=FWD[0])
    print(f"forward launcher call (TMA): {(time.perf_counter() - t0) / 200 * 1e6:.1f} us")
    block_sparse_attention_forward_triton(q, k, v, lists, block_size=BS, scale=D ** -0.5,
                                          is_causal=False, y=y, lse=lse,
                                          config=dataclasses.replace(FWD[0], use_tma=False))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        block_sparse_attention_forward_triton(q, k, v, lists, block_size=BS, scale=D ** -0.5,
                                              is_causal=False, y=y, lse=lse,
                                              config=dataclasses.replace(FWD[0], use_tma=False))
    print(f"forward launcher call (pointers): {(time.perf_counter() - t0) / 200 * 1e6:.1f} us")
    torch.cuda.synchronize()
    _ = triton_bwd


if __name__ == "__main__":
    main()
