"""GQA on the GPU: pack-GQA tiles against the plain launch (GPU time of the forward), and
the GQA forward / backward against the same call on K/V expanded to H heads.

    PYTHONPATH=src python scripts/probe_gqa.py

Llama-3-8B-like heads: H=32, Hkv=8, D=128, bf16, block 128, one run on one card.
"""
import torch
import triton

import baracuda_kernels as bk
from baracuda_kernels.attention.block_sparse.block_lists import BlockLists
from baracuda_kernels.attention.block_sparse.triton_fwd import \
    block_sparse_attention_forward_triton
from probe_common import graph_ms

B, H, HKV, D, BS = 2, 32, 8, 128, 128
DT = torch.bfloat16


def pack_probe():
    print("pack-GQA forward, GPU ms (graph replay), broadcast pattern, Nk=8192", flush=True)
    print(f"{'Nq':>6} {'density':>8} {'plain':>9} {'packed':>9} {'auto':>9} {'plain/packed':>13}")
    Nk = 8192
    for Nq in (1, 16, 64, 128, 1024):
        for density in (1.0, 0.25):
            q = torch.randn(B, H, Nq, D, device="cuda", dtype=DT)
            k, v = (torch.randn(B, HKV, Nk, D, device="cuda", dtype=DT) for _ in range(2))
            nq, nk = -(-Nq // BS), Nk // BS
            gen = torch.Generator(device="cpu").manual_seed(0)
            mask = (torch.rand(1, 1, nq, nk, generator=gen) < density).cuda()
            lists = BlockLists.build(mask, Nq, Nk, BS, False, use_triton=True)
            y = torch.empty(B, H, Nq, D, device="cuda", dtype=DT)
            lse = torch.empty(B, H, Nq, device="cuda")
            times = {}
            for label, pack in (("plain", False), ("packed", True), ("auto", None)):
                def run(pack=pack):
                    block_sparse_attention_forward_triton(
                        q, k, v, lists, block_size=BS, scale=D ** -0.5, is_causal=False,
                        y=y, lse=lse, pack_gqa=pack)
                times[label] = graph_ms(run, 10)
            print(f"{Nq:>6} {density:>8.2f} {times['plain']:>9.4f} {times['packed']:>9.4f} "
                  f"{times['auto']:>9.4f} {times['plain'] / times['packed']:>13.2f}", flush=True)


def expanded_probe():
    print("\nGQA vs K/V expanded to H heads, N=8192 (ms, triton.testing.do_bench)", flush=True)
    N = 8192
    q = torch.randn(B, H, N, D, device="cuda", dtype=DT, requires_grad=True)
    k, v = (torch.randn(B, HKV, N, D, device="cuda", dtype=DT, requires_grad=True)
            for _ in range(2))
    ke, ve = (t.detach().repeat_interleave(H // HKV, 1).requires_grad_() for t in (k, v))
    dy = torch.randn(B, H, N, D, device="cuda", dtype=DT)
    nb = N // BS
    gen = torch.Generator(device="cpu").manual_seed(0)
    patterns = {"dense": torch.ones(1, 1, nb, nb, dtype=torch.bool),
                "causal": torch.ones(1, 1, nb, nb, dtype=torch.bool),
                "random10%/kv-head": torch.rand(1, HKV, nb, nb, generator=gen) < 0.1}
    print(f"{'pattern':<20} {'fwd gqa':>8} {'fwd exp':>8} {'step gqa':>9} {'step exp':>9}")
    for name, mask in patterns.items():
        causal = name == "causal"
        prep = bk.prepare_pattern(mask.cuda(), query_len=N, block_size=BS, is_causal=causal)
        mask_e = mask.repeat_interleave(H // HKV, 1) if mask.shape[1] == HKV else mask
        prep_e = bk.prepare_pattern(mask_e.cuda(), query_len=N, block_size=BS, is_causal=causal)

        # backend="triton": our kernels (an all-active prepared pattern would otherwise take
        # the dense route to cuDNN).
        def fwd(a, b, c, p):
            return lambda: bk.block_sparse_attention(a, b, c, p, backend="triton")

        def step(a, b, c, p):
            def run():
                y = bk.block_sparse_attention(a, b, c, p, backend="triton")
                torch.autograd.grad(y, (a, b, c), dy)
            return run
        with torch.no_grad():
            f_g = triton.testing.do_bench(fwd(q, k, v, prep))
            f_e = triton.testing.do_bench(fwd(q, ke, ve, prep_e))
        s_g = triton.testing.do_bench(step(q, k, v, prep))
        s_e = triton.testing.do_bench(step(q, ke, ve, prep_e))
        print(f"{name:<20} {f_g:>8.3f} {f_e:>8.3f} {s_g:>9.3f} {s_e:>9.3f}", flush=True)


def dense_route_probe():
    print("\nFlashSdpaPlan backends, dense GQA N=8192 (ms fwd / step, do_bench)", flush=True)
    N = 8192
    q = torch.randn(B, H, N, D, device="cuda", dtype=DT, requires_grad=True)
    k, v = (torch.randn(B, HKV, N, D, device="cuda", dtype=DT, requires_grad=True)
            for _ in range(2))
    dy = torch.randn(B, H, N, D, device="cuda", dtype=DT)
    for causal in (False, True):
        desc = bk.FlashSdpaDescriptor.from_tensors(q, k, v, is_causal=causal)
        auto = bk.FlashSdpaPlan.select(desc, device="cuda")
        print(f"causal={causal}: automatic choice {auto.backend.value}; declined: "
              f"{ {kk.value: r for kk, r in auto.declined.items()} }", flush=True)
        for backend in ("torch_cudnn", "torch_flash", "triton"):
            try:
                bk.FlashSdpaPlan.select(desc, device="cuda", backend=backend)
            except bk.Unsupported as exc:
                print(f"  {backend:<12} unsupported: {exc}", flush=True)
                continue

            def fwd(backend=backend):
                with torch.no_grad():
                    bk.flash_sdpa(q, k, v, is_causal=causal, backend=backend)

            def step(backend=backend):
                y = bk.flash_sdpa(q, k, v, is_causal=causal, backend=backend)
                torch.autograd.grad(y, (q, k, v), dy)
            f, s_ = triton.testing.do_bench(fwd), triton.testing.do_bench(step)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            # Above the inputs: y, dq (64 MiB each at these shapes), dk, dv (16 MiB each),
            # plus whatever the backend allocates (lse, workspaces, any K/V expansion).
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
            print(f"  {backend:<12} fwd {f:7.3f} ms ({flops / f / 1e9:5.0f} TFLOP/s)  "
                  f"step {s_:7.3f} ms ({3.5 * flops / s_ / 1e9:5.0f} TFLOP/s)  "
                  f"step peak {peak:6.0f} MiB", flush=True)


def backward_tile_probe():
    """GQA backward GPU time with the default dK/dV tiles and narrower ones (more programs:
    the dK/dV grid has B*Hkv, not B*H, heads, so a causal launch has fewer, longer items)."""
    import dataclasses
    from baracuda_kernels.attention.block_sparse.triton_bwd import \
        block_sparse_attention_backward_triton
    from baracuda_kernels.attention.block_sparse.triton_bwd_configs import \
        default_backward_config
    print("\nGQA backward tiles, N=8192, GPU ms (graph replay)", flush=True)
    N = 8192
    base = default_backward_config(DT, D, BS)
    variants = {"default": base,
                "kv 64x64 w4": dataclasses.replace(base, kv_block_n=64, kv_warps=4),
                "kv 64x64 w8": dataclasses.replace(base, kv_block_n=64, kv_warps=8)}
    q = torch.randn(B, H, N, D, device="cuda", dtype=DT)
    for hkv in (HKV, H):
        k, v = (torch.randn(B, hkv, N, D, device="cuda", dtype=DT) for _ in range(2))
        for causal in (False, True):
            mask = torch.ones(1, 1, N // BS, N // BS, dtype=torch.bool, device="cuda")
            lists = BlockLists.build(mask, N, N, BS, causal, use_triton=True)
            y = torch.empty(B, H, N, D, device="cuda", dtype=DT)
            lse = torch.empty(B, H, N, device="cuda")
            block_sparse_attention_forward_triton(q, k, v, lists, block_size=BS,
                                                  scale=D ** -0.5, is_causal=causal, y=y,
                                                  lse=lse)
            dy = torch.randn_like(y)
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            cells = []
            for label, cfg in variants.items():
                def run(cfg=cfg):
                    block_sparse_attention_backward_triton(
                        q, k, v, y, lse, dy, lists, block_size=BS, scale=D ** -0.5,
                        is_causal=causal, dq=dq, dk=dk, dv=dv, config=cfg)
                cells.append(f"{label} {graph_ms(run, 3):.3f}")
            print(f"  Hkv={hkv:<3} causal={causal!s:<5} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    import sys
    if "--bwd-tiles" in sys.argv:
        backward_tile_probe()
        sys.exit(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    pack_probe()
    expanded_probe()
    dense_route_probe()
