"""Score modifiers: softcap, ALiBi and learnable sinks, alone and combined (softcap + sinks +
window + GQA, as gpt-oss-like models use), against the float64 oracle (forward, lse, and the
gradients of q, k, v and the sinks), with block patterns, both causal alignments, Nq != Nk,
empty rows, document ids and varlen packs; gradcheck in f64; validation; the plan API and
the custom op.

CPU: reference in f64, triton under the interpreter in f32, the cpu backend in f64 and f32; the
GPU grid runs every dtype."""

import pytest
import torch

import baracuda_kernels as bk
from cases import ALL_DTYPES, DEVICE, HAS_CUDA, nblocks
from oracle import assert_matches_oracle, dense_attention, token_rule_mask


def check_mods(backend, dtype, Nq, Nk, bs, causal, *, softcap=0.0, alibi=None, sinks=False,
               window=(-1, -1), sink_tokens=0, H=4, Hkv=2, B=2, seed=0, density=0.8,
               empty_block_row=None, tokens=None, lse_grad=True):
    """block_sparse_attention with the modifiers against the oracle, forward, lse and the
    gradients of q, k, v (and of the sinks, through y and lse alike). alibi: None, "h"
    ([H] slopes) or "bh" ([B, H]). empty_block_row: a query block row with no active block
    (its rows see nothing but the sink). lse_grad: with sinks, lse gets an upstream gradient
    too (False: y's alone, which the cpu backend's own backward takes; an lse gradient
    sends it to the reference backward)."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Nq, 16, generator=gen) * 2).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, Nk, 16, generator=gen).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, Nk, 24, generator=gen).to(DEVICE, dtype)
    p = torch.rand(B, 1, nblocks(Nq, bs), nblocks(Nk, bs), generator=gen) < density
    if empty_block_row is not None:
        p[:, :, empty_block_row] = False
    p = p.to(DEVICE)
    slopes = None
    if alibi is not None:
        slopes = (torch.rand((H,) if alibi == "h" else (B, H), generator=gen) * 0.5).to(DEVICE)
    sink_t = (torch.randn(H, generator=gen) * 2).to(DEVICE).requires_grad_() if sinks else None
    qx, kx, vx = (t.clone().requires_grad_() for t in (q, k, v))
    tokens = tokens or {}
    y, lse = bk.block_sparse_attention(
        qx, kx, vx, p, block_size=bs, is_causal=causal, backend=backend, return_lse=True,
        window_size=window, sink_tokens=sink_tokens, softcap=softcap or None,
        alibi_slopes=slopes, sinks=sink_t, **tokens)
    dy = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    # The lse gradient only where every row's lse is finite (with sinks): it moves the
    # sinks' gradient too.
    with_dlse = sinks and lse_grad
    dlse = torch.randn(lse.shape, generator=gen).to(lse.device, lse.dtype) if with_dlse else None
    leaves = (qx, kx, vx) + ((sink_t,) if sinks else ())
    outs, grads_out = ((y, lse), (dy, dlse)) if with_dlse else ((y,), (dy,))
    grads = torch.autograd.grad(outs, leaves, grads_out)

    G = H // Hkv
    extra = token_rule_mask(B, Nq, Nk, False, **tokens).to(DEVICE) if tokens else None
    live = None
    if tokens.get("query_range") is not None:
        live = token_rule_mask(B, Nq, 1, False, query_range=tokens["query_range"])[:, 0, :, 0]

    def oracle(dt):
        qo, ko, vo = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        so = sink_t.detach().to(dt).requires_grad_() if sinks else None
        yo, lo = dense_attention(qo, ko.repeat_interleave(G, 1), vo.repeat_interleave(G, 1), p,
                                 bs, causal, dtype=dt, window_size=window,
                                 sink_tokens=sink_tokens, extra_mask=extra, softcap=softcap,
                                 alibi_slopes=slopes, sinks=so, live_rows=live)
        leaves_o = (qo, ko, vo) + ((so,) if sinks else ())
        outs_o = (yo, lo) if with_dlse else (yo,)
        g = torch.autograd.grad(outs_o, leaves_o, tuple(t.to(o.dtype) for t, o in
                                                        zip(grads_out, outs_o)))
        return yo, lo, g
    y64, lse64, g64 = oracle(torch.float64)
    ys, lses, gs = oracle(dtype)
    assert_matches_oracle(y, y64, ys)
    assert_matches_oracle(lse, lse64, lses, what="lse")
    for name, g, r, s in zip(("dq", "dk", "dv", "dsinks"), grads, g64, gs):
        assert_matches_oracle(g, r, s, factor=3.0, what=name)
    return y, lse


DOCS = torch.tensor([[0] * 13 + [1] * 30 + [2] * 27, [0] * 1 + [1] * 40 + [2] * 29])
# (name, Nq, Nk, bs, causal, options)
CASES = [
    ("softcap", 70, 70, 16, True, dict(softcap=5.0)),
    ("softcap-bidir-rect", 37, 70, 16, False, dict(softcap=2.0)),
    ("alibi", 37, 70, 16, False, dict(alibi="h")),
    ("alibi-batch-causal", 65, 65, 16, True, dict(alibi="bh")),
    ("alibi-bottom-right", 30, 75, 16, "bottom_right", dict(alibi="h")),
    ("sinks", 70, 70, 16, True, dict(sinks=True, empty_block_row=1)),
    ("sinks-decode", 1, 75, 32, "bottom_right", dict(sinks=True, H=8, Hkv=1)),
    ("gpt-oss", 70, 70, 16, True, dict(softcap=8.0, sinks=True, window=(20, 0),
                                       sink_tokens=0, H=8, Hkv=2)),
    ("all+window+sinktokens", 61, 61, 16, True, dict(softcap=4.0, alibi="h", sinks=True,
                                                     window=(11, 0), sink_tokens=3)),
    ("sinks+window+documents", 70, 70, 16, True, dict(
        sinks=True, window=(20, 0), H=8, Hkv=2,
        tokens=dict(document_ids=DOCS, query_range=(None, torch.tensor([70, 50]))))),
    ("all+documents+padding", 70, 70, 16, True, dict(
        softcap=4.0, alibi="h", sinks=True,
        tokens=dict(document_ids=DOCS, query_range=(None, torch.tensor([70, 50]))))),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_score_mods_match_oracle_cpu(backend, case):
    if HAS_CUDA:
        pytest.skip("the GPU grid below covers this")
    _, Nq, Nk, bs, causal, opts = case
    check_mods(backend, torch.float32 if backend == "triton" else torch.float64, Nq, Nk, bs,
               causal, **opts)


SINK_CASES = [c for c in CASES if not (c[5].get("softcap") or c[5].get("alibi"))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", SINK_CASES, ids=[c[0] for c in SINK_CASES])
def test_cpu_backend_sinks(dtype, case):
    """The fused cpu backend has learnable sinks (folded in after torch's fused kernel)."""
    if HAS_CUDA:
        pytest.skip("the cpu backend runs CPU tensors; the CPU suite covers it")
    _, Nq, Nk, bs, causal, opts = case
    check_mods("cpu", dtype, Nq, Nk, bs, causal, **opts)
    if dtype == torch.float64:  # y alone (no lse gradient): the fused backward kernel runs
        H = opts.get("H", 4)
        gen = torch.Generator().manual_seed(9)
        q = torch.randn(1, H, Nq, 16, generator=gen, dtype=dtype)
        k, v = (torch.randn(1, opts.get("Hkv", 2), Nk, 16, generator=gen, dtype=dtype)
                for _ in range(2))
        p = torch.ones(1, 1, nblocks(Nq, bs), nblocks(Nk, bs), dtype=torch.bool)
        sinks = torch.randn(H, generator=gen, dtype=dtype)
        grads = []
        for backend in ("cpu", "reference"):
            leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
            y = bk.block_sparse_attention(*leaves[:3], p, block_size=bs, is_causal=causal,
                                          sinks=leaves[3], backend=backend)
            grads.append(torch.autograd.grad(y, leaves, torch.ones_like(y) * 0.5))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("lse_grad", [True, False], ids=["y+lse", "y"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cpu_backend_score_mods(dtype, case, lse_grad):
    """The cpu backend runs ALiBi (and sinks) as additive terms of its mask, softcap in its
    matmul path (cpu_capped), with ALiBi added to every case: forward, lse and gradients
    against the oracle; gradients of y alone too, so that with sinks its own backward runs
    (an lse gradient takes the reference's)."""
    if HAS_CUDA:
        pytest.skip("the cpu backend runs CPU tensors; the CPU suite covers it")
    _, Nq, Nk, bs, causal, opts = case
    if not lse_grad and not opts.get("sinks"):
        pytest.skip("without sinks y's gradient alone is the y+lse case already")
    check_mods("cpu", dtype, Nq, Nk, bs, causal, lse_grad=lse_grad,
               **dict(opts, alibi=opts.get("alibi", "bh")))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_score_mods_match_oracle_gpu(backend, dtype, case):
    _, Nq, Nk, bs, causal, opts = case
    check_mods(backend, dtype, Nq, Nk, bs, causal, **opts)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_score_mods_at_scale_gpu(dtype):
    """Block 128 tiles (TMA paths on sm90), softcap + ALiBi + sinks + a window, GQA 8 / 2."""
    check_mods("triton", dtype, 1000, 1000, 128, True, softcap=30.0, alibi="h", sinks=True,
               window=(300, 0), sink_tokens=4, H=8, Hkv=2, density=1.0)


def test_empty_rows_with_sinks_give_zero_and_the_sink():
    q = k = v = torch.randn(1, 2, 40, 8, dtype=torch.float64)
    p = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    p[:, :, 1] = False                                # rows 16..31 see no key
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64)
    y, lse = bk.block_sparse_attention(q, k, v, p, block_size=16, sinks=sinks,
                                       return_lse=True)
    assert torch.all(y[:, :, 16:32] == 0)
    assert torch.equal(lse[0, :, 16:32], sinks[:, None].expand(2, 16))
    y2, lse2 = bk.block_sparse_attention(q, k, v, p, block_size=16, sinks=sinks,
                                         return_lse=True, query_range=(None, 36))
    assert torch.all(lse2[:, :, 36:] == float("-inf"))  # padding takes no sink


def test_score_mods_gradcheck_f64():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 12, 4, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    sinks = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    slopes = torch.tensor([0.3, 0.1])
    p = torch.ones(1, 1, 3, 3, dtype=torch.bool)

    def fn(q, k, v, sinks):
        return bk.block_sparse_attention(q, k, v, p, block_size=4, is_causal=True,
                                         softcap=3.0, alibi_slopes=slopes, sinks=sinks,
                                         return_lse=True, backend="reference")
    assert torch.autograd.gradcheck(fn, (q, k, v, sinks))


def test_varlen_with_score_mods():
    """Per sequence: softcap + ALiBi (inside each sequence, bottom-right) + sinks."""
    from test_varlen import _cu
    lens_q, lens_k = [3, 20, 9], [10, 45, 9]
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(sum(lens_q) + 2, 4, 8, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(sum(lens_k), 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(sum(lens_k), 2, 8, generator=gen, dtype=torch.float64)
    slopes = torch.rand(4, generator=gen) * 0.5
    sinks = torch.randn(4, generator=gen, dtype=torch.float64)
    y, lse = bk.block_sparse_attention_varlen(
        q, k, v, _cu(lens_q), _cu(lens_k), block_size=8, is_causal=False, softcap=3.0,
        alibi_slopes=slopes, sinks=sinks, return_lse=True)
    cq, ck = _cu(lens_q).tolist(), _cu(lens_k).tolist()
    for s in range(3):
        qs = q[cq[s]:cq[s + 1]].permute(1, 0, 2)[None]
        ks = k[ck[s]:ck[s + 1]].permute(1, 0, 2)[None].repeat_interleave(2, 1)
        vs = v[ck[s]:ck[s + 1]].permute(1, 0, 2)[None].repeat_interleave(2, 1)
        yo, lo = dense_attention(qs, ks, vs, torch.ones(1, 1, 1, 1, dtype=torch.bool), 1 << 20,
                                 False, softcap=3.0, alibi_slopes=slopes, sinks=sinks)
        torch.testing.assert_close(y[cq[s]:cq[s + 1]], yo[0].permute(1, 0, 2))
        torch.testing.assert_close(lse[:, cq[s]:cq[s + 1]], lo[0])
    assert torch.all(lse[:, -2:] == float("-inf"))  # the pack's padding tail


def test_plan_api_and_custom_op_with_score_mods():
    desc = bk.SdpaBlockSparseDescriptor(1, 2, 40, 40, 8, 8, block_size=16, element="f64",
                                        is_causal=True, softcap=4.0, alibi=True, sinks=True)
    plan = bk.SdpaBlockSparsePlan.select(desc, device="cpu")
    assert plan.backend.value == "cpu"     # softcap in its matmul path
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    p = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    slopes, sinks = torch.tensor([0.2, 0.4]), torch.tensor([0.1, -0.3], dtype=torch.float64)
    with pytest.raises(bk.InvalidProblem, match="sinks"):
        plan.run(bk.SdpaBlockSparseArgs(q, k, v, p, alibi_slopes=slopes))
    args = bk.SdpaBlockSparseArgs(q, k, v, p, alibi_slopes=slopes, sinks=sinks)
    assert plan.can_implement(args)
    y, lse = plan.run(args)
    dy = torch.randn_like(y)
    dq, dk, dv, dsinks = plan.run_backward(args, dy)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    sg = sinks.clone().requires_grad_()
    y_fn = bk.block_sparse_attention(qs, ks, vs, p, block_size=16, is_causal=True, softcap=4.0,
                                     alibi_slopes=slopes, sinks=sg)
    torch.testing.assert_close(y, y_fn)
    g = torch.autograd.grad(y_fn, (qs, ks, vs, sg), dy)
    for a, b in zip((dq, dk, dv, dsinks), g):
        torch.testing.assert_close(a, b)
    # The custom op (torch.compile) gives the same values and the sinks' gradient.
    sc = sinks.clone().requires_grad_()
    f = torch.compile(lambda q, k, v, s: bk.block_sparse_attention(
        q, k, v, p, block_size=16, is_causal=True, softcap=4.0, alibi_slopes=slopes, sinks=s),
        backend="eager", fullgraph=True)
    y_op = f(qs, ks, vs, sc)
    torch.testing.assert_close(y_op, y_fn)
    (ds_op,) = torch.autograd.grad(y_op, (sc,), dy)
    torch.testing.assert_close(ds_op, g[3])


def test_score_mod_validation():
    q = k = v = torch.randn(2, 4, 40, 8)
    p = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    call = lambda **kw: bk.block_sparse_attention(q, k, v, p, block_size=16, **kw)  # noqa: E731
    for bad in (0.0 - 1.0, float("nan"), float("inf")):
        with pytest.raises(bk.InvalidProblem, match="softcap"):
            call(softcap=bad)
    with pytest.raises(bk.InvalidProblem, match="alibi_slopes.*float32"):
        call(alibi_slopes=torch.ones(4, dtype=torch.float64))
    with pytest.raises(bk.InvalidProblem, match=r"alibi_slopes.*\[4\]"):
        call(alibi_slopes=torch.ones(3))
    with pytest.raises(bk.InvalidProblem, match=r"alibi_slopes.*\[2, 4\]"):
        call(alibi_slopes=torch.ones(3, 4))
    with pytest.raises(bk.InvalidProblem, match=r"sinks.*\[4\]"):
        call(sinks=torch.ones(2, 4))
    with pytest.raises(bk.InvalidProblem, match="sinks"):
        call(sinks=torch.ones(4, dtype=torch.int64))
    with pytest.raises(bk.InvalidProblem, match="prefix"):
        call(is_causal=True, prefix_lengths=5, alibi_slopes=torch.ones(4))
