"""SdpaMaskedPlan and masked_sdpa: attention with an additive (float) or boolean mask, against
torch SDPA with the same mask (forward and the gradients of q, k, v and a float mask), with a
block pattern, GQA and a causal rule; the plan surface (select, can_implement, preallocated
outputs, run_backward) and its errors.

CPU: reference in f64 and triton under the interpreter in f32; GPU: triton in bf16 / f32."""

import pytest
import torch
import torch.nn.functional as F

import baracuda_kernels as bk
from cases import DEVICE, HAS_CUDA
from oracle import assert_matches_oracle, dense_attention


def sdpa(q, k, v, mask, is_causal=False):
    """torch SDPA (math) with GQA expanded, in float64, and its gradient tape."""
    G = q.shape[1] // k.shape[1]
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = mask.masked_fill(~causal, float("-inf")) if mask.dtype != torch.bool \
            else mask & causal
    return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1),
                                          v.repeat_interleave(G, 1), attn_mask=mask)


@pytest.mark.parametrize("backend", [
    "reference", pytest.param("triton", marks=pytest.mark.skipif(
        HAS_CUDA, reason="the GPU test below runs triton"))])
@pytest.mark.parametrize("mask_kind", ["float-per-head", "float-2d", "bool-padding"])
def test_masked_sdpa_matches_torch_sdpa(backend, mask_kind):
    dtype = torch.float64 if backend == "reference" else torch.float32
    gen = torch.Generator().manual_seed(1)
    B, H, Hkv, Nq, Nk = 2, 4, 2, 45, 70
    q = (torch.randn(B, H, Nq, 16, generator=gen) * 2).to(DEVICE, dtype)
    k, v = (torch.randn(B, Hkv, Nk, 16, generator=gen).to(DEVICE, dtype) for _ in range(2))
    if mask_kind == "float-per-head":
        mask = torch.randn(1, H, Nq, Nk, generator=gen) * 2
    elif mask_kind == "float-2d":
        mask = torch.randn(Nq, Nk, generator=gen) * 2
    else:
        mask = torch.rand(B, 1, 1, Nk, generator=gen) > 0.3
    mask = mask.to(DEVICE, dtype) if mask.dtype != torch.bool else mask.to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    trainable = mask.dtype != torch.bool
    if trainable:
        leaves.append(mask.clone().requires_grad_())
    y = bk.masked_sdpa(*leaves[:3], leaves[3] if trainable else mask, block_size=16,
                       backend=backend)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = sdpa(*ref_leaves[:3], ref_leaves[3] if trainable else mask)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn(y.shape, generator=gen).to(DEVICE, dtype)
    for g, r in zip(torch.autograd.grad(y, leaves, dy),
                    torch.autograd.grad(y_ref, ref_leaves, dy.double())):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


