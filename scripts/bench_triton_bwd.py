"""Time the Triton block-sparse attention backward (and a few tile configs) on one GPU.

    PYTHONPATH=src python scripts/bench_triton_bwd.py [--sweep] [--flex] [--dtype bf16]
        [--patterns dense,random25,window] [--block-sizes 128,64]

--sweep times the default config plus a few alternatives that each change one kernel's
tiles (so a time difference belongs to that kernel) and the tile-major launch order; the
alternatives depend on the block size (tiles are clipped to the block).

Effective TFLOP/s use the project convention: forward = 4 * D * (query-key pairs inside
active blocks, ragged tails cut, causally empty blocks dropped); backward = 2.5 x forward.
y and lse come from a chunked dense PyTorch computation (the backward only needs them to be
consistent), so this script does not depend on the forward kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch
import triton

from baracuda_kernels.attention.block_sparse.block_lists import BlockLists
from baracuda_kernels.attention.block_sparse.triton_bwd import (
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


# (tile along the program's own dim, tile along the loop, warps, stages) alternatives to the
# default, keyed by block-size bucket (tiles are clipped to the pattern block).
KV_VARIANTS = {128: [(128, 64, 8, 2), (128, 64, 8, 4), (128, 32, 8, 3), (64, 64, 4, 3)],
               64: [(64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3), (64, 32, 4, 4)]}
Q_VARIANTS = {128: [(128, 64, 8, 2), (128, 64, 8, 4), (128, 32, 8, 3), (64, 64, 4, 3)],
              64: [(64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 4, 3), (64, 32, 4, 4)]}


def sweep_configs(dtype, D, bs, tma=False):
    """Default first, then one-kernel variants and the tile-major order (no duplicates).
    tma: the variants (and a second default) load through TMA; the first default does not."""
    d = default_backward_config(dtype, D, bs)
    bucket = 128 if bs > 64 else 64
    out = [("default", d)]
    if tma:
        d = dataclasses.replace(d, use_tma=True)
        out.append(("default + tma", d))
    for n_, m_, w, s in KV_VARIANTS[bucket]:
        out.append((f"kv {n_}x{m_} w{w} s{s}", dataclasses.replace(
            d, kv_block_n=n_, kv_block_m=m_, kv_warps=w, kv_stages=s)))
    for m_, n_, w, s in Q_VARIANTS[bucket]:
        out.append((f"q {m_}x{n_} w{w} s{s}", dataclasses.replace(
            d, q_block_m=m_, q_block_n=n_, q_warps=w, q_stages=s)))
    for order in ("head-major", "tile-major"):
        out.append((f"{order} order", dataclasses.replace(d, launch_order=order)))
    seen, unique = set(), []
    for label, cfg in out:
        if cfg not in seen or label == "default":
            seen.add(cfg)
            unique.append((label, cfg))
    return unique


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--bs", type=int, default=128, help="block size (see --block-sizes)")
    ap.add_argument("--block-sizes", default=None,
                    help="comma list of block sizes to loop over (overrides --bs)")
    ap.add_argument("--patterns", default="dense,random25,random10,window")
    ap.add_argument("--sweep", action="store_true", help="also time candidate tile configs")
    ap.add_argument("--tma", action="store_true", help="with --sweep: variants use TMA loads")
    ap.add_argument("--flex", action="store_true", help="also time FlexAttention's backward")
    a = ap.parse_args()
    dtype, dev = DTYPES[a.dtype], "cuda"
    gen = torch.Generator().manual_seed(0)
    q, k, v, dy = (torch.randn(a.B, a.H, a.N, a.D, generator=gen).to(dev, dtype)
                   for _ in range(4))
    scale = a.D ** -0.5
    block_sizes = [int(x) for x in a.block_sizes.split(",")] if a.block_sizes else [a.bs]
    for bs in block_sizes:
        run_block_size(a, bs, dtype, dev, gen, q, k, v, dy, scale)


def run_block_size(a, bs, dtype, dev, gen, q, k, v, dy, scale):
    n = -(-a.N // bs)
    print(f"\ndevice {torch.cuda.get_device_name()}  dtype {a.dtype}  B={a.B} H={a.H} N={a.N} "
          f"D={a.D} block={bs}  default {default_backward_config(dtype, a.D, bs)}")
    configs = sweep_configs(dtype, a.D, bs, a.tma) if a.sweep else [("default", None)]

    for kind in a.patterns.split(","):
        causal = kind in ("dense", "window")
        pattern = pattern_of(kind, a.B, a.H, n, gen).to(dev)
        lists = BlockLists.build(pattern, a.N, a.N, bs, causal)
        active = (lists.block_class != 0)
        per_cell = active.sum().item() * bs * bs  # N divisible by bs here
        reps = (a.B // pattern.shape[0]) * (a.H // pattern.shape[1])
        flops = 2.5 * 4 * a.D * per_cell * reps
        y, lse = forward_dense(q, k, v, token_mask(pattern, a.N, bs, causal), scale)
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        density = active.float().mean().item()
        print(f"\n{kind}{' causal' if causal else ''} block {bs}: active blocks {density:.1%}")
        ref = None
        for label, cfg in configs:
            fn = lambda: block_sparse_attention_backward_triton(  # noqa: E731
                q, k, v, y, lse, dy, lists, block_size=bs, scale=scale, is_causal=causal,
                dq=dq, dk=dk, dv=dv, config=cfg)
            try:
                fn()
                got = [t.float() for t in (dq, dk, dv)]
                if ref is None:
                    ref, diff = got, 0.0
                else:  # every config computes the same gradients (up to rounding)
                    diff = max(((x - r).abs().max() / r.abs().max()).item()
                               for x, r in zip(got, ref))
                ms = triton.testing.do_bench(fn, warmup=25, rep=200)
            except Exception as e:  # a config that does not fit (shared memory)
                print(f"  {label:<20} failed {type(e).__name__}: {str(e)[:80]}")
                continue
            print(f"  {label:<20} {ms:.3f} ms  {flops / ms / 1e9:.1f} TFLOP/s  diff {diff:.1e}"
                  + (f"  {cfg}" if a.sweep and cfg is not None else ""))
        if a.flex:
            try:
                time_flex(q, k, v, dy, pattern, a, bs, causal, scale, flops)
            except Exception as e:  # e.g. block 64 with flex's default kernel options
                print(f"  flex backward: failed {type(e).__name__}: {str(e)[:80]}")


def time_flex(q, k, v, dy, pattern, a, bs, causal, scale, flops):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        print("  flex: not available")
        return
    dense_pat = pattern.expand(a.B, a.H, -1, -1).contiguous()

    def mask_mod(b, h, qi, ki):
        ok = dense_pat[b, h, qi // bs, ki // bs]
        return ok & (ki <= qi) if causal else ok

    bm = create_block_mask(mask_mod, a.B, a.H, a.N, a.N, device="cuda", BLOCK_SIZE=bs)
    flex = torch.compile(flex_attention)
    qr, kr, vr = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = flex(qr, kr, vr, block_mask=bm, scale=scale)
    ms = triton.testing.do_bench(lambda: torch.autograd.grad(out, (qr, kr, vr), dy,
                                                             retain_graph=True),
                                 warmup=25, rep=200)
    print(f"  {'flex backward':<20} {ms:.3f} ms  {flops / ms / 1e9:.1f} TFLOP/s")


if __name__ == "__main__":
    main()
