"""block_sparse_attention_with_kvcache: contiguous and paged caches (random page order),
per-row cache lengths around block edges (1, 127, 128, 129, 5000), Nq in {1, 7, 64}, GQA
1/4/8, the window with sink tokens, softcap, ALiBi, learnable sinks, appending new tokens in
place, a block pattern over the cache (sparse page selection, exact on the kept blocks),
split-KV with its combine; against the float64 oracle per row (bottom-right causal over the
row's keys).

The triton backend runs the decode kernel (decode/triton_decode.py) for f16/bf16/f32; the
block-sparse path serves float64, the reference backend and calls that want a gradient.
CPU: reference in f64 and the decode kernel under the interpreter in f32 (with and without
splits); the GPU grid runs every dtype, long caches and the determinism of the combine."""

import pytest
import torch

import baracuda_kernels as bk
from cases import DEVICE, HAS_CUDA
from oracle import assert_matches_oracle, dense_attention


def make_cache(B, N, Hkv, D, dtype, gen, page_size=None):
    """(k_cache, v_cache, block_table or None, contiguous copies [B, N, Hkv, D]): a paged
    cache holds the rows' pages in a random order among spare pages."""
    k = torch.randn(B, N, Hkv, D, generator=gen).to(DEVICE, dtype)
    v = torch.randn(B, N, Hkv, D, generator=gen).to(DEVICE, dtype)
    if page_size is None:
        return k.clone(), v.clone(), None, k, v
    per_row = N // page_size
    n_pages = B * per_row + 3
    order = torch.randperm(n_pages, generator=gen)[:B * per_row].view(B, per_row)
    k_pages = torch.randn(n_pages, page_size, Hkv, D, generator=gen).to(DEVICE, dtype)
    v_pages = torch.randn(n_pages, page_size, Hkv, D, generator=gen).to(DEVICE, dtype)
    k_pages[order.flatten()] = k.reshape(-1, page_size, Hkv, D)
    v_pages[order.flatten()] = v.reshape(-1, page_size, Hkv, D)
    return k_pages, v_pages, order.to(DEVICE, torch.int32), k, v


def oracle_rows(q, k_rows, v_rows, total, is_causal, dtype, **mods):
    """Per row b: dense attention of q[b] over keys [0, L_b), bottom-right (float64)."""
    B, Nq, H, _ = q.shape
    G = H // k_rows.shape[2]
    ys = []
    for b in range(B):
        L = int(total[b])
        qb = q[b:b + 1].transpose(1, 2)
        kb = k_rows[b:b + 1, :L].transpose(1, 2).repeat_interleave(G, 1)
        vb = v_rows[b:b + 1, :L].transpose(1, 2).repeat_interleave(G, 1)
        yb, _ = dense_attention(qb, kb, vb, torch.ones(1, 1, 1, 1, dtype=torch.bool,
                                                       device=q.device), 1 << 20,
                                "bottom_right" if is_causal else False, dtype=dtype, **mods)
        ys.append(yb.transpose(1, 2))
    return torch.cat(ys)


CASES = [  # (name, Nq, H, Hkv, page_size, n_new, options)
    ("decode", 1, 8, 2, None, 1, {}),
    ("decode-mqa-paged", 1, 8, 1, 16, 1, {}),
    ("chunk-gqa", 7, 4, 1, None, 7, {}),
    ("chunk-paged-window-sinks", 7, 4, 4, 32, 7, dict(window_size=(40, 0), sink_tokens=3)),
    ("decode-softcap-sinks", 1, 8, 2, 16, 0, dict(softcap=5.0, sinks=True)),
    ("non-causal", 7, 4, 2, None, 0, dict(is_causal=False)),
    ("decode-alibi-gqa8", 1, 8, 1, None, 1, dict(alibi=True)),
    ("decode-odd-pages", 1, 8, 2, 12, 1, dict(window_size=(70, 0), sink_tokens=5)),
    ("chunk64-paged-window", 64, 4, 1, 16, 64, dict(window_size=(50, 0), sink_tokens=4)),
]


