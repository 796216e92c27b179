"""Context-parallel block-sparse attention: one sequence sharded over a process group.

Forward, on every rank: post the K/V blocks other ranks need and the receives of the blocks
it needs (``exchange``), compute its queries against its own keys while they travel, then
against each source rank's blocks as its ring step arrives (``ring_steps``: one batch of
messages per step), and merge the partial (y, lse) through their lse in a fixed order (own
keys first, then sources by ring step): the result is the single-device call's up to
floating-point reassociation, and the same on every run for a fixed world size.

Backward: the K/V blocks travel again (not kept from the forward: at long context the
gathered K/V of every layer would outgrow memory) while the local part's backward runs; each
part's backward takes the merged y and lse (the softmax is over all parts), so its dQ adds
up and its dK/dV are the exact contributions of these queries, which go back to the blocks'
owners (a return step per ring step, posted as soon as that step's part is done, so it
travels while the next part runs); an owner adds what it receives in rank order. The
learnable sinks join once, after the merge (``fold_sinks``), and take their gradient from
the merged rows.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..attention.block_sparse.autograd import (DOUBLE_BACKWARD_MESSAGE, attention_backward,
                                               attention_forward, plan_for)
from ..attention.block_sparse.descriptor import SdpaBlockSparseDescriptor
from ..attention.common.autograd_pieces import autocast_inputs, refuse_double_backward
from ..attention.common.numerics import merge_by_lse
from ..attention.common.problem import check_qkv
from ..attention.common.score_mods import fold_sinks, row_delta, sinks_grad
from ..core import InvalidProblem
from ..core.devices import device_guard
from .exchange import Exchange, pack, unpack
from .prepared import ContextParallelPattern, Part
from .sharding import block_tokens


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               pattern: ContextParallelPattern, *, group=None,
                               scale: Optional[float] = None, softcap: Optional[float] = None,
                               alibi_slopes: Optional[torch.Tensor] = None,
                               sinks: Optional[torch.Tensor] = None,
                               bias: Optional[torch.Tensor] = None, return_lse: bool = False,
                               backend: Optional[str] = None):
    """Block-sparse attention of one sequence sharded over the ranks of ``group``.

    Every rank calls it with its own shard (``pattern.sharding``: ``shard`` the global
    q/k/v, or hold the shard from the start) and its own prepared pattern
    (``prepare_context_parallel`` with its rank). Differentiable in q, k, v and sinks; the
    gradient of k / v on a rank includes the contributions of every rank's queries.

    Args:
        q: [B, H, n, Dk], n = ``pattern.sharding.local_len`` (this rank's tokens, in shard
            order), float16 / bfloat16 / float32 / float64, on ``pattern.device``.
        k: [B, Hkv, n, Dk] (Hkv < H: grouped-query attention); v: [B, Hkv, n, Dv].
        pattern: this rank's ContextParallelPattern.
        group: the process group of the context-parallel ranks (None: the default group);
            its size and this process's rank in it must be the pattern's.
        scale, softcap, alibi_slopes, sinks, backend: as for ``block_sparse_attention``
            (ALiBi distances and sink tokens count global positions).
        bias: additive score bias of this rank's query rows against every key of the
            sequence: broadcastable to [B, H, n, N] (rows in shard order, like q; keys in
            global order, N = ``pattern.sharding.seq_len``; B, H, n may be 1). Each part
            reads the columns of its keys; gets a gradient when it requires one.
        return_lse: also return lse [B, H, n] (float32; float64 for float64 inputs),
            differentiable.

    Returns:
        y [B, H, n, Dv] in q's dtype (and lse), for this rank's queries.

    Every rank must call it (and run its backward) the same number of times in the same
    order: the ranks exchange blocks in both passes.
    """
    import torch.distributed as dist
    if not isinstance(pattern, ContextParallelPattern):
        raise InvalidProblem(f"pattern is a {type(pattern).__name__}; expected the "
                             f"ContextParallelPattern of prepare_context_parallel(...).")
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidProblem("torch.distributed is not initialised; expected "
                             "dist.init_process_group(...) on every rank before the call.")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if (world, rank) != (pattern.world_size, pattern.rank):
        raise InvalidProblem(
            f"the group has {world} ranks and this process is rank {rank}; the pattern was "
            f"prepared for rank {pattern.rank} of {pattern.world_size}. Prepare it with "
            f"world_size={world}, rank={rank}.")
    q, k, v, no_autocast = autocast_inputs(q, k, v)
    call = _Call(pattern, group, scale, softcap, alibi_slopes, backend, bias is not None)
    with no_autocast:
        call.check(q, k, v, bias)
        if not pattern.group_ready:
            # NCCL creates a group's communicator at its first collective, and a batch of
            # point-to-point messages may be that first call only if every rank takes part;
            # ranks with nothing to send would not: one all-reduce first, on every rank.
            with device_guard(q.device):
                dist.all_reduce(torch.zeros(1, device=q.device), group=group)
            pattern.group_ready = True
        y, lse = _ContextParallelFunction.apply(q, k, v, sinks, bias, call)
    return (y, lse) if return_lse else y


class _Call:
    """The fixed facts of one call: the pattern, the group, the modifiers; plans per part."""

    def __init__(self, pattern, group, scale, softcap, alibi_slopes, backend,
                 has_bias: bool = False):
        self.pattern, self.group, self.scale, self.softcap = pattern, group, scale, softcap
        self.alibi_slopes, self.has_bias = alibi_slopes, has_bias
        self.local_plan = None  # the local part's plan(), from check() to the forward
        self.backend = backend.value if backend is not None and not isinstance(backend, str) \
            else backend

    def check(self, q, k, v, bias=None) -> None:
        n, N = self.pattern.sharding.local_len, self.pattern.sharding.seq_len
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[2] != n:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise InvalidProblem(
                    f"{name} is {got}; expected [B, H, {n}, D]: this rank's {n} tokens of the "
                    f"{self.pattern.sharding.seq_len}-token sequence (pattern.sharding.shard).")
        if q.device != self.pattern.device:
            raise InvalidProblem(
                f"q is on {q.device}; the ContextParallelPattern was prepared for "
                f"{self.pattern.device}. Prepare it with device={q.device} "
                f"(prepare_context_parallel(..., device=q.device)).")
        if self.alibi_slopes is not None and self.pattern.has_prefix:
            raise InvalidProblem(
                "alibi_slopes was given with a prefix-LM pattern; expected one of them: the "
                "prefix rule shifts query positions, which ALiBi would read as distances.")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dim() < 2
                                 or bias.shape[-1] != N or bias.shape[-2] not in (1, n)):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise InvalidProblem(
                f"bias is {got}; expected [B|1, H|1, {n}|1, {N}]: this rank's query rows "
                f"(shard order) against every key of the sequence (global order). Shard a "
                f"global bias's rows with pattern.sharding.shard(bias, rank, dim=-2).")
        # dtypes, devices, heads, pattern fit: the local part's plan, which the forward
        # takes over (its bias columns are a copy: built once).
        self.local_plan = self.plan(q, k, v, self.pattern.local, bias)

    def plan(self, q, k, v, part: Part, bias=None):
        """(plan, lists, mods, the part's bias columns or None) of one part for these
        tensors (k / v: the part's keys, or any tensors of their shape)."""
        p = self.pattern
        desc = SdpaBlockSparseDescriptor.from_tensors(
            q, k, v, block_size=p.block_size, scale=self.scale, is_causal=p.is_causal,
            window_size=p.window_size, sink_tokens=p.sink_tokens, softcap=self.softcap,
            alibi=self.alibi_slopes is not None, bias=self.has_bias)
        device = check_qkv(desc, q, k, v)
        plan = plan_for(desc, device, self.backend)
        part_bias = None if bias is None else \
            bias.detach().index_select(-1, part.key_positions.to(bias.device))
        return (plan, plan.block_lists(part.prepared),
                plan.score_mods(self.alibi_slopes, None, part_bias), part_bias)

    def kv_exchange(self, k, v, stats_phase: str):
        """Post this rank's K/V blocks to the ranks that need them and the receives of the
        blocks it needs, one batch per ring step (``ring_steps``) -> ([(src, dst, Exchange)]
        in step order, {src: (k view, v view)} filled once src's step completed)."""
        p = self.pattern
        steps, views = [], {}
        for src, dst in ring_steps(p.world_size, p.rank):
            sends = {dst: pack(k, v, block_tokens(p.sends[dst], p.block_size))} \
                if dst in p.sends else {}
            recvs = {}
            if src in p.remote:
                recvs[src] = k.new_empty(k.shape[0], k.shape[1], p.remote[src].key_tokens,
                                         k.shape[3] + v.shape[3])
                views[src] = unpack(recvs[src], k.shape[3])
            steps.append((src, dst, Exchange(self.group, sends, recvs, p.stats, stats_phase)))
        return steps, views


def ring_steps(world: int, rank: int) -> list[tuple[int, int]]:
    """(src, dst) of each ring step d = 1 .. world - 1: at step d every rank receives from
    rank - d and sends to rank + d. Each step is its own batch of messages, posted by every
    rank in the same order (an empty one where the pattern pairs nothing), so every batch
    meets its peers' batch of the same step: NCCL runs point-to-point batches one after
    another on its stream, and any other order could wait in a cycle. A step completes on
    its own, so a source's part starts as soon as its step is in (NCCL gives one work per
    batch)."""
    return [((rank - d) % world, (rank + d) % world) for d in range(1, world)]


class _ContextParallelFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, sinks, bias, call: _Call):
        p = call.pattern
        steps, received = call.kv_exchange(k, v, "forward")
        (plan, lists, mods, _), call.local_plan = call.local_plan, None  # (from check)
        y, lse = attention_forward(plan, q, k, v, lists, mods)
        remote = {src: call.plan(q, *received[src], part, bias)
                  for src, part in p.remote.items()}
        for src, _, exchange in steps:  # each source as soon as its step is in
            exchange.wait()
            if src in remote:
                plan, lists, mods, _ = remote[src]
                y, lse = merge_by_lse(y, lse, *attention_forward(plan, q, *received[src],
                                                                 lists, mods))
        y = y.to(q.dtype)
        if sinks is not None:  # in place: y and lse are fresh tensors of this call
            live = None if p.q_valid is None else p.q_valid[:, None, :]
            fold_sinks(y, lse, sinks, live)
        ctx.save_for_backward(q, k, v, y, lse, sinks, bias)
        ctx.call = call
        ctx.set_materialize_grads(False)
        return y, lse

    @staticmethod
    def backward(ctx, dy, dlse):
        q, k, v, y, lse, sinks, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: no second derivative of our own
            with torch.no_grad():
                grads = _backward(ctx, q, k, v, y, lse, sinks, bias, dy, dlse)
            return refuse_double_backward(grads, (q, k, v, sinks, bias, dy, dlse),
                                          DOUBLE_BACKWARD_MESSAGE) + (None,)
        return _backward(ctx, q, k, v, y, lse, sinks, bias, dy, dlse) + (None,)


def _backward(ctx, q, k, v, y, lse, sinks, bias, dy, dlse) -> tuple:
    call, p = ctx.call, ctx.call.pattern
    need_q, need_k, need_v, need_s, need_b = ctx.needs_input_grad[:5]
    need_b = need_b and bias is not None
    dy = None if dy is None else dy.contiguous()
    steps, received = call.kv_exchange(k, v, "backward")
    acc = lse.dtype
    db = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None

    def part_backward(part, ks, vs, needs):
        """(dq, dk, dv) of one part; its bias columns' gradient added into db."""
        plan, lists, mods, part_bias = call.plan(q, ks, vs, part, bias)
        grads = attention_backward(plan, lists, q, ks, vs, y, lse, dy, dlse,
                                   needs + (False, need_b), mods, None, part_bias)
        if need_b:
            db.index_add_(-1, part.key_positions.to(db.device), grads[4].to(acc))
        return grads[:3]

    dq, dk, dv = part_backward(p.local, k, v, (need_q, need_k, need_v))
    dq = None if dq is None else dq.to(acc)
    # Each step's dK/dV go back to their owner (src) while the next step's part runs, in
    # a return step of the same ring (to rank - d, from rank + d), posted in step order.
    returns, back = [], {}
    for src, dst, exchange in steps:
        exchange.wait()
        sends = {}
        if src in p.remote:
            dq_s, dk_s, dv_s = part_backward(p.remote[src], *received[src],
                                             (need_q, True, True))
            if need_q:
                dq = dq + dq_s.to(acc)
            sends[src] = pack(dk_s, dv_s)
        # Every rank returns the dK/dV of the blocks it received, whether or not its own
        # k / v want gradients: their owners may.
        recvs = {}
        if dst in p.sends:
            back[dst] = recvs[dst] = k.new_empty(k.shape[0], k.shape[1],
                                                 p.sends[dst].numel() * p.block_size,
                                                 k.shape[3] + v.shape[3])
        returns.append(Exchange(call.group, sends, recvs, p.stats, "backward"))
    for exchange in returns:
        exchange.wait()
    if need_k or need_v:
        dk = torch.zeros_like(k, dtype=acc) if dk is None else dk.to(acc)
        dv = torch.zeros_like(v, dtype=acc) if dv is None else dv.to(acc)
        for dst in sorted(back):
            tokens = block_tokens(p.sends[dst], p.block_size)
            dk_d, dv_d = unpack(back[dst], k.shape[3])
            dk.index_add_(2, tokens, dk_d.to(acc))
            dv.index_add_(2, tokens, dv_d.to(acc))
    ds = None
    if need_s and sinks is not None:
        ds = sinks_grad(sinks, lse, row_delta(y, dy, dlse, acc))
    return (None if dq is None else dq.to(q.dtype), dk.to(k.dtype) if need_k else None,
            dv.to(v.dtype) if need_v else None, ds,
            db.to(bias.dtype) if need_b else None)