def test_masked_sdpa_with_pattern_and_causal_skips_blocks():
    """With a block pattern, masked_sdpa is block_sparse_attention with the bias: the oracle
    ANDs pattern, causal rule and bias; the bias outside active blocks is never read (NaN
    there changes nothing)."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    p = torch.tensor([[[[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]]]],
                     dtype=torch.bool)
    bias = torch.randn(1, 2, 64, 64, generator=gen, dtype=torch.float64)
    inactive = ~p.repeat_interleave(16, -1).repeat_interleave(16, -2)
    poisoned = bias.masked_fill(inactive, float("nan"))
    y = bk.masked_sdpa(q, k, v, poisoned, block_pattern=p, block_size=16, is_causal=True)
    y_ref, _ = dense_attention(q, k, v, p, 16, True, bias=bias)
    assert_matches_oracle(y, y_ref, y_ref)


def test_masked_plan_surface():
    desc = bk.SdpaMaskedDescriptor(2, 4, 40, 40, 8, 8, element="f64", is_causal=True,
                                   bias_shape=(1, 4, 40, 40), block_size=16)
    plan = bk.SdpaMaskedPlan.select(desc, device="cpu")
    assert plan.backend.value == "cpu" and plan.sku.op is bk.AttentionKind.MASKED_SDPA
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 40, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 4, 40, 40, generator=gen, dtype=torch.float64)
    y = torch.full((2, 4, 40, 8), float("nan"), dtype=torch.float64)
    lse = torch.full((2, 4, 40), float("nan"), dtype=torch.float64)
    args = bk.SdpaMaskedArgs(q, k, v, bias, y=y, lse=lse)
    assert plan.can_implement(args)
    y_out, lse_out = plan.run(args)
    assert y_out is y and lse_out is lse
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    y_fn, lse_fn = bk.masked_sdpa(*leaves, block_size=16, is_causal=True, return_lse=True)
    torch.testing.assert_close(y, y_fn)
    torch.testing.assert_close(lse, lse_fn)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = plan.run_backward(args, dy)
    for a, b in zip(grads, torch.autograd.grad(y_fn, leaves, dy)):
        torch.testing.assert_close(a, b)
    # Errors: typed, saying what was expected, nothing written.
    y.fill_(7.0)
    with pytest.raises(bk.InvalidProblem, match=r"bias_shape=\(1, 4, 40, 40\)"):
        plan.run(bk.SdpaMaskedArgs(q, k, v, bias[0, 0], y=y))
    with pytest.raises(bk.InvalidProblem, match="args.bias is None"):
        plan.run(bk.SdpaMaskedArgs(q, k, v, None, y=y))
    with pytest.raises(bk.InvalidProblem, match="SdpaMaskedArgs"):
        plan.run(bk.SdpaBlockSparseArgs(q, k, v, None))
    assert torch.all(y == 7.0)
    with pytest.raises(bk.InvalidProblem, match="bias_shape"):
        bk.SdpaMaskedDescriptor(2, 4, 40, 40, 8, 8, bias_shape=(1, 4, 40, 1))
    with pytest.raises(bk.InvalidProblem, match="SdpaMaskedDescriptor"):
        bk.SdpaMaskedPlan.select(bk.FlashSdpaDescriptor(2, 4, 40, 40, 8, 8), device="cpu")
    forced = {name: bk.SdpaMaskedPlan.select(desc, device="cpu", backend=name)
              for name in ("cpu", "reference")}
    torch.testing.assert_close(*(p.run(bk.SdpaMaskedArgs(q, k, v, bias))[0]
                                 for p in forced.values()))
    free = bk.SdpaMaskedPlan.select(bk.SdpaMaskedDescriptor(2, 4, 40, 40, 8, 8, element="f64",
                                                            block_size=16), device="cpu")
    torch.testing.assert_close(free.run(bk.SdpaMaskedArgs(q, k, v, bias[0, 0]))[0],
                               bk.masked_sdpa(q, k, v, bias[0, 0], block_size=16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_masked_sdpa_gpu(dtype):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 8, 1000, 64, generator=gen).to(DEVICE, dtype) for _ in range(3))
    bias = (torch.randn(1, 8, 1000, 1000, generator=gen) * 2).to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    y = bk.masked_sdpa(*leaves, is_causal=True)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y64 = sdpa(*ref_leaves, is_causal=True)
    same = [t.detach().to(dtype).requires_grad_() for t in leaves[:3]] + \
        [leaves[3].detach().clone().to(dtype).requires_grad_()]
    y_same = sdpa(*same, is_causal=True)
    assert_matches_oracle(y, y64, y_same)
    dy = torch.randn(y.shape, generator=gen).to(DEVICE, dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    g64 = torch.autograd.grad(y64, ref_leaves, dy.double())
    g_same = torch.autograd.grad(y_same, same, dy)
    for name, g, r, s in zip(("dq", "dk", "dv", "dbias"), grads, g64, g_same):
        assert_matches_oracle(g, r, s, factor=3.0, what=name)


def test_masked_sdpa_block_size_is_checked():
    q = torch.randn(1, 2, 40, 8)
    with pytest.raises(bk.InvalidProblem, match="block_size"):
        bk.masked_sdpa(q, q, q, torch.zeros(40, 40), block_size=0)
