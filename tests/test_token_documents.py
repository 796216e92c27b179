"""Per-token rules that depend on data: document ids, query / key ranges (padding on either
side) and prefix-LM, exact per token. Checked against the float64 oracle on both backends,
forward and gradients, alone and combined with block patterns, GQA, causal rules and windows;
NaN in padding never reaches a valid output; block classes are exact inside documents.

CPU: reference in f64 and triton under the interpreter in f32; the GPU grid runs every dtype."""

import pytest
import torch

import baracuda_kernels as bk
from baracuda_kernels.attention import patterns as P
from baracuda_kernels.attention.block_sparse.block_lists import FULL, PARTIAL, SKIP, classify_blocks
from baracuda_kernels.attention.common.token_rules import TokenRules
from cases import ALL_DTYPES, HAS_CUDA, check_token_rule, nblocks
from oracle import token_rule_mask


def _docs(lengths_per_row):
    """int32 [B, N] document ids from per-row document lengths (rows must have equal sums)."""
    rows = [torch.cat([torch.full((n,), d, dtype=torch.int32) for d, n in enumerate(lens)])
            for lens in lengths_per_row]
    return torch.stack(rows)


DOCS_70 = _docs([[13, 30, 27], [1, 40, 29]])                   # boundaries at odd offsets
# (name, Nq, Nk, bs, is_causal, window, sinks, B, tokens)
CASES = [
    ("documents", 70, 70, 16, True, (-1, -1), 0, 2, dict(document_ids=DOCS_70)),
    ("documents-bidir", 70, 70, 16, False, (-1, -1), 0, 2, dict(document_ids=DOCS_70)),
    ("documents+window", 70, 70, 16, True, (9, 0), 2, 2, dict(document_ids=DOCS_70)),
    ("left-padding", 61, 61, 16, True, (-1, -1), 0, 2,
     dict(query_range=(torch.tensor([0, 17]), None), key_range=(torch.tensor([0, 17]), None))),
    ("right-padding", 61, 61, 16, False, (-1, -1), 0, 2,
     dict(query_range=(None, torch.tensor([61, 33])), key_range=(None, torch.tensor([50, 33])))),
    ("kv-cache", 5, 90, 32, "bottom_right", (-1, -1), 0, 2,
     dict(key_range=(torch.tensor([3, 0]), torch.tensor([90, 71])))),
    ("decode", 1, 75, 32, "bottom_right", (-1, -1), 0, 2,
     dict(key_range=(torch.tensor([5, 0]), None))),
    ("prefix-lm", 70, 70, 16, True, (-1, -1), 0, 2, dict(prefix_lengths=torch.tensor([21, 0]))),
    ("prefix+docs", 70, 70, 16, True, (-1, -1), 0, 2,
     dict(prefix_lengths=37, document_ids=DOCS_70)),
    ("pair-docs", 30, 75, 16, "bottom_right", (-1, -1), 0, 1,
     dict(document_ids=(torch.tensor([[0] * 10 + [1] * 20]),
                        torch.tensor([[0] * 40 + [1] * 35])))),
    ("negative-ids", 70, 70, 16, True, (-1, -1), 0, 2,
     dict(document_ids=torch.where(DOCS_70 == 1, -1, DOCS_70))),
]


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_token_rules_match_oracle_cpu(backend, case):
    if HAS_CUDA:
        pytest.skip("the GPU grid below covers this")
    _, Nq, Nk, bs, causal, window, sinks, B, tokens = case
    dtype = torch.float32 if backend == "triton" else torch.float64
    check_token_rule(backend, dtype, Nq, Nk, bs, causal, window, sinks, B=B, tokens=tokens,
                     prepared=case[0] == "documents", nan_padding=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_token_rules_match_oracle_gpu(backend, dtype, case):
    _, Nq, Nk, bs, causal, window, sinks, B, tokens = case
    check_token_rule(backend, dtype, Nq, Nk, bs, causal, window, sinks, B=B, tokens=tokens,
                     H=8, Hkv=2, prepared=case[0] == "documents", nan_padding=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_documents_at_scale_gpu(dtype):
    """Block 128 tiles (TMA paths on sm90), 8 documents of odd random lengths, GQA 8 / 2."""
    gen = torch.Generator().manual_seed(3)
    cuts = torch.sort(torch.randperm(1999, generator=gen)[:7] + 1).values.tolist()
    lens = [b - a for a, b in zip([0] + cuts, cuts + [2000])]
    docs = _docs([lens, lens[::-1]])
    check_token_rule("triton", dtype, 2000, 2000, 128, True, B=2, H=8, Hkv=2, density=1.0,
                     tokens=dict(document_ids=docs, key_range=(None, torch.tensor([2000, 1900]))),
                     nan_padding=True)


def test_padded_rows_give_zero_and_minus_inf():
    q = k = v = torch.randn(2, 2, 40, 8, dtype=torch.float64, requires_grad=True)
    p = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    y, lse = bk.block_sparse_attention(q, k, v, p, block_size=16, return_lse=True,
                                       query_range=(torch.tensor([0, 9]), 33))
    assert torch.all(y[1, :, :9] == 0) and torch.all(lse[1, :, :9] == float("-inf"))
    assert torch.all(y[:, :, 33:] == 0) and torch.all(lse[:, :, 33:] == float("-inf"))
    assert torch.isfinite(lse[0, :, :33]).all() and torch.isfinite(lse[1, :, 9:33]).all()
    (dq,) = torch.autograd.grad(y.sum() + lse.clamp(min=-1e9).sum(), (q,))
    assert torch.isfinite(dq).all()


def _block_classes(tokens, Nq, Nk, bs, causal):
    p = torch.ones(1, 1, nblocks(Nq, bs), nblocks(Nk, bs), dtype=torch.bool)
    return classify_blocks(p, Nq, Nk, bs, causal, None, tokens)


@pytest.mark.parametrize("causal", [False, True])
def test_document_block_classes(causal):
    """Blocks inside one document are FULL (or causal-cut), blocks across documents SKIP,
    blocks a boundary crosses PARTIAL; never FULL where a pair is disallowed, never SKIP
    where one is allowed."""
    N, bs = 96, 16
    docs = _docs([[32, 40, 24]])
    tokens = TokenRules.build(1, N, N, "cpu", document_ids=docs)
    cls = _block_classes(tokens, N, N, bs, causal)[0, 0]
    allowed = token_rule_mask(1, N, N, causal, document_ids=docs)[0, 0]
    for qb in range(cls.shape[0]):
        for kb in range(cls.shape[1]):
            cell = allowed[qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs]
            want = SKIP if not cell.any() else (FULL if cell.all() else PARTIAL)
            assert int(cls[qb, kb]) == want, (qb, kb)


def test_padding_and_prefix_block_classes():
    N, bs = 64, 16
    tokens = TokenRules.build(2, N, N, "cpu", key_range=(torch.tensor([0, 20]), None),
                              prefix_lengths=torch.tensor([40, 0]))
    cls = _block_classes(tokens, N, N, bs, True)
    for b in range(2):
        allowed = token_rule_mask(2, N, N, True, key_range=(torch.tensor([0, 20]), None),
                                  prefix_lengths=torch.tensor([40, 0]))[b, 0]
        for qb in range(4):
            for kb in range(4):
                cell = allowed[qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs]
                if not cell.any():
                    assert int(cls[b, 0, qb, kb]) == SKIP, (b, qb, kb)
                elif cell.all():
                    assert int(cls[b, 0, qb, kb]) == FULL, (b, qb, kb)
                else:
                    assert int(cls[b, 0, qb, kb]) == PARTIAL, (b, qb, kb)


def test_token_rule_validation():
    q = k = v = torch.randn(2, 2, 40, 8, dtype=torch.float64)
    p = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    call = lambda **kw: bk.block_sparse_attention(q, k, v, p, block_size=16, **kw)  # noqa: E731
    with pytest.raises(bk.InvalidProblem, match="document_ids"):
        call(document_ids=torch.zeros(2, 39, dtype=torch.int32))
    with pytest.raises(bk.InvalidProblem, match="integer"):
        call(document_ids=torch.zeros(2, 40))
    with pytest.raises(bk.InvalidProblem, match="key_range"):
        call(key_range=5)
    with pytest.raises(bk.InvalidProblem, match="per batch row|one value per batch row"):
        call(key_range=(None, torch.tensor([1, 2, 3])))
    with pytest.raises(bk.InvalidProblem, match="is_causal"):
        call(prefix_lengths=4)
    with pytest.raises(bk.InvalidProblem, match="window_size"):
        call(prefix_lengths=4, is_causal=True, window_size=(8, 0))
    prep = bk.prepare_pattern(p, query_len=40, block_size=16, document_ids=torch.zeros(40, dtype=torch.int64))
    with pytest.raises(bk.InvalidProblem, match="PreparedPattern"):
        bk.block_sparse_attention(q, k, v, prep, key_range=(0, 30))
    prep3 = bk.prepare_pattern(p, query_len=40, block_size=16,
                               key_range=(None, torch.tensor([40, 30, 20])))
    with pytest.raises(bk.InvalidProblem, match="batch"):
        bk.block_sparse_attention(q, k, v, prep3)


def test_plan_api_token_rules():
    desc = bk.SdpaBlockSparseDescriptor(2, 2, 40, 40, 8, 8, block_size=16, element="f64",
                                        is_causal=True)
    plan = bk.SdpaBlockSparsePlan.select(desc, device="cpu")
    q, k, v = (torch.randn(2, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    p = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    rules = plan.token_rules(document_ids=DOCS_70[:, :40])
    y, _ = plan.run(bk.SdpaBlockSparseArgs(q, k, v, p, token_rules=rules))
    y_prep, _ = plan.run(bk.SdpaBlockSparseArgs(q, k, v, plan.prepare(p, document_ids=DOCS_70[:, :40])))
    y_fn = bk.block_sparse_attention(q, k, v, p, block_size=16, is_causal=True,
                                     document_ids=DOCS_70[:, :40])
    assert torch.equal(y, y_fn) and torch.equal(y_prep, y_fn)
    with pytest.raises(bk.InvalidProblem, match="token rules"):
        plan.run(bk.SdpaBlockSparseArgs(q, k, v, p, token_rules=TokenRules(
            torch.zeros(2, 39, dtype=torch.int32), torch.zeros(2, 40, dtype=torch.int32))))


BUILDERS = [
    ("sliding_window", lambda: P.sliding_window(70, 9, block_size=16, sinks=3)),
    ("sliding_window-bidir", lambda: P.sliding_window(70, 9, block_size=16, causal=False)),
    ("document_mask", lambda: P.document_mask([[13, 30, 27], [1, 40, 29]], block_size=16,
                                              causal=True)),
    ("prefix_lm", lambda: P.prefix_lm(70, [21, 0], block_size=16)),
    ("window&blocks", lambda: P.sliding_window(70, 20, block_size=16)
     & P.random_blocks(70, block_size=16, density=0.7, seed=2, causal=True)),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("prepared", [False, True])
@pytest.mark.parametrize("name,build", BUILDERS, ids=[b[0] for b in BUILDERS])
def test_builders_are_exact_in_attention(backend, prepared, name, build):
    """A builder's pattern passed as is: the call applies its kernel rules, and the result is
    its token rule exactly (dense SDPA with the rule's token mask, in float64)."""
    p = build()
    assert p.exact and p.kernel_rules, p.coarsening_report()
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 70, 16, generator=gen, dtype=torch.float64) * s
               for s in (2, 1, 1))
    if backend == "triton" and HAS_CUDA:
        q, k, v = (t.cuda() for t in (q, k, v))
    pattern = p.to(q.device).prepare() if prepared else p.to(q.device)
    y = bk.block_sparse_attention(q, k, v, pattern, backend=backend)
    allowed = p.to_dense_token_mask(rule=True).expand(2, 2, 70, 70).to(q.device)
    s = (q @ k.transpose(-1, -2)) / 4
    ref = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v
    ref = torch.where(allowed.any(-1, keepdim=True), ref, 0.0)  # rows that see nothing: 0
    torch.testing.assert_close(y, ref)
    assert torch.equal(p.to_dense_token_mask(), p.to_dense_token_mask(rule=True))


def test_builder_rules_must_agree_with_the_call():
    q = k = v = torch.randn(1, 2, 70, 8, dtype=torch.float64)
    p = P.sliding_window(70, 9, block_size=16, sinks=3)
    with pytest.raises(bk.InvalidProblem, match="window_size"):
        bk.block_sparse_attention(q, k, v, p, window_size=(20, 0))
    y1 = bk.block_sparse_attention(q, k, v, p)
    y2 = bk.block_sparse_attention(q, k, v, p, window_size=(8, 0), sink_tokens=3)
    assert torch.equal(y1, y2)
    d = P.document_mask([30, 40], block_size=16)
    with pytest.raises(bk.InvalidProblem, match="document_ids"):
        bk.block_sparse_attention(q, k, v, d, document_ids=torch.zeros(70, dtype=torch.int32))
    desc = bk.SdpaBlockSparseDescriptor(1, 2, 70, 70, 8, 8, block_size=16, element="f64",
                                        is_causal=True)
    plan = bk.SdpaBlockSparsePlan.select(desc, device="cpu")
    with pytest.raises(bk.InvalidProblem, match="window"):
        plan.run(bk.SdpaBlockSparseArgs(q, k, v, p))
    y3, _ = plan.run(bk.SdpaBlockSparseArgs(q, k, v, P.document_mask([30, 40], block_size=16,
                                                                    causal=True)))
    y4 = bk.block_sparse_attention(q, k, v, P.document_mask([30, 40], block_size=16,
                                                             causal=True))
    assert torch.equal(y3, y4)
