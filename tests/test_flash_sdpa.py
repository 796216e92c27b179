"""FlashSdpaPlan / flash_sdpa: dense (causal) attention with GQA behind the plan surface.

On the CPU: the reference grid (GQA ratios 1, 2, 4 and MQA, causal or not, odd lengths,
f32/f64, forward, lse and gradients), a few triton cases under the interpreter (f32/f64: its
bf16 dots are wrong), what the plan reports, the rules of the library backends (asked with
a CUDA device name, no GPU needed), the library autograd door run on torch's CPU flash
kernel, bad inputs and the routing rule. On the GPU (``gpu`` marker): the library backends
are picked and match the oracle; determinism and lse route to triton.
"""

import pytest
import torch

import baracuda_kernels as bk
from baracuda_kernels import BackendKind, InvalidProblem, Unsupported
from baracuda_kernels.attention.block_sparse.prepared import prepare_pattern
from baracuda_kernels.attention.flash_sdpa import plan as plan_module
from baracuda_kernels.attention.flash_sdpa import routing
from baracuda_kernels.attention.flash_sdpa.library_autograd import library_attention
from baracuda_kernels.attention.flash_sdpa.torch_sdpa import library_unavailable_reason
from cases import DEVICE
from oracle import assert_matches_oracle, dense_attention, rel_error

LIBRARY = (BackendKind.TORCH_CUDNN, BackendKind.TORCH_FLASH)
HEADS = [(4, 4), (4, 2), (8, 2), (4, 1)]  # H / Hkv = 1, 2, 4 and MQA
HEAD_IDS = ["mha", "gqa2", "gqa4", "mqa"]


def _qkv(B, H, Hkv, Nq, Nk, D, Dv, dtype, seed=0, device=DEVICE):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=gen) * 2.0  # peaked: a wrong mask shows
    k = torch.randn(B, Hkv, Nk, D, generator=gen)
    v = torch.randn(B, Hkv, Nk, Dv, generator=gen)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def _oracle(q, k, v, causal, dtype, dy, dlse=None):
    """(y, lse, (dq, dk, dv)) of dense attention in ``dtype``, K/V expanded to H heads."""
    G = q.shape[1] // k.shape[1]
    qx, kx, vx = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    ones = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device)
    y, lse = dense_attention(qx, kx.repeat_interleave(G, 1), vx.repeat_interleave(G, 1), ones,
                             max(q.shape[2], k.shape[2]), causal, dtype=dtype)
    outs, grads_in = (y,), (dy.to(dtype),)
    if dlse is not None:
        outs, grads_in = (y, lse), (dy.to(dtype), dlse.to(lse.dtype))
    return y, lse, torch.autograd.grad(outs, (qx, kx, vx), grads_in)


def _check(backend, dtype, H, Hkv, causal, *, B=1, Nq=37, Nk=53, D=16, Dv=24, with_lse=True):
    q, k, v = _qkv(B, H, Hkv, Nq, Nk, D, Dv, dtype)
    out = bk.flash_sdpa(q, k, v, is_causal=causal, backend=backend, return_lse=with_lse)
    y, lse = out if with_lse else (out, None)
    gen = torch.Generator(device="cpu").manual_seed(7)
    dy = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    dlse = torch.randn(lse.shape, generator=gen).to(lse.device, lse.dtype) if with_lse else None
    grads = torch.autograd.grad((y, lse) if with_lse else (y,), (q, k, v),
                                (dy, dlse) if with_lse else (dy,))
    y64, lse64, g64 = _oracle(q, k, v, causal, torch.float64, dy, dlse)
    ys, lses, gs = _oracle(q, k, v, causal, dtype, dy, dlse)
    assert_matches_oracle(y, y64, ys)
    if with_lse:
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_matches_oracle(lse, lse64, lses, what="lse")
    for name, g, ref, same in zip(("dq", "dk", "dv"), grads, g64, gs):
        assert g.shape == ref.shape
        assert_matches_oracle(g, ref, same, what=name)


