"""Launching a Triton kernel whose shared-memory need is estimated, not known: the config
tables estimate what the pipeliner stages (triton_fwd_configs.estimate_shared_bytes), but
extra staged loads (a score bias tile, token vectors) can push a config past the card's
limit, which Triton reports only when the compiled kernel is first launched."""

from __future__ import annotations

from triton.runtime.errors import OutOfResources


def launch_fitting(kernel, grid, *args, num_stages: int, **kwargs) -> None:
    """``kernel[grid](*args, num_stages=..., **kwargs)``; when the compiled kernel needs more
    shared memory than the card has, launch again with one pipeline stage fewer (down to 1):
    slower than a config that fits, never a failed call. Each stage count compiles once."""
    while True:
        try:
            kernel[grid](*args, num_stages=num_stages, **kwargs)
            return
        except OutOfResources:
            if num_stages <= 1:
                raise
            num_stages -= 1
