"""block_sparse_attention_varlen: packed variable-length batches in flash-attn's layout,
checked sequence by sequence against the float64 oracle (forward, lse and gradients) with
causal rules (either alignment), windows with sinks, GQA and a pack-level block pattern.

CPU: reference in f64 and triton under the interpreter in f32; the GPU grid runs every dtype
on the issue's pack (sequence lengths 1, 17, 128, 129, 1000)."""

import pytest
import torch

import baracuda_kernels as bk
from cases import ALL_DTYPES, DEVICE, HAS_CUDA
from oracle import assert_matches_oracle, dense_attention


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _oracle(q, k, v, lq, lk, causal, window, sinks, dy, dt, seq_pattern=None, bs=None):
    """Per-sequence dense attention in dtype dt -> (y [Tq,H,Dv], lse [H,Tq], grads);
    seq_pattern [S, Hp, a, b]: sequence s's own block pattern (blocks of bs tokens)."""
    qx, kx, vx = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
    G = q.shape[1] // k.shape[1]
    ys, lses = [], []
    cq, ck = _cu(lq).tolist(), _cu(lk).tolist()
    for s in range(len(lq)):
        qs = qx[cq[s]:cq[s + 1]].permute(1, 0, 2)[None]
        ks = kx[ck[s]:ck[s + 1]].permute(1, 0, 2)[None].repeat_interleave(G, 1)
        vs = vx[ck[s]:ck[s + 1]].permute(1, 0, 2)[None].repeat_interleave(G, 1)
        blocks, block = torch.ones(1, 1, 1, 1, dtype=torch.bool), 1 << 20
        if seq_pattern is not None:
            blocks, block = seq_pattern[s:s + 1], bs
            if blocks.shape[1] not in (1, q.shape[1]):  # per K/V head: expand to the group
                blocks = blocks.repeat_interleave(G, 1)
        y, lse = dense_attention(qs, ks, vs, blocks, block, causal, dtype=dt,
                                 window_size=window, sink_tokens=sinks)
        ys.append(y[0].permute(1, 0, 2))
        lses.append(lse[0])
    tail = q.shape[0] - cq[-1]  # pack padding: y = 0, lse = -inf
    ys.append(torch.zeros(tail, q.shape[1], v.shape[2], dtype=dt))
    lses.append(torch.full((q.shape[1], tail), float("-inf"), dtype=ys[0].dtype
                           if dt == torch.float64 else torch.float32))
    y, lse = torch.cat(ys, 0), torch.cat(lses, 1)
    grads = torch.autograd.grad(y, (qx, kx, vx), dy.to(dt))
    return y, lse, grads