# ------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("dtype,causal", [(torch.float32, False), (torch.float64, True)],
                         ids=["f32-full", "f64-causal"])
@pytest.mark.parametrize("H,Hkv", HEADS, ids=HEAD_IDS)
def test_reference_matches_oracle(dtype, H, Hkv, causal):
    _check("reference", dtype, H, Hkv, causal)


@pytest.mark.parametrize("dtype,H,Hkv,causal", [
    (torch.float32, 4, 4, True), (torch.float64, 4, 2, False),
    (torch.float32, 8, 2, False), (torch.float64, 4, 1, True)],
    ids=["f32-mha-causal", "f64-gqa2-full", "f32-gqa4-full", "f64-mqa-causal"])
def test_triton_matches_oracle(dtype, H, Hkv, causal):
    _check("triton", dtype, H, Hkv, causal)


def test_square_causal_and_no_lse():
    _check("reference", torch.float32, 4, 2, True, Nq=45, Nk=45, D=16, Dv=16, with_lse=False)


def test_empty_keys_give_zero_output_and_minus_inf_lse():
    q, k, v = _qkv(1, 2, 1, 5, 0, 8, 8, torch.float32)
    y, lse = bk.flash_sdpa(q, k, v, return_lse=True)
    assert torch.equal(y, torch.zeros_like(y)) and bool((lse == float("-inf")).all())


# ------------------------------------------------------------------------------ plan surface
def _desc(**kw):
    base = dict(batch_size=1, num_heads=4, query_len=37, key_len=53, d_k=16, d_v=16,
                is_causal=True, element="f32", num_kv_heads=2)
    base.update(kw)
    return bk.FlashSdpaDescriptor(**base)


def test_plan_reports_backend_sku_guarantee_and_declined_on_cpu():
    plan = bk.FlashSdpaPlan.select(_desc(), device="cpu")
    assert plan.backend is BackendKind.REFERENCE and plan.computes_lse
    sku = plan.sku
    assert sku.op is bk.AttentionKind.FLASH_SDPA and sku.backend is BackendKind.REFERENCE
    assert sku.aux_element is bk.ElementKind.F32 and "all-active" in sku.config
    assert plan.precision_guarantee.deterministic and plan.precision_guarantee.bit_stable_on_same_hardware
    declined = plan.declined
    assert set(declined) == {*LIBRARY, BackendKind.TRITON}
    for kind in LIBRARY:
        assert "not CUDA" in declined[kind]
    assert "triton" in declined[BackendKind.TRITON].lower()
    assert "reference" in repr(plan)


def test_plan_run_preallocated_and_backward_match_functional():
    desc = _desc(num_heads=2, num_kv_heads=1, d_v=24)
    plan = bk.FlashSdpaPlan.select(desc, device=DEVICE, backend="triton")
    assert plan.backend is BackendKind.TRITON and plan.block_sparse_plan is not None
    q, k, v = (t.detach() for t in _qkv(1, 2, 1, 37, 53, 16, 24, torch.float32))
    y = torch.full(desc.output_shape(), 7.0, device=DEVICE)
    lse = torch.full(desc.lse_shape(), 7.0, device=DEVICE)
    args = bk.FlashSdpaArgs(q, k, v, y, lse)
    assert plan.can_implement(args)
    y_out, lse_out = plan.run(args)
    assert y_out is y and lse_out is lse
    y_ref, lse_ref = bk.flash_sdpa(q, k, v, is_causal=True, return_lse=True, backend="reference")
    assert rel_error(y, y_ref) < 1e-5 and rel_error(lse, lse_ref) < 1e-5
    dy = torch.randn_like(y)
    dq = torch.empty_like(q)
    grads = plan.run_backward(args, dy, dq=dq)
    assert grads[0] is dq
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    y2 = bk.flash_sdpa(*leaves, is_causal=True, backend="reference")
    for g, ref in zip(grads, torch.autograd.grad(y2, leaves, dy)):
        assert rel_error(g, ref) < 1e-5


