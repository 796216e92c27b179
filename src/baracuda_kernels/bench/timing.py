"""Timing: device events, warm-up, L2 flush, repeats, median.

On CUDA this is ``triton.testing.do_bench`` (CUDA events around every call, a 256 MB buffer
zeroed before each call to flush L2, warm-up for ``warmup_ms``, repeats for ``rep_ms``,
median). Without triton it falls back to the same procedure written with torch.cuda.Event.
On CPU it is a wall-clock loop (one warm-up call, repeats for ``rep_ms``, median).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence

import torch


def _do_bench_triton(fn, warmup_ms, rep_ms, grad_to_none):
    import triton.testing
    try:
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                             grad_to_none=grad_to_none, return_mode="median"))
    except TypeError:  # older triton: no return_mode argument
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                             grad_to_none=grad_to_none, quantiles=[0.5])[0])


def _do_bench_events(fn, warmup_ms, rep_ms, grad_to_none, device):
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n = max(1, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        for t in grad_to_none or ():
            t.grad = None
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _time_cpu(fn, rep_ms, min_repeats=3, max_repeats=50):
    fn()  # warm-up (allocator, lazy init)
    times = []
    deadline = time.perf_counter() + rep_ms * 1e-3
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25,
              rep_ms: float = 100, grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Median time of ``fn()`` in milliseconds on ``device`` (see the module docstring)."""
    if device.type == "cuda":
        try:
            import triton.testing  # noqa: F401
        except ImportError:
            return _do_bench_events(fn, warmup_ms, rep_ms, grad_to_none, device)
        return _do_bench_triton(fn, warmup_ms, rep_ms, grad_to_none)
    return _time_cpu(fn, rep_ms)


def timer_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "wall clock (median, 1 warm-up)"
    try:
        import triton.testing  # noqa: F401
        return "triton.testing.do_bench (CUDA events, L2 flush, median)"
    except ImportError:
        return "CUDA events (L2 flush, median)"
