"""Sliding windows in tokens (window_size=(left, right), flash-attn's convention) with sink
tokens, exact per token: checked against the float64 oracle on both backends, forward and
gradients, with block patterns, GQA, causal (either alignment) and not, windows that are not
multiples of the block, and exact block classes (FULL / PARTIAL / SKIP).

CPU: reference in f64 and triton under the interpreter in f32; the GPU grid runs every dtype."""

import pytest
import torch

import baracuda_kernels as bk
from baracuda_kernels.attention.block_sparse.block_lists import classify_blocks
from baracuda_kernels.attention.common.problem import window_rule
from cases import ALL_DTYPES, HAS_CUDA, check_token_rule, nblocks
from oracle import dense_attention, token_mask

# (Nq, Nk, bs, is_causal, window_size, sink_tokens)
CASES = [(70, 70, 16, True, (20, 0), 0), (70, 70, 16, True, (37, 0), 5),
         (61, 61, 16, False, (9, 13), 0), (30, 75, 16, "bottom_right", (25, 0), 3),
         (75, 30, 16, False, (-1, 4), 0), (1, 90, 32, "bottom_right", (40, 0), 4)]


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
@pytest.mark.parametrize("Nq,Nk,bs,causal,window,sinks", CASES)
def test_window_matches_oracle_cpu(backend, Nq, Nk, bs, causal, window, sinks):
    if HAS_CUDA:
        pytest.skip("the GPU grid below covers this")
    check_token_rule(backend, torch.float32 if backend == "triton" else torch.float64, Nq, Nk, bs, causal,
           window, sinks, prepared=(sinks == 5))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("Nq,Nk,bs,causal,window,sinks", [
    (1000, 1000, 128, True, (300, 0), 4), (1000, 1000, 64, False, (100, 100), 0),
    (256, 1000, 128, "bottom_right", (500, 0), 4), (1, 1000, 128, "bottom_right", (200, 0), 4)])
def test_window_matches_oracle_gpu(backend, dtype, Nq, Nk, bs, causal, window, sinks):
    check_token_rule(backend, dtype, Nq, Nk, bs, causal, window, sinks, H=8, Hkv=2, B=2,
           prepared=(Nq == 256))


@pytest.mark.parametrize("Nq,Nk,bs,causal,window,sinks", CASES + [(100, 100, 7, True, (10, 0), 3)])
def test_window_block_classes_are_exact(Nq, Nk, bs, causal, window, sinks):
    p = torch.ones(1, 1, nblocks(Nq, bs), nblocks(Nk, bs), dtype=torch.bool)
    rule = window_rule(window, sinks, causal, Nq, Nk)
    cls = classify_blocks(p, Nq, Nk, bs, causal, rule)
    allowed = token_mask(p, Nq, Nk, bs, causal, window, sinks)[0, 0]
    for qb in range(cls.shape[2]):
        for kb in range(cls.shape[3]):
            cell = allowed[qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs]
            want = 0 if not cell.any() else (1 if cell.all() and cell.shape == (bs, bs) else 2)
            assert int(cls[0, 0, qb, kb]) == want, (qb, kb)


def test_window_validation_and_prepared_agreement():
    q = k = v = torch.randn(1, 2, 40, 16, dtype=torch.float64)
    p = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    for bad in ((5,), (-2, 0), (1.5, 0), "wide"):
        with pytest.raises(bk.InvalidProblem, match="window_size"):
            bk.block_sparse_attention(q, k, v, p, block_size=16, window_size=bad)
    with pytest.raises(bk.InvalidProblem, match="sink_tokens"):
        bk.block_sparse_attention(q, k, v, p, block_size=16, window_size=(4, 0), sink_tokens=-1)
    prep = bk.prepare_pattern(p, query_len=40, block_size=16, is_causal=True,
                              window_size=(8, 0))
    with pytest.raises(bk.InvalidProblem, match="window_size"):
        bk.block_sparse_attention(q, k, v, prep, window_size=(9, 0))
    y = bk.block_sparse_attention(q, k, v, prep)
    ref, _ = dense_attention(q, k, v, p, 16, True, window_size=(8, 0))
    torch.testing.assert_close(y, ref)


def test_window_under_compile_cpu():
    q = torch.randn(1, 2, 40, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    p = torch.ones(1, 1, 3, 3, dtype=torch.bool)

    def f(q, k, v):
        return bk.block_sparse_attention(q, k, v, p, block_size=16, is_causal=True,
                                         window_size=(11, 0), sink_tokens=2).square().sum()
    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v),
                              (q, k, v))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)
