"""Context-parallel attention with its ranks as threads of one process, on one device.

The messages go through an in-process mailbox instead of torch.distributed (the gloo tests
in test_context_parallel.py cover the real exchange and autograd on CPU processes), which
lets one GPU run every part of a 4-rank group: remote parts on the Triton kernels, K/V views
of packed buffers, dK/dV returned to their owners. One thread computes at a time (the others
wait in the mailbox), so kernels compile one at a time. CPU always; CUDA with the gpu
marker.
"""

from __future__ import annotations

import threading

import pytest
import torch

from baracuda_kernels import block_sparse_attention
from baracuda_kernels.distributed import Sharding, prepare_context_parallel
from baracuda_kernels.distributed import attention as cp_attention

from oracle import rel_error


class Mailbox:
    """The group: messages keyed (phase number, src, dst); one shared lock is held by the
    running rank and released only while a rank waits for a message."""

    def __init__(self):
        self.cv = threading.Condition()
        self.box = {}


class Rank:
    """What the attention passes as ``group``: the mailbox and this rank's phase counter."""

    def __init__(self, mailbox: Mailbox, rank: int):
        self.mailbox, self.rank, self.phase = mailbox, rank, 0


class MailboxExchange:
    """Stands in for exchange.Exchange (same constructor and wait)."""

    def __init__(self, group: Rank, sends, recvs, stats, phase):
        group.phase += 1
        self.group, self.number, self.recvs = group, group.phase, recvs
        box = group.mailbox
        for dst, t in sends.items():
            box.box[self.number, group.rank, dst] = t.clone()
        stats[f"{phase}_bytes"] += sum(t.numel() * t.element_size() for t in sends.values())
        stats["messages"] += len(sends)
        box.cv.notify_all()

    def wait(self):
        box = self.group.mailbox
        for src in sorted(self.recvs):
            key = (self.number, src, self.group.rank)
            if not getattr(self, f"_got{src}", False):
                box.cv.wait_for(lambda: key in box.box, timeout=600)
                self.recvs[src].copy_(box.box.pop(key))
                setattr(self, f"_got{src}", True)
        return self.recvs


class _Ctx:
    """What the autograd function reads from its ctx. The threads call its forward and
    backward directly: through torch.autograd, a CUDA backward runs on the engine's one
    thread per device, where four ranks waiting on one another would deadlock."""

    needs_input_grad = (True, True, True, False, False)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def set_materialize_grads(self, value):
        pass


def _run_ranks(world, body):
    mailbox, errors, out = Mailbox(), {}, {}

    def run(rank):
        with mailbox.cv:
            try:
                out[rank] = body(Rank(mailbox, rank))
            except Exception as e:  # noqa: BLE001 -- reported below
                errors[rank] = e
                mailbox.cv.notify_all()
    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    if errors:
        raise next(iter(errors.values()))
    return out


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("rule", ["window_sinks", "dense_causal", "documents"])
def test_threaded_group_matches_single_call(monkeypatch, device, dtype, rule):
    monkeypatch.setattr(cp_attention, "Exchange", MailboxExchange)
    world, N, bs, H, Hkv, D = 4, 512, 32, 4, 2, 64
    g = torch.Generator().manual_seed(7)
    q_all = torch.randn(2, H, N, D, generator=g) * 2
    k_all, v_all = (torch.randn(2, Hkv, N, D, generator=g) for _ in range(2))
    w = torch.randn(2, H, N, D, generator=g)
    rules = dict(is_causal=rule != "documents")
    if rule == "window_sinks":
        rules.update(window_size=(70, 0), sink_tokens=9)
    docs = None
    if rule == "documents":
        docs = torch.bucketize(torch.arange(N), torch.tensor([100, 230, 231, 400]),
                               right=True)[None].to(torch.int32).to(device)
    sharding = Sharding(N, world, "zigzag", bs)
    to = dict(device=device, dtype=dtype)

    def body(group: Rank):
        r = group.rank
        cp = prepare_context_parallel(None, seq_len=N, world_size=world, rank=r,
                                      block_size=bs, document_ids=docs,
                                      device=torch.device(device, 0),  # an index, as
                                      **rules)                         # torchrun code has
        q, k, v = (sharding.shard(t, r).to(**to) for t in (q_all, k_all, v_all))
        call = cp_attention._Call(cp, group, None, None, None, None)
        call.check(q, k, v)
        ctx = _Ctx()
        y, _ = cp_attention._ContextParallelFunction.forward(ctx, q, k, v, None, None, call)
        dy = sharding.shard(w, r).to(**to)   # d/dy of sum(y * w)
        dq, dk, dv = cp_attention._backward(ctx, *ctx.saved_tensors, dy, None)[:3]
        return y, dq, dk, dv

    out = _run_ranks(world, body)
    q, k, v = (t.to(**to).requires_grad_() for t in (q_all, k_all, v_all))
    pattern = torch.ones(1, 1, N // bs, N // bs, dtype=torch.bool, device=device)
    y = block_sparse_attention(q, k, v, pattern, block_size=bs, document_ids=docs, **rules)
    (y.float() * w.to(device)).sum().backward()
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for i, ref in enumerate((y, q.grad, k.grad, v.grad)):
        got = sharding.unshard([out[r][i] for r in range(world)])
        err = rel_error(got, ref.detach())
        assert err <= tol, f"{['y', 'dq', 'dk', 'dv'][i]}: {err:.2e}"


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_ring_steps_meet_their_peers(world):
    """At step d, the rank a message goes to receives, at its own step d, from the sender:
    every batch meets its peers' batch of the same step (what keeps NCCL from waiting in a
    cycle), and the steps reach every other rank once."""
    steps = {r: cp_attention.ring_steps(world, r) for r in range(world)}
    for r in range(world):
        assert len(steps[r]) == world - 1
        assert sorted(s for s, _ in steps[r]) == sorted(set(range(world)) - {r})
        for d, (src, dst) in enumerate(steps[r]):
            assert steps[dst][d][0] == r and steps[src][d][1] == r
