"""Exact token window vs the coarsened block window: forward and step GPU time (graph
replay) per computed block. bf16, B=2, H=16, D=128, N=8192, block 128, causal window of 1000
tokens plus 4 sink keys.

    PYTHONPATH=src python scripts/probe_window.py
"""
import torch

import baracuda_kernels as bk
from baracuda_kernels.patterns import sliding_window
from probe_common import prepared_fwd_step_ms

B, H, N, D, BS = 2, 16, 8192, 128, 128


def main():
    print(torch.cuda.get_device_name(), flush=True)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dy = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    window = sliding_window(N, window=1000, block_size=BS, sinks=4, causal=True).to("cuda")
    # The builder hands its window to the kernels (exact); its raw mask alone is coarsened.
    coarse = bk.prepare_pattern(window.mask, query_len=N, block_size=BS, is_causal=True)
    variants = {"coarsened blocks": coarse, "exact window": window.prepare()}
    for name, prep in variants.items():
        f, s, (blocks, full) = prepared_fwd_step_ms(q, k, v, dy, prep)
        print(f"{name:<18} blocks {blocks:5d} (FULL {full:5d})  fwd {f:.3f} ms "
              f"({f / blocks * 1e3:.3f} us/block)  step {s:.3f} ms ({s / blocks * 1e3:.3f} us/block)",
              flush=True)

if __name__ == "__main__":
    main()
