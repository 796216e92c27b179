"""Tests of baracuda_kernels.attention.patterns, continued (test_patterns.py has the
builders against brute force, token masks and mask functions, combinators, validation):
BSR and FlexAttention interop, drawing, a million-token pattern, moving to CUDA.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from baracuda_kernels.attention import patterns as P
from baracuda_kernels.attention.patterns import BlockPattern
from baracuda_kernels.core import InvalidProblem, Unsupported


# ---------------------------------------------------------------------------------------
# BSR and FlexAttention interop
def test_bsr_round_trip():
    p = P.random_blocks(70, 90, block_size=16, density=0.3, seed=4, batch=2, num_heads=3)
    indptr, indices = p.to_bsr()
    assert indptr.shape == (2 * 3 * 5 + 1,) and indices.shape == (int(p.mask.sum()),)
    # row by row, against the mask
    rows = p.mask.reshape(-1, 6)
    for r in range(rows.shape[0]):
        assert indices[indptr[r]:indptr[r + 1]].tolist() == rows[r].nonzero().reshape(-1).tolist()
    q = BlockPattern.from_bsr(indptr, indices, block_size=16, query_len=70, key_len=90,
                              batch=2, num_heads=3)
    assert q == p
    empty = BlockPattern(torch.zeros(4, 4, dtype=torch.bool), block_size=8, query_len=32)
    assert P.from_bsr(*empty.to_bsr(), block_size=8, query_len=32) == empty
    with pytest.raises(InvalidProblem, match="indptr"):
        P.from_bsr(indptr[:-1], indices, block_size=16, query_len=70, key_len=90, batch=2,
                   num_heads=3)
    with pytest.raises(InvalidProblem, match="indices"):
        P.from_bsr(indptr, indices + 10, block_size=16, query_len=70, key_len=90, batch=2,
                   num_heads=3)


needs_flex = pytest.mark.skipif(not P.flex_available(),
                                reason="torch.nn.attention.flex_attention.BlockMask not available")


def flex_cases():
    return [P.sliding_window(200, 70, block_size=32, sinks=3),                  # causal, ragged
            P.random_blocks(130, 100, block_size=32, density=0.4, num_heads=2),
            P.prefix_lm(128, [16, 90], block_size=16),
            P.document_mask([50, 30, 48], block_size=16, causal=True)]


@needs_flex
@pytest.mark.parametrize("idx", range(4))
def test_flex_round_trip(idx):
    from torch.nn.attention.flex_attention import create_mask
    p = flex_cases()[idx]
    bm = p.to_flex_block_mask()
    assert bm.BLOCK_SIZE == (p.block_size, p.block_size)
    assert tuple(bm.seq_lengths) == (p.query_len, p.key_len)
    assert torch.equal(bm.to_dense().bool(), p.mask)        # builders keep no dead blocks
    # full blocks: no causal cut and no ragged tail
    full = P.interop._dense(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert not (full & ~p.mask).any()
    bs = p.block_size
    for qb, kb in full[0, 0].nonzero().tolist():
        assert (qb + 1) * bs <= p.query_len and (kb + 1) * bs <= p.key_len
        assert not p.is_causal or (kb + 1) * bs - 1 <= qb * bs or \
            "prefix_lengths" in p.kernel_rules       # a prefix lifts the causal cut
    tok = create_mask(bm.mask_mod, p.batch, p.num_heads, p.query_len, p.key_len, device="cpu")
    assert torch.equal(tok, p.to_dense_token_mask())
    back = P.from_flex_block_mask(bm, is_causal=p.is_causal)
    assert back == p
    if p.kernel_rules is None:
        assert back.extra_token_pairs == 0   # the mask_mod only restates the blocks


@needs_flex
def test_flex_attention_matches_dense_sdpa():
    import warnings
    from torch.nn.attention.flex_attention import flex_attention
    p = P.sliding_window(96, 20, block_size=32, sinks=2)
    q, k, v = (torch.randn(1, 2, 96, 16, dtype=torch.float64) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                # eager (non-compiled) flex warning
        y = flex_attention(q, k, v, block_mask=p.to_flex_block_mask())
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                           attn_mask=p.to_dense_token_mask())
    torch.testing.assert_close(y, ref)


@needs_flex
def test_from_flex_create_block_mask():
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    def sw(b, h, q, kv):
        return (q - kv >= 0) & (q - kv < 50)

    bm = create_block_mask(sw, None, None, 300, 300, device="cpu", BLOCK_SIZE=32)
    p = P.from_flex_block_mask(bm, is_causal=True)
    ref = P.sliding_window(300, 50, block_size=32)
    assert torch.equal(p.mask, ref.mask)
    # the mask_mod is the token rule: dropping it in partial blocks is the coarsening (the
    # sliding_window builder hands its rule to the kernels instead, and is exact)
    coarse = BlockPattern(ref.mask, block_size=32, query_len=300, is_causal=True,
                          token_rule=ref.token_rule)
    assert p.extra_token_pairs == coarse.extra_token_pairs > 0 and ref.exact
    odd = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, BLOCK_SIZE=(32, 64),
                                   seq_lengths=(300, 600))
    with pytest.raises(Unsupported, match="square"):
        P.from_flex_block_mask(odd)


# ---------------------------------------------------------------------------------------
# drawing
def test_text_drawing():
    p = P.causal(64, block_size=16)
    s = str(p)
    assert "block_size=16" in s and "is_causal=True" in s and "exact" in s
    assert "█···\n██··\n███·\n████" in s
    assert repr(p) == s
    big = P.random_blocks(300 * 8, block_size=8, density=0.1, num_heads=6)
    text = big.draw(max_rows=20, max_cols=40)
    grid = [ln for ln in text.splitlines() if set(ln) <= set("█▒·") and ln]
    assert grid and all(len(ln) <= 40 for ln in grid) and len(grid) <= 4 * 20
    assert "more slices" in text and "each character" in text


def test_matplotlib_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import now raises ImportError
    p = P.causal(64, block_size=16)
    with pytest.raises(Unsupported, match="pip install matplotlib"):
        p.save_png("never.png")
    with pytest.raises(Unsupported, match="pip install matplotlib"):
        p.plot()


def test_save_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install matplotlib)")
    p = P.sliding_window(4096, 300, block_size=64, sinks=4)
    path = tmp_path / "p.png"
    p.save_png(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.figure import Figure
    ax = p.plot(Figure().subplots())
    assert ax.get_xlabel() == "key token"


# ---------------------------------------------------------------------------------------
# scale
def test_one_million_token_sliding_window_bounded():
    """1M tokens, block 128: an 8192 x 8192 block mask (64 MiB) from index arithmetic.
    Run in a fresh process so that its peak memory is measured on its own."""
    code = textwrap.dedent("""
        import resource, time, torch
        from baracuda_kernels.attention.patterns import sliding_window
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        p = sliding_window(1 << 20, 4096, block_size=128, sinks=4, global_tokens=[0, 777777])
        build = time.perf_counter() - t
        extra = p.extra_token_pairs
        total = time.perf_counter() - t
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        rows = p.row_counts()
        print(p.shape, build, total, grown, int(rows.max()), extra, p.exact)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(os.path.dirname(__file__), "..", "src"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    shape, rest = out.stdout.strip().split(")", 1)
    build, total, grown_mib, max_row, extra, exact = rest.split()
    assert shape.endswith("1, 1, 8192, 8192")
    assert float(build) < 10 and float(total) < 20
    assert float(grown_mib) < 1024          # the mask is 64 MiB; N x N tokens would be 1 TiB
    assert int(max_row) == 777777 // 128 + 1  # the global query sees every earlier key block
    assert int(extra) > 0 and exact == "False"


# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_to_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    p = P.sliding_window(1000, 100, block_size=64, sinks=4)
    g = p.to("cuda")
    assert g.mask.is_cuda and g.block_size == 64 and g.is_causal
    assert torch.equal(g.mask.cpu(), p.mask)
    assert g.extra_token_pairs == p.extra_token_pairs
    assert g.coarsening_report().coarsened_blocks == p.coarsening_report().coarsened_blocks
    assert torch.equal(g.to_dense_token_mask().cpu(), p.to_dense_token_mask())
    bm = g.to_flex_block_mask()
    assert bm.kv_indices.is_cuda
