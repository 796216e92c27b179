"""The additive score bias: every broadcast form ([B|1, H|1, Nq|1, Nk], fewer dims), float
masks with -inf (whole rows too), with block patterns, both causal alignments, Nq != Nk, GQA,
the softcap, sinks, windows, document ids and varlen packs, against the float64 oracle
(forward, lse, and the gradients of q, k, v, the sinks and the bias); gradcheck in f64 on
both backends; determinism of d bias; the plan API and the custom op; validation.

CPU: reference in f64 and triton under the interpreter in f32; the GPU grid runs every dtype."""

import pytest
import torch

import baracuda_kernels as bk
from cases import ALL_DTYPES, DEVICE, HAS_CUDA, nblocks
from oracle import assert_matches_oracle, dense_attention, token_rule_mask


def random_bias(shape, gen, dtype, *, masked=False):
    """A peaked random bias (std 2); masked: -inf on ~20% of the entries and on the whole
    row 3 (an empty row when the bias has a query dim)."""
    bias = torch.randn(shape, generator=gen) * 2
    if masked:
        bias = bias.masked_fill(torch.rand(shape, generator=gen) < 0.2, float("-inf"))
        if len(shape) >= 2 and shape[-2] > 3:
            bias[..., 3, :] = float("-inf")
    return bias.to(DEVICE, dtype)


def check_bias(backend, dtype, Nq, Nk, bs, causal, bias_shape, *, bias_dtype=None,
               masked=False, softcap=0.0, sinks=False, window=(-1, -1), H=4, Hkv=2, B=2,
               seed=0, density=0.8, tokens=None, head_dim=16):
    """block_sparse_attention with a bias against the oracle: y, lse and the gradients of q,
    k, v, the bias (and the sinks). bias_shape: the bias's shape, written with the letters
    B, H, Q, K for the full dims (e.g. "1HQK", "B11K", "QK")."""
    gen = torch.Generator().manual_seed(seed)
    # Scores of std ~2 whatever the head dim (peaked attention), d_v != d_k when small.
    q = (torch.randn(B, H, Nq, head_dim, generator=gen) * 4 / head_dim ** 0.25).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, Nk, head_dim, generator=gen).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, Nk, 24 if head_dim == 16 else head_dim,
                    generator=gen).to(DEVICE, dtype)
    p = (torch.rand(B, 1, nblocks(Nq, bs), nblocks(Nk, bs), generator=gen) < density).to(DEVICE)
    full = {"B": B, "H": H, "Q": Nq, "K": Nk, "1": 1}
    bias = random_bias(tuple(full[c] for c in bias_shape), gen, bias_dtype or dtype,
                       masked=masked)
    sink_t = (torch.randn(H, generator=gen) * 2).to(DEVICE).requires_grad_() if sinks else None
    qx, kx, vx, bx = (t.clone().requires_grad_() for t in (q, k, v, bias))
    tokens = tokens or {}
    y, lse = bk.block_sparse_attention(
        qx, kx, vx, p, block_size=bs, is_causal=causal, backend=backend, return_lse=True,
        window_size=window, softcap=softcap or None, sinks=sink_t, bias=bx, **tokens)
    dy = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    leaves = (qx, kx, vx, bx) + ((sink_t,) if sinks else ())
    grads = torch.autograd.grad(y, leaves, dy)
    assert grads[3].shape == bias.shape and grads[3].dtype == bias.dtype

    G = H // Hkv
    extra = token_rule_mask(B, Nq, Nk, False, **tokens).to(DEVICE) if tokens else None
    live = None
    if tokens.get("query_range") is not None:
        live = token_rule_mask(B, Nq, 1, False, query_range=tokens["query_range"])[:, 0, :, 0]

    def oracle(dt):
        qo, ko, vo = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        # The bias in its own dtype (as the kernels read it), the oracle's arithmetic in dt.
        bo = bias.detach().clone().requires_grad_()
        so = sink_t.detach().to(dt).requires_grad_() if sinks else None
        yo, lo = dense_attention(qo, ko.repeat_interleave(G, 1), vo.repeat_interleave(G, 1), p,
                                 bs, causal, dtype=dt, window_size=window, extra_mask=extra,
                                 softcap=softcap, sinks=so, live_rows=live, bias=bo)
        leaves_o = (qo, ko, vo, bo) + ((so,) if sinks else ())
        return yo, lo, torch.autograd.grad(yo, leaves_o, dy.to(yo.dtype))
    y64, lse64, g64 = oracle(torch.float64)
    ys, lses, gs = oracle(dtype)
    assert_matches_oracle(y, y64, ys)
    assert_matches_oracle(lse, lse64, lses, what="lse")
    for name, g, r, s in zip(("dq", "dk", "dv", "dbias", "dsinks"), grads, g64, gs):
        assert_matches_oracle(g, r, s, factor=3.0, what=name)
    return y, lse, grads


