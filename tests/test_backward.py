"""Gradients vs the float64 dense oracle, for every backend (triton's grid runs on the GPU)."""

import pytest
import torch

import baracuda_kernels as bk
from cases import ALL_DTYPES, BACKENDS, DEVICE, nblocks, random_pattern, random_qkv
from oracle import assert_matches_oracle, dense_attention


def grads_of(fn, q, k, v, dy):
    y = fn(q, k, v)
    return torch.autograd.grad(y, (q, k, v), dy)


def check_grads(q, k, v, pattern, bs, causal, backend, dy=None, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if dy is None:
        dy = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=gen).to(q.device, q.dtype)
    ours = grads_of(lambda a, b, c: bk.block_sparse_attention(a, b, c, pattern, block_size=bs,
                                                              is_causal=causal, backend=backend),
                    q, k, v, dy)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = grads_of(lambda a, b, c: dense_attention(a, b, c, pattern, bs, causal)[0], q64, k64, v64,
                   dy.double())
    same = grads_of(lambda a, b, c: dense_attention(a, b, c, pattern, bs, causal, dtype=q.dtype)[0],
                    q, k, v, dy)
    for name, g, r, s in zip(("dq", "dk", "dv"), ours, ref, same):
        assert g.shape == r.shape and g.dtype == q.dtype
        assert_matches_oracle(g, r, s, factor=3.0, what=name)
    return ours


CASES = [(16, 1, 1), (16, 17, 33), (16, 113, 203), (32, 203, 113), (64, 65, 63), (1, 13, 9),
         (128, 129, 129)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("bs,Nq,Nk", CASES)
def test_gradients_match_oracle(backend, dtype, causal, bs, Nq, Nk):
    q, k, v = random_qkv(2, 2, Nq, Nk, 16, 24, dtype, seed=Nq + Nk, requires_grad=True)
    pattern = random_pattern(2, 1, Nq, Nk, bs, seed=bs)
    check_grads(q, k, v, pattern, bs, causal, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_empty_rows_have_zero_gradients(backend, dtype):
    bs, N = 16, 64
    q, k, v = random_qkv(1, 2, N, N, 16, 16, dtype, requires_grad=True)
    pattern = torch.ones(1, 1, 4, 4, dtype=torch.bool, device=DEVICE)
    pattern[..., 0, 0] = False  # with causal, query block 0 sees nothing
    pattern[..., :, 3] = False  # key block 3 is never attended
    dq, dk, dv = check_grads(q, k, v, pattern, bs, True, backend)
    assert (dq[:, :, :bs] == 0).all()
    assert (dk[:, :, 3 * bs:] == 0).all() and (dv[:, :, 3 * bs:] == 0).all()
    for g in (dq, dk, dv):
        assert not torch.isnan(g).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_noncontiguous_upstream_gradient(backend):
    B, H, N, D, bs = 2, 2, 80, 16, 16
    q = random_qkv(B, N, H, N, D, D, torch.float32)[0].transpose(1, 2).requires_grad_()
    k, v = (t.requires_grad_() for t in random_qkv(B, H, N, N, D, D, torch.float32, seed=4)[1:])
    dy = torch.randn(B, N, H, D, device=DEVICE).transpose(1, 2)
    assert not q.is_contiguous() and not dy.is_contiguous()
    check_grads(q, k, v, random_pattern(1, H, N, N, bs), bs, True, backend, dy=dy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_pattern_gradients(backend):
    q, k, v = random_qkv(2, 3, 70, 70, 16, 16, torch.float64, requires_grad=True)
    check_grads(q, k, v, random_pattern(1, 1, 70, 70, 16), 16, False, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_gradients_deterministic(backend, dtype):
    q, k, v = random_qkv(2, 2, 130, 130, 32, 32, dtype, requires_grad=True)
    pattern = random_pattern(2, 2, 130, 130, 32)
    dy = torch.randn(2, 2, 130, 32, device=DEVICE).to(dtype)
    fn = lambda a, b, c: bk.block_sparse_attention(a, b, c, pattern, block_size=32, is_causal=True,  # noqa: E731
                                                   backend=backend)
    first = grads_of(fn, q, k, v, dy)
    for _ in range(3):
        again = grads_of(fn, q, k, v, dy)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_gradcheck_float64_reference():
    q, k, v = random_qkv(1, 2, 11, 9, 4, 5, torch.float64, requires_grad=True, device="cpu")
    pattern = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.bool).view(1, 1, 3, 3)
    for causal in (False, True):
        fn = lambda a, b, c: bk.block_sparse_attention(a, b, c, pattern, block_size=4,  # noqa: E731
                                                       is_causal=causal, backend="reference")
        assert torch.autograd.gradcheck(fn, (q, k, v))


def test_plan_run_backward_matches_autograd():
    d = bk.SdpaBlockSparseDescriptor(1, 2, 50, 40, 16, 8, block_size=16, is_causal=True,
                                     element=torch.float64)
    plan = bk.SdpaBlockSparsePlan.select(d, device=DEVICE, backend="reference")
    q, k, v = random_qkv(1, 2, 50, 40, 16, 8, torch.float64, requires_grad=True)
    pattern = random_pattern(1, 1, 50, 40, 16)
    args = bk.SdpaBlockSparseArgs(q.detach(), k.detach(), v.detach(), pattern)
    plan.run(args)
    dy = torch.randn(1, 2, 50, 8, dtype=torch.float64, device=DEVICE)
    dq = torch.full_like(q, float("nan"))
    got = plan.run_backward(args, dy, dq=dq)
    assert got[0] is dq
    want = grads_of(lambda a, b, c: bk.block_sparse_attention(a, b, c, pattern, block_size=16,
                                                              is_causal=True, backend="reference"),
                    q, k, v, dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
