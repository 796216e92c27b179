"""Host time per call of the forward (plan.run with a prepared pattern, and the functional
call with a new pattern object), with a cProfile of the plan.run path.

    PYTHONPATH=src python scripts/profile_host.py
"""
import cProfile
import pstats

import torch

import baracuda_kernels as bk
from probe_common import host_us

B, H, N, D, BS = 2, 16, 8192, 128, 128


def print_profile(fn, calls: int, rows: int) -> None:
    """cProfile of ``calls`` calls of fn, the ``rows`` costliest functions by own time."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


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
    for name, fn in (("plan.run prepared 2%", run), ("functional unprepared 2%", unprepared)):
        print(f"{name}: {host_us(fn, 300, warmup=20):8.1f} us host per call", flush=True)
    print_profile(run, 200, 18)
    print_profile(unprepared, 200, 14)


if __name__ == "__main__":
    main()
