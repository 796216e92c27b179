"""Grouped-query attention (GQA / MQA): k, v with Hkv heads, query head h reads K/V head
h // (H // Hkv). Checked against the float64 dense oracle run on K/V (and per-K/V-head
patterns) expanded to H heads in the oracle only.

On the CPU both backends run (triton under the interpreter, f32 / f64: the interpreter's bf16
dots are wrong); the GPU grid covers every dtype, bitwise stability and memory."""

import pytest
import torch

import baracuda_kernels as bk
from cases import ALL_DTYPES, DEVICE, HAS_CUDA, nblocks
from oracle import assert_matches_oracle, dense_attention

CPU_DTYPES = [torch.float32, torch.float64]
PATTERN_HEADS = ["per_q_head", "per_kv_head", "broadcast"]


def _qkv(B, H, Hkv, Nq, Nk, D, Dv, dtype, seed, device=DEVICE):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=gen) * 2.0  # peaked attention: masking errors show
    k = torch.randn(B, Hkv, Nk, D, generator=gen)
    v = torch.randn(B, Hkv, Nk, Dv, generator=gen)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def _pattern(kind, B, H, Hkv, Nq, Nk, bs, seed, device=DEVICE):
    heads = {"per_q_head": H, "per_kv_head": Hkv, "broadcast": 1}[kind]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    p = torch.rand(B, heads, nblocks(Nq, bs), nblocks(Nk, bs), generator=gen) < 0.6
    p[..., 0, 0] = False  # an empty query block under causal, and a key block nobody reads
    return p.to(device)