def test_deterministic_and_need_lse_never_pick_a_library_backend():
    for opts in ({"deterministic": True}, {"need_lse": True}, {}):
        plan = bk.FlashSdpaPlan.select(_desc(), device="cpu", **opts)
        assert plan.backend not in LIBRARY and plan.precision_guarantee.deterministic


# The library rules are asked with a CUDA device *name*: the checks before torch's own
# answer the question without touching a GPU.
CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("kind", LIBRARY, ids=["cudnn", "flash"])
def test_library_backend_reasons(kind, monkeypatch):
    half = _desc(element="bf16", is_causal=False, key_len=37)
    assert "not CUDA" in library_unavailable_reason(kind, half, torch.device("cpu"), {})
    assert "float16 and bfloat16" in library_unavailable_reason(kind, _desc(), CUDA, {})
    why = library_unavailable_reason(kind, half, CUDA, {"deterministic": True})
    assert "determinism" in why and "not promised deterministic" in why
    assert "lse" in library_unavailable_reason(kind, half, CUDA, {"need_lse": True})
    assert "head dims" in library_unavailable_reason(kind, _desc(element="f16", d_v=8), CUDA, {})
    assert "head dims" in library_unavailable_reason(kind, _desc(element="f16", d_k=512,
                                                                 d_v=512), CUDA, {})
    assert "empty" in library_unavailable_reason(kind, _desc(element="f16", key_len=0), CUDA, {})
    assert "query_len=37 != key_len=53" in library_unavailable_reason(
        kind, _desc(element="f16"), CUDA, {})
    if not torch.cuda.is_available():  # torch's own check cannot run: a reason, not a crash
        assert "torch cannot tell" in library_unavailable_reason(kind, half, CUDA, {})
    # torch.use_deterministic_algorithms(True) without flipping the process-wide flag
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert "determinism" in library_unavailable_reason(kind, half, CUDA, {})
    assert "determinism" in library_unavailable_reason(kind, half, CUDA, {"deterministic": False})


def test_forced_backend_that_declines_raises_with_its_reason():
    with pytest.raises(Unsupported, match="torch_cudnn.*not CUDA"):
        bk.FlashSdpaPlan.select(_desc(), device="cpu", backend="torch_cudnn")
    q, k, v = _qkv(1, 2, 2, 8, 8, 8, 8, torch.float32, device="cpu")
    with pytest.raises(Unsupported, match="torch_flash.*not CUDA"):
        bk.flash_sdpa(q, k, v, backend="torch_flash")
    with pytest.raises(InvalidProblem, match="expected None .automatic. or one of"):
        bk.flash_sdpa(q, k, v, backend="fastest")


def test_bad_problems_raise_typed_errors():
    with pytest.raises(InvalidProblem, match="multiple of the K/V heads"):
        _desc(num_heads=6, num_kv_heads=4)
    with pytest.raises(InvalidProblem, match="d_k is 0"):
        _desc(d_k=0)
    with pytest.raises(InvalidProblem, match="finite float"):
        _desc(scale=float("nan"))
    with pytest.raises(InvalidProblem, match="is_causal"):
        _desc(is_causal=1)
    with pytest.raises(InvalidProblem, match="expected an int"):
        _desc(query_len=3.0)
    with pytest.raises(InvalidProblem, match="FlashSdpaDescriptor"):
        bk.FlashSdpaPlan.select(bk.SdpaBlockSparseDescriptor(1, 1, 8, 8, 8, 8, 4), device="cpu")
    with pytest.raises(InvalidProblem, match="deterministic"):
        bk.FlashSdpaPlan.select(_desc(), device="cpu", deterministic="yes")
    q, k, v = _qkv(1, 4, 2, 8, 8, 8, 8, torch.float32)
    with pytest.raises(InvalidProblem, match="4 dims"):
        bk.flash_sdpa(q[0], k, v)
    with pytest.raises(InvalidProblem, match="k has dtype torch.float64"):
        bk.flash_sdpa(q, k.double(), v)
    with pytest.raises(InvalidProblem, match="v has shape"):
        bk.flash_sdpa(q, k, v[:, :, :5])
    with pytest.raises(InvalidProblem, match="q has 4 heads and k/v have 3"):
        bk.flash_sdpa(q, k[:, :1].expand(1, 3, 8, 8), v[:, :1].expand(1, 3, 8, 8))
    with pytest.raises(Unsupported, match="dtype torch.int32"):
        bk.flash_sdpa(*(t.detach().int() for t in (q, k, v)))


