"""KV-cache block selection (Quest-style upper bounds): the bounds bound every real score,
the selection keeps the top blocks by bound plus the first / last valid blocks and never a
block with no cached key, and attention over the selection is exact for the kept blocks
(and dense when every block is kept)."""

import pytest
import torch

import baracuda_kernels as bk
from baracuda_kernels.patterns import key_block_bounds, select_key_blocks
from oracle import dense_attention


def _cache(seed=0, B=2, N=300, Hkv=2, D=8):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, Hkv, D, generator=gen, dtype=torch.float64),
            torch.randn(B, N, Hkv, D, generator=gen, dtype=torch.float64),
            torch.randn(B, 3, 4 * Hkv, D, generator=gen, dtype=torch.float64))


def test_bounds_bound_every_score():
    kc, _, q = _cache()
    lens = torch.tensor([300, 111])
    b = key_block_bounds(kc, lens, block_size=32)
    assert b.valid.tolist() == [[True] * 10, [True] * 4 + [False] * 6]
    G = q.shape[2] // kc.shape[2]
    for row in range(2):
        for j in range(10):
            lo, hi = j * 32, min((j + 1) * 32, int(lens[row]))
            if lo >= hi:
                continue
            for h in range(q.shape[2]):
                keys = kc[row, lo:hi, h // G]                             # [n, D]
                qh = q[row, :, h]                                         # [Nq, D]
                actual = (qh @ keys.T).amax(-1)                           # [Nq]
                blo, bhi = b.lo[row, h // G, j].double(), b.hi[row, h // G, j].double()
                bound = torch.maximum(qh * blo, qh * bhi).sum(-1)
                assert torch.all(actual <= bound + 1e-5)


def test_selection_rules():
    kc, _, q = _cache(1)
    lens = torch.tensor([300, 70])
    b = key_block_bounds(kc, lens, block_size=32)
    keep = select_key_blocks(q, b, keep=2)
    assert keep.shape == (2, 2, 1, 10) and keep.dtype == torch.bool
    assert torch.all(keep[:, :, 0, 0])                                   # the first block
    assert torch.all(keep[0, :, 0, 9]) and torch.all(keep[1, :, 0, 2])   # the last valid one
    assert not keep[1, :, 0, 3:].any()                                   # no cached key there
    assert keep[0].sum(-1).max() <= 4
    none = select_key_blocks(q, b, keep=0, always_first=0, always_last=0)
    assert not none.any()
    everything = select_key_blocks(q, b, keep=100)
    assert torch.equal(everything[:, :, 0], b.valid[:, None, :].expand(-1, 2, -1))
    with pytest.raises(bk.InvalidProblem, match="keep"):
        select_key_blocks(q, b, keep=-1)
    with pytest.raises(bk.InvalidProblem, match="does not fit"):
        select_key_blocks(q[..., :4], b, keep=2)


def test_attention_over_selection_is_exact_for_kept_blocks():
    kc, vc, q = _cache(2)
    lens = torch.tensor([300, 150])
    keep = select_key_blocks(q, key_block_bounds(kc, lens, 32), keep=3)
    y = bk.block_sparse_attention_with_kvcache(q, kc, vc, lens, block_pattern=keep,
                                               block_size=32, is_causal=False)
    G = q.shape[2] // kc.shape[2]
    for row in range(2):
        cols = torch.arange(300)
        for hk in range(2):
            kept = keep[row, hk, 0][cols // 32] & (cols < lens[row])
            kb = kc[row:row + 1, kept, hk:hk + 1].transpose(1, 2).expand(-1, G, -1, -1)
            vb = vc[row:row + 1, kept, hk:hk + 1].transpose(1, 2).expand(-1, G, -1, -1)
            qh = q[row:row + 1, :, hk * G:(hk + 1) * G].transpose(1, 2)
            yo, _ = dense_attention(qh, kb, vb, torch.ones(1, 1, 1, 1, dtype=torch.bool),
                                    1 << 20, False)
            torch.testing.assert_close(y[row:row + 1, :, hk * G:(hk + 1) * G],
                                       yo.transpose(1, 2))
