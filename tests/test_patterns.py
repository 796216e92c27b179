"""Tests of baracuda_kernels.attention.patterns.

Every builder is checked against a brute-force token-level rule written here with plain
Python predicates (no code shared with the builders): the block mask must be exactly the
set of blocks holding an allowed pair, the kernel's token mask must cover the rule, and
the exactness / extra-pair reports must match counts taken on dense token masks.
(Interop, drawing and scale: test_patterns_interop.py.)
"""

import itertools
import math

import pytest
import torch

from baracuda_kernels.attention import patterns as P
from baracuda_kernels.attention.patterns import BlockPattern
from oracle import token_mask, token_rule_mask
from baracuda_kernels.core import InvalidProblem


# ---------------------------------------------------------------------------------------
# brute-force helpers
def dense(pred, lq, lk, b=1, h=1):
    """bool [b, h, lq, lk] with pred(b, h, i, j) evaluated one pair at a time."""
    vals = [[[[bool(pred(bi, hi, i, j)) for j in range(lk)] for i in range(lq)]
             for hi in range(h)] for bi in range(b)]
    return torch.tensor(vals, dtype=torch.bool)


def blocks_any(tok, bs):
    """Blocks holding at least one True pair, by explicit loops over blocks."""
    b, h, lq, lk = tok.shape
    nq, nk = math.ceil(lq / bs), math.ceil(lk / bs)
    out = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    for qb in range(nq):
        for kb in range(nk):
            out[:, :, qb, kb] = tok[:, :, qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs].any(-1).any(-1)
    return out


def kernel_tokens(p):
    """Token pairs the kernel computes, from the block mask by repetition, and the kernel
    rules the pattern hands to the attention call (stated by the test oracle)."""
    bs = p.block_size
    t = p.mask.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :p.query_len, :p.key_len]
    rules = p.kernel_rules or {}
    if "block_bits" in rules:  # the bits of cut blocks state the pattern's own rule exactly
        t = t & p.to_dense_token_mask(rule=True)
    elif rules:
        prefix = rules.get("prefix_lengths")
        t = t & token_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), p.query_len, p.key_len,
                           1 << 20, p.is_causal and prefix is None,
                           rules.get("window_size", (-1, -1)), rules.get("sink_tokens", 0))
        t = t & token_rule_mask(t.shape[0], p.query_len, p.key_len, p.is_causal,
                                document_ids=rules.get("document_ids"), prefix_lengths=prefix)
    elif p.is_causal:
        t = t & torch.ones(p.query_len, p.key_len, dtype=torch.bool).tril()
    return t


def check_pattern(p, rule, minimal=True):
    """Check ``p`` against the dense token rule [B, H, lq, lk] (B/H = p's stored dims)."""
    assert isinstance(p, BlockPattern)
    bs, lq, lk = p.block_size, p.query_len, p.key_len
    assert p.mask.dtype == torch.bool and p.mask.dim() == 4
    assert (p.num_blocks_q, p.num_blocks_k) == (math.ceil(lq / bs), math.ceil(lk / bs))
    rule = rule.expand(p.batch, p.num_heads, lq, lk)
    has_prefix = "prefix_lengths" in (p.kernel_rules or {})  # causal relaxed by the prefix
    if p.is_causal and not has_prefix:
        rule = rule & torch.ones(lq, lk, dtype=torch.bool).tril()
    if minimal:
        assert torch.equal(p.mask, blocks_any(rule, bs)), "block mask is not the minimal cover"
    kern = kernel_tokens(p)
    assert torch.equal(p.to_dense_token_mask(), kern)
    assert not (rule & ~kern).any(), "a pair allowed by the rule is not computed"
    extra = int((kern & ~rule).sum())
    assert p.computed_token_pairs() == int(kern.sum())
    # FLOP convention: active blocks the causal mask does not empty, ragged tails cut
    tiles = 0
    for bi, hi, qb, kb in p.mask.nonzero().tolist():
        rows = min(lq, (qb + 1) * bs) - qb * bs
        cols = min(lk, (kb + 1) * bs) - kb * bs
        if not p.is_causal or kb * bs <= qb * bs + rows - 1:
            tiles += rows * cols
    assert p.flop_token_pairs() == tiles
    assert p.rule_token_pairs() == int(rule.sum())
    assert p.extra_token_pairs == extra
    assert p.exact == (extra == 0)
    assert torch.equal(p.to_dense_token_mask(rule=True), rule)
    # exact blocks: every computed pair of the block is allowed
    bad = blocks_any(kern & ~rule, bs)
    assert torch.equal(p.exact_mask, p.mask & ~bad)
    rep = p.coarsening_report()
    assert rep.coarsened_blocks == int((p.mask & bad).sum())
    # the generic (rule-evaluating) count agrees with the builder's closed form (without
    # kernel rules, which the generic pattern does not have)
    if p.kernel_rules is None:
        generic = BlockPattern(p.mask, block_size=bs, query_len=lq, key_len=lk,
                               is_causal=p.is_causal, token_rule=p.token_rule)
        assert generic.extra_token_pairs == extra


