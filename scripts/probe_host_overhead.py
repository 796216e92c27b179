"""Host (CPU) cost of one training step through block_sparse_attention, per backward variant.

    PYTHONPATH=src python scripts/probe_host_overhead.py

At low density the GPU finishes before Python has submitted the next launch, so the step
time is the host's. This times, in one process: the fwd+bwd step (do_bench, as the bench
does) and its host-only submission time, for the default backward and variants (TMA off,
head-major order), and the pieces of the launcher's Python work.
"""
import dataclasses
import time

import torch
import triton

from baracuda_kernels.attention import block_sparse_attention, triton_bwd
from baracuda_kernels.attention.block_lists import BlockLists
from baracuda_kernels.attention.triton_tma import row_tile_descriptor, tma_fallback_reason


def host_ms(fn, n=50):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return host


def main():
    B, H, N, D, bs = 2, 16, 8192, 128, 128
    gen = torch.Generator().manual_seed(0)
    q, k, v, dy = (torch.randn(B, H, N, D, generator=gen).to("cuda", torch.bfloat16)
                   for _ in range(4))
    xs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    real_default = triton_bwd.default_backward_config
    variants = {
        "default": lambda cfg: cfg,
        "no tma": lambda cfg: dataclasses.replace(cfg, use_tma=False),
        "head-major": lambda cfg: dataclasses.replace(cfg, launch_order="head-major"),
        "no tma, head-major": lambda cfg: dataclasses.replace(cfg, use_tma=False,
                                                              launch_order="head-major"),
    }
    for density in (0.05, 0.25):
        pattern = (torch.rand(B, H, N // bs, N // bs, generator=gen) < density).cuda()
        step = lambda: torch.autograd.grad(  # noqa: E731
            block_sparse_attention(*xs, pattern, block_size=bs), xs, dy)
        fwd = lambda: block_sparse_attention(q, k, v, pattern, block_size=bs)  # noqa: E731
        print(f"\ndensity {density}: forward only {triton.testing.do_bench(fwd):.3f} ms "
              f"(host {host_ms(fwd):.3f} ms)")
        for name, change in variants.items():
            triton_bwd.default_backward_config = lambda *a, c=change: c(real_default(*a))
            ms = triton.testing.do_bench(step, warmup=25, rep=200)
            print(f"  fwd+bwd {name:<20} {ms:.3f} ms   host {host_ms(step):.3f} ms")
        triton_bwd.default_backward_config = real_default

    lists = BlockLists.build(pattern, N, N, bs, False)
    pieces = {
        "row_tile_descriptor x1": lambda: row_tile_descriptor(q, 64, 128),
        "tma_fallback_reason(q, dy)": lambda: tma_fallback_reason(q.dtype, q.device, q, dy),
        "_launch_order (cached)": lambda: triton_bwd._launch_order(
            lists, True, B, H, 1, "heavy-first"),
        "lists.transposed (cached)": lambda: lists.transposed(),
        "torch.empty x1": lambda: torch.empty_like(q),
    }
    print()
    for name, fn in pieces.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(1000):
            fn()
        print(f"  {name:<28} {(time.perf_counter() - t0):.3f} ms per 1000")


if __name__ == "__main__":
    main()