def check_kvcache(backend, dtype, case, lengths=(1, 127, 128, 129), N=192, D=16, seed=0,
                  num_splits=None):
    name, Nq, H, Hkv, page_size, n_new, opts = case
    opts = dict(opts)
    is_causal = opts.pop("is_causal", True)
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    k_cache, v_cache, table, k_rows, v_rows = make_cache(B, N, Hkv, D, dtype, gen, page_size)
    q = (torch.randn(B, Nq, H, D, generator=gen) * 2).to(DEVICE, dtype)
    # Cached before this call; with the new tokens each row holds L_b = max(length, n_new).
    lens = (torch.tensor(lengths, dtype=torch.int64) - n_new).clamp(min=0)
    k_new = torch.randn(B, n_new, Hkv, D, generator=gen).to(DEVICE, dtype) if n_new else None
    v_new = torch.randn(B, n_new, Hkv, D, generator=gen).to(DEVICE, dtype) if n_new else None
    sinks = (torch.randn(H, generator=gen) * 2).to(DEVICE) if opts.pop("sinks", False) else None
    slopes = (torch.rand(H, generator=gen) * 0.2).to(DEVICE) if opts.pop("alibi", False) else None
    y = bk.block_sparse_attention_with_kvcache(
        q, k_cache, v_cache, lens.to(DEVICE), k_new, v_new, block_table=table,
        is_causal=is_causal, sinks=sinks, alibi_slopes=slopes, block_size=32, backend=backend,
        num_splits=num_splits, **opts)
    assert y.shape == (B, Nq, H, D)
    for b in range(B):  # the expected rows: the new tokens written in place
        if n_new:
            k_rows[b, lens[b]:lens[b] + n_new] = k_new[b]
            v_rows[b, lens[b]:lens[b] + n_new] = v_new[b]
    if table is None:
        torch.testing.assert_close(k_cache, k_rows, rtol=0, atol=0)
    mods = dict(window_size=opts.get("window_size", (-1, -1)),
                sink_tokens=opts.get("sink_tokens", 0), softcap=opts.get("softcap", 0.0),
                sinks=sinks, alibi_slopes=slopes)
    total = lens + n_new
    y64 = oracle_rows(q, k_rows, v_rows, total, is_causal, torch.float64, **mods)
    ys = oracle_rows(q, k_rows, v_rows, total, is_causal, dtype, **mods)
    assert_matches_oracle(y, y64, ys)


