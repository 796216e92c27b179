"""Decode (Nq = 1) against a KV cache, one run on one card (issue 18's benchmark): time per
step of block_sparse_attention_with_kvcache (the decode kernel, split-KV chosen
automatically) against the bandwidth floor (bytes of K/V read / the card's measured copy
bandwidth), torch SDPA (enable_gqa, the cache's live part as a strided view) and
FlexAttention (compiled flex_attention, enable_gqa, dense and with a BlockMask of the same
10% of blocks); a paged cache (page 64, random page order) and 10% of the blocks selected
(select_key_blocks). bf16, H=32, Hkv=8, D=128.

Times are device times from the bench timer (L2 flushed before each call); "loop" is the
wall time per call of 200 back-to-back eager calls, which includes the host's launch time;
"graph" replays one step captured in a CUDA graph (how serving stacks run decode), which
leaves the device time alone.

    PYTHONPATH=src python scripts/probe_decode.py [--sweep]
"""
import sys

import torch
import torch._dynamo
import torch.nn.functional as F

import baracuda_kernels as bk
from baracuda_kernels.attention.decode.launch import DecodeConfig
from baracuda_kernels.bench.timing import median_ms
from baracuda_kernels.patterns import key_block_bounds, select_key_blocks
from probe_common import graph_ms, loop_us

H, HKV, D, PAGE = 32, 8, 128, 64


def copy_bandwidth(dev) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), dev)
    return 2 * src.numel() / (ms * 1e-3)  # bytes read + written per second


def flex_fns(q, kc, vc, keep, N):
    """Compiled flex_attention, dense and with the selection as a BlockMask (None if Flex
    is missing or fails to compile)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None, None
    flex = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
    G = H // HKV
    kept = keep[:, :, 0]                                          # [B, Hkv, nb]

    def mask_mod(b, h, q_idx, kv_idx):
        return kept[b, h // G, kv_idx // 128]

    try:
        bm = create_block_mask(mask_mod, q.shape[0], H, 1, N, device=q.device, BLOCK_SIZE=128)
        dense = lambda: flex(qt, kt, vt, enable_gqa=True)  # noqa: E731
        sparse = lambda: flex(qt, kt, vt, block_mask=bm, enable_gqa=True)  # noqa: E731
        dense(), sparse()
        return dense, sparse
    except Exception as exc:  # report and go on: Flex is a baseline, not the subject
        print(f"  flex failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return None, None


def sweep(dev):
    """Tile configs of the decode kernel on two sizes (device time, us)."""
    from baracuda_kernels.attention.decode.launch import decode_forward_triton
    for B, N in ((1, 32768), (16, 32768), (64, 4096)):
        kc = torch.randn(B, N, HKV, D, device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        q = torch.randn(B, 1, H, D, device=dev, dtype=torch.bfloat16)
        row = []
        for bn in (32, 64, 128):
            for stages in (2, 3, 4):
                cfg = DecodeConfig(16, bn, 4, stages)
                fn = lambda: decode_forward_triton(  # noqa: E731
                    q, kc, vc, seqlens=None, host_len=N, n_new=0, capacity=N,
                    block_table=None, is_causal=True, scale=D ** -0.5, config=cfg)
                try:
                    row.append(f"bn{bn}/s{stages} {median_ms(fn, dev) * 1e3:7.1f}")
                except Exception as exc:
                    row.append(f"bn{bn}/s{stages} {type(exc).__name__}")
        print(f"sweep B={B} N={N}: " + " | ".join(row), flush=True)
        kc = vc = None


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), flush=True)
    # One compiled Flex per cache shape: without room for the recompiles, dynamo would fall
    # back to eager flex_attention after the eighth shape and time that instead.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 4096)
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    if "--sweep" in sys.argv:
        sweep(dev)
    cols = ["ours", "sdpa", "flex", "paged", "sel10", "flex10", "graph", "loop", "sdpaloop"]
    print(f"{'B':>3} {'cache':>7} {'floor':>7} " + " ".join(f"{c:>8}" for c in cols)
          + "   (us per step; x floor in brackets)", flush=True)
    for B, N in ((1, 4096), (1, 32768), (1, 131072), (16, 4096), (16, 32768), (16, 131072),
                 (64, 4096), (64, 32768)):
        gen = torch.Generator(device=dev).manual_seed(0)
        kc = torch.randn(B, N, HKV, D, device=dev, dtype=torch.bfloat16, generator=gen)
        vc = torch.randn_like(kc)
        q = torch.randn(B, 1, H, D, device=dev, dtype=torch.bfloat16, generator=gen)
        floor = 2 * kc.numel() * kc.element_size() / bw * 1e6
        lens = torch.full((B,), N, dtype=torch.int32, device=dev)
        res = {}
        with torch.no_grad():
            ours = lambda: bk.block_sparse_attention_with_kvcache(q, kc, vc, lens)  # noqa: E731
            res["ours"] = median_ms(ours, dev)
            kt, vt, qt = kc.transpose(1, 2), vc.transpose(1, 2), q.transpose(1, 2)
            sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)  # noqa: E731
            res["sdpa"] = median_ms(sdpa, dev)
            per_row = N // PAGE
            order = torch.randperm(B * per_row, device=dev, generator=gen)
            table = order.view(B, per_row).to(torch.int32)
            kp = torch.empty(B * per_row, PAGE, HKV, D, device=dev, dtype=kc.dtype)
            vp = torch.empty_like(kp)
            kp[order] = kc.view(-1, PAGE, HKV, D)
            vp[order] = vc.view(-1, PAGE, HKV, D)
            res["paged"] = median_ms(lambda: bk.block_sparse_attention_with_kvcache(
                q, kp, vp, lens, block_table=table), dev)
            kp = vp = None
            keep = select_key_blocks(q, key_block_bounds(kc, N, 128),
                                     keep=max(1, N // 128 // 10))
            res["sel10"] = median_ms(lambda: bk.block_sparse_attention_with_kvcache(
                q, kc, vc, lens, block_pattern=keep, block_size=128), dev)
            flex_dense, flex_sparse = flex_fns(q, kc, vc, keep, N)
            if flex_dense is not None:
                res["flex"] = median_ms(flex_dense, dev)
                res["flex10"] = median_ms(flex_sparse, dev)
            res["graph"] = graph_ms(ours)
            res["loop"] = loop_us(ours) * 1e-3
            res["sdpaloop"] = loop_us(sdpa) * 1e-3
        us = [res[c] * 1e3 if c in res else float("nan") for c in cols]
        print(f"{B:>3} {N:>7} {floor:7.1f} " + " ".join(f"{u:8.1f}" for u in us) + "   ["
              + " ".join(f"{u / floor:.2f}" for u in us) + "]", flush=True)
        kc = vc = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