# ---------------------------------------------------------------------------------------
# builders against brute force
@pytest.mark.parametrize("lq,lk,bs", [(16, 16, 4), (37, 37, 8), (37, 20, 8), (20, 37, 16),
                                      (1, 1, 4), (9, 9, 1)])
def test_causal(lq, lk, bs):
    p = P.causal(lq, lk, block_size=bs)
    assert p.is_causal and p.exact
    check_pattern(p, dense(lambda b, h, i, j: j <= i, lq, lk))


SW_CASES = list(itertools.product([1, 5, 8, 40], [True, False], [0, 3, 9],
                                  [None, [0], [5, 17, 36]]))


@pytest.mark.parametrize("window,is_causal,sinks,glob", SW_CASES)
def test_sliding_window(window, is_causal, sinks, glob):
    n, bs = 37, 8
    g = set(glob or [])
    p = P.sliding_window(n, window, block_size=bs, causal=is_causal, sinks=sinks,
                         global_tokens=glob)
    assert p.is_causal == is_causal

    def pred(b, h, i, j):
        near = (0 <= i - j < window) if is_causal else (abs(i - j) < window)
        return near or j < sinks or i in g or j in g

    check_pattern(p, dense(pred, n, n))


@pytest.mark.parametrize("lq,lk,bs,is_causal", [(30, 45, 4, True), (45, 30, 4, False),
                                                (45, 30, 16, True), (64, 64, 16, True)])
def test_sliding_window_lengths(lq, lk, bs, is_causal):
    g = {2, 40}
    p = P.sliding_window(lq, 6, block_size=bs, causal=is_causal, sinks=2, global_tokens=[2, 40],
                         key_len=lk)

    def pred(b, h, i, j):
        near = (0 <= i - j < 6) if is_causal else (abs(i - j) < 6)
        return near or j < 2 or i in g or j in g

    check_pattern(p, dense(pred, lq, lk))


def test_sliding_window_exact_and_coarsened_cases():
    # a window covering everything in causal mode is exactly causal
    assert P.sliding_window(64, 64, block_size=16).exact
    # a narrow window cuts blocks, and the kernels cut them per token: exact
    p = P.sliding_window(64, 5, block_size=16, sinks=3)
    assert p.exact and p.kernel_rules == dict(window_size=(4, 0), sink_tokens=3)
    # a global token does not fill its block: coarsened, and the report says by how much
    p = P.sliding_window(64, 5, block_size=16, global_tokens=[3])
    assert p.kernel_rules is None and not p.exact and p.extra_token_pairs > 0
    assert "coarsened" in str(p.coarsening_report())


@pytest.mark.parametrize("window,dilation,is_causal,bs",
                         [(w, d, c, bs) for w in (1, 3, 5) for d in (1, 2, 3, 9)
                          for c in (True, False) for bs in (4, 8)])
def test_dilated_sliding_window(window, dilation, is_causal, bs):
    n = 37
    p = P.dilated_sliding_window(n, window, dilation, block_size=bs, causal=is_causal)
    ks = range(0, window) if is_causal else range(-window + 1, window)

    def pred(b, h, i, j):
        return any(j == i - k * dilation for k in ks)

    check_pattern(p, dense(pred, n, n))