def _oracle_pattern(p, H):
    """The pattern per query head, as the oracle needs it."""
    return p if p.shape[1] in (1, H) else p.repeat_interleave(H // p.shape[1], dim=1)


def _check(backend, dtype, H, Hkv, kind, causal, Nq=45, Nk=61, bs=16, B=2, seed=0, dv=24):
    q, k, v = _qkv(B, H, Hkv, Nq, Nk, 16, dv, dtype, seed)
    p = _pattern(kind, B, H, Hkv, Nq, Nk, bs, seed + 1)
    y, lse = bk.block_sparse_attention(q, k, v, p, block_size=bs, is_causal=causal,
                                       backend=backend, return_lse=True)
    gen = torch.Generator(device="cpu").manual_seed(seed + 2)
    dy = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    dlse = torch.randn(lse.shape, generator=gen).to(lse.device, lse.dtype)
    dlse = torch.where(torch.isfinite(lse), dlse, torch.zeros_like(dlse))
    grads = torch.autograd.grad((y, lse), (q, k, v), (dy, dlse))

    G = H // Hkv
    po = _oracle_pattern(p, H)

    def oracle(dtype_):
        qx, kx, vx = (t.detach().to(dtype_).requires_grad_() for t in (q, k, v))
        ke, ve = kx.repeat_interleave(G, dim=1), vx.repeat_interleave(G, dim=1)
        yo, lo = dense_attention(qx, ke, ve, po, bs, causal, dtype=dtype_)
        go = torch.autograd.grad((yo, lo), (qx, kx, vx), (dy.to(yo.dtype), dlse.to(lo.dtype)))
        return yo, lo, go

    y64, lse64, g64 = oracle(torch.float64)
    ys, lses, gs = oracle(dtype)
    assert_matches_oracle(y, y64, ys, what="y")
    assert_matches_oracle(lse, lse64, lses, what="lse")
    for name, g, r, s in zip(("dq", "dk", "dv"), grads, g64, gs):
        assert g.shape == r.shape and g.dtype == dtype
        assert_matches_oracle(g, r, s, factor=3.0, what=name)
    return y, grads


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", PATTERN_HEADS)
@pytest.mark.parametrize("Hkv", [4, 2, 1], ids=lambda h: f"Hkv{h}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_matches_oracle_cpu(backend, kind, Hkv, causal):
    if HAS_CUDA:
        pytest.skip("the GPU grid below covers this")
    _check(backend, torch.float32 if backend == "triton" else torch.float64, 4, Hkv, kind, causal,
           Nq=29, Nk=41, B=1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gqa_f64_odd_lengths_and_blocks(backend):
    if HAS_CUDA:
        pytest.skip("the GPU grid below covers this")
    _check(backend, torch.float64, 6, 2, "per_kv_head", True, Nq=37, Nk=53, bs=12, B=1)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", PATTERN_HEADS)
@pytest.mark.parametrize("Hkv", [8, 4, 2, 1], ids=lambda h: f"Hkv{h}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_matches_oracle_gpu(backend, dtype, kind, Hkv, causal):
    _check(backend, dtype, 8, Hkv, kind, causal, Nq=203, Nk=177, bs=64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gqa_gpu_long_blocks_128(dtype):
    _check("triton", dtype, 8, 2, "broadcast", True, Nq=640, Nk=640, bs=128, dv=128)


@pytest.mark.gpu
def test_gqa_gradients_bitwise_stable_gpu():
    q, k, v = _qkv(2, 8, 2, 512, 512, 64, 64, torch.bfloat16, 5)
    p = _pattern("per_q_head", 2, 8, 2, 512, 512, 64, 6)
    dy = torch.randn(2, 8, 512, 64, device=DEVICE, dtype=torch.bfloat16)

    def run():
        y = bk.block_sparse_attention(q, k, v, p, block_size=64, is_causal=True)
        return (y, *torch.autograd.grad(y, (q, k, v), dy))
    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gqa_allocates_no_expanded_kv_gpu():
    """The forward and backward never materialise K/V at H heads: the memory a call needs
    above its outputs stays well under one expanded K/V copy."""
    B, H, Hkv, N, D = 1, 32, 4, 4096, 128
    q, k, v = _qkv(B, H, Hkv, N, N, D, D, torch.bfloat16, 7)
    prep = bk.prepare_pattern(torch.ones(1, 1, N // 128, N // 128, dtype=torch.bool),
                              query_len=N, block_size=128, is_causal=True, device=DEVICE)
    expanded_kv = 2 * B * H * N * D * 2  # bytes of K and V at H heads in bf16
    # backend="triton": our kernels (the all-active pattern would take the dense route).
    y = bk.block_sparse_attention(q, k, v, prep, backend="triton")  # compile / warm up
    dy = torch.ones_like(y)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = bk.block_sparse_attention(q, k, v, prep, backend="triton")
    grads = torch.autograd.grad(y, (q, k, v), dy)
    torch.cuda.synchronize()
    # y, dq, dk, dv, and the float32 rows lse, delta, lse2.
    outputs = y.numel() * 2 + sum(g.numel() * 2 for g in grads) + B * H * N * 4 * 3
    extra = torch.cuda.max_memory_allocated() - base - outputs
    assert extra < expanded_kv // 4, f"{extra / 2**20:.1f} MiB extra; expanded K/V is " \
                                     f"{expanded_kv / 2**20:.1f} MiB"


def test_gqa_head_counts_are_checked():
    q = torch.randn(1, 6, 32, 16)
    k = v = torch.randn(1, 4, 32, 16)
    p = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(bk.InvalidProblem, match="q has 6 heads and k/v have 4"):
        bk.block_sparse_attention(q, k, v, p, block_size=16)
    with pytest.raises(bk.InvalidProblem, match="q has 6 heads and k/v have 4"):
        bk.SdpaBlockSparseDescriptor(1, 6, 32, 32, 16, 16, 16, num_kv_heads=4)
    k2 = torch.randn(1, 2, 32, 16)
    with pytest.raises(bk.InvalidProblem, match="v has shape"):
        bk.block_sparse_attention(q, k2, v, p, block_size=16)
    bad = torch.ones(1, 3, 2, 2, dtype=torch.bool)  # neither 6, 2 nor 1 heads
    with pytest.raises(bk.InvalidProblem, match=r"head extent may also be 2 or 1"):
        bk.block_sparse_attention(q, k2, k2, bad, block_size=16)


def test_gqa_plan_api_and_prepared_pattern():
    B, H, Hkv, N, D, bs = 2, 4, 2, 40, 16, 16
    desc = bk.SdpaBlockSparseDescriptor(B, H, N, N, D, D, bs, is_causal=True, element="f64",
                                        num_kv_heads=Hkv)
    assert desc.group_size == 2 and desc.key_shape() == (B, Hkv, N, D)
    plan = bk.SdpaBlockSparsePlan.select(desc, device="cpu")
    assert "Hkv=2" in repr(plan)
    q, k, v = (t.detach() for t in _qkv(B, H, Hkv, N, N, D, D, torch.float64, 3, "cpu"))
    p = torch.ones(1, Hkv, 3, 3, dtype=torch.bool)
    p[:, 1, 2, 0] = False
    prep = plan.prepare(p)
    y = torch.full((B, H, N, D), float("nan"), dtype=torch.float64)
    lse = torch.full((B, H, N), float("nan"), dtype=torch.float64)
    plan.run(bk.SdpaBlockSparseArgs(q, k, v, prep, y=y, lse=lse))
    ref, ref_lse = dense_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                   p.repeat_interleave(2, 1), bs, True)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(lse, ref_lse)
    with pytest.raises(bk.InvalidProblem, match="k has shape"):
        plan.run(bk.SdpaBlockSparseArgs(q, q, v, prep))


def test_gqa_compile_fullgraph_cpu():
    B, H, Hkv, N, D, bs = 1, 4, 2, 48, 16, 16
    q, k, v = _qkv(B, H, Hkv, N, N, D, D, torch.float64, 9, "cpu")
    p = torch.ones(1, Hkv, 3, 3, dtype=torch.bool)
    p[:, 0, 1, 0] = False

    def f(q, k, v):
        return bk.block_sparse_attention(q, k, v, p, block_size=bs, is_causal=True).square().sum()
    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


def _launch_forward(q, k, v, p, bs, causal, pack):
    from baracuda_kernels.attention.block_sparse.block_lists import BlockLists
    from baracuda_kernels.attention.block_sparse.triton_fwd import \
        block_sparse_attention_forward_triton
    B, H, Nq, _ = q.shape
    lists = BlockLists.build(p, Nq, k.shape[2], bs, causal, use_triton=True)
    y = torch.full(q.shape[:-1] + (v.shape[-1],), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:-1], float("nan"), dtype=torch.float32, device=q.device)
    block_sparse_attention_forward_triton(q, k, v, lists, block_size=bs, scale=q.shape[-1] ** -0.5,
                                          is_causal=causal, y=y, lse=lse, pack_gqa=pack)
    return y, lse


@pytest.mark.parametrize("Nq,Nk,bs,kind,Hkv", [(1, 50, 16, "per_kv_head", 2),
                                               (5, 40, 32, "broadcast", 1),
                                               (24, 24, 16, "per_kv_head", 2),
                                               (33, 37, 64, "broadcast", 1)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_pack_gqa_forward_matches_oracle(Nq, Nk, bs, kind, Hkv, causal):
    """Pack-GQA tiles (a group's query rows in one tile) against the oracle and the plain
    launch, including short queries (decode-like) where the automatic rule packs."""
    from baracuda_kernels.attention.block_sparse.triton_fwd import pack_gqa_tiles
    dev = DEVICE
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    H = 4
    G = H // Hkv
    q, k, v = (t.detach() for t in _qkv(1, H, Hkv, Nq, Nk, 16, 16, dtype, Nq, dev))
    p = _pattern(kind, 1, H, Hkv, Nq, Nk, bs, 4)
    p[..., 0] = True  # the first query block attends something even under causal
    ke, ve = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    ref, ref_lse = dense_attention(q, ke, ve, _oracle_pattern(p, H), bs, causal)
    same, _ = dense_attention(q, ke, ve, _oracle_pattern(p, H), bs, causal, dtype=dtype)
    for pack in (True, False, None):
        y, lse = _launch_forward(q, k, v, p, bs, causal, pack)
        assert_matches_oracle(y, ref, same, what=f"y pack={pack}")
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-4)
    assert pack_gqa_tiles(4, 4, 1, 64, None) == (16, 4)      # decode: packed
    assert pack_gqa_tiles(4, 4, 16, 128, None) == (64, 16)   # short queries: packed
    assert pack_gqa_tiles(4, 4, 64, 128, None) is None       # half a tile: measured no gain
    assert pack_gqa_tiles(4, 4, 128, 128, None) is None      # full blocks: plain
    assert pack_gqa_tiles(4, 1, 1, 64, None) is None         # per-query-head pattern
    assert pack_gqa_tiles(4, 4, 128, 128, True) == (128, 32)
