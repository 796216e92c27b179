"""Host cost of one forward launch, split: our TMA checks, descriptor construction, and
Triton's launch with descriptor vs pointer arguments; then a profile of the host time of a
forward launch and of a decode step.

    PYTHONPATH=src python scripts/probe_launch_cost.py
"""
import dataclasses

import torch

import baracuda_kernels as bk
from baracuda_kernels.attention.block_sparse import triton_fwd
from baracuda_kernels.attention.block_sparse.block_lists import BlockLists
from baracuda_kernels.attention.block_sparse.triton_fwd_configs import ForwardConfig
from baracuda_kernels.attention.common.triton_tma import row_tile_descriptor, tma_fallback_reason
from probe_common import host_us

B, H, N, D, BS = 2, 16, 8192, 128, 128


def main():
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.rand(1, H, N // BS, N // BS, device="cuda") < 0.02
    lists = BlockLists.build(mask, N, N, BS, False, use_triton=True)
    y = torch.empty_like(q)
    lse = torch.empty(B, H, N, device="cuda")
    tma = ForwardConfig(128, 64, 4, 2, True)
    ptr = dataclasses.replace(tma, use_tma=False)

    def launch(cfg):
        return lambda: triton_fwd.block_sparse_attention_forward_triton(
            q, k, v, lists, block_size=BS, scale=D ** -0.5, is_causal=False, y=y, lse=lse,
            config=cfg)

    rows = {
        "tma_fallback_reason(k, v)": lambda: tma_fallback_reason(q.dtype, q.device, k, v),
        "row_tile_descriptor(k)": lambda: row_tile_descriptor(k, 64, 128),
        "launcher, pointers": launch(ptr),
        "launcher, TMA": launch(tma),
    }
    for name, fn in rows.items():
        print(f"{name:<40} {host_us(fn):7.1f} us", flush=True)
    # The same TMA launch with the descriptors built once: what remains is Triton's own
    # handling of descriptor arguments.
    kd, vd = row_tile_descriptor(k, 64, 128), row_tile_descriptor(v, 64, 128)
    real = triton_fwd.row_tile_descriptor
    triton_fwd.row_tile_descriptor = lambda t, bn, dp: kd if t is k else vd
    real_reason = triton_fwd.tma_fallback_reason
    triton_fwd.tma_fallback_reason = lambda *a: None
    print(f"{'launcher, TMA, descriptors prebuilt':<40} {host_us(launch(tma)):7.1f} us")
    triton_fwd.row_tile_descriptor, triton_fwd.tma_fallback_reason = real, real_reason
    profile_rows(q, k, v, mask, launch(tma))


def profile_rows(q, k, v, mask, forward):
    """Where the host time of a forward launch and of a decode step goes: cProfile's top
    entries by own time over 200 calls each."""
    import cProfile
    import pstats

    Hd, Hkv, Dd = 32, 8, 128
    qd = torch.randn(1, 1, Hd, Dd, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(1, 4096, Hkv, Dd, device="cuda", dtype=torch.bfloat16)
              for _ in range(2))
    lens = torch.full((1,), 4096, device="cuda", dtype=torch.int32)

    def decode():
        return bk.block_sparse_attention_with_kvcache(qd, kc, vc, cache_seqlens=lens)

    for name, fn in (("forward launcher, TMA, 2%", forward), ("decode B=1 4k", decode)):
        print(f"{name}: {host_us(fn):.1f} us per call", flush=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