@pytest.mark.parametrize("backend,splits", [("reference", None), ("cpu", None), ("triton", 1),
                                            ("triton", 3)])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kvcache_matches_oracle_cpu(backend, splits, case):
    if HAS_CUDA:
        pytest.skip("the GPU grid below covers this")
    check_kvcache(backend, torch.float32 if backend == "triton" else torch.float64, case,
                  num_splits=splits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kvcache_matches_oracle_gpu(dtype, case):
    check_kvcache("triton", dtype, case)
    check_kvcache("triton", dtype, case, num_splits=5)
    if case[4] is None or 5120 % case[4] == 0:
        check_kvcache("triton", dtype, case, lengths=(5000, 1, 4097), N=5120, D=128)


@pytest.mark.gpu
def test_kvcache_f64_takes_the_block_sparse_path_gpu():
    check_kvcache("triton", torch.float64, CASES[3])


def test_decode_kernel_serves_the_triton_backend(monkeypatch):
    """f16/bf16/f32 on the triton backend run the decode kernel (forward only); float64 and
    calls that want a gradient for q take the block-sparse path (and still match)."""
    import baracuda_kernels.attention.decode.kvcache as kvcache
    calls = []
    real = kvcache.decode_forward_triton
    monkeypatch.setattr(kvcache, "decode_forward_triton",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(5)
    kc, vc, _, _, _ = make_cache(2, 64, 2, 16, torch.float32, gen)
    q = torch.randn(2, 1, 4, 16, generator=gen).to(DEVICE)
    y = bk.block_sparse_attention_with_kvcache(q, kc, vc, 40, backend="triton")
    assert len(calls) == 1
    qg = q.clone().requires_grad_()
    yg = bk.block_sparse_attention_with_kvcache(qg, kc, vc, 40, backend="triton")
    yg.sum().backward()
    assert len(calls) == 1 and qg.grad is not None
    torch.testing.assert_close(yg.detach(), y)


def test_kvcache_pattern_keeps_selected_blocks_exactly():
    """A pattern over the cache's blocks (e.g. selected pages): exact on the kept blocks."""
    gen = torch.Generator().manual_seed(3)
    B, N, H, Hkv, D = 2, 128, 4, 2, 8
    k_cache, v_cache, _, k_rows, v_rows = make_cache(B, N, Hkv, D, torch.float64, gen)
    q = torch.randn(B, 1, H, D, generator=gen, dtype=torch.float64).to(DEVICE)
    keep = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 1]], dtype=torch.bool)   # per row, 32-token blocks
    pattern = keep[:, None, None, :].to(DEVICE)
    lens = torch.tensor([100, 128])
    y = bk.block_sparse_attention_with_kvcache(q, k_cache, v_cache, lens.to(DEVICE),
                                               block_pattern=pattern, block_size=32)
    for b in range(B):
        cols = torch.arange(N)
        kept = (keep[b][cols // 32] & (cols < lens[b])).to(DEVICE)
        kb = k_rows[b:b + 1, kept].transpose(1, 2).repeat_interleave(2, 1)
        vb = v_rows[b:b + 1, kept].transpose(1, 2).repeat_interleave(2, 1)
        yb, _ = dense_attention(q[b:b + 1].transpose(1, 2), kb, vb,
                                torch.ones(1, 1, 1, 1, dtype=torch.bool, device=DEVICE),
                                1 << 20, False)
        torch.testing.assert_close(y[b:b + 1], yb.transpose(1, 2))


def test_kvcache_validation():
    q = torch.randn(2, 1, 4, 8)
    kc = vc = torch.zeros(2, 64, 2, 8)
    call = bk.block_sparse_attention_with_kvcache
    with pytest.raises(bk.InvalidProblem, match=r"\[B, Nq, H, D\]"):
        call(q[0], kc, vc, 3)
    with pytest.raises(bk.InvalidProblem, match="cache_seqlens"):
        call(q, kc, vc, torch.tensor([3, 65]))
    with pytest.raises(bk.InvalidProblem, match="overflows"):
        call(q, kc.clone(), vc.clone(), torch.tensor([3, 64]), torch.zeros(2, 1, 2, 8),
             torch.zeros(2, 1, 2, 8))
    with pytest.raises(bk.InvalidProblem, match="k and v go together"):
        call(q, kc, vc, 3, torch.zeros(2, 1, 2, 8))
    with pytest.raises(bk.InvalidProblem, match="block_table"):
        call(q, kc, vc, 3, block_table=torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(bk.InvalidProblem, match="paged"):
        call(q, kc, vc, None, block_table=torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(bk.InvalidProblem, match="rows"):
        call(q, torch.zeros(3, 64, 2, 8), torch.zeros(3, 64, 2, 8), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_table_entries_past_a_rows_pages_are_never_read(dtype):
    """vLLM-style tables hold -1 (or any junk) past a row's last page: the answer is the
    same as with real pages there, on the decode kernel (f32 on the triton backend, also
    under the interpreter) and on the block-sparse path (f64), with new tokens appended."""
    gen = torch.Generator().manual_seed(11)
    B, N, H, Hkv, D, page = 2, 128, 4, 2, 16, 16
    k_pages, v_pages, table, _, _ = make_cache(B, N, Hkv, D, dtype, gen, page)
    q = torch.randn(B, 1, H, D, generator=gen).to(DEVICE, dtype)
    k_new = torch.randn(B, 1, Hkv, D, generator=gen).to(DEVICE, dtype)
    v_new = torch.randn(B, 1, Hkv, D, generator=gen).to(DEVICE, dtype)
    lens = torch.tensor([40, 95])                    # with the new token: 3 and 6 pages
    junk = table.clone()
    junk[0, 3:] = -1
    junk[1, 6:] = 10 ** 6
    ys = []
    for t in (table, junk):
        kp, vp = k_pages.clone(), v_pages.clone()
        ys.append(bk.block_sparse_attention_with_kvcache(
            q, kp, vp, lens.to(DEVICE), k_new, v_new, block_table=t, backend="triton"
            if HAS_CUDA or dtype == torch.float32 else "reference", num_splits=2))
    torch.testing.assert_close(ys[1], ys[0], rtol=0, atol=0)


def test_kvcache_rejects_a_used_page_outside_the_cache_and_bad_splits():
    gen = torch.Generator().manual_seed(12)
    k_pages, v_pages, table, _, _ = make_cache(2, 64, 2, 8, torch.float64, gen, 16)
    q = torch.randn(2, 1, 4, 8, dtype=torch.float64).to(DEVICE)
    call = bk.block_sparse_attention_with_kvcache
    if not HAS_CUDA:  # CUDA tables are trusted (a check would synchronise)
        bad = table.clone()
        bad[1, 1] = k_pages.shape[0]                 # row 1 holds 30 tokens: pages 0 and 1
        with pytest.raises(bk.InvalidProblem, match=r"block_table\[1, 1\]"):
            call(q, k_pages, v_pages, torch.tensor([20, 30]), block_table=bad)
        bad[1, 1] = -1
        with pytest.raises(bk.InvalidProblem, match=r"block_table\[1, 1\] is -1"):
            call(q, k_pages, v_pages, 30, block_table=bad)
    for splits in ("2", -1, 1.5, True):
        with pytest.raises(bk.InvalidProblem, match="num_splits"):
            call(q, k_pages, v_pages, 30, block_table=table, num_splits=splits)


@pytest.mark.parametrize("lengths", [(100, 100), (0, 0), (64, 64)])
def test_kvcache_uniform_lengths_take_the_plain_path(lengths):
    """Rows of one length known on the host (an int, or a CPU tensor) run as plain
    bottom-right attention over the cache's first L keys: the same result as per-row rules."""
    gen = torch.Generator().manual_seed(7)
    kc, vc, _, k_rows, v_rows = make_cache(2, 128, 2, 8, torch.float64, gen)
    q = torch.randn(2, 3, 4, 8, generator=gen, dtype=torch.float64).to(DEVICE)
    k_new, v_new = (torch.randn(2, 3, 2, 8, generator=gen, dtype=torch.float64).to(DEVICE)
                    for _ in range(2))
    outs = []
    for lens in (lengths[0], torch.tensor(lengths)):
        kcc, vcc = kc.clone(), vc.clone()
        outs.append(bk.block_sparse_attention_with_kvcache(
            q, kcc, vcc, lens if isinstance(lens, int) else lens.to(DEVICE), k_new, v_new,
            block_size=32, window_size=(40, 0)))
    L = lengths[0]
    k_rows[:, L:L + 3], v_rows[:, L:L + 3] = k_new, v_new
    ref = oracle_rows(q, k_rows, v_rows, torch.tensor(lengths) + 3, True, torch.float64,
                      window_size=(40, 0))
    for y in outs:
        torch.testing.assert_close(y, ref)


def check_selection(backend, dtype, paged, num_splits, N=256, block=32, D=16):
    """A per-(row, K/V head) selection of cache blocks: the kernel is exact on the kept
    blocks and reads no other (the oracle attends over the kept keys only)."""
    gen = torch.Generator().manual_seed(11)
    B, H, Hkv = 3, 8, 2
    lengths = torch.tensor([200, 33, 256])
    kc, vc, table, k_rows, v_rows = make_cache(B, N, Hkv, D, dtype, gen, 16 if paged else None)
    q = (torch.randn(B, 1, H, D, generator=gen) * 2).to(DEVICE, dtype)
    keep = torch.rand(B, Hkv, 1, N // block, generator=gen) < 0.4
    keep[:, :, :, 0] = True
    y = bk.block_sparse_attention_with_kvcache(
        q, kc, vc, lengths.to(DEVICE), block_table=table, block_pattern=keep.to(DEVICE),
        block_size=block, backend=backend, num_splits=num_splits)
    cols = torch.arange(N)
    G = H // Hkv
    refs = []
    for which in (torch.float64, dtype):
        ref = []
        for b in range(B):
            kept = keep[b, :, 0][:, cols // block] & (cols < lengths[b])      # [Hkv, N]
            mask = kept.repeat_interleave(G, 0)[None, :, None, :].to(DEVICE)  # [1, H, 1, N]
            kb = k_rows[b:b + 1].transpose(1, 2).repeat_interleave(G, 1)
            vb = v_rows[b:b + 1].transpose(1, 2).repeat_interleave(G, 1)
            yb, _ = dense_attention(q[b:b + 1].transpose(1, 2), kb, vb,
                                    torch.ones(1, 1, 1, 1, dtype=torch.bool, device=DEVICE),
                                    1 << 20, False, dtype=which, extra_mask=mask)
            ref.append(yb.transpose(1, 2))
        refs.append(torch.cat(ref))
    assert_matches_oracle(y, *refs)


@pytest.mark.parametrize("backend,splits", [("reference", None), ("triton", 1), ("triton", 2)])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_selected_blocks_cpu(backend, splits, paged):
    if HAS_CUDA:
        pytest.skip("the GPU grid below covers this")
    check_selection(backend, torch.float64 if backend == "reference" else torch.float32,
                    paged, splits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_selected_blocks_gpu(dtype, paged):
    check_selection("triton", dtype, paged, None)
    check_selection("triton", dtype, paged, 4, N=4096, block=128, D=128)


@pytest.mark.gpu
def test_split_combine_is_deterministic_gpu():
    """Split-KV partials merge in a fixed order: identical bits run after run, and the same
    result (to rounding) whatever the split count."""
    gen = torch.Generator().manual_seed(2)
    kc, vc, _, _, _ = make_cache(2, 20000, 8, 128, torch.bfloat16, gen)
    q = torch.randn(2, 1, 32, 128, generator=gen).to(DEVICE, torch.bfloat16)
    lens = torch.tensor([19999, 7001], device=DEVICE)
    call = bk.block_sparse_attention_with_kvcache
    first = call(q, kc, vc, lens, num_splits=16)
    for _ in range(3):
        assert torch.equal(call(q, kc, vc, lens, num_splits=16), first)
    torch.testing.assert_close(call(q, kc, vc, lens, num_splits=1), first, atol=2e-2, rtol=0)


@pytest.mark.parametrize("splits", [1, 2])
def test_queries_before_the_first_key_see_nothing(splits):
    """Rows holding fewer keys than queries (causal, nothing appended): query i of row b sits
    at L_b - Nq + i < 0 for the first ones, which see no key (y = 0, lse = -inf, or lse =
    sink with sinks); the decode kernel and the block-sparse path agree."""
    gen = torch.Generator().manual_seed(8)
    kc, vc, _, _, _ = make_cache(2, 64, 2, 16, torch.float32, gen)
    q = torch.randn(2, 7, 4, 16, generator=gen).to(DEVICE)
    lens = torch.tensor([2, 5], device=DEVICE)
    sinks = torch.randn(4, generator=gen).to(DEVICE)
    for s in (None, sinks):
        y, lse = bk.block_sparse_attention_with_kvcache(
            q, kc, vc, lens, sinks=s, return_lse=True, backend="triton", num_splits=splits)
        y_ref, lse_ref = bk.block_sparse_attention_with_kvcache(
            q.double(), kc.double(), vc.double(), lens, sinks=s, return_lse=True,
            backend="reference")
        torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), lse_ref, atol=1e-5, rtol=1e-5)
        assert (y[0, :5] == 0).all() and (y[1, :2] == 0).all()
        if s is None:
            assert torch.isinf(lse[0, :, :5]).all()


@pytest.mark.parametrize("backend,splits", [("reference", None), ("triton", 1), ("triton", 3)])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_key_mask_hides_cached_keys(backend, splits, paged):
    """key_mask [B, Ncache]: keys marked False take part in nothing (a left-padded batch in a
    cache, holes), positions still count in indices; window and sinks on top."""
    gen = torch.Generator().manual_seed(9)
    B, N, H, Hkv, D, Nq = 3, 96, 4, 2, 16, 3
    dtype = torch.float64 if backend == "reference" else torch.float32
    kc, vc, table, k_rows, v_rows = make_cache(B, N, Hkv, D, dtype, gen, 16 if paged else None)
    q = (torch.randn(B, Nq, H, D, generator=gen) * 2).to(DEVICE, dtype)
    lens = torch.tensor([96, 70, 40])
    key_mask = torch.ones(B, N, dtype=torch.bool)
    key_mask[0, :11] = False                       # left padding
    key_mask[1, 20:45] = False                     # a hole
    key_mask[2, :] = False                         # nothing visible
    y = bk.block_sparse_attention_with_kvcache(
        q, kc, vc, lens.to(DEVICE), block_table=table, key_mask=key_mask.to(DEVICE),
        window_size=(50, 0), sink_tokens=2, backend=backend, num_splits=splits)
    for b in range(B):
        L = int(lens[b])
        kb = k_rows[b:b + 1, :L].transpose(1, 2).repeat_interleave(H // Hkv, 1)
        vb = v_rows[b:b + 1, :L].transpose(1, 2).repeat_interleave(H // Hkv, 1)
        extra = key_mask[b, :L][None, None, None, :].to(DEVICE)
        yb, _ = dense_attention(q[b:b + 1].transpose(1, 2), kb, vb,
                                torch.ones(1, 1, 1, 1, dtype=torch.bool, device=DEVICE),
                                1 << 20, "bottom_right", window_size=(50, 0), sink_tokens=2,
                                extra_mask=extra)
        torch.testing.assert_close(y[b:b + 1].double(), yb.transpose(1, 2).double(),
                                   atol=2e-5, rtol=2e-5)
    assert (y[2] == 0).all()
    with pytest.raises(bk.InvalidProblem, match="key_mask"):
        bk.block_sparse_attention_with_kvcache(q, kc, vc, lens.to(DEVICE), block_table=table,
                                               key_mask=key_mask[:, :5].to(DEVICE))


def test_strided_inputs_are_read_correctly():
    """Non-dense views (a transposed block table, strided lengths and new keys, a cache whose
    head dim is strided) give the same result as dense copies, on either path."""
    gen = torch.Generator().manual_seed(12)
    kp, vp, table, _, _ = make_cache(2, 64, 2, 16, torch.float32, gen, 16)
    q = torch.randn(2, 1, 4, 16, generator=gen).to(DEVICE)
    k_new = torch.randn(2, 16, 2, 1, generator=gen).to(DEVICE).permute(0, 3, 2, 1)  # [2,1,2,16]
    v_new = torch.randn(2, 1, 2, 16, generator=gen).to(DEVICE)
    lens_all = torch.tensor([30, 0, 50, 0], device=DEVICE)
    table_t = table.t().contiguous().t()                                          # stride(1) != 1
    backend = None if HAS_CUDA else "triton"
    outs = []
    for tab, lens, kn in ((table_t, lens_all[::2], k_new), (table.contiguous(),
                                                             lens_all[::2].contiguous(),
                                                             k_new.contiguous())):
        kc, vc = kp.clone(), vp.clone()
        outs.append((bk.block_sparse_attention_with_kvcache(
            q, kc, vc, lens, kn, v_new, block_table=tab, backend=backend), kc))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)
    # a cache whose last dim is not dense takes the block-sparse path, which says so
    wide = torch.randn(2, 64, 2, 32, generator=gen).to(DEVICE)[..., ::2]
    with pytest.raises(bk.InvalidProblem, match="stride"):
        bk.block_sparse_attention_with_kvcache(q, wide, wide, 10, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Nq,H,Hkv,is_causal", [(1, 8, 2, True), (1, 4, 4, True),
                                                (5, 8, 2, False)])
def test_cpu_decode_of_a_plain_cache_is_one_fused_call(monkeypatch, dtype, Nq, H, Hkv,
                                                       is_causal):
    """CPU rows of one length, no rule or modifier: one call of the fused CPU kernel
    (decode/cpu_dense.py), GQA groups as rows; y and lse against the float64 oracle."""
    from baracuda_kernels.attention.decode import cpu_dense, kvcache
    calls = []
    real = cpu_dense.cpu_dense_decode
    monkeypatch.setattr(kvcache, "cpu_dense_decode",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(3)
    kc, vc, _, k_rows, v_rows = (None if t is None else t.cpu()
                                 for t in make_cache(2, 300, Hkv, 32, dtype, gen))
    q = (torch.randn(2, Nq, H, 32, generator=gen) * 3).to(dtype)
    k_new, v_new = (torch.randn(2, 2, Hkv, 32, generator=gen).to(dtype) for _ in range(2))
    y, lse = bk.block_sparse_attention_with_kvcache(q, kc, vc, 201, k_new, v_new,
                                                    is_causal=is_causal, return_lse=True)
    assert calls, "the plain CPU decode did not take the fused call"
    k_rows[:, 201:203], v_rows[:, 201:203] = k_new, v_new
    total = torch.tensor([203, 203])
    y64 = oracle_rows(q, k_rows, v_rows, total, is_causal, torch.float64)
    assert_matches_oracle(y, y64, oracle_rows(q, k_rows, v_rows, total, is_causal, dtype))
    G = H // Hkv
    s = torch.einsum("bqhd,bnhd->bhqn", q.double(),
                     k_rows[:, :203].double().repeat_interleave(G, 2)) * 32 ** -0.5
    assert lse.shape == (2, H, Nq)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lse.double(), s.logsumexp(-1), rtol=0,
                               atol=1e-10 if dtype == torch.float64 else 2e-2)
    # The same call on the reference backend takes the general path and agrees.
    calls.clear()
    kc2, vc2 = kc.clone(), vc.clone()
    y_ref = bk.block_sparse_attention_with_kvcache(q, kc2, vc2, 203, is_causal=is_causal,
                                                   backend="reference")
    assert not calls
    assert_matches_oracle(y_ref, y64, oracle_rows(q, k_rows, v_rows, total, is_causal, dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Nq,causal,window", [(1, True, (50, 0)), (1, True, None),
                                              (1, False, (30, 5)), (4, False, None)])
@pytest.mark.parametrize("paged,with_sinks,softcap", [
    (False, False, None), (True, False, None), (False, True, None), (False, True, 4.0)],
    ids=["contiguous", "paged", "sinks", "softcap+sinks"])
def test_cpu_decode_with_lengths_key_mask_and_window(monkeypatch, dtype, Nq, causal, window,
                                                     paged, with_sinks, softcap):
    """CPU rows of different lengths, padding and holes in key_mask, a row that sees nothing,
    the window with sink tokens, learnable sinks, softcap: still the one dense CPU step (the
    fused call, or with softcap the capped matmuls), with one [B, 1, 1, L] mask; y and lse
    against the float64 oracle."""
    from baracuda_kernels.attention.decode import kvcache
    calls = []
    real = kvcache.cpu_dense_decode
    monkeypatch.setattr(kvcache, "cpu_dense_decode",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(12)
    B, N, H, Hkv, D = 4, 96, 8, 2, 16
    kc, vc, table, k_rows, v_rows = (None if t is None else t.cpu() for t in
                                     make_cache(B, N, Hkv, D, dtype, gen, 16 if paged else None))
    q = (torch.randn(B, Nq, H, D, generator=gen) * 3).to(dtype)
    lens = torch.tensor([96, 70, 40, 33])
    key_mask = torch.ones(B, N, dtype=torch.bool)
    key_mask[0, :11] = False                       # left padding
    key_mask[1, 20:45] = False                     # a hole
    key_mask[2, :] = False                         # nothing visible
    opts = dict(window_size=window, sink_tokens=3) if window is not None else {}
    sinks = torch.randn(H, generator=gen, dtype=torch.float64) * 2 if with_sinks else None
    y, lse = bk.block_sparse_attention_with_kvcache(
        q, kc, vc, lens, block_table=table, key_mask=key_mask, is_causal=causal,
        return_lse=True, sinks=sinks, softcap=softcap, **opts)
    assert calls, "the CPU decode did not take the fused call"
    assert (y[2] == 0).all()
    empty_lse = sinks.float()[:, None].expand(H, Nq) if with_sinks else float("-inf")
    assert torch.equal(lse[2].float(), torch.as_tensor(empty_lse).expand(H, Nq).float())
    for b in (0, 1, 3):
        L = int(lens[b])
        kb = k_rows[b:b + 1, :L].transpose(1, 2).repeat_interleave(H // Hkv, 1)
        vb = v_rows[b:b + 1, :L].transpose(1, 2).repeat_interleave(H // Hkv, 1)
        extra = key_mask[b, :L][None, None, None, :]
        args = (q[b:b + 1].transpose(1, 2), kb, vb, torch.ones(1, 1, 1, 1, dtype=torch.bool),
                1 << 20, "bottom_right" if causal else False)
        mods = dict(window_size=window or (-1, -1), sink_tokens=3 if window else 0,
                    extra_mask=extra, sinks=sinks, softcap=softcap or 0.0)
        y64, lse64 = dense_attention(*args, **mods)
        ys, _ = dense_attention(*args, dtype=dtype, **mods)
        assert_matches_oracle(y[b:b + 1].transpose(1, 2), y64, ys)
        torch.testing.assert_close(lse[b:b + 1].double(), lse64.double(), rtol=0,
                                   atol=1e-9 if dtype == torch.float64 else 2e-2)
