"""Time the Triton block-sparse attention backward (and a few tile configs) on one GPU.

    PYTHONPATH=src python scripts/bench_triton_bwd.py [--sweep] [--flex] [--dtype bf16]

Effective TFLOP/s use the project convention: forward = 4 * D * (query-key pairs inside
active blocks, ragged tails cut, causally empty blocks dropped); backward = 2.5 x forward.
y and lse come from a chunked dense PyTorch computation (the backward only needs them to be
consistent), so this script does not depend on the forward kernel.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

from baracuda_kernels.attention.block_lists import BlockLists
from baracuda_kernels.attention.triton_bwd import (
    BackwardConfig,
    block_sparse_attention_backward_triton,
    default_backward_config,
)

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32,
          "f64": torch.float64}


def token_mask(pattern, N, bs, causal):
    idx = torch.arange(N, device=pattern.device)
    m = pattern[:, :, idx // bs][:, :, :, idx // bs]
    return m & (idx[None, :] <= idx[:, None]) if causal else m


def forward_dense(q, k, v, mask, scale):
    """(y, lse) one head at a time in f32 (f64 for f64) to bound memory."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    y = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=acc, device=q.device)
    for b, h in itertools.product(range(q.shape[0]), range(q.shape[1])):
        s = (q[b, h].to(acc) @ k[b, h].to(acc).T) * scale
        s = s.masked_fill(~mask[b % mask.shape[0], h % mask.shape[1]], float("-inf"))
        lse[b, h] = torch.logsumexp(s, -1)
        y[b, h] = torch.nan_to_num(torch.softmax(s, -1)).to(q.dtype) @ v[b, h]
    return y, lse


def pattern_of(kind, B, H, n, gen):
    if kind == "dense":
        return torch.ones(1, 1, n, n, dtype=torch.bool)
    if kind.startswith("random"):
        density = float(kind[len("random"):]) / 100
        return torch.rand(B, H, n, n, generator=gen) < density
    if kind == "window":  # 8 blocks sliding window + 1 sink column (use with causal)
        i = torch.arange(n)
        p = ((i[:, None] - i[None, :]).abs() < 8) | (i[None, :] == 0)
        return p[None, None]
    raise ValueError(kind)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--patterns", default="dense,random25,random10,window")
    ap.add_argument("--sweep", action="store_true", help="also time candidate tile configs")
    ap.add_argument("--flex", action="store_true", help="also time FlexAttention's backward")
    a = ap.parse_args()
    dtype, dev = DTYPES[a.dtype], "cuda"
    gen = torch.Generator().manual_seed(0)
    q, k, v, dy = (torch.randn(a.B, a.H, a.N, a.D, generator=gen).to(dev, dtype)
                   for _ in range(4))
    scale = a.D ** -0.5
    n = -(-a.N // a.bs)
    print(f"device {torch.cuda.get_device_name()}  dtype {a.dtype}  B={a.B} H={a.H} N={a.N} "
          f"D={a.D} block={a.bs}  default {default_backward_config(dtype, a.D)}")

    configs = [None]
    if a.sweep:  # vary one kernel's tiles at a time: time differences are that kernel's
        d = default_backward_config(dtype, a.D)
        for n_, m_, w, s in [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (128, 32, 8, 4),
                             (64, 64, 8, 2), (64, 32, 8, 3), (64, 64, 4, 3), (128, 16, 8, 3)]:
            configs.append(BackwardConfig(n_, m_, w, s, d.q_block_m, d.q_block_n, d.q_warps,
                                          d.q_stages))
        for m_, n_, w, s in [(128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 8, 3),
                             (64, 64, 4, 3), (64, 32, 4, 3), (128, 16, 8, 3)]:
            configs.append(BackwardConfig(d.kv_block_n, d.kv_block_m, d.kv_warps, d.kv_stages,
                                          m_, n_, w, s))

    for kind in a.patterns.split(","):
        causal = kind in ("dense", "window")
        pattern = pattern_of(kind, a.B, a.H, n, gen).to(dev)
        lists = BlockLists.build(pattern, a.N, a.N, a.bs, causal)
        active = (lists.block_class != 0)
        per_cell = active.sum().item() * a.bs * a.bs  # N divisible by bs here
        reps = (a.B // pattern.shape[0]) * (a.H // pattern.shape[1])
        flops = 2.5 * 4 * a.D * per_cell * reps
        y, lse = forward_dense(q, k, v, token_mask(pattern, a.N, a.bs, causal), scale)
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        density = active.float().mean().item()
        print(f"\n{kind}{' causal' if causal else ''}: active blocks {density:.1%}")
        for cfg in configs:
            fn = lambda: block_sparse_attention_backward_triton(  # noqa: E731
                q, k, v, y, lse, dy, lists, block_size=a.bs, scale=scale, is_causal=causal,
                dq=dq, dk=dk, dv=dv, config=cfg)
            try:
                ms = triton.testing.do_bench(fn, warmup=50, rep=300)
            except Exception as e:  # a config that does not fit (shared memory)
                print(f"  {cfg}: failed {type(e).__name__}: {str(e)[:80]}")
                continue
            print(f"  {'default' if cfg is None else cfg}: {ms:.3f} ms  "
                  f"{flops / ms / 1e9:.1f} TFLOP/s")
        if a.flex:
            time_flex(q, k, v, dy, pattern, a, causal, scale, flops)


def time_flex(q, k, v, dy, pattern, a, causal, scale, flops):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        print("  flex: not available")
        return
    dense_pat = pattern.expand(a.B, a.H, -1, -1).contiguous()

    def mask_mod(b, h, qi, ki):
        ok = dense_pat[b, h, qi // a.bs, ki // a.bs]
        return ok & (ki <= qi) if causal else ok

    bm = create_block_mask(mask_mod, a.B, a.H, a.N, a.N, device="cuda", BLOCK_SIZE=a.bs)
    flex = torch.compile(flex_attention)
    qr, kr, vr = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = flex(qr, kr, vr, block_mask=bm, scale=scale)
    ms = triton.testing.do_bench(lambda: torch.autograd.grad(out, (qr, kr, vr), dy,
                                                             retain_graph=True),
                                 warmup=50, rep=300)
    print(f"  flex backward: {ms:.3f} ms  {flops / ms / 1e9:.1f} TFLOP/s")


if __name__ == "__main__":
    main()
