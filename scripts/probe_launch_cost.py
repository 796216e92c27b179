"""Host cost of one forward launch, split: our TMA checks, descriptor construction, and
Triton's launch with descriptor vs pointer arguments; then the host time of a forward, an
eager training step and decode steps with the compiled-kernel reuse of
common/triton_launch.py on and off (same process, outputs compared bitwise).

    PYTHONPATH=src python scripts/probe_launch_cost.py
"""
import dataclasses

import torch

import baracuda_kernels as bk
from baracuda_kernels.attention.block_sparse import triton_fwd
from baracuda_kernels.attention.common import triton_launch
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
    reuse_rows(q, k, v, mask, launch(tma), y)


def reuse_rows(q, k, v, mask, forward, y):
    """Host us per call with the compiled-kernel reuse off / on; outputs must agree."""
    prepared = bk.prepare_pattern(mask, query_len=N, block_size=BS)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    dy = torch.randn_like(q)

    def step():
        out = bk.block_sparse_attention(qg, kg, vg, prepared, backend="triton")
        return torch.autograd.grad(out, (qg, kg, vg), dy)

    Bd, Hd, Hkv, Dd = 1, 32, 8, 128
    qd = torch.randn(Bd, 1, Hd, Dd, device="cuda", dtype=torch.bfloat16)
    decode_rows = {}
    for n_keys in (4096, 32768):
        kc, vc = (torch.randn(Bd, n_keys, Hkv, Dd, device="cuda", dtype=torch.bfloat16)
                  for _ in range(2))
        lens = torch.full((Bd,), n_keys, device="cuda", dtype=torch.int32)
        decode_rows[f"decode B=1 {n_keys // 1024}k, device lengths"] = (
            lambda kc=kc, vc=vc, lens=lens: bk.block_sparse_attention_with_kvcache(
                qd, kc, vc, cache_seqlens=lens))
    rows = {"forward launcher, TMA, 2%": lambda: (forward(), y.clone())[1],
            "eager training step, prepared 2%": step, **decode_rows}
    print(f"{'host us per call':<40} {'reuse off':>10} {'reuse on':>10}  same output")
    for name, fn in rows.items():
        triton_launch._reuse_state["on"] = False
        off_out = fn()
        off = host_us(fn)
        triton_launch._reuse_state["on"] = True
        fn()  # fills the reuse cache
        on_out = fn()
        on = host_us(fn)
        outs = (off_out, on_out)
        same = all(torch.equal(a, b) for a, b in zip(*(o if isinstance(o, tuple) else (o,)
                                                         for o in outs)))
        print(f"{name:<40} {off:10.1f} {on:10.1f}  {same}", flush=True)


if __name__ == "__main__":
    main()