def test_run_checks_everything_before_writing():
    desc = _desc(query_len=8, key_len=8)
    plan = bk.FlashSdpaPlan.select(desc, device=DEVICE)
    q, k, v = (t.detach() for t in _qkv(1, 4, 2, 8, 8, 16, 16, torch.float32))
    y = torch.full(desc.output_shape(), 3.0, device=DEVICE)
    lse64 = torch.zeros(desc.lse_shape(), dtype=torch.float64, device=DEVICE)
    with pytest.raises(InvalidProblem, match="lse has dtype"):
        plan.run(bk.FlashSdpaArgs(q, k, v, y, lse64))
    with pytest.raises(InvalidProblem, match="y shares memory with q"):
        plan.run(bk.FlashSdpaArgs(q, k, v, q))
    with pytest.raises(InvalidProblem, match="expected FlashSdpaArgs"):
        plan.run((q, k, v))
    assert bool((y == 3.0).all())


# ------------------------------------------------------------------------------ library door
def _cpu_flash_plan(desc):
    """A library plan on torch's CPU flash kernel: select never picks it off CUDA, but the
    autograd door and the plan's library paths are the same code on every device."""
    return bk.FlashSdpaPlan(desc, torch.device("cpu"), BackendKind.TORCH_FLASH)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_library_door_forward_backward_retain_and_double_backward(causal):
    q, k, v = _qkv(2, 4, 2, 33, 33, 16, 16, torch.float32, device="cpu")
    plan = _cpu_flash_plan(bk.FlashSdpaDescriptor.from_tensors(q, k, v, is_causal=causal))
    assert not plan.computes_lse and plan.prepared_pattern is None
    assert plan.sku.config == "torch.nn.functional.scaled_dot_product_attention[flash]"
    assert plan.sku.aux_element is None
    assert not plan.precision_guarantee.deterministic
    assert not plan.precision_guarantee.bit_stable_on_same_hardware
    y = library_attention(plan, q, k, v)
    dy = torch.randn_like(y)
    y64, _, g64 = _oracle(q, k, v, causal, torch.float64, dy)
    ys, _, gs = _oracle(q, k, v, causal, torch.float32, dy)
    assert_matches_oracle(y, y64, ys)
    first = torch.autograd.grad(y, (q, k, v), dy, retain_graph=True)
    again = torch.autograd.grad(y, (q, k, v), dy)       # the inner graph was retained
    for g, g2, ref, same in zip(first, again, g64, gs):
        assert_matches_oracle(g, ref, same) and torch.equal(g, g2)
    (dq,) = torch.autograd.grad(library_attention(plan, q, k.detach(), v.detach()), (q,), dy)
    assert_matches_oracle(dq, g64[0], gs[0], what="dq only")
    (dq,) = torch.autograd.grad(library_attention(plan, q, k, v).square().sum(), (q,),
                                create_graph=True)
    with pytest.raises(Unsupported, match="differentiable once"):
        dq.sum().backward()
    with torch.no_grad():
        assert torch.equal(library_attention(plan, q, k, v), y.detach())


