"""The cpu backend's banded path (cpu_band): a sliding window's rows read K/V through one
overlapping strided view, the sinks (fixed blocks) in a second call merged by lse; the
backward pairs block rows into one problem and takes the sinks by matmuls. Checked
against the float64 oracle (forward, lse and gradients) on
windows with and without sinks, GQA groups (gathered queries) and single heads (views),
causal either alignment and not, ragged tails, documents, padding with NaN in it,
prepared patterns, several chunks; every case asserts that the banded path ran."""

import pytest
import torch

import baracuda_kernels as bk
from baracuda_kernels.attention.block_sparse import cpu_band, cpu_fused
from baracuda_kernels.attention.block_sparse.block_lists import PARTIAL, SKIP
from cases import HAS_CUDA, check_sinks_against_reference, check_token_rule

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="the cpu backend runs CPU tensors")


@pytest.fixture
def band_runs(monkeypatch):
    """A list that records the Band of every banded forward call; the banded backward calls
    go to ``band_runs.backward``."""
    class Runs(list):
        backward: list

    runs = Runs()
    runs.backward = []
    real_fwd, real_bwd = cpu_fused.band_forward, cpu_fused.band_backward

    def spy_fwd(*args):
        runs.append(args[5])
        return real_fwd(*args)

    def spy_bwd(*args):
        runs.backward.append(args[9])
        return real_bwd(*args)
    monkeypatch.setattr(cpu_fused, "band_forward", spy_fwd)
    monkeypatch.setattr(cpu_fused, "band_backward", spy_bwd)
    return runs


def runs_of(bands):
    return [(b.first, b.count, b.shift, b.width, b.fixed.tolist()) for b in bands]


DOCS = torch.stack([torch.repeat_interleave(torch.tensor([0, 1, 2]), torch.tensor([101, 130, 69])),
                    torch.repeat_interleave(torch.tensor([0, 1]), torch.tensor([7, 293]))]).int()
