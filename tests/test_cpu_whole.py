"""The cpu backend's whole-problem path (cpu_whole): a call that is dense (causal) attention
-- every reachable block active, no causal or top-left causal (or one query after every
key), no window, token rule or additive modifier -- runs as one fused call per GQA group member. Checked against the
float64 oracle (forward, lse, gradients) over odd lengths, Nq != Nk, GQA, d_k != d_v,
every dtype and learnable sinks; every case asserts which path ran (the calls that are not
dense must keep the block walk)."""

import pytest
import torch

import baracuda_kernels as bk
from baracuda_kernels.attention.block_sparse import cpu_fused
from cases import HAS_CUDA, check_sinks_against_reference, check_token_rule
from oracle import dense_attention

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="the cpu backend runs CPU tensors")


@pytest.fixture
def whole_runs(monkeypatch):
    """A list of "fwd" / "bwd" entries, one per whole-problem call."""
    runs = []
    real_fwd, real_bwd = cpu_fused.whole_forward, cpu_fused.whole_backward

    def spy_fwd(*args):
        runs.append("fwd")
        return real_fwd(*args)

    def spy_bwd(*args):
        runs.append("bwd")
        return real_bwd(*args)
    monkeypatch.setattr(cpu_fused, "whole_forward", spy_fwd)
    monkeypatch.setattr(cpu_fused, "whole_backward", spy_bwd)
    return runs


# (name, Nq, Nk, bs, causal, H, Hkv, dtype)
TAKES = [
    ("causal-odd-gqa", 77, 77, 16, True, 4, 2, torch.float64),
    ("top-left-short-q", 45, 130, 16, True, 4, 4, torch.float32),
    ("top-left-long-q", 130, 77, 16, True, 2, 1, torch.float64),
    ("bottom-right-square", 100, 100, 16, "bottom_right", 4, 2, torch.bfloat16),
    ("full-gqa", 61, 45, 16, False, 4, 2, torch.float16),
    ("full-ragged", 33, 90, 32, False, 2, 2, torch.float32),
    ("decode-step", 1, 90, 16, "bottom_right", 4, 2, torch.float64),
]


@pytest.mark.parametrize("case", TAKES, ids=[c[0] for c in TAKES])
def test_dense_calls_take_one_fused_call(case, whole_runs):
    _, Nq, Nk, bs, causal, H, Hkv, dtype = case
    check_token_rule("cpu", dtype, Nq, Nk, bs, causal, H=H, Hkv=Hkv, B=2, density=1.0)
    assert whole_runs == ["fwd", "bwd"]


# (name, Nq, Nk, causal, window, density, tokens)
KEEPS = [
    ("a-skipped-block", 77, 77, True, (-1, -1), 0.6, None),
    ("window", 77, 77, True, (20, 0), 1.0, None),
    ("bottom-right-rectangle", 50, 90, "bottom_right", (-1, -1), 1.0, None),
    ("bottom-right-two-queries", 2, 90, "bottom_right", (-1, -1), 1.0, None),
    ("documents", 70, 70, True, (-1, -1), 1.0,
     dict(document_ids=torch.tensor([[0] * 30 + [1] * 40, [0] * 70]))),
]


@pytest.mark.parametrize("case", KEEPS, ids=[c[0] for c in KEEPS])
def test_other_calls_keep_the_block_walk(case, whole_runs):
    _, Nq, Nk, causal, window, density, tokens = case
    check_token_rule("cpu", torch.float64, Nq, Nk, 16, causal, window, H=4, Hkv=2, B=2,
                     density=density, tokens=tokens)
    assert whole_runs == []


def test_causal_block_pattern_and_prepared(whole_runs):
    """Only the blocks on and below the diagonal active (the causal rule reaches no other):
    dense causal attention, through a plain tensor and a prepared pattern."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 90, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    tril = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    ref, _ = dense_attention(q, k, v, tril, 16, True)
    y = bk.block_sparse_attention(q, k, v, tril, block_size=16, is_causal=True, backend="cpu")
    prep = bk.prepare_pattern(tril, query_len=90, key_len=90, block_size=16, is_causal=True)
    y2 = bk.block_sparse_attention(q, k, v, prep, backend="cpu")
    assert (y - ref).abs().max() < 1e-12 and (y2 - ref).abs().max() < 1e-12
    assert whole_runs == ["fwd", "fwd"]


def test_alibi_keeps_the_block_walk(whole_runs):
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float64) for _ in range(3))
    bk.block_sparse_attention(q, k, v, torch.ones(1, 1, 3, 3, dtype=torch.bool), block_size=16,
                              is_causal=True, alibi_slopes=torch.tensor([0.5, 0.25]),
                              backend="cpu")
    assert whole_runs == []


def test_learnable_sinks(whole_runs):
    """Sinks folded in after the whole forward; the whole backward reads the folded y and
    lse."""
    check_sinks_against_reference(70, 16, 5, is_causal=True)
    assert whole_runs == ["fwd", "bwd"]
