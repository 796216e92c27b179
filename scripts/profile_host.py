"""Host time per call of the forward (plan.run with a prepared pattern, and the functional
call with a new pattern object), with a cProfile of the plan.run path.

    PYTHONPATH=src python scripts/profile_host.py
"""
import cProfile
import pstats
import time

import torch

import baracuda_kernels as bk

B, H, N, D, BS = 2, 16, 8192, 128, 128


def per_call_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host


def main():
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    gen = torch.Generator(device="cpu").manual_seed(0)
    mask = (torch.rand(1, H, N // BS, N // BS, generator=gen) < 0.02).cuda()
    desc = bk.SdpaBlockSparseDescriptor(B, H, N, N, D, D, BS, element=torch.bfloat16)
    plan = bk.SdpaBlockSparsePlan.select(desc)
    prep = plan.prepare(mask)
    args = bk.SdpaBlockSparseArgs(q, k, v, prep)
    plan.run(args)
    run = lambda: plan.run(args)  # noqa: E731
    unprepared = lambda: bk.block_sparse_attention(q, k, v, mask.view(mask.shape), block_size=BS)  # noqa: E731
    print(f"{bk.__file__}", flush=True)
    print(f"plan.run prepared 2%: {per_call_us(run):8.1f} us host per call", flush=True)
    print(f"functional unprepared 2%: {per_call_us(unprepared):8.1f} us host per call", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        run()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        unprepared()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
