"""Launching Triton kernels: reuse of the compiled kernel across calls, and a retry for
configs whose shared-memory need was only estimated.

Reuse. ``kernel[grid](...)`` binds every argument, works out its specialisation (dtype and
16-byte alignment of each pointer; each integer's ``== 1`` / ``% 16 == 0`` class and width),
hashes that with the options into a cache key, then calls the compiled kernel's launcher.
With our 40-70 arguments that Python path is most of a launch's host time (probe_launch_cost:
tens of microseconds per launch on the device machine), paid again by every decode step and
training step. ``launch`` keeps the compiled kernel returned by the first launch under a key
that is at least as fine as Triton's own (the class of every argument, the options and
constants, the current device) and launches it directly on later calls through the compiled
kernel's launcher, which still reads each pointer and builds TMA descriptors per call.
A key that is finer than needed only costs one more ordinary launch; one that is coarser
would reuse a kernel compiled for other arguments, so anything this module cannot classify
(an unknown argument type, launch hooks set by a profiler, the interpreter, a launch traced
by torch.compile) takes the ordinary path. The reuse is off when ``BARACUDA_TRITON_REUSE=0``.
"""

from __future__ import annotations

import os

import torch
from triton.runtime.errors import OutOfResources

from ...core.runtime import triton_interpreting

_I32 = (-(2 ** 31), 2 ** 31 - 1)
_I64 = (-(2 ** 63), 2 ** 63 - 1)
_MAX_ENTRIES = 1024

# (kernel, device, options, argument classes) -> (compiled kernel, trailing constexpr values)
_COMPILED: dict = {}
_reuse_state = {"on": None}


def _reuse_enabled() -> bool:
    on = _reuse_state["on"]
    if on is None:
        on = (os.environ.get("BARACUDA_TRITON_REUSE", "1").strip() not in ("0", "false", "no")
              and not triton_interpreting())
        _reuse_state["on"] = on
    return on


def _arg_class(a):
    """What Triton's specialisation can tell apart about one runtime argument (or more).
    Raises TypeError for a type this module does not know."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return (a == 1, a % 16 == 0, _I32[0] <= a <= _I32[1], _I64[0] <= a <= _I64[1])
    if isinstance(a, float):
        return float
    base = getattr(a, "base", None)
    if isinstance(base, torch.Tensor) and hasattr(a, "block_shape"):  # a host TMA descriptor
        return ("desc", base.dtype, base.data_ptr() % 16 == 0, tuple(a.block_shape),
                getattr(a, "padding", None), tuple(map(_arg_class, a.shape)),
                tuple(map(_arg_class, a.strides)))
    raise TypeError(type(a).__name__)


def _hooks_set() -> bool:
    try:
        from triton import knobs
    except ImportError:  # older Triton: no hook registry to honour, no reuse
        return True
    rt = knobs.runtime
    return rt.launch_enter_hook is not None or rt.launch_exit_hook is not None


def _trailing_constants(kernel, n_args: int, kwargs: dict):
    """The values of the kernel's parameters after the first n_args (all compile-time
    constants given by keyword, or their defaults), in signature order; None when some
    trailing parameter is not a constexpr (then the launch is not reused)."""
    params = getattr(kernel, "params", None)
    if params is None:
        return None
    tail = []
    for p in params[n_args:]:
        if not p.is_constexpr:
            return None
        if p.name in kwargs:
            tail.append(kwargs[p.name])
        elif p.has_default:
            tail.append(p.default)
        else:
            return None
    return tuple(tail)


def _reuse_key(kernel, args, kwargs):
    """The reuse key of one launch (module docstring), or None when it has none."""
    if not (_reuse_enabled() and torch.cuda.is_available()):
        return None
    try:
        return (kernel, torch.cuda.current_device(), tuple(kwargs.items()),
                tuple(map(_arg_class, args)))
    except TypeError:  # an argument of a type we cannot classify
        return None


def _keep(key, kernel, args, kwargs, compiled) -> None:
    """File the kernel an ordinary launch returned under ``key``, with the constants that
    follow the positional arguments."""
    if key is None or compiled is None:
        return
    if hasattr(compiled, "result"):  # an asynchronous compile's future
        compiled = compiled.result()
    tail = _trailing_constants(kernel, len(args), kwargs)
    if tail is not None and all(hasattr(compiled, a) for a in
                                ("run", "function", "packed_metadata")):
        try:
            if len(_COMPILED) >= _MAX_ENTRIES:
                _COMPILED.clear()
            _COMPILED[key] = (compiled, tail)
        except TypeError:  # unhashable options
            pass


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, through the compiled kernel kept from an earlier
    call with arguments of the same classes when there is one (module docstring)."""
    if torch.compiler.is_compiling():  # traced: the kernel joins the graph as a call
        return kernel[grid](*args, **kwargs)
    key = _reuse_key(kernel, args, kwargs)
    if key is not None:
        try:
            hit = _COMPILED.get(key)
        except TypeError:  # unhashable options
            key = hit = None
        if hit is not None and not _hooks_set():
            compiled, tail = hit
            g = tuple(grid) + (1, 1)
            from triton.runtime import driver
            stream = driver.active.get_current_stream(key[1])
            compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata,
                         None, None, None, *args, *tail)
            return compiled
    compiled = kernel[grid](*args, **kwargs)
    _keep(key, kernel, args, kwargs, compiled)
    return compiled


def launch_fitting(kernel, grid, *args, num_stages: int, **kwargs) -> None:
    """``launch(kernel, grid, *args, num_stages=..., **kwargs)``; when the compiled kernel
    needs more shared memory than the card has (the config tables estimate what the
    pipeliner stages, triton_fwd_configs.estimate_shared_bytes, but extra staged loads such
    as a score bias tile or token vectors can push a config past the card's limit, which
    Triton reports only at the first launch), launch again with one pipeline stage fewer
    (down to 1): slower than a config that fits, never a failed call. Each stage count
    compiles once; the reuse key is the one asked for, so later calls go straight to the
    config that fitted."""
    try:
        launch(kernel, grid, *args, num_stages=num_stages, **kwargs)
        return
    except OutOfResources:
        if num_stages <= 1:
            raise
    stages = num_stages - 1
    while True:
        try:
            compiled = kernel[grid](*args, num_stages=stages, **kwargs)
            break
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
    # Filed under the stage count asked for: the next such call launches what fitted.
    _keep(_reuse_key(kernel, args, {"num_stages": num_stages, **kwargs}), kernel, args,
          kwargs, compiled)
