"""Any token mask, exact: from_mask_fn / from_token_mask patterns keep the bits of the blocks
they cut (patterns.block_bits), and every backend applies them per token in PARTIAL blocks.

Checked against the float64 oracle (dense SDPA with the rule's token mask), forward, lse and
gradients, with rules none of the builders knows (token parity checkerboards, random token
masks per batch and head), odd lengths, Nq != Nk, GQA, causal rules (both alignments),
windows, document ids, block patterns ANDed on top, rows that see nothing, prepared patterns,
the plan API and the custom op.

CPU: reference / cpu in f64 and triton under the interpreter in f32; the GPU grid runs every
dtype."""

import random

import pytest
import torch

import baracuda_kernels as bk
from baracuda_kernels.attention import patterns as P
from baracuda_kernels.attention.block_sparse.block_lists import FULL, PARTIAL, SKIP
from baracuda_kernels.attention.patterns.block_bits import BlockBits, pack_rows
from cases import ALL_DTYPES, DEVICE, HAS_CUDA, assert_gqa_matches_oracle


def checkerboard(b, h, q, kv):
    """Token parity: no builder states it, and it cuts every block."""
    return ((q + kv) % 2 == 0) | (kv == 0)


def stripes_per_head(b, h, q, kv):
    """Depends on the head and the batch row: key stripes of width h + 2, shifted by b."""
    return ((kv + b) // (h + 2)) % 2 == 0


def _random_token_mask(B, H, Nq, Nk, seed):
    gen = torch.Generator().manual_seed(seed)
    m = torch.rand(B, H, Nq, Nk, generator=gen) < 0.4
    m[..., 3, :] = False                       # a row that sees nothing
    m[..., : Nq // 3, : Nk // 3] = True         # some FULL blocks too
    return m


def _dense_rule(pattern: "P.BlockPattern") -> torch.Tensor:
    return pattern.to_dense_token_mask(rule=True)


def check_bits_pattern(backend, dtype, pattern, *, B=2, H=4, Hkv=2, causal=None, seed=0,
                       extra=None, prepared=False, call_kw=None):
    """block_sparse_attention with a bits-carrying BlockPattern (ANDed with ``extra`` when
    given) against the oracle with the pattern's token rule as a dense mask."""
    Nq, Nk, bs = pattern.query_len, pattern.key_len, pattern.block_size
    p = pattern if extra is None else pattern & extra
    assert p.exact and p.extra_token_pairs == 0, p.coarsening_report()
    allowed = (_dense_rule(pattern) if extra is None else
               _dense_rule(pattern) & extra.to_dense_token_mask())
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Nq, 16, generator=gen) * 2).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, Nk, 16, generator=gen).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, Nk, 24, generator=gen).to(DEVICE, dtype)
    qx, kx, vx = (t.clone().requires_grad_() for t in (q, k, v))
    p = p.to(DEVICE)
    arg = p.prepare(DEVICE) if prepared else p
    y, lse = bk.block_sparse_attention(qx, kx, vx, arg, backend=backend, return_lse=True,
                                       **(dict(is_causal=causal) if causal is not None else {}),
                                       **(call_kw or {}))
    dy = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, (qx, kx, vx), dy)
    ones = torch.ones(1, 1, p.num_blocks_q, p.num_blocks_k, dtype=torch.bool, device=DEVICE)
    if allowed.shape[1] not in (1, H):  # a pattern per K/V head: query head h reads h // G
        allowed = allowed.repeat_interleave(H // allowed.shape[1], 1)
    extra_mask = allowed.expand(B, H, Nq, Nk)
    rule_causal = causal if causal is not None else False  # the pattern's rule states its own
    assert_gqa_matches_oracle(y, lse, grads, (q, k, v), dy, ones, bs, rule_causal, dtype,
                              extra_mask=extra_mask)
    return y, lse


def _bits_cases():
    return [
        ("checkerboard-causal", lambda: P.from_mask_fn(checkerboard, 77, block_size=16,
                                                       is_causal=True), {}),
        ("checkerboard-rect", lambda: P.from_mask_fn(checkerboard, 45, 83, block_size=16), {}),
        ("stripes-per-head", lambda: P.from_mask_fn(stripes_per_head, 50, 61, block_size=16,
                                                    batch=2, num_heads=4), {}),
        ("token-mask-per-head", lambda: P.from_token_mask(_random_token_mask(2, 4, 53, 47, 1),
                                                          block_size=16), {}),
        ("token-mask-kv-heads", lambda: P.from_token_mask(_random_token_mask(1, 2, 40, 40, 2),
                                                          block_size=8), {}),
        ("checkerboard&blocks", lambda: P.from_mask_fn(checkerboard, 70, block_size=16,
                                                       is_causal=True), dict(extra=True)),
    ]


BITS_CASES = _bits_cases()


def _run_case(backend, dtype, case, **kw):
    name, build, opts = case
    pattern = build()
    extra = None
    if opts.get("extra"):
        extra = P.random_blocks(pattern.query_len, block_size=pattern.block_size, density=0.6,
                                seed=4, causal=True)
    return check_bits_pattern(backend, dtype, pattern, extra=extra, **kw)


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
@pytest.mark.parametrize("case", BITS_CASES, ids=[c[0] for c in BITS_CASES])
def test_mask_patterns_are_exact_cpu(backend, case):
    if HAS_CUDA:
        pytest.skip("the GPU grid below covers this")
    dtype = torch.float32 if backend == "triton" else torch.float64
    _run_case(backend, dtype, case, prepared=case[0] == "checkerboard-causal")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", BITS_CASES, ids=[c[0] for c in BITS_CASES])
def test_mask_patterns_are_exact_gpu(backend, dtype, case):
    _run_case(backend, dtype, case, prepared=case[0] == "checkerboard-causal")


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
@pytest.mark.parametrize("seed", range(8))
def test_random_masks_match_oracle(backend, seed):
    """Property test: a random token mask (random density, per batch row and per query or
    K/V head, odd lengths, Nq = 1 included) is exact and equals the oracle."""
    if HAS_CUDA and backend == "cpu":
        pytest.skip("the cpu backend runs CPU tensors; the CPU suite covers it")
    if backend == "triton":
        dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    else:
        dtype = torch.float64
    rnd = random.Random(seed)
    B, heads = rnd.choice([1, 2]), rnd.choice([1, 2, 4])
    Nq = rnd.choice([1, 9, 33, 50])
    Nk = rnd.choice([Nq, 17, 64])
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, heads, Nq, Nk, generator=gen) < rnd.choice([0.1, 0.5, 0.9])
    pattern = P.from_token_mask(mask, block_size=rnd.choice([8, 16]),
                                is_causal=Nq == Nk and rnd.random() < 0.4)
    check_bits_pattern(backend, dtype, pattern, B=B, H=4, Hkv=2, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bs", [64, 128])
def test_mask_patterns_at_scale_gpu(dtype, bs):
    """Pattern blocks of 64 / 128 (several kernel tiles per block, TMA paths on sm90), a
    checkerboard under a causal rule and a window, GQA 8 / 2."""
    def rule(b, h, q, kv):
        return checkerboard(b, h, q, kv) & (q - kv < 300)
    pattern = P.from_mask_fn(rule, 1000, block_size=bs, is_causal=True)
    check_bits_pattern("triton", dtype, pattern, B=2, H=8, Hkv=2)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bits_compose_with_token_rules(backend):
    """Bits AND a bottom-right causal rule, a window and document ids, all from the call."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    Nq, Nk, bs = 37, 70, 16
    pattern = P.from_mask_fn(checkerboard, Nq, Nk, block_size=bs)
    docs = (torch.tensor([[0] * 20 + [1] * 17]), torch.tensor([[0] * 45 + [1] * 25]))
    call_kw = dict(window_size=(30, 0), document_ids=docs)
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, Nq, 16, generator=gen).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(1, 2, Nk, 16, generator=gen).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(1, 2, Nk, 16, generator=gen).to(DEVICE, dtype).requires_grad_()
    y, lse = bk.block_sparse_attention(q, k, v, pattern.to(DEVICE), backend=backend,
                                       is_causal="bottom_right", return_lse=True, **call_kw)
    dy = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    i = torch.arange(Nq)[:, None] + (Nk - Nq)
    j = torch.arange(Nk)[None, :]
    allowed = checkerboard(0, 0, torch.arange(Nq)[:, None], j) & (j <= i) & (j >= i - 30)
    allowed &= docs[0][0][:, None] == docs[1][0][None, :]
    ones = torch.ones(1, 1, 3, 5, dtype=torch.bool, device=DEVICE)
    assert_gqa_matches_oracle(y, lse, grads, (q.detach(), k.detach(), v.detach()), dy, ones, bs,
                              False, dtype, extra_mask=allowed[None, None])


def test_rows_that_see_nothing_give_zero_and_minus_inf():
    mask = torch.zeros(40, 40, dtype=torch.bool)
    mask[::2, 1::3] = True                       # odd rows see nothing
    pattern = P.from_token_mask(mask, block_size=16)
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    y, lse = bk.block_sparse_attention(q, k, v, pattern, return_lse=True)
    assert torch.all(y[:, :, 1::2] == 0) and torch.all(lse[:, :, 1::2] == float("-inf"))
    assert torch.isfinite(lse[:, :, ::2]).all()
    (dq,) = torch.autograd.grad(y.sum(), (q,))
    assert torch.all(dq[:, :, 1::2] == 0)


def test_block_classes_and_bits_storage():
    """Only blocks the mask cuts carry bits; they are PARTIAL, the fully allowed ones FULL,
    the empty ones SKIP; the bits round-trip the mask."""
    N, bs = 64, 16
    mask = torch.zeros(N, N, dtype=torch.bool)
    mask[:32, :32] = True                        # 4 FULL blocks
    mask[40:45, 50:52] = True                    # one cut block
    pattern = P.from_token_mask(mask, block_size=bs)
    bits = pattern.kernel_rules["block_bits"]
    assert bits.num_cut_blocks == 1 and bits.words.shape == (2, bs, 1)
    assert torch.equal(pattern.to_dense_token_mask()[0, 0], mask)
    plan = bk.SdpaBlockSparsePlan.select(
        bk.SdpaBlockSparseDescriptor(1, 1, N, N, 8, 8, block_size=bs, element="f64"),
        device="cpu", backend="reference")
    cls = plan.block_lists(pattern).block_class[0, 0]
    want = torch.full((4, 4), SKIP, dtype=torch.int8)
    want[:2, :2] = FULL
    want[2, 3] = PARTIAL
    assert torch.equal(cls, want)


def test_pack_rows_bit_order():
    bits = torch.zeros(1, 2, 40, dtype=torch.bool)
    bits[0, 0, 0] = bits[0, 0, 31] = bits[0, 1, 33] = True
    words = pack_rows(bits)
    assert words.dtype == torch.int32 and words.shape == (1, 2, 2)
    assert int(words[0, 0, 0]) == 1 - 2**31 and int(words[0, 0, 1]) == 0
    assert int(words[0, 1, 0]) == 0 and int(words[0, 1, 1]) == 2


def test_plan_and_custom_op_carry_bits():
    pattern = P.from_mask_fn(checkerboard, 40, block_size=16, is_causal=True)
    desc = bk.SdpaBlockSparseDescriptor(1, 2, 40, 40, 8, 8, block_size=16, element="f64",
                                        is_causal=True)
    plan = bk.SdpaBlockSparsePlan.select(desc, device="cpu")
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    y_plan, _ = plan.run(bk.SdpaBlockSparseArgs(q, k, v, pattern))
    y_prep, _ = plan.run(bk.SdpaBlockSparseArgs(q, k, v, plan.prepare(pattern)))
    y_fn = bk.block_sparse_attention(q, k, v, pattern)
    y_op = torch.compile(lambda q, k, v: bk.block_sparse_attention(q, k, v, pattern),
                         backend="eager", fullgraph=True)(q, k, v)
    for y in (y_plan, y_prep, y_op):
        torch.testing.assert_close(y, y_fn, rtol=0, atol=1e-12)


def test_bits_validation():
    pattern = P.from_mask_fn(checkerboard, 40, block_size=16)
    q = k = v = torch.randn(1, 2, 48, 8, dtype=torch.float64)
    with pytest.raises(bk.InvalidProblem):
        bk.block_sparse_attention(q, k, v, pattern)        # lengths differ from the pattern's
    with pytest.raises(bk.InvalidProblem, match="block_bits"):
        P.BlockPattern(pattern.mask, block_size=16, query_len=40,
                       _kernel_rules={"block_bits": "bits"})
    assert isinstance(pattern.kernel_rules["block_bits"], BlockBits)