DOCS = torch.tensor([[0] * 13 + [1] * 30 + [2] * 27, [0] * 1 + [1] * 40 + [2] * 29])
# (name, Nq, Nk, bs, causal, bias shape, options)
CASES = [
    ("full", 70, 70, 16, True, "BHQK", {}),
    ("per-head-rect", 37, 70, 16, False, "1HQK", {}),
    ("per-key-gqa", 70, 70, 16, True, "B11K", dict(H=8, Hkv=2)),
    ("per-head-key", 45, 45, 16, False, "1H1K", {}),
    ("2d-bottom-right", 30, 75, 16, "bottom_right", "QK", {}),
    ("1d-keys", 33, 33, 16, False, "K", {}),
    ("float-mask", 70, 70, 16, False, "B1QK", dict(masked=True)),
    ("gpt-oss+bias", 70, 70, 16, True, "1H1K", dict(softcap=8.0, sinks=True, window=(20, 0),
                                                    H=8, Hkv=2)),
    ("softcap+mask+sinks", 61, 61, 16, True, "1HQK", dict(softcap=4.0, sinks=True,
                                                          masked=True)),
    ("documents+padding", 70, 70, 16, True, "BHQK", dict(
        tokens=dict(document_ids=DOCS, query_range=(None, torch.tensor([70, 50]))))),
    ("float32-bias", 50, 50, 16, True, "1HQK", dict(bias_dtype=torch.float32)),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bias_matches_oracle_cpu(backend, case):
    if HAS_CUDA:
        pytest.skip("the GPU grid below covers this")
    _, Nq, Nk, bs, causal, shape, opts = case
    check_bias(backend, torch.float32 if backend == "triton" else torch.float64, Nq, Nk, bs,
               causal, shape, **opts)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cpu_backend_bias(case):
    """The cpu backend adds the bias to its mask, after the softcap where there is one
    (forward; the bias's gradient takes the reference backward): against the oracle."""
    if HAS_CUDA:
        pytest.skip("the cpu backend runs CPU tensors; the CPU suite covers it")
    _, Nq, Nk, bs, causal, shape, opts = case
    check_bias("cpu", torch.float64, Nq, Nk, bs, causal, shape, **opts)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_cpu_backend_bias_without_its_gradient_runs_the_fused_backward(monkeypatch, softcap):
    """A bias that needs no gradient: q/k/v gradients from the cpu backend's own backward
    (the fused kernel; with softcap, cpu_capped), equal to the reference backend's; ALiBi
    on top."""
    from baracuda_kernels.attention.block_sparse import cpu_fused
    if HAS_CUDA:
        pytest.skip("CPU tensors")
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, 4, 70, 16, generator=gen, dtype=torch.float64) * 2
    k, v = (torch.randn(2, 2, 70, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(1, 4, 70, 70, generator=gen, dtype=torch.float64)
    bias[..., 5:9] = float("-inf")
    slopes = torch.rand(4, generator=gen) * 0.3
    p = torch.rand(2, 1, 5, 5, generator=gen) < 0.7
    calls = []
    real = cpu_fused.block_sparse_attention_backward_reference
    monkeypatch.setattr(cpu_fused, "block_sparse_attention_backward_reference",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    grads = []
    for backend in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        y = bk.block_sparse_attention(*leaves, p, block_size=16, is_causal=True, bias=bias,
                                      alibi_slopes=slopes, softcap=softcap, backend=backend)
        grads.append((y,) + torch.autograd.grad(y, leaves, torch.ones_like(y)))
    assert not calls
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bias_matches_oracle_gpu(backend, dtype, case):
    _, Nq, Nk, bs, causal, shape, opts = case
    check_bias(backend, dtype, Nq, Nk, bs, causal, shape, **opts)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["1HQK", "B11K"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias_dtype", ["float32", "same"])
def test_bias_at_scale_gpu(dtype, shape, bias_dtype):
    """Block 128 tiles at D=128 (TMA paths on sm90, the bias tiles staged with K/V: the
    default tiles shrink to fit), softcap + sinks + window + bias, GQA 8 / 2."""
    check_bias("triton", dtype, 1000, 1000, 128, True, shape, softcap=30.0, sinks=True,
               window=(300, 0), H=8, Hkv=2, density=1.0, head_dim=128,
               bias_dtype=torch.float32 if bias_dtype == "float32" else dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 8, 500, 500), (2, 1, 1, 500)])
def test_bias_grad_is_deterministic_gpu(shape):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 8, 500, 64, generator=gen).to(DEVICE, torch.bfloat16)
               for _ in range(3))
    bias = torch.randn(shape, generator=gen).to(DEVICE).requires_grad_()
    p = torch.ones(1, 1, 4, 4, dtype=torch.bool, device=DEVICE)
    runs = []
    for _ in range(2):
        y = bk.block_sparse_attention(q, k, v, p, block_size=128, is_causal=True, bias=bias)
        runs.append(torch.autograd.grad(y, bias, torch.ones_like(y))[0])
    assert torch.equal(runs[0], runs[1])


