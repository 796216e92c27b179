"""Context-parallel attention (baracuda_kernels.distributed) on CPU processes over gloo.

World sizes 2 and 4, spawned once each (all cases of a size run in one group), against the
single-process call and the float64 oracle, forward and gradients: dense causal, sliding
window + sink tokens, documents with padding, GQA / MQA, a per-head random pattern with the
score modifiers; plus the traffic: empty shard pairs never exchange a message.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from baracuda_kernels import InvalidProblem
from baracuda_kernels.distributed import (Sharding, context_parallel_attention,
                                          prepare_context_parallel, shard_sequence,
                                          unshard_sequence)

sys.path.insert(0, os.path.dirname(__file__))
import cp_worker  # noqa: E402
from oracle import token_mask, token_rule_mask  # noqa: E402

BASE = dict(B=1, H=4, Hkv=2, D=16, bs=16, seed=0, layout="zigzag", dtype="float32",
            causal=False)
CASES = [
    dict(BASE, name="dense_causal_gqa", N=256, causal=True),
    dict(BASE, name="window_sinks_contiguous", N=256, causal=True, layout="contiguous",
         window=(40, 0), sink_tokens=8, seed=1),
    dict(BASE, name="window_zigzag_f64", N=256, causal=True, window=(33, 0), sink_tokens=5,
         dtype="float64", seed=2),
    dict(BASE, name="documents_padding_mqa_sinks", N=256, Hkv=1, docs=5, pad=20, sinks=True,
         seed=3),
    dict(BASE, name="documents_per_row", N=256, B=2, docs=4, doc_rows=2, causal=True,
         window=(50, 0), seed=8),
    dict(BASE, name="documents_causal_bf16", N=256, causal=True, docs=3, dtype="bfloat16",
         seed=4),
    dict(BASE, name="random_pattern_mods", N=256, pattern="random", pattern_heads=4,
         softcap=5.0, alibi=True, sinks=True, seed=5),
    dict(BASE, name="window_noncausal", N=256, window=(24, 24), B=2, seed=6),
    dict(BASE, name="window_exchange_all", N=256, causal=True, window=(40, 0), seed=9,
         exchange="all"),
    dict(BASE, name="prefix_lm_per_row", N=256, B=2, causal=True, prefix=[40, 150], seed=11),
    dict(BASE, name="bias_window_documents", N=256, causal=True, window=(60, 0), docs=3,
         bias=True, seed=10),
]
# (errors against the single-process call, per dtype: the merge rounds y once more)
TOL = {"float64": 1e-10, "float32": 2e-5, "bfloat16": 3e-2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, cases: list, tmp_path, backend: str = "gloo") -> list[dict]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=cp_worker.worker,
                         args=(r, world, port, cases, str(tmp_path), backend))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            pytest.fail(f"rank {r} of {world} did not finish (a deadlock in the exchange?)")
    results = []
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        assert path.exists(), f"rank {r} of {world} wrote no results (exit code " \
                              f"{procs[r].exitcode})"
        results.append(json.loads(path.read_text()))
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    world = request.param
    return world, _run(world, CASES, tmp_path_factory.mktemp(f"cp{world}"))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_matches_single_process_and_oracle(world_results, case):
    world, results = world_results
    for rank, res in enumerate(results):
        got = res[case["name"]]
        assert "error" not in got, f"rank {rank}: {got['error']}"
        tol = TOL[case["dtype"]]
        extra = (("dsinks",) if case.get("sinks") else ()) + \
            (("dbias",) if case.get("bias") else ())
        for what in ("y", "lse", "dq", "dk", "dv") + extra:
            assert got[what] <= tol, f"rank {rank} of {world}: {what} error {got[what]:.2e}"
        # Against float64: no worse than twice the single-process call's own error.
        bound = 2 * got["single_y_oracle"] + {"float64": 1e-12, "float32": 1e-5,
                                               "bfloat16": 1.6e-2}[case["dtype"]]
        assert got["y_oracle"] <= bound, f"rank {rank}: y vs oracle {got['y_oracle']:.2e}"


def _needed_blocks(case: dict, world: int) -> dict:
    """{(dst, src): src-local blocks holding a key that some query of dst may see}, from
    the token-level mask of the case's rules (oracle.py), independently of the library."""
    x = cp_worker.global_inputs(case)
    N, bs = case["N"], case["bs"]
    pattern = x["pattern"] if x["pattern"] is not None else \
        torch.ones(1, 1, N // bs, N // bs, dtype=torch.bool)
    causal = case["causal"] and case.get("prefix") is None
    allowed = token_mask(pattern, N, N, bs, causal, case.get("window", (-1, -1)),
                         case.get("sink_tokens", 0))
    if case.get("prefix") is not None:
        allowed = allowed & token_rule_mask(case["B"], N, N, True,
                                            prefix_lengths=torch.tensor(case["prefix"]))
    if x["docs"] is not None:
        allowed = allowed & token_rule_mask(x["docs"].shape[0], N, N, document_ids=x["docs"])
    allowed = allowed.any(1).any(0)                                   # [N, N]
    s = Sharding(N, world, case["layout"], bs)
    need = {}
    for dst in range(world):
        for src in range(world):
            if dst != src:
                keys = allowed[s.positions(dst)][:, s.positions(src)].any(0)
                blocks = keys.view(-1, bs).any(1).nonzero().flatten().tolist()
                if blocks:
                    need[dst, src] = blocks
    return need


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_only_needed_blocks_travel(world_results, case):
    """Each rank sends exactly the key blocks some query of the receiver may see (from the
    token mask): a shard pair with no such block exchanges no message, and the bytes counted
    on the wire are the planned ones. With documents the plan may send more, never less: the
    block classes judge a block by the range of its ids (a block that mixes padding and a
    document spans every id between them) and each rule on its own (a shared document
    whose pairs the causal rule removes)."""
    world, results = world_results
    if case.get("exchange") == "all":
        pytest.skip("exchange='all' sends every block by design (test_exchange_all_...)")
    need = _needed_blocks(case, world)
    for rank, res in enumerate(results):
        got = res[case["name"]]
        sends = {int(d): b for d, b in got["sends"].items()}
        expected = {dst: blocks for (dst, src), blocks in need.items() if src == rank}
        if case.get("docs"):
            assert all(set(b) <= set(sends.get(d, ())) for d, b in expected.items())
        else:
            assert sends == expected, f"rank {rank} of {world}"
        assert got["stats"]["forward_bytes"] == got["send_bytes"]
        # K/V in the forward and again in the backward; dK/dV back to each source.
        assert got["stats"]["messages"] == 2 * len(sends) + len(got["receives"])
        assert got["receives"] == sorted(src for (dst, src) in need if dst == rank) \
            or case.get("docs")
    if case["name"] == "window_sinks_contiguous":  # far less than dense ring attention
        total = sum(r[case["name"]]["send_bytes"] for r in results)
        ring = sum(r[case["name"]]["dense_ring_bytes"] for r in results)
        assert total < ring / 2, (total, ring)


@pytest.mark.gpu
def test_nccl_group_of_one_on_the_gpu(tmp_path):
    """NCCL on this machine's GPU (one rank: only the local part, no message), bf16 and f32:
    the process-group path end to end on the GPU kernels."""
    cases = [dict(c, device="cuda", name=f"{c['name']}_cuda") for c in CASES
             if c["dtype"] != "float64"]
    got = _run(1, cases, tmp_path, backend="nccl")[0]
    for case in cases:
        res = got[case["name"]]
        assert "error" not in res, res["error"]
        for what in ("y", "lse", "dq", "dk", "dv"):
            assert res[what] <= TOL[case["dtype"]], (case["name"], what, res[what])


def test_bad_calls_raise_before_any_message(world_results):
    """In a live group: a pattern of another rank, a shard of the wrong length, tensors on
    another device and a bias without every key column raise InvalidProblem naming the fix
    (and no rank hangs: a refused call sends nothing)."""
    world, results = world_results
    for rank, res in enumerate(results):
        got = res["_refusals"]
        assert got["other_rank"].startswith("InvalidProblem") and \
            f"rank={rank}" in got["other_rank"], got["other_rank"]
        assert got["short_shard"].startswith("InvalidProblem") and \
            "this rank's" in got["short_shard"], got["short_shard"]
        assert got["device"].startswith("InvalidProblem") and \
            "device=meta" in got["device"], got["device"]
        assert got["bias_columns"].startswith("InvalidProblem") and \
            "every key" in got["bias_columns"], got["bias_columns"]


# ---------------------------------------------------------------------------- single process
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_sharding_round_trip_and_positions(layout):
    s = Sharding(96, 3, layout, 16)
    x = torch.arange(96)[None, None, :, None].expand(2, 1, 96, 4)
    shards = [s.shard(x, r) for r in range(3)]
    assert torch.equal(unshard_sequence(shards, layout=layout), x)
    for r in range(3):
        assert torch.equal(shards[r][0, 0, :, 0], s.positions(r))
        assert torch.equal(shard_sequence(x, 3, r, layout=layout), shards[r])
    if layout == "zigzag":  # rank 0 holds the first and the last chunk
        assert s.positions(0).tolist() == list(range(16)) + list(range(80, 96))


def test_sharding_rejects_ragged_lengths():
    with pytest.raises(InvalidProblem, match="multiple of 64"):
        Sharding(100, 2, "zigzag", 16)
    with pytest.raises(InvalidProblem, match="layout"):
        Sharding(64, 2, "striped", 16)


def test_prepare_is_exact_about_needs():
    """Without a group: the plan of a causal window over contiguous shards lists only the
    previous rank's last blocks."""
    cp = prepare_context_parallel(None, seq_len=256, world_size=4, rank=2, block_size=16,
                                  layout="contiguous", is_causal=True, window_size=(20, 0))
    assert sorted(cp.remote) == [1]
    assert cp.remote[1].key_blocks.tolist() == [2, 3]   # keys 96..127 of rank 1
    assert sorted(cp.sends) == [3] and cp.sends[3].tolist() == [2, 3]


def test_exchange_all_is_dense_ring_traffic():
    """exchange="all" (the dense-ring baseline of the benchmark) sends every block."""
    cp = prepare_context_parallel(None, seq_len=256, world_size=4, rank=1, block_size=16,
                                  is_causal=True, window_size=(20, 0), exchange="all")
    k = torch.empty(1, 2, 64, 8)
    assert cp.send_bytes(k, k) == cp.dense_ring_bytes(k, k)
    assert sorted(cp.remote) == [0, 2, 3]
    with pytest.raises(InvalidProblem, match="exchange"):
        prepare_context_parallel(None, seq_len=256, world_size=4, rank=1, block_size=16,
                                 exchange="ring")


def test_call_checks_before_any_message():
    cp = prepare_context_parallel(None, seq_len=64, world_size=2, rank=0, block_size=16,
                                  is_causal=True)
    q = torch.randn(1, 2, 32, 8)
    with pytest.raises(InvalidProblem, match="not initialised"):
        context_parallel_attention(q, q, q, cp)
    with pytest.raises(InvalidProblem, match="ContextParallelPattern"):
        context_parallel_attention(q, q, q, None)
