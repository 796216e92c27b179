"""Host cost of block-sparse attention calls, and what the GPU does meanwhile.

    PYTHONPATH=src python scripts/probe_host_overhead.py

On the benchmark problem (bf16, B=2, H=16, N=8192, D=128, block 128, random per-head
patterns as in the bench) this prints, in one process on one card:

* list building from a raw pattern: GPU time per build (a CUDA graph of 20 builds replayed,
  so host time is excluded) against the forward kernel's GPU time at each density, and the
  host time of one build call;
* per density: forward and training-step (fwd + bwd through autograd) time eager (what a
  user's loop sees, triton.testing.do_bench), the same work replayed from a CUDA graph (the
  GPU-only time), the host submission time of one eager call, and the CUDA kernels launched
  per call (torch.profiler), for a prepared pattern and for a raw pattern tensor.
"""
import time

import torch
import triton

from probe_common import graph_ms, host_us

from baracuda_kernels import block_sparse_attention, prepare_pattern
from baracuda_kernels.attention.block_sparse.block_lists import BlockLists

B, H, N, D, BS = 2, 16, 8192, 128, 128
DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05, 0.02)


def kernels_launched(fn) -> int:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main():
    gen = torch.Generator().manual_seed(0)
    q, k, v, dy = (torch.randn(B, H, N, D, generator=gen).to("cuda", torch.bfloat16)
                   for _ in range(4))
    xs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"bf16 B={B} H={H} N={N} D={D} block {BS}; random per-head patterns\n")
    header = ("density  build_gpu_us  fwd_gpu_us  build/fwd | fwd eager / graph / host ms, "
              "launches | step eager / graph / host ms, launches | raw-pattern fwd / step ms")
    print(header)
    for density in DENSITIES:
        nb = N // BS
        mask = (torch.rand(B, H, nb, nb, generator=gen) < density).cuda()
        prepared = prepare_pattern(mask, query_len=N, block_size=BS)

        def build():
            return BlockLists.build(mask, N, N, BS, False, use_triton=True)
        build_gpu = graph_ms(build, repeats_inside=20) * 1e3

        def fwd(p=prepared):
            return block_sparse_attention(q, k, v, p, block_size=BS)

        def step(p=prepared):
            return torch.autograd.grad(block_sparse_attention(*xs, p, block_size=BS), xs, dy)

        fwd_gpu = graph_ms(fwd)
        row = [f"{density:7.2f}  {build_gpu:12.1f}  {fwd_gpu * 1e3:10.1f}  {build_gpu / (fwd_gpu * 1e3):9.3f}"]
        row.append(f"{triton.testing.do_bench(fwd):.3f} / {fwd_gpu:.3f} / {host_us(fwd, 50) / 1e3:.3f}, "
                   f"{kernels_launched(fwd)}")
        step_gpu = graph_ms(step)
        row.append(f"{triton.testing.do_bench(step):.3f} / {step_gpu:.3f} / {host_us(step, 50) / 1e3:.3f}, "
                   f"{kernels_launched(step)}")
        raw_fwd = triton.testing.do_bench(lambda: fwd(mask))
        raw_step = triton.testing.do_bench(lambda: step(mask))
        row.append(f"{raw_fwd:.3f} / {raw_step:.3f}")
        print(" | ".join(row), flush=True)
    t0 = time.perf_counter()
    for _ in range(200):
        build()
    print(f"\nhost time of one raw-pattern list build call: "
          f"{(time.perf_counter() - t0) / 200 * 1e6:.1f} us")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