# (name, Nq, Nk, bs, is_causal, window, sinks, H, Hkv, B, tokens)
CASES = [
    ("gqa+sinks", 300, 300, 16, True, (40, 0), 16, 4, 2, 2, None),
    ("heads+no-sinks", 300, 300, 16, True, (40, 0), 0, 2, 2, 1, None),
    ("bidirectional+ragged", 301, 301, 16, False, (25, 30), 0, 2, 1, 1, None),
    ("bottom-right+partial-sinks", 200, 330, 16, "bottom_right", (50, 0), 5, 4, 1, 1, None),
    ("documents", 300, 300, 16, True, (40, 0), 3, 4, 2, 2, dict(document_ids=DOCS)),
    ("left-padding", 300, 300, 16, True, (40, 0), 0, 2, 2, 2,
     dict(query_range=(torch.tensor([0, 37]), None), key_range=(torch.tensor([0, 37]), None))),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_banded_rows_match_oracle(case, band_runs):
    name, Nq, Nk, bs, causal, window, sinks, H, Hkv, B, tokens = case
    check_token_rule("cpu", torch.float64, Nq, Nk, bs, causal, window, sinks, H=H, Hkv=Hkv, B=B,
                     density=1.0, tokens=tokens, prepared=name == "documents",
                     nan_padding=tokens is not None)
    assert band_runs and all(b.count >= cpu_band.MIN_ROWS for b in band_runs)
    assert runs_of(band_runs.backward) == runs_of(band_runs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_low_precision_banded_rows_match_oracle(dtype, band_runs):
    check_token_rule("cpu", dtype, 300, 300, 16, True, (40, 0), 16, H=4, Hkv=2, B=2, density=1.0)
    assert band_runs and band_runs.backward


@pytest.mark.parametrize("B,H,Hkv", [(2, 4, 2), (2, 2, 2), (1, 4, 4)])
def test_flash_layout_inputs(B, H, Hkv, band_runs):
    """q / k / v as [B, N, H, D] tensors seen as [B, H, N, D]: batch and heads do not merge
    into one stride (K/V are copied once, Q and y gathered / scattered; the gradients,
    shaped like their inputs, take index_add_ for the band's keys)."""
    from oracle import dense_attention
    from baracuda_kernels.patterns import sliding_window
    gen = torch.Generator().manual_seed(2)
    N, D = 300, 16
    q = torch.randn(B, N, H, D, generator=gen, dtype=torch.float64).transpose(1, 2)
    k, v = (torch.randn(B, N, Hkv, D, generator=gen, dtype=torch.float64).transpose(1, 2)
            for _ in range(2))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    p = sliding_window(N, window=40, block_size=16, sinks=16)
    y = bk.block_sparse_attention(q, k, v, p, backend="cpu")
    ref, _ = dense_attention(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1),
                             torch.ones(1, 1, 19, 19, dtype=torch.bool), 16, True,
                             window_size=(39, 0), sink_tokens=16)
    assert band_runs and (y - ref).abs().max() < 1e-12
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    got, want = (torch.autograd.grad(out, (q, k, v), dy) for out in (y, ref))
    assert band_runs.backward
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-11


@pytest.mark.parametrize("per_problem,rows_per_chunk", [(3, 3), (3, 7), (2, 4), (2, 3), (1, 1)])
def test_several_chunks(band_runs, monkeypatch, per_problem, rows_per_chunk):
    """Forward chunks of 3 rows; backward problems of 1-3 block rows in chunks of whole
    problems (7 rows of budget with 3 per problem: chunks of 6), the run's last rows that
    fill no problem as single-row problems, over a run whose row count is odd or even."""
    monkeypatch.setattr(cpu_band, "BAND_BUDGET", 2 * 16 * 16 * 5 * 3)  # 3 rows per chunk
    monkeypatch.setattr(cpu_band, "BAND_BWD_BUDGET", 2 * 16 * 16 * 5 * rows_per_chunk)
    monkeypatch.setattr(cpu_band, "BWD_ROWS_PER_PROBLEM", per_problem)
    check_token_rule("cpu", torch.float64, 300 - 16 * (rows_per_chunk == 4), 300, 16, True,
                     (40, 0), 16, H=2, Hkv=2, density=1.0)
    band = band_runs[0]
    assert band.width + band.fixed.numel() == 5 and band.count > 2 * 3
    assert runs_of(band_runs.backward) == runs_of(band_runs)


def test_backward_chunks_hold_whole_problems():
    band = cpu_band.Band(first=2, count=17, shift=-3, width=4, fixed=torch.tensor([0]))
    per_row = 2 * 16 * 16 * 5
    assert list(cpu_band._chunks(band, 2, 16, 7 * per_row, multiple=3)) == \
        [(2, 6), (8, 6), (14, 5)]
    assert list(cpu_band._chunks(band, 2, 16, 2 * per_row, multiple=3)) == \
        [(2, 3), (5, 3), (8, 3), (11, 3), (14, 3), (17, 2)]
    assert list(cpu_band._chunks(band, 2, 16, 7 * per_row)) == [(2, 7), (9, 7), (16, 3)]


def test_find_band_on_a_window_and_not_elsewhere():
    classes = torch.full((12, 12), SKIP, dtype=torch.int8)
    for r in range(12):
        classes[r, max(0, r - 3):r + 1] = PARTIAL
        classes[r, 0] = PARTIAL                       # a sink block
    band = cpu_band.find_band(classes, 16, 12 * 16, 12 * 16)
    assert (band.first, band.count, band.shift, band.width) == (5, 7, -3, 4)
    assert band.fixed.tolist() == [0]
    causal = torch.tril(torch.ones(12, 12)).to(torch.int8)  # widths grow: no band
    assert cpu_band.find_band(causal, 16, 192, 192) is None
    assert cpu_band.find_band(torch.ones(12, 12, dtype=torch.int8), 16, 192, 192) is None
    # a ragged last query block and a band reaching past the keys stay out of the run
    assert cpu_band.find_band(classes, 16, 12 * 16 - 1, 12 * 16 - 1).count == 6


def test_nan_in_a_query_row_comes_back_as_nan(band_runs):
    """The merge of band and sink partials must not turn a NaN row into zeros."""
    q, k, v = (torch.randn(1, 2, 256, 16, dtype=torch.float64) for _ in range(3))
    q[0, 1, 200] = float("nan")
    y = bk.block_sparse_attention(q, k, v, torch.ones(1, 1, 16, 16, dtype=torch.bool),
                                  block_size=16, is_causal=True, window_size=(40, 0),
                                  sink_tokens=16, backend="cpu")
    assert band_runs
    assert torch.isnan(y[0, 1, 200]).all() and not torch.isnan(y[0, 0]).any()
    assert not torch.isnan(y[0, 1, :200]).any() and not torch.isnan(y[0, 1, 201:]).any()


@pytest.mark.parametrize("per_problem", [1, 2, 3])
def test_band_key_gradients_land_on_their_keys(per_problem):
    """_Chunk.add_band_keys: problem p's key gradient column j belongs to key token
    k0 + p * m * bs + j, through strided views of m * bs rows (3 rows per problem: a
    shorter last view) or (batch and heads that do not merge into one stride) index_add_;
    checked against a plain loop."""
    bs, b, hk, N, D = 4, 2, 3, 64, 5
    band = cpu_band.Band(first=3, count=6, shift=-2, width=3, fixed=torch.zeros(0, dtype=torch.long))
    classes = torch.ones(N // bs, N // bs, dtype=torch.int8)
    kv = torch.zeros(b, hk, 1, N, D, dtype=torch.float64)
    allowed = cpu_band._RunAllowed(band, classes, None, bs, 1, torch.float64)
    chunk = cpu_band._Chunk(band, 3, 6, kv, kv, allowed, bs, per_problem=per_problem)
    n, L = 6 // per_problem, (band.width + per_problem - 1) * bs
    grad = torch.randn(n, b * hk, L, D, dtype=torch.float64)
    want = torch.zeros(b, hk, N, D, dtype=torch.float64)
    for p in range(n):
        start = (3 + band.shift) * bs + p * per_problem * bs
        want[:, :, start:start + L] += grad[p].view(b, hk, L, D)
    merged = torch.zeros(b, hk, 1, N, D, dtype=torch.float64)
    apart = torch.zeros(b, N, hk, D, dtype=torch.float64).transpose(1, 2).unsqueeze(2)
    assert cpu_band._run_view(apart, 0, 1, 1, 1) is None  # takes the index_add_ route
    for acc in (merged, apart):
        chunk.add_band_keys(acc, grad, bs)
        assert (acc[:, :, 0] - want).abs().max() < 1e-12  # sums in another order


def test_learnable_sinks_through_the_banded_backward(band_runs):
    """Learnable sinks (folded into y and lse after the forward) reach the banded backward
    through the final y and lse alone."""
    check_sinks_against_reference(300, 16, 7, is_causal=True, window_size=(40, 0),
                                  sink_tokens=16)
    assert band_runs and band_runs.backward


def test_prepared_pattern_keeps_the_run_masks_across_calls(band_runs):
    """A prepared window keeps its run's masks (one broadcast row) from call to call, per
    GQA group size and dtype: calls that differ in both, one after the other on the same
    prepared pattern, each match the oracle, forward and backward (a mask kept for one
    group size or dtype and reused for another would fail here)."""
    from oracle import dense_attention
    from baracuda_kernels.patterns import sliding_window
    gen = torch.Generator().manual_seed(5)
    N, D, bs = 300, 16, 16
    prep = sliding_window(N, window=40, block_size=bs, sinks=16).prepare()
    for dtype, H, Hkv, tol in [(torch.float64, 4, 2, 1e-11), (torch.float32, 4, 4, 2e-5),
                               (torch.float64, 4, 1, 1e-11), (torch.float64, 4, 2, 1e-11)]:
        q = torch.randn(1, H, N, D, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(1, Hkv, N, D, generator=gen, dtype=torch.float64)
                for _ in range(2))
        q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
        y = bk.block_sparse_attention(q, k, v, prep, backend="cpu")
        g = H // Hkv
        ref, _ = dense_attention(*(t.double() for t in (q, k.repeat_interleave(g, 1),
                                                        v.repeat_interleave(g, 1))),
                                 torch.ones(1, 1, 19, 19, dtype=torch.bool), bs, True,
                                 window_size=(39, 0), sink_tokens=16)
        assert (y.double() - ref).abs().max() < tol
        dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad(y, (q, k, v), dy.to(dtype))
        want = torch.autograd.grad(ref, (q, k, v), dy)
        for a, b in zip(got, want):
            assert (a.double() - b).abs().max() < 10 * tol
    kept = [v for key, v in prep.lists.__dict__.get("_memo", {}).items()
            if key[0] == "cpu-band-masks"]
    assert band_runs and kept and sorted(kept[0], key=str) == sorted(
        [(2, torch.float64), (1, torch.float32), (4, torch.float64)], key=str)


def test_query_only_gradient_skips_the_sinks_key_gradients(band_runs, monkeypatch):
    """Only q needs a gradient: the banded backward gets no dK / dV accumulators, computes no
    sink-block key gradients (no baddbmm_ into them), and dq is the all-grads call's dq."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    call = dict(block_size=16, is_causal=True, window_size=(40, 0), sink_tokens=16,
                backend="cpu")
    pattern = torch.ones(1, 1, 19, 19, dtype=torch.bool)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dy = torch.randn(1, 2, 300, 16, generator=gen, dtype=torch.float64)
    dq_all = torch.autograd.grad(bk.block_sparse_attention(*leaves, pattern, **call), leaves[0], dy)[0]
    calls = []
    real = torch.Tensor.baddbmm_
    monkeypatch.setattr(torch.Tensor, "baddbmm_", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    qg = q.clone().requires_grad_()
    dq = torch.autograd.grad(bk.block_sparse_attention(qg, k, v, pattern, **call), qg, dy)[0]
    assert len(band_runs.backward) == 2 and calls == []
    assert torch.equal(dq, dq_all)
