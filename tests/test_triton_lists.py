"""One-launch Triton block-list builder vs the torch-op version (classify_blocks + _compact).

Counts must match exactly, and each line's first ``count`` index entries too (entries past
the count are unspecified and not compared). CPU tests run under TRITON_INTERPRET=1 on small
patterns; GPU tests (marked ``gpu``) repeat the comparison on CUDA and inside a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from baracuda_kernels.attention.block_sparse.block_lists import _compact, classify_blocks
from baracuda_kernels.attention.block_sparse.triton_lists import build_block_lists_triton

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def _blocks(n: int, bs: int) -> int:
    return -(-n // bs)


def _random_pattern(shape, density: float, seed: int, device=DEV) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen) < density).to(device)


def _reference(pattern, query_len, key_len, block_size, is_causal):
    cls = classify_blocks(pattern != 0, query_len, key_len, block_size, is_causal)
    return (*_compact(cls), *_compact(cls.transpose(-1, -2)))


def _assert_lists_equal(got, want):
    names = ("kv_index", "kv_count_full", "kv_count", "q_index", "q_count_full", "q_count")
    for name, g, w in zip(names, got, want):
        assert g.dtype == torch.int32 and g.is_contiguous(), name
        assert g.shape == w.shape and g.device == w.device, (name, g.shape, w.shape)
    for index, count, name in ((0, 2, "kv"), (3, 5, "q")):
        g_idx, w_idx, cnt = got[index].cpu(), want[index].cpu(), want[count].cpu()
        assert torch.equal(got[count - 1].cpu(), want[count - 1].cpu()), f"{name}_count_full"
        assert torch.equal(got[count].cpu(), cnt), f"{name}_count"
        # Only the first `count` entries of each line are specified.
        valid = torch.arange(g_idx.shape[-1]) < cnt[..., None]
        assert torch.equal(g_idx[valid], w_idx[valid]), f"{name}_index"


def _check(pattern, query_len, key_len, block_size, is_causal, **kw):
    got = build_block_lists_triton(pattern, query_len, key_len, block_size, is_causal, **kw)
    _assert_lists_equal(got, _reference(pattern, query_len, key_len, block_size, is_causal))
    return got


# --------------------------------------------------------------------------------------
# CPU (interpreter) and GPU alike
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("query_len,key_len,block_size", [
    (203, 113, 16),   # ragged both, Nq > Nk
    (45, 83, 16),     # ragged both, Nq < Nk
    (64, 48, 16),     # no ragged tail
    (10, 40, 16),     # Nq < block_size
    (150, 130, 64),   # large block, ragged
    (13, 21, 1),      # block 1: never ragged, FULL on the diagonal
    (2**33 + 5, 2**32 + 2**29, 2**30),  # token indices past 2^32, small pattern
])
def test_random_patterns_match_torch(query_len, key_len, block_size, is_causal):
    nq, nk = _blocks(query_len, block_size), _blocks(key_len, block_size)
    # A per-(b, h) pattern and a broadcast one (Bp = Hp = 1), at two densities.
    for seed, (shape, density) in enumerate([((2, 2, nq, nk), 0.3), ((1, 1, nq, nk), 0.75)]):
        _check(_random_pattern(shape, density, seed), query_len, key_len, block_size, is_causal)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("fill", [0, 1])
def test_all_zero_and_all_one(fill, is_causal):
    query_len, key_len, bs = 203, 113, 16
    shape = (1, 1, _blocks(query_len, bs), _blocks(key_len, bs))
    got = _check(torch.full(shape, fill, dtype=torch.bool, device=DEV), query_len, key_len, bs,
                 is_causal)
    if fill == 0:
        assert int(got[2].abs().sum()) == 0 and int(got[5].abs().sum()) == 0


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_uint8_values_other_than_one(dtype):
    """Any non-zero uint8 is active; bool and uint8 give the same lists."""
    pat = _random_pattern((1, 2, 13, 8), 0.5, 7)
    if dtype == torch.uint8:
        gen = torch.Generator().manual_seed(3)
        pat = pat.to(torch.uint8) * torch.randint(1, 256, pat.shape, generator=gen,
                                                  dtype=torch.uint8).to(DEV)
    _check(pat, 203, 113, 16, True)


@pytest.mark.parametrize("is_causal", [False, True])
def test_non_contiguous_patterns(is_causal):
    query_len, key_len, bs = 75, 45, 16   # nq = 5, nk = 3, both ragged
    nq, nk = _blocks(query_len, bs), _blocks(key_len, bs)
    # Broadcast view: stride 0 on B and H.
    expanded = _random_pattern((1, 1, nq, nk), 0.6, 11).expand(2, 3, nq, nk)
    assert expanded.stride()[:2] == (0, 0)
    _check(expanded, query_len, key_len, bs, is_causal)
    # Transposed view of a pattern laid out for the other geometry: unit stride along q.
    transposed = _random_pattern((2, 2, nk, nq), 0.6, 12).transpose(-1, -2)
    assert transposed.stride(-2) == 1
    _check(transposed, query_len, key_len, bs, is_causal)
    _check(transposed.to(torch.uint8), query_len, key_len, bs, is_causal)
    # A flat per-(b, h) pattern reshaped to 4-D, and a strided slice of a bigger one.
    flat = _random_pattern((2, 3, nq * nk), 0.6, 13).to(torch.uint8)
    _check(flat.reshape(2, 3, nq, nk), query_len, key_len, bs, is_causal)
    big = _random_pattern((2, 4, nq + 3, 2 * nk), 0.6, 14)
    _check(big[:, 1::2, 2:nq + 2, ::2], query_len, key_len, bs, is_causal)


@pytest.mark.parametrize("is_causal", [False, True])
def test_lines_longer_than_the_chunk(is_causal):
    """chunk=16 with 40..50 cells per line: running counts carried across chunks."""
    query_len, key_len, bs = 7 * 39 + 3, 7 * 50, 7   # nq = 40 (ragged), nk = 50
    nq, nk = _blocks(query_len, bs), _blocks(key_len, bs)
    pat = _random_pattern((1, 1, nq, nk), 0.5, 20)
    pat[:, :, :6] = True       # dense rows and columns: whole chunks of FULL (then PARTIAL)
    pat[:, :, :, -6:] = True
    _check(pat, query_len, key_len, bs, is_causal, chunk=16)
    # chunk 1 is the degenerate extreme of the same path.
    _check(_random_pattern((1, 1, 5, 4), 0.5, 30), 5 * 16, 4 * 16 - 2, 16, is_causal, chunk=1)


def test_empty_patterns_do_not_launch():
    for shape, (nq_len, nk_len) in [((0, 2, 3, 4), (48, 64)), ((1, 1, 0, 4), (0, 64)),
                                    ((1, 2, 3, 0), (48, 0))]:
        pat = torch.ones(shape, dtype=torch.bool, device=DEV)
        kv_idx, kv_cf, kv_c, q_idx, q_cf, q_c = build_block_lists_triton(
            pat, nq_len, nk_len, 16, True)
        B, H, nq, nk = shape
        assert kv_idx.shape == (B, H, nq, nk) and q_idx.shape == (B, H, nk, nq)
        assert kv_cf.shape == kv_c.shape == (B, H, nq)
        assert q_cf.shape == q_c.shape == (B, H, nk)
        for c in (kv_cf, kv_c, q_cf, q_c):
            assert c.dtype == torch.int32 and int(c.abs().sum()) == 0


def test_rejects_bad_input():
    pat = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    with pytest.raises(ValueError):
        build_block_lists_triton(pat, 48, 80, 16, False)        # nk mismatch
    with pytest.raises(TypeError):
        build_block_lists_triton(pat.float(), 48, 64, 16, False)
    with pytest.raises(ValueError):
        build_block_lists_triton(pat, 48, 64, 16, False, chunk=24)


# --------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("query_len,key_len,block_size", [
    (4093, 2011, 64), (2011, 4093, 128), (8192, 8192, 64), (777, 513, 1),
])
def test_gpu_matches_torch(query_len, key_len, block_size, is_causal):
    nq, nk = _blocks(query_len, block_size), _blocks(key_len, block_size)
    for seed, (shape, density) in enumerate([((2, 4, nq, nk), 0.1), ((1, 1, nq, nk), 0.9)]):
        pat = _random_pattern(shape, density, seed, "cuda")
        _check(pat, query_len, key_len, block_size, is_causal)          # default chunk
        _check(pat, query_len, key_len, block_size, is_causal, chunk=32)
    expanded = _random_pattern((1, 1, nq, nk), 0.3, 5, "cuda").expand(2, 3, nq, nk)
    _check(expanded, query_len, key_len, block_size, is_causal)
    _check(_random_pattern((2, 2, nk, nq), 0.3, 6, "cuda").transpose(-1, -2), query_len,
           key_len, block_size, is_causal)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_second_device():
    """The launch must follow the pattern's device, not the current one."""
    pat = _random_pattern((1, 2, 40, 30), 0.5, 8, "cuda:1")
    with torch.cuda.device(0):
        _check(pat, 40 * 16 - 5, 30 * 16, 16, True)


@pytest.mark.gpu
@pytest.mark.parametrize("is_causal", [False, True])
def test_gpu_cuda_graph_rereads_the_pattern(is_causal):
    query_len, key_len, bs = 3001, 2500, 64
    nq, nk = _blocks(query_len, bs), _blocks(key_len, bs)
    pattern = _random_pattern((2, 3, nq, nk), 0.3, 40, "cuda")
    args = (query_len, key_len, bs, is_causal)
    # Warm up (compile, allocator) on a side stream before capturing, as torch recommends.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        build_block_lists_triton(pattern, *args)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = build_block_lists_triton(pattern, *args)

    for seed, density in ((41, 0.3), (42, 0.05), (43, 0.9), (44, 0.0)):
        with torch.no_grad():
            pattern.copy_(_random_pattern(pattern.shape, density, seed, "cuda"))
        graph.replay()
        torch.cuda.synchronize()
        _assert_lists_equal(static_out, build_block_lists_triton(pattern, *args))
        _assert_lists_equal(static_out, _reference(pattern, *args))