def test_dilated_sliding_window_lengths():
    p = P.dilated_sliding_window(29, 4, 5, block_size=4, causal=True, key_len=41)
    check_pattern(p, dense(lambda b, h, i, j: any(j == i - 5 * k for k in range(4)), 29, 41))


@pytest.mark.parametrize("glob", [[0], [0, 1, 2, 3], [13, 30]])
def test_longformer(glob):
    n, w = 37, 4
    p = P.longformer(n, w, glob, block_size=4)
    assert not p.is_causal
    g = set(glob)
    check_pattern(p, dense(lambda b, h, i, j: abs(i - j) < w or i in g or j in g, n, n))


@pytest.mark.parametrize("stride,bs,split", [(3, 4, False), (8, 4, False), (13, 4, True),
                                             (6, 2, False), (16, 8, True)])
def test_sparse_transformer_strided(stride, bs, split):
    n = 37
    p = P.sparse_transformer_strided(n, stride, block_size=bs, split_heads=split)
    assert p.is_causal

    def local(i, j):
        return i - j < stride

    def strided(i, j):
        return (i - j) % stride == 0

    if split:
        assert p.num_heads == 2
        rule = dense(lambda b, h, i, j: local(i, j) if h == 0 else strided(i, j), n, n, h=2)
    else:
        rule = dense(lambda b, h, i, j: local(i, j) or strided(i, j), n, n)
    check_pattern(p, rule)


@pytest.mark.parametrize("stride,summary,is_causal,split,bs",
                         [(4, 1, True, False, 2), (6, 2, True, False, 4), (8, 3, False, False, 4),
                          (8, 8, False, False, 8), (5, 2, True, True, 4), (16, 1, False, True, 8)])
def test_sparse_transformer_fixed(stride, summary, is_causal, split, bs):
    n = 37
    p = P.sparse_transformer_fixed(n, stride, block_size=bs, summary=summary, causal=is_causal,
                                   split_heads=split)
    assert p.is_causal == is_causal

    def chunk(i, j):
        return i // stride == j // stride

    def summ(i, j):
        return j % stride >= stride - summary

    if split:
        rule = dense(lambda b, h, i, j: chunk(i, j) if h == 0 else summ(i, j), n, n, h=2)
    else:
        rule = dense(lambda b, h, i, j: chunk(i, j) or summ(i, j), n, n)
    check_pattern(p, rule)


def test_sparse_transformer_fixed_chunk_exact_when_aligned():
    p = P.sparse_transformer_fixed(64, 16, block_size=8, summary=8, causal=False)
    assert p.exact