def test_library_plan_run_and_run_backward():
    q, k, v = (t.detach() for t in _qkv(1, 4, 1, 16, 16, 16, 16, torch.float32, device="cpu"))
    desc = bk.FlashSdpaDescriptor.from_tensors(q, k, v)
    plan = _cpu_flash_plan(desc)
    y = torch.empty(desc.output_shape())
    out, lse = plan.run(bk.FlashSdpaArgs(q, k, v, y))
    assert out is y and lse is None
    with pytest.raises(InvalidProblem, match="computes no lse"):
        plan.run(bk.FlashSdpaArgs(q, k, v, None, torch.empty(desc.lse_shape())))
    dy = torch.randn_like(y)
    with pytest.raises(InvalidProblem, match="dlse"):
        plan.run_backward(bk.FlashSdpaArgs(q, k, v, y), dy, dlse=torch.zeros(desc.lse_shape()))
    dv = torch.empty_like(v)
    grads = plan.run_backward(bk.FlashSdpaArgs(q, k, v, y), dy, dv=dv)
    assert grads[2] is dv
    _, _, g64 = _oracle(q, k, v, False, torch.float64, dy)
    for g, ref in zip(grads, g64):
        assert rel_error(g, ref) < 1e-4


# ------------------------------------------------------------------------------ routing
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_all_blocks_active(causal):
    def prep(mask):
        return prepare_pattern(mask, query_len=40, key_len=40, block_size=16, is_causal=causal)
    ones = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    assert routing.all_blocks_active(prep(ones))
    above, below = ones.clone(), ones.clone()
    above[..., 0, 2] = False  # emptied by the causal rule anyway
    below[..., 2, 0] = False
    assert routing.all_blocks_active(prep(above)) is causal
    assert not routing.all_blocks_active(prep(below))
    per_head = torch.ones(2, 4, 3, 3, dtype=torch.bool)
    per_head[1, 3, 1, 1] = False
    assert not routing.all_blocks_active(prep(per_head))


def test_dense_route_rule(monkeypatch):
    bs_desc = bk.SdpaBlockSparseDescriptor(1, 4, 64, 64, 16, 16, 16, is_causal=True,
                                           element="bf16", num_kv_heads=2)
    routing._ROUTES.clear()
    assert routing.dense_route(bs_desc, DEVICE, True, None) is None or torch.cuda.is_available()
    # Pretend a library backend accepts (no GPU here): the rule around it is what is tested.
    accept = lambda kind, desc, device, options: (  # noqa: E731
        library_unavailable_reason(kind, desc, CUDA, options)
        if options.get("deterministic") or options.get("need_lse") else None)
    monkeypatch.setattr(routing, "library_unavailable_reason", accept)
    monkeypatch.setattr(plan_module, "library_unavailable_reason", accept)
    routing._ROUTES.clear()
    try:
        plan = routing.dense_route(bs_desc, "cpu", True, None)
        assert plan is not None and plan.backend is BackendKind.TORCH_CUDNN
        assert plan.descriptor == bk.FlashSdpaDescriptor.from_block_sparse(bs_desc)
        assert routing.dense_route(bs_desc, "cpu", True, None) is plan  # cached
        assert routing.dense_route(bs_desc, "cpu", False, None) is None
        assert routing.dense_route(bs_desc, "cpu", True, True) is None
        assert routing.dense_route(bs_desc, "cpu", True, None, need_lse=True) is None
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        assert routing.dense_route(bs_desc, "cpu", True, None) is None
    finally:
        routing._ROUTES.clear()


