"""The op-agnostic plan layer in core: backend registry (who declines and why), plan cache,
the Plan protocol that every op's plan implements."""

import pytest
import torch

import baracuda_kernels as bk
from baracuda_kernels.core import (BackendKind, BackendRegistry, Plan, PlanCache, Unsupported,
                                   resolve_device)


def _registry(log):
    reg = BackendRegistry("toy op")

    def triton(desc, device, options, explicit):
        log.append(("triton", explicit))
        return None if desc == "fits" else f"desc {desc!r} does not fit the kernel"

    reg.register(BackendKind.TRITON, triton, priority=0)
    reg.register(BackendKind.REFERENCE, lambda d, dev, o, e: None if d != "nothing" else "no",
                 priority=10)
    return reg


def test_registry_picks_first_that_accepts_and_reports_who_declined():
    log = []
    reg = _registry(log)
    assert reg.kinds == (BackendKind.TRITON, BackendKind.REFERENCE)
    choice = reg.choose("fits", torch.device("cpu"))
    assert choice.kind is BackendKind.TRITON and choice.declined == {}
    choice = reg.choose("odd", torch.device("cpu"))
    assert choice.kind is BackendKind.REFERENCE
    assert choice.declined == {BackendKind.TRITON: "desc 'odd' does not fit the kernel"}
    assert "triton: desc 'odd'" in choice.describe_declined()
    assert log == [("triton", False), ("triton", False)]


def test_registry_forced_backend_raises_with_its_reason():
    reg = _registry([])
    with pytest.raises(Unsupported, match=r"backend='triton' cannot run this toy op problem: "
                                          r"desc 'odd' does not fit"):
        reg.choose("odd", torch.device("cpu"), BackendKind.TRITON)
    with pytest.raises(Unsupported, match="does not implement toy op"):
        reg.choose("fits", torch.device("cpu"), BackendKind.TORCH_CUDNN)
    with pytest.raises(Unsupported, match="no backend can run this toy op problem: triton: .*; "
                                          "reference: no"):
        reg.choose("nothing", torch.device("cpu"))
    assert reg.reasons("odd", torch.device("cpu"))[BackendKind.REFERENCE] is None


def test_plan_cache_is_lru_and_selects_once():
    cache = PlanCache(max_plans=2)
    calls = []

    def select(name):
        return lambda: calls.append(name) or name
    assert cache.get("a", select("a")) == "a" and cache.get("a", select("a2")) == "a"
    cache.get("b", select("b"))
    cache.get("a", select("a3"))          # refreshes a
    cache.get("c", select("c"))           # evicts b, the least recently used
    assert calls == ["a", "b", "c"] and len(cache) == 2
    cache.get("b", select("b2"))
    assert calls[-1] == "b2"


def test_block_sparse_and_dense_plans_share_the_protocol():
    desc = bk.SdpaBlockSparseDescriptor(1, 2, 32, 32, 16, 16, 16, element="f32")
    plan = bk.SdpaBlockSparsePlan.select(desc, device="cpu")
    dense = bk.FlashSdpaPlan.select(bk.FlashSdpaDescriptor(1, 2, 32, 32, 16, 16, element="f32"),
                                    device="cpu")
    for p in (plan, dense):
        assert isinstance(p, Plan)
        assert p.workspace_size() == 0 and p.device == torch.device("cpu")
        assert p.sku.backend is p.backend and p.sku.precision_guarantee == p.precision_guarantee
        assert p.sku.category is bk.OpCategory.ATTENTION
    assert plan.sku.op is bk.AttentionKind.BLOCK_SPARSE_ATTENTION
    assert dense.sku.op is bk.AttentionKind.FLASH_SDPA
    # On a CPU the Triton interpreter is never picked automatically, and the plan says why;
    # the fused CPU backend is.
    assert plan.backend is BackendKind.CPU
    if BackendKind.TRITON in plan.declined:
        assert "CUDA" in plan.declined[BackendKind.TRITON] or \
            "asked for" in plan.declined[BackendKind.TRITON]
    assert set(dense.declined) >= {BackendKind.TORCH_CUDNN, BackendKind.TORCH_FLASH}


def test_resolve_device_rejects_missing_cuda():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(bk.InvalidProblem, match="CUDA is not available"):
        resolve_device("cuda")
