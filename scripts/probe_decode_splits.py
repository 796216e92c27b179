"""Eager decode steps: split-KV (automatic) against one split, for issue 18's host time.

An eager decode step launches the split kernel and, with more than one split, a combine
kernel. One split saves a launch but leaves most SMs idle on long caches. This prints,
per (heads, cache length), the wall time per call of 200 back-to-back eager calls ("loop":
host launch time included) and the device time (L2 flushed), for num_splits=None (auto)
and 1, so that a rule for choosing one split in eager mode can be read off.
bf16, B=1, D=128.

    PYTHONPATH=src python scripts/probe_decode_splits.py
"""
import torch

import baracuda_kernels as bk
from baracuda_kernels.bench.timing import median_ms
from probe_common import loop_us

D = 128


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), flush=True)
    print(f"{'H/Hkv':>7} {'keys':>6} | {'auto loop us':>12} {'auto dev us':>11} | "
          f"{'1-split loop us':>15} {'1-split dev us':>14}")
    for H, Hkv in ((16, 4), (32, 8)):
        for n in (512, 2048, 8192, 32768):
            q = torch.randn(1, 1, H, D, device=dev, dtype=torch.bfloat16)
            kc, vc = (torch.randn(1, n, Hkv, D, device=dev, dtype=torch.bfloat16)
                      for _ in range(2))
            row = []
            for splits in (None, 1):
                def step(splits=splits):
                    return bk.block_sparse_attention_with_kvcache(q, kc, vc, n,
                                                                  num_splits=splits)
                row += [loop_us(step), median_ms(step, dev) * 1e3]
            print(f"{H:>3}/{Hkv:<3} {n:>6} | {row[0]:>12.1f} {row[1]:>11.1f} | "
                  f"{row[2]:>15.1f} {row[3]:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