def check_varlen(backend, dtype, lq, lk, causal, window=(-1, -1), sinks=0, *, H=4, Hkv=2,
                 bs=16, pad=0, pattern_density=None, seed=0, seq_density=None, seq_heads=1):
    gen = torch.Generator().manual_seed(seed)
    Tq, Tk = sum(lq) + pad, sum(lk) + pad
    q = (torch.randn(Tq, H, 16, generator=gen) * 2).to(dtype)
    k = torch.randn(Tk, Hkv, 16, generator=gen).to(dtype)
    v = torch.randn(Tk, Hkv, 24, generator=gen).to(dtype)
    pattern = None
    if pattern_density is not None:
        pattern = torch.rand(1, 1, -(-Tq // bs), -(-Tk // bs), generator=gen) < pattern_density
    seq_pattern = None
    if seq_density is not None:  # one pattern per sequence, in its own block coordinates
        seq_pattern = torch.rand(len(lq), seq_heads, -(-max(lq) // bs) + 1, -(-max(lk) // bs),
                                 generator=gen) < seq_density
    dy = torch.randn(Tq, H, 24, generator=gen).to(dtype)
    qd, kd, vd = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    y, lse = bk.block_sparse_attention_varlen(
        qd, kd, vd, _cu(lq).to(DEVICE), _cu(lk).to(DEVICE), max_seqlen_q=max(lq),
        max_seqlen_k=max(lk), block_size=bs, is_causal=causal, window_size=window,
        sink_tokens=sinks, return_lse=True, backend=backend,
        block_pattern=None if pattern is None else pattern.to(DEVICE),
        sequence_pattern=None if seq_pattern is None else seq_pattern.to(DEVICE))
    assert y.shape == (Tq, H, 24) and lse.shape == (H, Tq)
    grads = torch.autograd.grad(y, (qd, kd, vd), dy.to(DEVICE))
    if pattern is not None:  # the oracle of a pack pattern: mask blocks in pack coordinates
        return y, grads
    y64, lse64, g64 = _oracle(q, k, v, lq, lk, causal, window, sinks, dy, torch.float64,
                              seq_pattern, bs)
    ys, lses, gs = _oracle(q, k, v, lq, lk, causal, window, sinks, dy, dtype, seq_pattern, bs)
    assert_matches_oracle(y.cpu(), y64, ys)
    assert_matches_oracle(lse.cpu(), lse64, lses, what="lse")
    for name, g, r, s in zip(("dq", "dk", "dv"), grads, g64, gs):
        assert_matches_oracle(g.cpu(), r, s, factor=3.0, what=name)
    return y, grads


CPU_CASES = [
    ("causal", [1, 17, 40, 33, 70], [1, 17, 40, 33, 70], True, (-1, -1), 0, 0),
    ("bidirectional", [5, 29, 50], [5, 29, 50], False, (-1, -1), 0, 3),
    ("bottom-right", [3, 20, 9], [10, 45, 9], "bottom_right", (-1, -1), 0, 0),
    ("window+sinks", [1, 17, 60, 33], [1, 17, 60, 33], True, (12, 0), 3, 0),
    ("window-bidir", [30, 41], [30, 41], False, (7, 5), 0, 0),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_varlen_matches_oracle_cpu(backend, case):
    if HAS_CUDA:
        pytest.skip("the GPU grid below covers this")
    _, lq, lk, causal, window, sinks, pad = case
    check_varlen(backend, torch.float32 if backend == "triton" else torch.float64, lq, lk,
                 causal, window, sinks, pad=pad)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("causal,window,sinks", [(True, (-1, -1), 0), (False, (-1, -1), 0),
                                                 (True, (100, 0), 4)])
def test_varlen_issue_pack_gpu(backend, dtype, causal, window, sinks):
    lens = [1, 17, 128, 129, 1000]
    check_varlen(backend, dtype, lens, lens, causal, window, sinks, H=8, Hkv=2, bs=128)


SEQ_PATTERN_CASES = [
    # (name, lq, lk, causal, window, sinks, heads of the per-sequence pattern)
    ("seq-pattern-causal", [1, 17, 40, 33, 70], [1, 17, 40, 33, 70], True, (-1, -1), 0, 1),
    ("seq-pattern-per-head", [5, 29, 50], [5, 29, 50], False, (-1, -1), 0, 4),
    ("seq-pattern-kv-heads", [3, 20, 9], [10, 45, 9], "bottom_right", (-1, -1), 0, 2),
    ("seq-pattern-window", [1, 17, 60, 33], [1, 17, 60, 33], True, (12, 0), 3, 1),
]


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
@pytest.mark.parametrize("case", SEQ_PATTERN_CASES, ids=[c[0] for c in SEQ_PATTERN_CASES])
def test_varlen_sequence_pattern_cpu(backend, case):
    """One block pattern per sequence, in the sequence's own blocks: sequences start at odd
    pack offsets, so pack blocks cut sequence blocks; exact against the per-sequence oracle."""
    if HAS_CUDA:
        pytest.skip("the GPU grid below covers this")
    _, lq, lk, causal, window, sinks, heads = case
    check_varlen(backend, torch.float32 if backend == "triton" else torch.float64, lq, lk,
                 causal, window, sinks, seq_density=0.5, seq_heads=heads, bs=8, seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", SEQ_PATTERN_CASES, ids=[c[0] for c in SEQ_PATTERN_CASES])
def test_varlen_sequence_pattern_gpu(backend, dtype, case):
    _, lq, lk, causal, window, sinks, heads = case
    check_varlen(backend, dtype, lq, lk, causal, window, sinks, seq_density=0.5,
                 seq_heads=heads, bs=16, seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_varlen_sequence_pattern_issue_pack_gpu(dtype):
    """The issue's pack (1, 17, 128, 129, 1000) with 64-token sequence blocks, GQA 8 / 2."""
    lens = [1, 17, 128, 129, 1000]
    check_varlen("triton", dtype, lens, lens, True, H=8, Hkv=2, bs=64, seq_density=0.4,
                 seq_heads=8)


def test_varlen_sequence_pattern_validation():
    q = torch.randn(20, 2, 8)
    cu = torch.tensor([0, 7, 20])
    with pytest.raises(bk.InvalidProblem, match="sequence_pattern"):   # too few blocks
        bk.block_sparse_attention_varlen(q, q, q, cu, cu, block_size=8,
                                         sequence_pattern=torch.ones(2, 1, 1, 2, dtype=torch.bool))
    with pytest.raises(bk.InvalidProblem, match="sequence_pattern"):   # wrong sequence count
        bk.block_sparse_attention_varlen(q, q, q, cu, cu, block_size=8,
                                         sequence_pattern=torch.ones(3, 1, 2, 2, dtype=torch.bool))
    # An all-ones pattern is the plain pack; a pack pattern of ones ANDed changes nothing.
    ones = torch.ones(2, 1, 2, 2, dtype=torch.bool)
    y0 = bk.block_sparse_attention_varlen(q, q, q, cu, cu, block_size=8, is_causal=True)
    y1 = bk.block_sparse_attention_varlen(q, q, q, cu, cu, block_size=8, is_causal=True,
                                          sequence_pattern=ones,
                                          block_pattern=torch.ones(1, 2, 3, 3, dtype=torch.bool))
    torch.testing.assert_close(y0, y1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_varlen_bottom_right_gpu(dtype):
    check_varlen("triton", dtype, [1, 64, 300, 7], [200, 64, 900, 7], "bottom_right", H=8,
                 Hkv=1, bs=64)


def test_varlen_pattern_agrees_across_backends():
    """A pack-level pattern (blocks in pack coordinates) ANDed with the sequences: the two
    backends agree, and an all-ones pattern equals no pattern."""
    lens = [9, 40, 31]
    y_ref, g_ref = check_varlen("reference", torch.float64, lens, lens, True, pattern_density=0.6)
    y_tri, g_tri = check_varlen("triton", torch.float64, lens, lens, True, pattern_density=0.6)
    torch.testing.assert_close(y_tri, y_ref)
    for a, b in zip(g_tri, g_ref):
        torch.testing.assert_close(a, b)
    y_all, _ = check_varlen("reference", torch.float64, lens, lens, True, pattern_density=1.1)
    y_none, _ = check_varlen("reference", torch.float64, lens, lens, True)
    torch.testing.assert_close(y_all, y_none)


def test_varlen_validation():
    q = torch.randn(20, 2, 8)
    with pytest.raises(bk.InvalidProblem, match="cu_seqlens_q"):
        bk.block_sparse_attention_varlen(q, q, q, torch.tensor([0, 25]), torch.tensor([0, 20]))
    with pytest.raises(bk.InvalidProblem, match="cu_seqlens_k"):
        bk.block_sparse_attention_varlen(q, q, q, torch.tensor([0, 20]), torch.tensor([1, 20]))
    with pytest.raises(bk.InvalidProblem, match="sequences"):
        bk.block_sparse_attention_varlen(q, q, q, torch.tensor([0, 20]), torch.tensor([0, 5, 20]))
    with pytest.raises(bk.InvalidProblem, match="3 dims"):
        bk.block_sparse_attention_varlen(q[None], q, q, torch.tensor([0, 20]),
                                         torch.tensor([0, 20]))
    cu = torch.tensor([0, 20])
    with pytest.raises(bk.InvalidProblem, match="block_size"):   # was a ZeroDivisionError
        bk.block_sparse_attention_varlen(q, q, q, cu, cu, block_size=0)
    with pytest.raises(bk.InvalidProblem, match="window_size"):  # an int: was a TypeError
        bk.block_sparse_attention_varlen(q, q, q, cu, cu, is_causal=True, window_size=8)
