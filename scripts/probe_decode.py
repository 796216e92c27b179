"""Decode (Nq = 1) against a KV cache, one run on one card: time per call of
block_sparse_attention_with_kvcache (split-KV chosen automatically) against torch SDPA
(enable_gqa, the cache's live part as a strided view) and the bandwidth floor (bytes of K/V
read / the card's measured copy bandwidth); a paged cache (gathered per call in this first
version) and 10% of the blocks selected (select_key_blocks). bf16, H=32, Hkv=8, D=128.

    PYTHONPATH=src python scripts/probe_decode.py
"""
import torch
import torch.nn.functional as F

import baracuda_kernels as bk
from baracuda_kernels.bench.timing import median_ms
from baracuda_kernels.patterns import key_block_bounds, select_key_blocks

H, HKV, D = 32, 8, 128


def copy_bandwidth(dev) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), dev)
    return 2 * src.numel() / (ms * 1e-3)  # bytes read + written per second


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), flush=True)
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    print(f"{'B':>3} {'cache':>7} {'floor us':>9} {'ours':>8} {'sdpa':>8} {'paged':>8} "
          f"{'10% sel':>8}   (us per call; x floor in brackets)", flush=True)
    for B, N in ((1, 4096), (1, 32768), (16, 4096), (16, 32768), (64, 4096), (1, 131072)):
        gen = torch.Generator(device=dev).manual_seed(0)
        kc = torch.randn(B, N, HKV, D, device=dev, dtype=torch.bfloat16, generator=gen)
        vc = torch.randn_like(kc)
        q = torch.randn(B, 1, H, D, device=dev, dtype=torch.bfloat16, generator=gen)
        floor = 2 * kc.numel() * kc.element_size() / bw * 1e6
        with torch.no_grad():
            ours = median_ms(lambda: bk.block_sparse_attention_with_kvcache(q, kc, vc, N), dev)
            kt, vt, qt = kc.transpose(1, 2), vc.transpose(1, 2), q.transpose(1, 2)
            sdpa = median_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True),
                             dev)
            page = 256
            table = torch.arange(B * (N // page), device=dev, dtype=torch.int32).view(B, -1)
            kp, vp = kc.view(-1, page, HKV, D), vc.view(-1, page, HKV, D)
            paged = median_ms(lambda: bk.block_sparse_attention_with_kvcache(
                q, kp, vp, N, block_table=table), dev)
            keep = select_key_blocks(q, key_block_bounds(kc, N, 128),
                                     keep=max(1, N // 128 // 10))
            sel = median_ms(lambda: bk.block_sparse_attention_with_kvcache(
                q, kc, vc, N, block_pattern=keep, block_size=128), dev)
        us = [t * 1e3 for t in (ours, sdpa, paged, sel)]
        print(f"{B:>3} {N:>7} {floor:9.1f} " + " ".join(
            f"{u:8.1f}" for u in us) + "   [" + " ".join(f"{u / floor:.2f}" for u in us) + "]",
              flush=True)


if __name__ == "__main__":
    main()