@pytest.mark.parametrize("seed,heads", [(0, 1), (3, 2)])
def test_bigbird(seed, heads):
    n, bs, w, r = 40, 4, 3, 2
    glob = [0, 1]
    p = P.bigbird(n, block_size=bs, window=w, global_tokens=glob, num_random_blocks=r,
                  seed=seed, num_heads=heads)
    assert p.shape == (1, heads, 10, 10) and not p.is_causal
    # the random draw, restated: per head and query block the r highest uniform scores
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(heads, 10, 10, generator=gen)
    rnd = torch.zeros(heads, 10, 10, dtype=torch.bool)
    for h in range(heads):
        for qb in range(10):
            for kb in scores[h, qb].argsort(descending=True)[:r].tolist():
                rnd[h, qb, kb] = True

    def pred(b, h, i, j):
        return abs(i - j) < w or i in glob or j in glob or bool(rnd[h, i // bs, j // bs])

    check_pattern(p, dense(pred, n, n, h=heads))
    again = P.bigbird(n, block_size=bs, window=w, global_tokens=glob, num_random_blocks=r,
                      seed=seed, num_heads=heads)
    assert torch.equal(again.mask, p.mask)


@pytest.mark.parametrize("lens,bs,is_causal", [([5, 11, 21], 4, False), ([5, 11, 21], 8, True),
                                               ([8, 8, 16], 8, False), ([8, 8, 16], 8, True),
                                               ([[10, 27], [37], [1, 1, 35]], 4, True),
                                               ([37], 16, False)])
def test_document_mask(lens, bs, is_causal):
    p = P.document_mask(lens, block_size=bs, causal=is_causal)
    rows = lens if isinstance(lens[0], list) else [lens]
    docs = [[d for d, length in enumerate(r) for _ in range(length)] for r in rows]
    n = len(docs[0])
    assert p.query_len == n and p.batch == len(rows) and p.is_causal == is_causal
    check_pattern(p, dense(lambda b, h, i, j: docs[b][i] == docs[b][j], n, n, b=len(rows)))
    if lens == [8, 8, 16]:
        assert p.exact                      # boundaries on block multiples


@pytest.mark.parametrize("prefix,bs", [(0, 4), (10, 4), (37, 8), (16, 8), ([3, 20], 4)])
def test_prefix_lm(prefix, bs):
    n = 37
    pl = prefix if isinstance(prefix, list) else [prefix]
    p = P.prefix_lm(n, prefix, block_size=bs)
    assert p.is_causal and p.exact and p.batch == len(pl)
    check_pattern(p, dense(lambda b, h, i, j: j <= i or j < pl[b], n, n, b=len(pl)))


@pytest.mark.parametrize("density,is_causal", [(0.0, False), (0.3, False), (1.0, False),
                                               (0.5, True)])
def test_random_blocks(density, is_causal):
    p = P.random_blocks(37, 50, block_size=4, density=density, seed=7, batch=2, num_heads=3,
                        causal=is_causal)
    nq, nk = 10, 13
    assert p.shape == (2, 3, nq, nk) and p.is_causal == is_causal
    cand = torch.ones(nq, nk, dtype=torch.bool)
    if is_causal:
        cand = torch.tensor([[kb * 4 <= min(qb * 4 + 3, 36) for kb in range(nk)] for qb in range(nq)])
    want = round(density * int(cand.sum()))
    assert (p.mask.sum((-1, -2)) == want).all()
    assert not (p.mask & ~cand).any()
    assert p.exact
    check_pattern(p, blocks_to_tokens(p.mask, 4, 37, 50), minimal=False)
    assert torch.equal(p.mask, P.random_blocks(37, 50, block_size=4, density=density, seed=7,
                                               batch=2, num_heads=3, causal=is_causal).mask)
    if 0 < density < 1:
        other = P.random_blocks(37, 50, block_size=4, density=density, seed=8, batch=2,
                                num_heads=3, causal=is_causal)
        assert not torch.equal(other.mask, p.mask)
        assert not torch.equal(p.mask[0, 0], p.mask[0, 1])       # heads differ


def blocks_to_tokens(mask, bs, lq, lk):
    return mask.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :lq, :lk]


def test_per_head():
    n, bs = 37, 4
    heads = [P.sliding_window(n, 5, block_size=bs),
             lambda: P.causal(n, block_size=bs),
             P.dilated_sliding_window(n, 3, 6, block_size=bs)]
    p = P.per_head(heads)
    assert p.shape == (1, 3, 10, 10) and p.is_causal

    def pred(b, h, i, j):
        return [0 <= i - j < 5, j <= i, any(j == i - 6 * k for k in range(3))][h]

    check_pattern(p, dense(pred, n, n, h=3))
    # batch broadcasting: prefix_lm with per-batch prefixes next to a broadcast pattern
    q = P.per_head([P.prefix_lm(n, [4, 30], block_size=bs), P.random_blocks(n, block_size=bs,
                                                                           density=0.2,
                                                                           causal=True)])
    assert q.shape == (2, 2, 10, 10)
    assert torch.equal(q.mask[1, 1], q.mask[0, 1])
    with pytest.raises(InvalidProblem, match="is_causal"):
        P.per_head([P.causal(n, block_size=bs), P.random_blocks(n, block_size=bs, density=0.2)])
    with pytest.raises(InvalidProblem, match="heads"):
        P.per_head([p])


def test_stacked_tensor_and_uint8():
    t = (torch.rand(2, 3, 5, 5) < 0.4).to(torch.uint8)
    p = BlockPattern(t, block_size=16, query_len=70, key_len=80)
    assert p.mask.dtype == torch.bool and torch.equal(p.mask, t.bool()) and p.exact
    q = BlockPattern(t[0, 0].bool(), block_size=16, query_len=70, key_len=80)
    assert q.shape == (1, 1, 5, 5)


# ---------------------------------------------------------------------------------------
# from token masks and mask functions
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape,bs", [((37, 41), 4), ((2, 33, 33), 8), ((2, 1, 20, 20), 5)])
def test_from_token_mask(shape, bs, is_causal):
    gen = torch.Generator().manual_seed(1)
    tm = torch.rand(*shape, generator=gen) < 0.03
    tm[..., :bs, :bs] = True                          # one fully allowed block
    p = P.from_token_mask(tm, block_size=bs, is_causal=is_causal)
    full = tm
    while full.dim() < 4:
        full = full.unsqueeze(0)
    check_pattern(p, full)
    if not is_causal:
        assert p.exact_mask[..., 0, 0].all()


def test_from_mask_fn_matches_token_mask_and_builder():
    doc = torch.tensor([0] * 13 + [1] * 40 + [2] * 11)

    def doc_causal(b, h, q, kv):
        return (doc[q] == doc[kv]) & (kv <= q)

    n = 64
    q = torch.arange(n)
    tm = doc_causal(None, None, q[:, None], q[None, :])
    p = P.from_mask_fn(doc_causal, n, block_size=8, chunk_pairs=300)       # many chunks
    ref = P.from_token_mask(tm, block_size=8)
    assert torch.equal(p.mask, ref.mask) and torch.equal(p.exact_mask, ref.exact_mask)
    assert p.extra_token_pairs == ref.extra_token_pairs
    check_pattern(p, tm[None, None])
    # a head-dependent function: window grows with the head index
    f = lambda b, h, q, kv: (q - kv >= 0) & (q - kv < 4 * (h + 1))          # noqa: E731
    ph = P.from_mask_fn(f, 40, block_size=4, num_heads=2, is_causal=True)
    sw = P.per_head([P.sliding_window(40, 4, block_size=4), P.sliding_window(40, 8, block_size=4)])
    assert torch.equal(ph.mask, sw.mask) and ph.rule_token_pairs() == sw.rule_token_pairs()
    assert ph.exact and ph.extra_token_pairs == 0 < sw.extra_token_pairs  # bits vs blocks
    # many chunks: slots of every chunk point at that chunk's bits
    assert torch.equal(p.kernel_rules["block_bits"].words, ref.kernel_rules["block_bits"].words)


def test_from_mask_fn_long_sequence_chunked():
    n, w = 4096, 300

    def sw(b, h, q, kv):
        return (q - kv >= 0) & (q - kv < w)

    p = P.from_mask_fn(sw, n, block_size=128, is_causal=True, chunk_pairs=1 << 20)   # 16 chunks
    ref = P.sliding_window(n, w, block_size=128)
    assert torch.equal(p.mask, ref.mask)
    coarse = BlockPattern(ref.mask, block_size=128, query_len=n, is_causal=True,
                          token_rule=ref.token_rule)       # the window without kernel rules
    # The same rule, exact through the bits of the blocks the window cuts.
    assert p.exact and coarse.extra_token_pairs > 0
    assert p.computed_token_pairs() == coarse.rule_token_pairs() == p.rule_token_pairs()
    assert p.kernel_rules["block_bits"].num_cut_blocks == int((p.mask & ~coarse.exact_mask).sum())


def test_from_mask_fn_bad_shape():
    with pytest.raises(InvalidProblem, match="broadcast"):
        P.from_mask_fn(lambda b, h, q, kv: torch.ones(3, 3, dtype=torch.bool), 10, block_size=4)


# ---------------------------------------------------------------------------------------
# combinators
def test_combinators():
    n, bs = 37, 4
    a = P.sliding_window(n, 6, block_size=bs, sinks=2)                      # causal
    b = P.random_blocks(n, block_size=bs, density=0.4, seed=2, num_heads=2)  # not causal
    c = P.sparse_transformer_fixed(n, 8, block_size=bs, causal=True)
    ra = dense(lambda _b, h, i, j: (0 <= i - j < 6 or j < 2) and j <= i, n, n)
    rb = blocks_to_tokens(b.mask, bs, n, n)
    rc = dense(lambda _b, h, i, j: (i // 8 == j // 8 or j % 8 == 7) and j <= i, n, n)

    both = a & b
    assert both.is_causal and both.shape == (1, 2, 10, 10)
    assert torch.equal(both.mask, a.mask & b.mask)
    check_pattern(both, ra & rb, minimal=False)

    either = a | b
    assert not either.is_causal
    assert torch.equal(either.mask, a.mask | b.mask)
    check_pattern(either, ra | rb, minimal=False)

    ac = a | c
    assert ac.is_causal
    check_pattern(ac, ra | rc, minimal=False)

    inv = ~a
    assert not inv.is_causal and torch.equal(inv.mask, ~a.mask) and inv.exact
    check_pattern(inv, blocks_to_tokens(~a.mask, bs, n, n))

    # a batch-broadcast document mask (B = 1) combined with a B = 2 pattern
    d = P.document_mask([10, 27], block_size=bs) & P.prefix_lm(n, [5, 20], block_size=bs)
    assert d.batch == 2
    docs = [0] * 10 + [1] * 27
    rd = dense(lambda _b, h, i, j: docs[i] == docs[j] and (j <= i or j < [5, 20][_b]), n, n, b=2)
    check_pattern(d, rd, minimal=False)

    assert (a & P.causal(n, block_size=bs)) == a
    with pytest.raises(InvalidProblem, match="geometry"):
        a & P.causal(n + 1, block_size=bs)
    with pytest.raises(InvalidProblem, match="geometry"):
        a | P.causal(n, block_size=8)
    with pytest.raises(InvalidProblem, match="heads"):
        b & P.random_blocks(n, block_size=bs, density=0.4, num_heads=3)
    with pytest.raises(InvalidProblem, match="BlockPattern"):
        a & a.mask


# ---------------------------------------------------------------------------------------
# introspection, immutability, validation
def test_introspection():
    p = P.sliding_window(100, 10, block_size=16, sinks=4)
    assert p.nbytes == 49 and p.num_active_blocks() == int(p.mask.sum())
    assert p.density() == pytest.approx(int(p.mask.sum()) / 49)
    assert torch.equal(p.row_counts(), p.mask.sum(-1)) and p.row_counts().dtype == torch.int64
    assert torch.equal(p.col_counts(), p.mask.sum(-2))
    assert p.to("cpu") is p and p.cpu() is p
    with pytest.raises(AttributeError):
        p.block_size = 32
    with pytest.raises(InvalidProblem, match="max_elements"):
        p.to_dense_token_mask(max_elements=100)


def test_validation_errors():
    with pytest.raises(InvalidProblem, match=r"expected \[B, H, 2, 2\]"):
        BlockPattern(torch.ones(3, 3, dtype=torch.bool), block_size=64, query_len=128)
    with pytest.raises(InvalidProblem, match="dtype"):
        BlockPattern(torch.ones(2, 2), block_size=64, query_len=128)
    with pytest.raises(InvalidProblem, match="block_size"):
        P.causal(10, block_size=0)
    with pytest.raises(InvalidProblem, match="range"):
        P.sliding_window(100, 8, block_size=16, global_tokens=5)
    with pytest.raises(InvalidProblem, match=r"\[0, 100\)"):
        P.sliding_window(100, 8, block_size=16, global_tokens=[100])
    with pytest.raises(InvalidProblem, match="window"):
        P.sliding_window(100, 0, block_size=16)
    with pytest.raises(InvalidProblem, match="density"):
        P.random_blocks(100, block_size=16, density=1.5)
    with pytest.raises(InvalidProblem, match="total"):
        P.document_mask([[3, 4], [5]], block_size=4)
    with pytest.raises(InvalidProblem, match="prefix_len"):
        P.prefix_lm(10, 11, block_size=4)
    with pytest.raises(InvalidProblem, match="summary"):
        P.sparse_transformer_fixed(10, 4, block_size=4, summary=5)
