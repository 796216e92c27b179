"""Mode ``step-graph``: one training step captured once in a CUDA graph and replayed.

Replaying a graph launches the step's kernels without Python, autograd or the launchers on
the host, so its time is the step's GPU time; ``step`` minus ``step-graph`` is what the host
adds per eager step (``report`` derives it). The capture follows PyTorch's whole-network
recipe: static leaves q, k, v (requires_grad) and a static dy, a few warm-up steps on a side
stream (lazy initialisation, compiles and autotuning stay out of the graph), then

    with torch.cuda.graph(g):
        y = train(q, k, v)
        grads = torch.autograd.grad(y, (q, k, v), dy)

and ``g.replay()`` is timed. A capture that fails (an op that synchronises with the host,
a launcher that cannot be captured) makes the implementation ``Unavailable`` with the first
line of the error. A capture that succeeds but replays something else than the eager step
would be a fast wrong number, so ``replay_error`` compares one replay with an eager step on
the same tensors before anything is timed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .baselines import Unavailable, _first_line

WARMUP_STEPS = 3      # the recipe's warm-up iterations on a side stream


@dataclass
class CapturedStep:
    """A captured training step: ``replay()`` reruns it, writing ``y`` and ``grads``
    (dq, dk, dv) in place; ``xs`` are the static leaves, ``dy`` the static gradient."""

    graph: "torch.cuda.CUDAGraph"
    xs: list
    dy: torch.Tensor
    y: torch.Tensor
    grads: tuple
    setup_s: float

    def replay(self) -> None:
        self.graph.replay()


def capture_step(train: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 dy: torch.Tensor, warmup: int = WARMUP_STEPS) -> CapturedStep:
    """Capture ``y = train(q, k, v)`` and its autograd backward with ``dy`` in one graph.

    Raises Unavailable off CUDA or when the capture fails (the reason is the error's first
    line). The leaves share storage with q, k, v (no copy); the graph's own memory pool
    holds y, the grads and the step's intermediates until the CapturedStep is dropped.
    """
    if q.device.type != "cuda":
        raise Unavailable("CUDA graphs need a CUDA device")
    t0 = time.perf_counter()
    xs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    dy = dy.detach()
    side = torch.cuda.Stream(device=q.device)
    side.wait_stream(torch.cuda.current_stream(q.device))
    try:
        with torch.cuda.stream(side):
            for _ in range(warmup):
                torch.autograd.grad(train(*xs), xs, dy)
    except Exception as exc:
        raise Unavailable(f"the eager step failed before capture: {_first_line(exc)}") from None
    torch.cuda.current_stream(q.device).wait_stream(side)
    torch.cuda.synchronize(q.device)

    graph = torch.cuda.CUDAGraph()
    inner = None     # the error inside the capture: the one to report, not capture_end's
    try:
        with torch.cuda.graph(graph):
            try:
                y = train(*xs)
                grads = torch.autograd.grad(y, xs, dy)
            except Exception as exc:
                inner = exc
                raise
    except Exception as exc:
        first = inner if inner is not None else exc
        del graph
        try:      # a failed capture is not a sticky error: the device stays usable
            torch.cuda.synchronize(q.device)
        except Exception:
            pass
        raise Unavailable(f"CUDA graph capture failed: {_first_line(first)}") from None
    return CapturedStep(graph, xs, dy, y, tuple(grads), time.perf_counter() - t0)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| computed in float32 (float64 for float64), 0.0 when equal."""
    dt = torch.float64 if ref.dtype == torch.float64 else torch.float32
    a, b = out.detach().to(dt), ref.detach().to(dt)
    if torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True):     # bitwise (NaN at NaN)
        return 0.0
    diff, denom = float((a - b).norm()), float(b.norm())
    return diff / denom if denom > 0 else diff


def replay_error(step: CapturedStep, train: Callable) -> float:
    """Worst relative error of one replay's (y, dq, dk, dv) against an eager step on the same
    leaves and dy: 0.0 when bitwise equal, nan if the replay produced non-finite values
    where the eager step did not."""
    step.replay()
    torch.cuda.synchronize(step.dy.device)
    y = train(*step.xs)
    eager = torch.autograd.grad(y, step.xs, step.dy)
    torch.cuda.synchronize(step.dy.device)
    worst = 0.0
    for got, want in zip((step.y,) + step.grads, (y,) + tuple(eager)):
        e = _rel(got, want)
        if e != e:          # nan
            return e
        worst = max(worst, e)
    return worst
