"""BlockSparseAttention (torch.nn.Module): both layouts, every pattern form (None, a
BlockPattern, a callable per length), prepared once per length, GQA, learnable sinks that
train, a bias; the same results as the functional API; errors."""

import pytest
import torch

import baracuda_kernels as bk
from baracuda_kernels.patterns import causal, sliding_window


def _qkv(B=2, N=96, H=4, Hkv=2, D=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, N, D, generator=gen, dtype=dtype) * s
            for h, s in ((H, 2.0), (Hkv, 1.0), (Hkv, 1.0))]


def test_module_matches_functional_in_both_layouts():
    q, k, v = _qkv()
    fn = lambda nq, nk: sliding_window(nq, window=40, block_size=32, sinks=3)  # noqa: E731
    attn = bk.BlockSparseAttention(fn)
    ref = bk.block_sparse_attention(q, k, v, fn(96, 96))
    torch.testing.assert_close(attn(q, k, v), ref)
    attn_t = bk.BlockSparseAttention(fn, layout="bnhd")
    y_t = attn_t(*(t.transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(y_t, ref.transpose(1, 2))
    assert len(attn.prepared) == 1
    attn(q, k, v)
    assert len(attn.prepared) == 1                     # reused, not rebuilt
    q2, k2, v2 = _qkv(N=64)
    torch.testing.assert_close(attn(q2, k2, v2),
                               bk.block_sparse_attention(q2, k2, v2, fn(64, 64)))
    assert len(attn.prepared) == 2                     # one per length


def test_module_pattern_forms_and_sinks_train():
    q, k, v = _qkv()
    dense = bk.BlockSparseAttention(is_causal=True, block_size=32)
    torch.testing.assert_close(dense(q, k, v), bk.block_sparse_attention(
        q, k, v, torch.ones(1, 1, 3, 3, dtype=torch.bool), block_size=32, is_causal=True))
    fixed = bk.BlockSparseAttention(causal(96, block_size=32))
    torch.testing.assert_close(fixed(q, k, v), dense(q, k, v))
    with pytest.raises(bk.InvalidProblem, match="callable"):
        fixed(*_qkv(N=64))
    with pytest.raises(bk.InvalidProblem, match="raw tensor"):
        bk.BlockSparseAttention(torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(bk.InvalidProblem, match="layout"):
        bk.BlockSparseAttention(layout="nhd")
    sinky = bk.BlockSparseAttention(is_causal=True, block_size=32, num_sink_heads=4).double()
    bias = torch.randn(1, 4, 96, 96, dtype=torch.float64)
    y = sinky(q, k, v, bias=bias)
    y.square().sum().backward()
    assert sinky.sinks.grad is not None and sinky.sinks.grad.abs().sum() > 0
    expected = bk.block_sparse_attention(q, k, v, torch.ones(1, 1, 3, 3, dtype=torch.bool),
                                         block_size=32, is_causal=True,
                                         sinks=sinky.sinks.detach(), bias=bias)
    torch.testing.assert_close(y.detach(), expected)
    assert "sinks" in dict(sinky.named_parameters())
    assert "all blocks" in repr(sinky)


@pytest.mark.parametrize("kwargs, field", [
    (dict(window_size=5), "window_size"),          # an int: was a TypeError at the first call
    (dict(block_size=0), "block_size"),            # was a ZeroDivisionError at the first call
    (dict(block_size="16"), "block_size"),
    (dict(is_causal="yes"), "is_causal"),
    (dict(num_sink_heads=-1), "num_sink_heads"),   # was a RuntimeError from torch.zeros
])
def test_module_options_are_checked_when_built(kwargs, field):
    with pytest.raises(bk.InvalidProblem, match=field):
        bk.BlockSparseAttention(**kwargs)
