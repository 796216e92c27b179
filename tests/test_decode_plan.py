"""SdpaDecodePlan: the plan surface of KV-cache attention (select once, check and run per
step): descriptor validation, backend choice and SKU, per-call checks of the tensors against
the descriptor (typed errors, nothing appended on failure), and the same result as
block_sparse_attention_with_kvcache."""

import pytest
import torch

import baracuda_kernels as bk
from cases import DEVICE, HAS_CUDA


def cache(B=2, N=64, Hkv=2, D=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kc = torch.randn(B, N, Hkv, D, generator=gen).to(DEVICE, dtype)
    vc = torch.randn(B, N, Hkv, D, generator=gen).to(DEVICE, dtype)
    return kc, vc, gen


@pytest.mark.parametrize("backend", [None, "reference"] + ([] if HAS_CUDA else ["triton"]))
def test_plan_matches_functional(backend):
    kc, vc, gen = cache()
    q = torch.randn(2, 1, 8, 16, generator=gen).to(DEVICE)
    k_new, v_new = (torch.randn(2, 1, 2, 16, generator=gen).to(DEVICE) for _ in range(2))
    sinks = torch.randn(8, generator=gen).to(DEVICE)
    lens = torch.tensor([5, 40], device=DEVICE)
    desc = bk.SdpaDecodeDescriptor.from_tensors(q, kc, vc, new_tokens=1, window_size=(20, 0),
                                                sink_tokens=2, sinks=True)
    plan = bk.SdpaDecodePlan.select(desc, device=DEVICE, backend=backend)
    assert plan.sku.op is bk.AttentionKind.DECODE
    kc2, vc2 = kc.clone(), vc.clone()
    y, lse = plan.run(bk.SdpaDecodeArgs(q, kc, vc, lens, k_new, v_new, sinks=sinks))
    y2, lse2 = bk.block_sparse_attention_with_kvcache(
        q, kc2, vc2, lens, k_new, v_new, window_size=(20, 0), sink_tokens=2, sinks=sinks,
        return_lse=True, backend="reference")
    torch.testing.assert_close(kc, kc2, rtol=0, atol=0)
    torch.testing.assert_close(y, y2.to(y.dtype))
    torch.testing.assert_close(lse, lse2)


def test_plan_reports_the_decode_kernel_where_it_runs():
    d = bk.SdpaDecodeDescriptor(4, 32, 1, 4096, 128, 128, element="bf16", num_kv_heads=8,
                                page_size=64, block_size=128)
    if HAS_CUDA:
        plan = bk.SdpaDecodePlan.select(d, device="cuda")
        assert plan.uses_decode_kernel and "decode BM=" in plan.sku.config
        assert "paged" in plan.sku.config
    plan = bk.SdpaDecodePlan.select(d, device="cpu")
    assert plan.backend is bk.BackendKind.REFERENCE and not plan.uses_decode_kernel
    assert bk.BackendKind.TRITON in plan.declined


def test_descriptor_validation():
    D = bk.SdpaDecodeDescriptor
    with pytest.raises(bk.InvalidProblem, match="page_size"):
        D(1, 4, 1, 100, 16, 16, page_size=64)
    with pytest.raises(bk.InvalidProblem, match="block_size"):
        D(1, 4, 1, 128, 16, 16, block_size=48)
    with pytest.raises(bk.InvalidProblem, match="is_causal"):
        D(1, 4, 1, 128, 16, 16, is_causal="bottom_right")
    with pytest.raises(bk.InvalidProblem, match="num_kv_heads|multiple"):
        D(1, 4, 1, 128, 16, 16, num_kv_heads=3)
    with pytest.raises(bk.InvalidProblem, match="new_tokens"):
        D(1, 4, 1, 128, 16, 16, new_tokens=200)


def test_run_checks_tensors_and_writes_nothing_on_failure():
    kc, vc, gen = cache()
    q = torch.randn(2, 1, 8, 16, generator=gen).to(DEVICE)
    desc = bk.SdpaDecodeDescriptor.from_tensors(q, kc, vc, new_tokens=1)
    plan = bk.SdpaDecodePlan.select(desc, device=DEVICE)
    before = kc.clone()
    k_new = torch.randn(2, 1, 2, 16, generator=gen).to(DEVICE)
    bad = [
        (bk.SdpaDecodeArgs(q[:, :, :4], kc, vc, 3, k_new, k_new), r"q has shape"),
        (bk.SdpaDecodeArgs(q, kc, vc, 3, None, None), r"k is a NoneType"),
        (bk.SdpaDecodeArgs(q, kc, vc, 3, k_new, k_new, sinks=torch.zeros(8, device=DEVICE)),
         r"sinks is given"),
        (bk.SdpaDecodeArgs(q, kc, vc, 3, k_new, k_new,
                           block_table=torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)),
         r"block_table given"),
        (bk.SdpaDecodeArgs(q.double(), kc, vc, 3, k_new, k_new), r"dtype"),
    ]
    for args, match in bad:
        with pytest.raises(bk.InvalidProblem, match=match):
            plan.run(args)
    torch.testing.assert_close(kc, before, rtol=0, atol=0)
    with pytest.raises(bk.InvalidProblem, match="SdpaDecodeArgs"):
        plan.run((q, kc, vc))


def test_paged_plan_checks_the_block_table():
    gen = torch.Generator().manual_seed(1)
    kp = torch.randn(6, 16, 2, 16, generator=gen).to(DEVICE)
    vp = torch.randn(6, 16, 2, 16, generator=gen).to(DEVICE)
    q = torch.randn(2, 1, 4, 16, generator=gen).to(DEVICE)
    table = torch.tensor([[3, 1, 5], [0, 2, 4]], dtype=torch.int32, device=DEVICE)
    desc = bk.SdpaDecodeDescriptor.from_tensors(q, kp, vp, block_table=table)
    assert desc.key_len == 48 and desc.page_size == 16
    plan = bk.SdpaDecodePlan.select(desc, device=DEVICE)
    with pytest.raises(bk.InvalidProblem, match="block_table"):
        plan.run(bk.SdpaDecodeArgs(q, kp, vp, 10, block_table=table[:, :2]))
    y, _ = plan.run(bk.SdpaDecodeArgs(q, kp, vp, torch.tensor([10, 48], device=DEVICE),
                                      block_table=table))
    ref = bk.block_sparse_attention_with_kvcache(q, kp, vp, torch.tensor([10, 48], device=DEVICE),
                                                 block_table=table, backend="reference")
    torch.testing.assert_close(y, ref)
