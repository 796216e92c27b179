"""Context-parallel weak scaling on the GPUs of one host (NCCL), for issue 17's table.

    PYTHONPATH=src python scripts/bench_context_parallel.py [--per-rank 32768] [--worlds 1,2,4,8]

bf16, B = 1, H = Hkv = 16, D = 128, ``--per-rank`` tokens per rank. For each pattern (causal
window 4k + 64 sink tokens, contiguous and zigzag shards; dense causal, zigzag) and each
world size W: the forward + backward time of ``context_parallel_attention`` on W GPUs
(N = W x per-rank tokens; the slowest rank, median of the iterations), the single-GPU
``block_sparse_attention`` on the same N (run by the W = 1 group), weak-scaling efficiency
T_1gpu(N) / (W x T_cp(N)), the same call with every shard sent to every rank
(``exchange="all"``: dense ring attention's traffic on the same kernels), and the bytes
the busiest rank sends against dense ring attention. NVLink multicast stays off as the
device image sets it.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from baracuda_kernels import block_sparse_attention, prepare_pattern  # noqa: E402
from baracuda_kernels.distributed import (context_parallel_attention,  # noqa: E402
                                          prepare_context_parallel)

PATTERNS = [("window4k+64sinks", "contiguous", dict(window_size=(4095, 0), sink_tokens=64)),
            ("window4k+64sinks", "zigzag", dict(window_size=(4095, 0), sink_tokens=64)),
            ("dense causal", "zigzag", {})]
BS, H, D = 128, 16, 128


def median_ms(fn, iters: int, before=lambda: None) -> float:
    """Median ms of fn() over iters, after two warm-ups; ``before`` runs ahead of each."""
    times = []
    for i in range(iters + 2):
        before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def timed(fn, iters: int) -> float:
    """median_ms with every rank in step; the slowest rank sets the step time."""
    t = torch.tensor([median_ms(fn, iters, dist.barrier)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def run(rank: int, world: int, port: int, per_rank: int, iters: int, out: list) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    N = per_rank * world
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, layout, window in PATTERNS:
        cp = prepare_context_parallel(None, seq_len=N, world_size=world, rank=rank,
                                      block_size=BS, layout=layout, is_causal=True,
                                      device="cuda", **window)
        q, k, v = (torch.randn(1, H, per_rank, D, device="cuda", dtype=torch.bfloat16,
                               generator=g).requires_grad_() for _ in range(3))
        dy = torch.randn_like(q)

        ring = prepare_context_parallel(None, seq_len=N, world_size=world, rank=rank,
                                        block_size=BS, layout=layout, is_causal=True,
                                        device="cuda", exchange="all", **window)

        def step(plan=cp):
            context_parallel_attention(q, k, v, plan).backward(dy)
        cp_ms = timed(step, iters)
        ring_ms = timed(lambda: step(ring), iters)
        sent = torch.tensor([cp.send_bytes(k, v)], device="cuda")
        dist.all_reduce(sent, op=dist.ReduceOp.MAX)
        if rank == 0:
            out.append(dict(pattern=name, layout=layout, world=world, N=N, cp_ms=cp_ms,
                            ring_ms=ring_ms,
                            sent=int(sent), ring=cp.dense_ring_bytes(k, v)))
            ring_mib = cp.dense_ring_bytes(k, v) / 2**20
            print(f"  W={world} {name} {layout}: {cp_ms:.2f} ms (every shard sent: "
                  f"{ring_ms:.2f} ms), busiest rank sends {int(sent) / 2**20:.1f} MiB "
                  f"(dense ring {ring_mib:.1f})", flush=True)
    dist.destroy_process_group()


def single_gpu(N: int, iters: int) -> dict:
    """fwd + bwd ms of the single-GPU call on the whole N-token sequence, per pattern."""
    times = {}
    pattern = torch.ones(1, 1, N // BS, N // BS, dtype=torch.bool, device="cuda")
    for name, layout, window in PATTERNS:
        q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16)
                   .requires_grad_() for _ in range(3))
        dy = torch.randn_like(q)
        # Lists built once, as the context-parallel plans have them; deterministic=True keeps
        # our kernels (a fully active pattern would otherwise take the dense route).
        prep = prepare_pattern(pattern, query_len=N, block_size=BS, is_causal=True,
                               device="cuda", **window)

        def step():
            block_sparse_attention(q, k, v, prep, deterministic=True).backward(dy)
        times[name, layout] = median_ms(step, iters)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-rank", type=int, default=32768)
    ap.add_argument("--worlds", default="1,2,4,8")
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    gpus = torch.cuda.device_count()
    worlds = [w for w in map(int, a.worlds.split(",")) if w <= gpus]
    print(f"{gpus} GPUs ({torch.cuda.get_device_name(0)}); worlds {worlds}", flush=True)
    rows = mp.Manager().list()
    for world in worlds:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(run, args=(world, port, a.per_rank, a.iters, rows), nprocs=world)
    print("| pattern | layout | W | N | CP fwd+bwd ms | every shard sent ms | 1 GPU ms | "
          "efficiency | sent / ring |")
    print("|---|---|---|---|---|---|---|---|---|")
    singles = {}
    for r in rows:
        if r["N"] not in singles:
            singles[r["N"]] = single_gpu(r["N"], a.iters)
        single = singles[r["N"]][r["pattern"], r["layout"]]
        eff = single / (r["world"] * r["cp_ms"])
        ratio = r["sent"] / r["ring"] if r["ring"] else 0.0
        print(f"| {r['pattern']} | {r['layout']} | {r['world']} | {r['N']} | {r['cp_ms']:.2f} | "
              f"{r['ring_ms']:.2f} | "
              f"{single:.2f} | {eff:.2f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
