"""When a block-sparse attention call is really dense, and may run on a library backend.

``block_sparse_attention`` can call ``dense_route`` once per call (cheap after the first call
for a problem: the answer is cached) and, when it returns a plan, run
``library_autograd.library_attention(plan, q, k, v)`` instead of the block-sparse kernels.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ...core import PlanCache, Unsupported
from ..block_sparse.descriptor import SdpaBlockSparseDescriptor, kernel_block_size
from ..block_sparse.prepared import PreparedPattern
from .descriptor import FlashSdpaDescriptor
from .plan import FlashSdpaPlan
from .torch_sdpa import LIBRARY, determinism_requested, library_unavailable_reason

_ROUTES = PlanCache()   # (dense descriptor, device, need_lse) -> library plan or _NO_ROUTE
_NO_ROUTE = object()


def all_blocks_active(prepared: PreparedPattern) -> bool:
    """True when every block the token rule can reach is active in ``prepared``: every
    (query block, key block) cell, or with ``is_causal`` every cell on or below the causal
    diagonal (cells the causal rule empties may be either). Then the prepared pattern's
    block-sparse attention equals dense (causal) attention, exactly.

    Read from the lists measured at preparation (``lists.mean_row_blocks``: each row counts
    at most its reachable blocks, so the mean equals the reachable mean only when every row
    is complete): no device work and no host sync; memoised on the lists."""
    lists = prepared.lists
    if lists.mean_row_blocks is None:
        return False
    return lists.memo("all_blocks_active", lambda: _all_active(prepared))


def _all_active(prepared: PreparedPattern) -> bool:
    bp, hp, nq, nk = prepared.shape
    nq_, nk_ = prepared.query_len, prepared.key_len
    if 0 in (bp, hp, nq, nk, nq_, nk_):
        return False
    if prepared.is_causal == "bottom_right" and nq_ != nk_:
        return False  # a shifted diagonal: not what the library's is_causal computes
    if tuple(prepared.window_size) != (-1, -1):
        return False  # a token window: not dense attention
    bs = kernel_block_size(prepared.block_size, nq_, nk_)  # what the lists were built with
    reachable = nq * nk
    if prepared.is_causal:  # key block kb reachable from query block qb iff kb*bs <= its last row
        reachable = sum(min(nk, (min((qb + 1) * bs, nq_) - 1) // bs + 1) for qb in range(nq))
    return round(prepared.lists.mean_row_blocks * bp * hp * nq) == reachable * bp * hp


def dense_route(desc: Union[SdpaBlockSparseDescriptor, FlashSdpaDescriptor],
                device: torch.device, pattern_is_all_active: bool,
                deterministic: Optional[bool], *, need_lse: bool = False
                ) -> Optional[FlashSdpaPlan]:
    """A FlashSdpaPlan on a library backend (torch_cudnn or torch_flash) for a block-sparse
    problem that is dense, or None: keep the block-sparse kernels.

    The rule. Returns a plan exactly when all of these hold, else None:

    1. ``pattern_is_all_active``: the caller's pattern is a PreparedPattern for ``desc``
       with ``all_blocks_active(prepared)`` True, i.e. every block the token rule can reach
       is active: all nq x nk blocks, or with ``is_causal`` (top-left) every block on or
       below the diagonal. An all-active pattern under the causal rule IS dense causal
       attention, so causal problems route too. Raw tensors and BlockPatterns should pass
       False: their content would have to be read (a host sync) on every call.
    2. Determinism was not asked for: ``deterministic`` is not True and
       ``torch.are_deterministic_algorithms_enabled()`` is False (the library backends'
       backward is not promised deterministic; they are never chosen silently then).
    3. lse is not needed (``need_lse=False``; pass ``return_lse`` here): torch SDPA's public
       API does not return it.
    4. A library backend accepts the dense problem (``FlashSdpaPlan``'s rules: CUDA,
       float16/bfloat16, d_k == d_v <= 256, square when causal, torch's own
       ``can_use_*_attention`` check); cuDNN is preferred to flash.

    Ask only when the caller did not force a backend (``backend=None``) and is not tracing
    (under torch.compile the block-sparse custom op carries the call). Answers are cached per
    (problem, device, need_lse); the determinism test runs on every call (it reads torch's
    global flag). Run the returned plan with ``library_autograd.library_attention(plan, q, k, v)``
    (autograd-aware). Wiring, in ``block_sparse_attention`` after ``desc``/``device``::

        if backend is None and isinstance(block_pattern, PreparedPattern) and not _tracing(q):
            plan = dense_route(desc, device, all_blocks_active(block_pattern), None,
                               need_lse=return_lse)
            if plan is not None:
                return library_attention(plan, q, k, v)
    """
    if not pattern_is_all_active or determinism_requested(deterministic):
        return None
    if isinstance(desc, SdpaBlockSparseDescriptor):
        desc = FlashSdpaDescriptor.from_block_sparse(desc)
    device = torch.device(device)
    need_lse = bool(need_lse)
    options = {"deterministic": deterministic, "need_lse": need_lse}

    def select():
        if all(library_unavailable_reason(kind, desc, device, options) for kind in LIBRARY):
            return _NO_ROUTE
        try:
            plan = FlashSdpaPlan.select(desc, device=device, deterministic=deterministic,
                                        need_lse=need_lse)
        except Unsupported:
            return _NO_ROUTE
        return plan if not plan.computes_lse else _NO_ROUTE
    plan = _ROUTES.get((desc, device, need_lse), select)
    return None if plan is _NO_ROUTE else plan
