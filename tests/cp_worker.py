"""The process side of the context-parallel tests (test_context_parallel.py spawns it).

Each spawned rank joins a gloo group, runs every case it is given, and writes one JSON file
of measured errors (or the traceback of what raised); the parent test asserts on them.
Every rank builds the same global inputs from the case's seed, so each can compare its
shard of the context-parallel result with its shard of the single-process call and of the
float64 oracle, forward and gradients.
"""

from __future__ import annotations

import json
import os
import traceback

import torch
import torch.distributed as dist

from oracle import dense_attention, rel_error, token_rule_mask

from baracuda_kernels import block_sparse_attention
from baracuda_kernels.distributed import (Sharding, context_parallel_attention,
                                          prepare_context_parallel)


def worker(rank: int, world: int, port: int, cases: list, out_dir: str,
           backend: str = "gloo") -> None:
    if backend == "gloo":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    results = {}
    try:
        for case in cases:
            try:
                results[case["name"]] = run_case(rank, world, case)
            except Exception:  # reported to the parent test, which fails on it
                results[case["name"]] = {"error": traceback.format_exc()}
        results["_refusals"] = refusals(rank, world)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def refusals(rank: int, world: int) -> dict:
    """The messages of calls that must raise InvalidProblem before any exchange: a pattern
    prepared for another rank, a shard of the wrong length, tensors on another device than
    the pattern's, a bias without all keys."""
    from baracuda_kernels import InvalidProblem
    N, bs = 64 * world, 16
    q = torch.randn(1, 2, N // world, 8)
    out = {}
    def prep(r):
        return prepare_context_parallel(None, seq_len=N, world_size=world, rank=r,
                                        block_size=bs)
    calls = {
        "other_rank": lambda: context_parallel_attention(q, q, q, prep((rank + 1) % world)),
        "short_shard": lambda: context_parallel_attention(q[:, :, :-1], q, q, prep(rank)),
        "device": lambda: context_parallel_attention(*(q.to("meta"),) * 3, prep(rank)),
        "bias_columns": lambda: context_parallel_attention(
            q, q, q, prep(rank), bias=torch.zeros(1, 2, N // world, N // world)),
    }
    for name, call in calls.items():
        try:
            call()
            out[name] = "no error"
        except InvalidProblem as e:
            out[name] = f"InvalidProblem: {e}"
        except Exception as e:  # noqa: BLE001 -- reported: the wrong type
            out[name] = f"{type(e).__name__}: {e}"
    return out


def global_inputs(c: dict) -> dict:
    """The case's global tensors, the same on every rank (seeded)."""
    g = torch.Generator().manual_seed(c["seed"])
    B, H, Hkv, N, D, bs = c["B"], c["H"], c["Hkv"], c["N"], c["D"], c["bs"]
    n = N // bs
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    # Peaked attention (scores of a few units): masking errors show up in y.
    x = dict(q=randn(B, H, N, D) * 2.0, k=randn(B, Hkv, N, D), v=randn(B, Hkv, N, D),
             w=randn(B, H, N, D), w_lse=randn(B, H, N))
    x["pattern"] = None
    if c.get("pattern") == "random":
        heads = c.get("pattern_heads", H)
        p = torch.rand(1, heads, n, n, generator=g) < 0.5
        p |= torch.eye(n, dtype=torch.bool)  # no query block left empty by the pattern alone
        x["pattern"] = p
    x["docs"] = None
    if c.get("docs"):
        rows = []
        for _ in range(c.get("doc_rows", 1)):  # 1: shared by the batch, else one per row
            cuts = torch.sort(torch.randint(1, N, (c["docs"] - 1,), generator=g)).values
            ids = torch.bucketize(torch.arange(N), cuts, right=True)
            ids[N - c.get("pad", 0):] = -1
            rows.append(ids)
        x["docs"] = torch.stack(rows).to(torch.int32)
    x["sinks"] = randn(H) if c.get("sinks") else None
    x["bias"] = randn(1, H, N, N) if c.get("bias") else None
    x["alibi"] = (torch.rand(H, generator=g) * 0.5).float() if c.get("alibi") else None
    return x


def run_case(rank: int, world: int, c: dict) -> dict:
    x = {n: t.to(c.get("device", "cpu")) if isinstance(t, torch.Tensor) else t
         for n, t in global_inputs(c).items()}
    dtype = getattr(torch, c["dtype"])
    bs, N = c["bs"], c["N"]
    sharding = Sharding(N, world, c["layout"], bs)
    rules = dict(is_causal=c["causal"], window_size=c.get("window", (-1, -1)),
                 sink_tokens=c.get("sink_tokens", 0))
    prefix = c.get("prefix")  # prefix-LM lengths (per batch row)
    prefix = None if prefix is None else torch.tensor(prefix)
    mods = dict(softcap=c.get("softcap"), alibi_slopes=x["alibi"])
    cp = prepare_context_parallel(x["pattern"], seq_len=N, world_size=world, rank=rank,
                                  block_size=bs, layout=c["layout"], document_ids=x["docs"],
                                  exchange=c.get("exchange", "needed"),
                                  device=c.get("device", "cpu"),
                                  prefix_lengths=prefix, **rules)

    def leaf(t):
        return None if t is None else t.to(dtype).detach().requires_grad_()

    def loss_of(y, lse, w, w_lse):
        finite = torch.isfinite(lse)
        return (y.double() * w).sum() + (torch.where(finite, lse, 0.0).double() * w_lse).sum()

    # The context-parallel call on this rank's shard.
    shard = lambda t: sharding.shard(t, rank, dim=2)  # noqa: E731
    q, k, v = (leaf(shard(x[n])) for n in ("q", "k", "v"))
    sinks = None if x["sinks"] is None else x["sinks"].float().requires_grad_()
    bias = None if x["bias"] is None else \
        sharding.shard(x["bias"], rank, dim=2).float().requires_grad_()   # my query rows
    y, lse = context_parallel_attention(q, k, v, cp, sinks=sinks, bias=bias, return_lse=True,
                                        **mods)
    loss_of(y, lse, shard(x["w"]), sharding.shard(x["w_lse"], rank, 2)).backward()
    d_sinks = None
    if sinks is not None:
        d_sinks = sinks.grad.clone()
        dist.all_reduce(d_sinks)  # each rank holds the gradient of its own rows' loss

    # The single-process call on the whole sequence.
    pattern = (x["pattern"] if x["pattern"] is not None else
               torch.ones(1, 1, N // bs, N // bs, dtype=torch.bool)).to(x["q"].device)
    gq, gk, gv = (leaf(x[n]) for n in ("q", "k", "v"))
    g_sinks = None if x["sinks"] is None else x["sinks"].float().requires_grad_()
    g_bias = None if x["bias"] is None else x["bias"].float().requires_grad_()
    gy, glse = block_sparse_attention(gq, gk, gv, pattern, block_size=bs, return_lse=True,
                                      document_ids=x["docs"], sinks=g_sinks, bias=g_bias,
                                      prefix_lengths=prefix if prefix is None
                                      else prefix.to(gq.device),
                                      **rules, **mods)
    loss_of(gy, glse, x["w"], x["w_lse"]).backward()

    # The float64 oracle on the whole sequence (y only: its gradients are the single call's
    # business, which its own tests cover).
    x, pattern = {n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in x.items()}, \
        pattern.cpu()
    extra = None if x["docs"] is None else \
        token_rule_mask(x["docs"].shape[0], N, N, document_ids=x["docs"])
    oracle_rules = rules
    if prefix is not None:  # the rule's own causal term, relaxed by the prefix
        extra = token_rule_mask(c["B"], N, N, True, prefix_lengths=prefix)
        oracle_rules = dict(rules, is_causal=False)
    live = None if x["docs"] is None else x["docs"] >= 0
    G = c["H"] // c["Hkv"]
    oy, olse = dense_attention(x["q"], x["k"].repeat_interleave(G, 1),
                               x["v"].repeat_interleave(G, 1),
                               pattern.repeat_interleave(c["H"] // pattern.shape[1], 1)
                               if pattern.shape[1] > 1 else pattern, bs,
                               extra_mask=extra, sinks=x["sinks"], live_rows=live,
                               softcap=c.get("softcap") or 0.0, alibi_slopes=x["alibi"],
                               bias=x["bias"], **oracle_rules)

    y, lse, gy, glse = (t.detach().cpu() for t in (y, lse, gy, glse))
    errors = {
        "y": rel_error(y, shard(gy)), "lse": rel_error(lse, shard(glse)),
        "dq": rel_error(q.grad.cpu(), shard(gq.grad.cpu())),
        "dk": rel_error(k.grad.cpu(), shard(gk.grad.cpu())),
        "dv": rel_error(v.grad.cpu(), shard(gv.grad.cpu())),
        "y_oracle": rel_error(y, shard(oy)), "single_y_oracle": rel_error(gy, oy),
        "lse_oracle": rel_error(lse, sharding.shard(olse, rank, 2)),
    }
    if bias is not None:
        errors["dbias"] = rel_error(bias.grad.cpu(), shard(g_bias.grad.cpu()))
    if d_sinks is not None:
        errors["dsinks"] = rel_error(d_sinks.cpu(), g_sinks.grad.cpu())
    errors["sends"] = {dst: blocks.tolist() for dst, blocks in cp.sends.items()}
    errors["receives"] = sorted(cp.remote)
    errors["stats"] = dict(cp.stats)
    errors["send_bytes"] = cp.send_bytes(k, v)
    errors["dense_ring_bytes"] = cp.dense_ring_bytes(k, v)
    return errors