# ------------------------------------------------------------------------------ GPU
GPU_CASES = [(8, 8, 256, False), (8, 2, 256, True), (8, 1, 1000, True), (4, 2, 333, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("H,Hkv,N,causal", GPU_CASES, ids=["mha", "gqa4-causal", "mqa-causal",
                                                            "gqa2-odd"])
def test_gpu_library_backend_matches_oracle(dtype, H, Hkv, N, causal):
    q, k, v = _qkv(2, H, Hkv, N, N, 64, 64, dtype, device="cuda")
    desc = bk.FlashSdpaDescriptor.from_tensors(q, k, v, is_causal=causal)
    plan = bk.FlashSdpaPlan.select(desc, device="cuda")
    assert plan.backend in LIBRARY, plan.declined
    name = "cudnn" if plan.backend is BackendKind.TORCH_CUDNN else "flash"
    assert plan.sku.config.endswith(f"[{name}]") and not plan.precision_guarantee.deterministic
    y = bk.flash_sdpa(q, k, v, is_causal=causal)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    y64, _, g64 = _oracle(q, k, v, causal, torch.float64, dy)
    ys, _, gs = _oracle(q, k, v, causal, dtype, dy)
    assert_matches_oracle(y, y64, ys)
    for name, g, ref, same in zip(("dq", "dk", "dv"), grads, g64, gs):
        assert_matches_oracle(g, ref, same, what=name)


@pytest.mark.gpu
def test_gpu_determinism_and_lse_pick_triton():
    desc = bk.FlashSdpaDescriptor(2, 8, 512, 512, 64, 64, is_causal=True, element="bf16",
                                  num_kv_heads=2)
    assert bk.FlashSdpaPlan.select(desc, device="cuda").backend in LIBRARY
    for opts in ({"deterministic": True}, {"need_lse": True}):
        plan = bk.FlashSdpaPlan.select(desc, device="cuda", **opts)
        assert plan.backend is BackendKind.TRITON and plan.precision_guarantee.deterministic
        assert set(plan.declined) == set(LIBRARY)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert bk.FlashSdpaPlan.select(desc, device="cuda").backend is BackendKind.TRITON
    finally:
        torch.use_deterministic_algorithms(previous)
    q, k, v = _qkv(2, 8, 2, 512, 512, 64, 64, torch.bfloat16, device="cuda")
    y, lse = bk.flash_sdpa(q, k, v, is_causal=True, return_lse=True)
    y64, lse64, _ = _oracle(q, k, v, True, torch.float64, torch.zeros_like(y))
    ys, lses, _ = _oracle(q, k, v, True, torch.bfloat16, torch.zeros_like(y))
    assert_matches_oracle(y, y64, ys)
    assert_matches_oracle(lse, lse64, lses, what="lse")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_block_sparse_attention_routes_all_active_prepared_patterns(causal, monkeypatch):
    """block_sparse_attention with an all-active prepared pattern runs on a library backend
    (the dense route) unless determinism, lse or a forced backend says otherwise; a pattern
    with one block off stays on our kernels."""
    from baracuda_kernels.attention.block_sparse import functional as bs_functional
    q, k, v = _qkv(2, 8, 2, 512, 512, 64, 64, torch.bfloat16, device="cuda")
    full = torch.ones(1, 1, 4, 4, dtype=torch.bool, device="cuda")
    prep = bk.prepare_pattern(full, query_len=512, block_size=128, is_causal=causal)
    routed = []
    real = bs_functional.library_attention
    monkeypatch.setattr(bs_functional, "library_attention",
                        lambda plan, *a: routed.append(plan.backend) or real(plan, *a))
    y = bk.block_sparse_attention(q, k, v, prep)
    assert routed and routed[-1] in LIBRARY
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    y64, _, g64 = _oracle(q, k, v, causal, torch.float64, dy)
    ys, _, gs = _oracle(q, k, v, causal, torch.bfloat16, dy)
    assert_matches_oracle(y, y64, ys)
    for name, g, ref, same in zip(("dq", "dk", "dv"), grads, g64, gs):
        assert_matches_oracle(g, ref, same, what=name)
    n = len(routed)
    ours = bk.block_sparse_attention(q, k, v, prep, deterministic=True)
    assert torch.equal(ours, bk.block_sparse_attention(q, k, v, prep, backend="triton"))
    bk.block_sparse_attention(q, k, v, prep, return_lse=True)
    holed = full.clone()
    holed[..., 3, 0] = False
    bk.block_sparse_attention(q, k, v, bk.prepare_pattern(holed, query_len=512, block_size=128,
                                                          is_causal=causal))
    assert len(routed) == n, "deterministic / return_lse / a missing block must not route"
