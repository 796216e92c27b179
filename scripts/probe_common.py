"""Timing helpers shared by the probe scripts (run on a CUDA device)."""
import time

import torch
import triton


def host_us(fn, n=100, warmup=1):
    """Mean host time (us) to submit ``fn`` once, synchronised before and after the loop
    (the GPU runs behind, so this is what Python, autograd and launches cost)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    out = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return out


def loop_us(fn, n=200) -> float:
    """Wall time (us) per call of ``n`` back-to-back calls, the device drained after: the
    host's launch time and the device time, whichever bounds the loop."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def graph_ms(fn, repeats_inside=1):
    """GPU time (ms) of one ``fn``: captured ``repeats_inside`` times in a CUDA graph after a
    warm-up on a side stream, and the graph replayed (no host work in the timing)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats_inside):
            fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=200) / repeats_inside


def prepared_fwd_step_ms(q, k, v, dy, prepared):
    """(forward ms, training-step ms) of block_sparse_attention on a prepared pattern (triton
    backend), GPU time of graph replays; also (blocks, FULL blocks) of its lists."""
    import baracuda_kernels as bk

    def fwd():
        with torch.no_grad():
            bk.block_sparse_attention(q, k, v, prepared, backend="triton")

    def step():
        y = bk.block_sparse_attention(q, k, v, prepared, backend="triton")
        torch.autograd.grad(y, (q, k, v), dy)
    lists = prepared.lists
    blocks = (int(lists.kv_count.sum()), int(lists.kv_count_full.sum()))
    return graph_ms(fwd), graph_ms(step), blocks
