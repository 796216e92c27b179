"""Run a long-context sliding-window + sink attention problem and compare it with dense.

Uses the GPU (triton backend) when one is present, the CPU (reference backend) otherwise;
checks the last rows against dense float32 SDPA with the pattern as a token mask, and
prints shape, density, backend, time and the speedup over dense attention (torch SDPA) on
the same device.
"""

from __future__ import annotations

import time

import torch

from .attention import SdpaBlockSparseArgs, SdpaBlockSparseDescriptor, SdpaBlockSparsePlan
from .attention.block_sparse.block_lists import BlockLists
from .attention.patterns import sliding_window


def add_arguments(parser) -> None:
    parser.add_argument("--seq-len", type=int, default=None, help="tokens (default 16384)")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--window", type=int, default=None, help="window in tokens")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.set_defaults(run=run)


def _time(fn, device, repeats: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _check_tail_rows(q, k, v, y, window: int, sinks: int, rows: int) -> float:
    """Relative error of y's last `rows` query rows against dense float32 SDPA with the
    token rule (causal, a window of ``window`` tokens and ``sinks`` sink tokens) as a token
    mask: an independent check that stays small at 16k."""
    N = q.shape[2]
    first = N - rows
    i = torch.arange(first, N, device=q.device)[:, None]
    j = torch.arange(N, device=q.device)[None, :]
    allowed = (j <= i) & ((i - j < window) | (j < sinks))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, first:].float(), k.float(), v.float(), attn_mask=allowed)
    got = y[:, :, first:].float()
    return ((got - ref).norm() / ref.norm()).item()


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    B = 2 if gpu else 1
    H = args.heads or (16 if gpu else 4)
    N = args.seq_len or 16384
    D = args.head_dim or (128 if gpu else 64)
    bs = args.block_size or (128 if gpu else 64)
    window = args.window or 8 * bs
    dtype = torch.bfloat16 if gpu else torch.float32

    pattern = sliding_window(N, block_size=bs, window=window, sinks=bs, causal=True).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=gen) for _ in range(3))

    # The builder's window and sinks (pattern.kernel_rules) are cut per token by the kernels.
    desc = SdpaBlockSparseDescriptor(B, H, N, N, D, D, block_size=bs, is_causal=True, element=dtype,
                                     **pattern.kernel_rules)
    plan = SdpaBlockSparsePlan.select(desc, device=device)
    args_ = SdpaBlockSparseArgs(q, k, v, pattern)
    y, lse = plan.run(args_)

    err = _check_tail_rows(q, k, v, y, window, bs, rows=min(N, 1024))

    lists = BlockLists.build(pattern.mask, N, N, bs, True, window=desc.window)
    active = int((lists.block_class != 0).sum())
    sparse_s = _time(lambda: plan.run(args_), device, repeats=5)
    dense_s = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                    device, repeats=5)

    print(f"baracuda-kernels demo on {torch.cuda.get_device_name(device) if gpu else 'CPU'}")
    print(f"  problem   q/k/v [{B}, {H}, {N}, {D}] {str(dtype).removeprefix('torch.')}, causal, block {bs}")
    print(f"  pattern   sliding window {window} tokens + {bs} sink tokens: {active} of "
          f"{plan.num_blocks_q * plan.num_blocks_k} blocks active ({pattern.density():.2%})")
    what = {"cpu": "PyTorch's fused CPU attention kernel on the active blocks",
            "reference": "pure PyTorch, block by block"}.get(plan.backend.value, "")
    print(f"  backend   {plan.backend.value}  ({plan.sku.config or what})")
    print(f"  check     relative error of the last 1024 rows vs dense float32 SDPA {err:.2e}")
    print(f"  time      block-sparse {sparse_s * 1e3:.2f} ms   dense SDPA (causal) {dense_s * 1e3:.2f} ms")
    print(f"  speedup   {dense_s / sparse_s:.1f}x over dense on the same device")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    if not err <= tol:
        print(f"  FAILED    error {err:.2e} above {tol:.0e}")
        return 1
    return 0