def test_fully_masked_row_is_empty_with_and_without_sinks():
    """A row whose bias is -inf everywhere sees nothing: y = 0, lse = -inf (lse = sink with
    sinks), zero gradients, no NaN anywhere; the other rows are untouched."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=gen, dtype=torch.float64).to(DEVICE)
               for _ in range(3))
    p = torch.ones(1, 1, 3, 3, dtype=torch.bool, device=DEVICE)
    bias = torch.randn(1, 2, 40, 40, generator=gen, dtype=torch.float64)
    bias[:, :, 5] = float("-inf")
    bias = bias.to(DEVICE)
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64, device=DEVICE)
    for backend in ("reference", "triton"):
        bx = bias.clone().requires_grad_()
        qx = q.clone().requires_grad_()
        y, lse = bk.block_sparse_attention(qx, k, v, p, block_size=16, bias=bx,
                                           return_lse=True, backend=backend)
        assert torch.all(y[:, :, 5] == 0) and torch.all(lse[:, :, 5] == float("-inf"))
        dq, db = torch.autograd.grad(y, (qx, bx), torch.ones_like(y))
        assert torch.all(dq[:, :, 5] == 0) and torch.all(db[:, :, 5] == 0)
        assert not (dq.isnan().any() or db.isnan().any())
        y2, lse2 = bk.block_sparse_attention(q, k, v, p, block_size=16, bias=bias, sinks=sinks,
                                             return_lse=True, backend=backend)
        assert torch.all(y2[:, :, 5] == 0)
        assert torch.equal(lse2[0, :, 5], sinks)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bias_gradcheck_f64(backend):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 12, 4, generator=gen, dtype=torch.float64).to(DEVICE)
               .requires_grad_() for _ in range(3))
    p = torch.tensor([[[[1, 0, 1], [1, 1, 0], [0, 1, 1]]]], dtype=torch.bool, device=DEVICE)
    for shape in ((1, 2, 12, 12), (2, 1, 12)):
        bias = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE) \
            .requires_grad_()

        def fn(q, k, v, bias):
            return bk.block_sparse_attention(q, k, v, p, block_size=4, is_causal=True,
                                             softcap=3.0, bias=bias, return_lse=True,
                                             backend=backend)
        # fast_mode (a random projection of the Jacobian): the interpreter runs each forward
        # in ~0.1 s, and the full numerical Jacobian would take ~1000 of them.
        assert torch.autograd.gradcheck(fn, (q, k, v, bias), fast_mode=backend == "triton")


def test_varlen_with_bias():
    """A bias in pack coordinates [H, Tq, Tk]: each sequence reads its own diagonal block."""
    from test_varlen import _cu
    lens_q, lens_k = [3, 20, 9], [10, 45, 9]
    gen = torch.Generator().manual_seed(4)
    Tq, Tk = sum(lens_q), sum(lens_k)
    q = torch.randn(Tq, 4, 8, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(Tk, 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(Tk, 2, 8, generator=gen, dtype=torch.float64)
    bias = (torch.randn(4, Tq, Tk, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    y = bk.block_sparse_attention_varlen(q, k, v, _cu(lens_q), _cu(lens_k), block_size=8,
                                         is_causal=True, bias=bias)
    (db,) = torch.autograd.grad(y, (bias,), torch.ones_like(y))
    cq, ck = _cu(lens_q).tolist(), _cu(lens_k).tolist()
    outside = torch.ones(Tq, Tk, dtype=torch.bool)
    for s in range(3):
        rows, cols = slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1])
        outside[rows, cols] = False
        qs = q[rows].permute(1, 0, 2)[None]
        ks = k[cols].permute(1, 0, 2)[None].repeat_interleave(2, 1)
        vs = v[cols].permute(1, 0, 2)[None].repeat_interleave(2, 1)
        bs_ = bias.detach()[:, rows, cols].clone().requires_grad_()
        yo, _ = dense_attention(qs, ks, vs, torch.ones(1, 1, 1, 1, dtype=torch.bool), 1 << 20,
                                True, bias=bs_)
        torch.testing.assert_close(y[rows], yo[0].permute(1, 0, 2))
        (dbo,) = torch.autograd.grad(yo, (bs_,), torch.ones_like(yo))
        torch.testing.assert_close(db[:, rows, cols], dbo)
    assert torch.all(db[:, outside] == 0)  # pairs across sequences are never computed


def test_plan_api_and_custom_op_with_bias():
    desc = bk.SdpaBlockSparseDescriptor(1, 2, 40, 40, 8, 8, block_size=16, element="f64",
                                        is_causal=True, bias=True, sinks=True)
    plan = bk.SdpaBlockSparsePlan.select(desc, device="cpu")
    assert plan.backend.value == "cpu"           # the bias joins its additive mask
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    p = torch.tensor([[[[1, 0, 0], [1, 1, 0], [0, 1, 1]]]], dtype=torch.bool)
    bias = torch.randn(2, 40, 40, generator=gen, dtype=torch.float64)
    sinks = torch.tensor([0.1, -0.3], dtype=torch.float64)
    with pytest.raises(bk.InvalidProblem, match="bias"):
        plan.run(bk.SdpaBlockSparseArgs(q, k, v, p, sinks=sinks))
    args = bk.SdpaBlockSparseArgs(q, k, v, p, sinks=sinks, bias=bias)
    assert plan.can_implement(args)
    y, lse = plan.run(args)
    dy = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    dq, dk, dv, dsinks, dbias = plan.run_backward(args, dy)
    assert dbias.shape == bias.shape
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks, bias)]
    y_fn = bk.block_sparse_attention(*leaves[:3], p, block_size=16, is_causal=True,
                                     sinks=leaves[3], bias=leaves[4])
    torch.testing.assert_close(y, y_fn)
    g = torch.autograd.grad(y_fn, leaves, dy)
    for a, b in zip((dq, dk, dv, dsinks, dbias), g):
        torch.testing.assert_close(a, b)
    # The custom op (torch.compile) gives the same values and the bias's gradient.
    bc = bias.clone().requires_grad_()
    f = torch.compile(lambda q, k, v, b: bk.block_sparse_attention(
        q, k, v, p, block_size=16, is_causal=True, sinks=sinks, bias=b),
        backend="eager", fullgraph=True)
    y_op = f(*leaves[:3], bc)
    torch.testing.assert_close(y_op, y_fn)
    (db_op,) = torch.autograd.grad(y_op, (bc,), dy)
    torch.testing.assert_close(db_op, g[4])


def test_bias_validation():
    q = k = v = torch.randn(2, 4, 40, 8)
    p = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    call = lambda **kw: bk.block_sparse_attention(q, k, v, p, block_size=16, **kw)  # noqa: E731
    with pytest.raises(bk.InvalidProblem, match=r"bias.*float32 or torch.float32"):
        call(bias=torch.zeros(40, 40, dtype=torch.float16))
    with pytest.raises(bk.InvalidProblem, match=r"\[2\|1, 4\|1, 40\|1, 40\]"):
        call(bias=torch.zeros(2, 4, 40, 1))           # constant over keys
    with pytest.raises(bk.InvalidProblem, match=r"\[2\|1, 4\|1, 40\|1, 40\]"):
        call(bias=torch.zeros(3, 1, 40, 40))
    with pytest.raises(bk.InvalidProblem, match="bias"):
        call(bias=torch.zeros(1, 1, 1, 2, 40, 40))
    with pytest.raises(bk.InvalidProblem, match="bias"):
        call(bias=[[0.0] * 40] * 40)
    b = torch.randn(40, 40)
    torch.testing.assert_close(call(bias=b, backend="cpu"), call(bias=b, backend="reference"))
    # A strided key dim is accepted (copied once): same result as the contiguous bias.
    b = torch.randn(40, 40)
    torch.testing.assert_close(call(bias=b.t().contiguous().t()), call(bias=b.clone()))
    torch.testing.assert_close(call(bias=b.t()), call(bias=b.t().contiguous()))
