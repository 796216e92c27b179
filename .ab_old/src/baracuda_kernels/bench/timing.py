"""Timing: device events, warm-up, L2 flush, repeats, median.

On CUDA this is ``triton.testing.do_bench`` (CUDA events around every call, a 256 MB buffer
zeroed before each call to flush L2, warm-up for ``warmup_ms``, repeats for ``rep_ms``,
median). Without triton it falls back to the same procedure written with torch.cuda.Event.
On CPU it is a wall-clock loop (one warm-up call, repeats for ``rep_ms``, median).

Memory: ``peak_memory_mib`` runs one more call, outside the timing, and returns the peak
CUDA memory allocated during it above what was allocated just before it (None on CPU).
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


MIB = 1024 * 1024


def allocated_mib(device: torch.device) -> Optional[float]:
    """CUDA memory allocated by tensors now, in MiB (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device) / MIB


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` -> ``m.mib``: the peak CUDA memory allocated
    inside the block above the allocation at its start, in MiB (None off CUDA)."""

    def __init__(self, device: torch.device):
        self.device, self.mib, self._base = device, None, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda" and exc[0] is None:
            torch.cuda.synchronize(self.device)
            self.mib = max(0, torch.cuda.max_memory_allocated(self.device) - self._base) / MIB
        return False


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak CUDA memory allocated during one call of ``fn`` above the allocation before
    the call, in MiB: its outputs, temporaries and (autograd) saved tensors, not what was
    allocated before it (inputs, preallocated outputs, a recorded forward). None off CUDA."""
    if device.type != "cuda":
        return None
    with PeakMemory(device) as m:
        out = fn()
    del out
    return m.mib


def timer_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "wall clock (median, 1 warm-up)"
    try:
        import triton.testing  # noqa: F401
        return "triton.testing.do_bench (CUDA events, L2 flush, median)"
    except ImportError:
        return "CUDA events (L2 flush, median)"
