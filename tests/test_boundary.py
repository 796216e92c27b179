"""The API boundary: autograd contract, prepared patterns, NaN, aliasing, autocast, odd inputs.

Every test runs on both backends: the reference, and the Triton kernels (under the
interpreter on a machine without a GPU, on the GPU otherwise). Small shapes: these check
the contract, not the numerics grid (test_forward.py / test_backward.py do that).
"""

import pytest
import torch

import baracuda_kernels as bk
from baracuda_kernels.attention.block_sparse import triton_bwd
from baracuda_kernels.attention.block_sparse.autograd import block_sparse_attention_op
from baracuda_kernels.attention.block_sparse.block_lists import BlockLists
from baracuda_kernels.patterns import sliding_window
from cases import DEVICE, HAS_CUDA, random_qkv
from oracle import dense_attention, rel_error

BACKENDS = ["reference", "triton"] + ([] if HAS_CUDA else ["cpu"])  # cpu: the CPU default
B, H, N, D, BS = 1, 2, 40, 16, 16          # 3 x 3 blocks, the last one ragged


def _pattern(dtype=torch.bool):
    p = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=dtype, device=DEVICE)
    return p.expand(1, H, 3, 3).contiguous()


def _inputs(dtype=torch.float32, requires_grad=True, seed=0):
    return random_qkv(B, H, N, N, D, D, dtype, seed=seed, requires_grad=requires_grad)


def _oracle(q, k, v, pattern, causal=True):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    y, lse = dense_attention(q64, k64, v64, pattern.bool(), BS, causal)
    return (q64, k64, v64), y, lse


def _attend(q, k, v, pattern, backend, **kw):
    kw.setdefault("block_size", None if hasattr(pattern, "lists") else BS)
    kw.setdefault("is_causal", None if hasattr(pattern, "lists") else True)
    return bk.block_sparse_attention(q, k, v, pattern, backend=backend, **kw)


# ------------------------------------------------------------------------------ autograd
@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_backward_with_stride0_dy(backend):
    """y.sum().backward() hands the backward an expanded dy with all strides 0."""
    q, k, v = _inputs()
    pattern = _pattern()
    _attend(q, k, v, pattern, backend).sum().backward()
    leaves, y_ref, _ = _oracle(q, k, v, pattern)
    y_ref.sum().backward()
    for ours, ref in zip((q.grad, k.grad, v.grad), leaves):
        assert rel_error(ours, ref.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_q_needs_grad_skips_dkdv(backend, monkeypatch):
    q, k, v = _inputs()
    k, v = k.detach(), v.detach()
    launches = {"dkdv": 0, "dq": 0}
    for name in launches:
        kernel = getattr(triton_bwd, f"_bwd_{name}_kernel")
        monkeypatch.setattr(triton_bwd, f"_bwd_{name}_kernel", _Counting(kernel, launches, name))
    pattern = _pattern()
    dy = torch.randn(B, H, N, D, device=DEVICE)
    (dq,) = torch.autograd.grad(_attend(q, k, v, pattern, backend), (q,), dy)
    leaves, y_ref, _ = _oracle(q, k, v, pattern)
    (dq_ref,) = torch.autograd.grad(y_ref, leaves[:1], dy.double())
    assert rel_error(dq, dq_ref) < 1e-5
    if backend == "triton":
        assert launches == {"dkdv": 0, "dq": 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_kv_need_grad_skips_dq(backend, monkeypatch):
    q, k, v = _inputs()
    launches = {"dkdv": 0, "dq": 0}
    for name in launches:
        kernel = getattr(triton_bwd, f"_bwd_{name}_kernel")
        monkeypatch.setattr(triton_bwd, f"_bwd_{name}_kernel", _Counting(kernel, launches, name))
    pattern = _pattern()
    y, lse = _attend(q.detach(), k, v, pattern, backend, return_lse=True)
    w = torch.randn(B, H, N, device=DEVICE)
    dk, dv = torch.autograd.grad(y.sum() + (lse * w).sum(), (k, v))
    leaves, y_ref, lse_ref = _oracle(q, k, v, pattern)
    _, dk_ref, dv_ref = torch.autograd.grad(y_ref.sum() + (lse_ref * w.double()).sum(), leaves)
    assert rel_error(dk, dk_ref) < 1e-5 and rel_error(dv, dv_ref) < 1e-5
    if backend == "triton":
        assert launches == {"dkdv": 1, "dq": 0}


class _Counting:
    """Stands in for a Triton kernel object and counts its launches."""

    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] += 1
        return self.kernel[grid]


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_clearly(backend):
    q, k, v = _inputs()
    y = _attend(q, k, v, _pattern(), backend)
    (gq,) = torch.autograd.grad(y.square().sum(), (q,), create_graph=True)
    with pytest.raises(bk.Unsupported, match="differentiable once"):
        gq.square().sum().backward()


def test_double_backward_raises_through_the_custom_op():
    q, k, v = _inputs()
    y, _ = block_sparse_attention_op(q, k, v, _pattern(), BS, D ** -0.5, "top_left", "reference")
    (gq,) = torch.autograd.grad(y.square().sum(), (q,), create_graph=True)
    with pytest.raises(bk.Unsupported, match="differentiable once"):
        gq.square().sum().backward()


@pytest.mark.parametrize("door", ["function", "custom_op"])
def test_both_doors_share_the_contract(door):
    """Stride-0 dy, lse gradient and q-only gradients through either autograd door."""
    q, k, v = _inputs()
    pattern = _pattern()
    if door == "function":
        y, lse = bk.block_sparse_attention(q, k, v, pattern, block_size=BS, is_causal=True,
                                           return_lse=True, backend="reference")
    else:
        y, lse = block_sparse_attention_op(q, k, v, pattern, BS, D ** -0.5, "top_left", "reference")
    (dq,) = torch.autograd.grad(y.sum() + lse.sum(), (q,))
    leaves, y_ref, lse_ref = _oracle(q, k, v, pattern)
    (dq_ref,) = torch.autograd.grad(y_ref.sum() + lse_ref.sum(), leaves[:1])
    assert rel_error(dq, dq_ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lse_is_differentiable(backend, dtype):
    q, k, v = _inputs(dtype)
    pattern = _pattern()
    gen = torch.Generator().manual_seed(3)
    w_y = torch.randn(B, H, N, D, generator=gen).to(DEVICE, dtype)
    w_l = torch.randn(B, H, N, generator=gen).to(DEVICE, dtype)
    y, lse = _attend(q, k, v, pattern, backend, return_lse=True)
    assert lse.requires_grad
    grads = torch.autograd.grad((y * w_y).sum() + (lse * w_l).sum(), (q, k, v))
    leaves, y_ref, lse_ref = _oracle(q, k, v, pattern)
    refs = torch.autograd.grad((y_ref * w_y.double()).sum() + (lse_ref * w_l.double()).sum(), leaves,
                               retain_graph=True)
    tol = 1e-11 if dtype == torch.float64 else 1e-5
    for ours, ref in zip(grads, refs):
        assert rel_error(ours, ref) < tol
    # lse alone (y unused: its gradient arrives as None)
    _, lse = _attend(q, k, v, pattern, backend, return_lse=True)
    g_only = torch.autograd.grad((lse * w_l).sum(), (q, k))
    r_only = torch.autograd.grad((lse_ref * w_l.double()).sum(), leaves[:2])
    for ours, ref in zip(g_only, r_only):
        assert rel_error(ours, ref) < tol


def test_plan_run_backward_takes_dlse():
    q, k, v = _inputs(torch.float64, requires_grad=False)
    desc = bk.SdpaBlockSparseDescriptor.from_tensors(q, k, v, block_size=BS, is_causal=True)
    plan = bk.SdpaBlockSparsePlan.select(desc, device=DEVICE, backend="reference")
    args = bk.SdpaBlockSparseArgs(q, k, v, _pattern())
    plan.run(args)
    dlse = torch.randn(B, H, N, dtype=torch.float64, device=DEVICE)
    dq, dk, dv = plan.run_backward(args, None, dlse=dlse)
    leaves, _, lse_ref = _oracle(q, k, v, _pattern())
    refs = torch.autograd.grad((lse_ref * dlse).sum(), leaves, allow_unused=True)
    assert rel_error(dq, refs[0]) < 1e-11 and rel_error(dk, refs[1]) < 1e-11
    assert (dv == 0).all()


# ------------------------------------------------------------------------------ patterns
@pytest.mark.parametrize("backend", BACKENDS)
def test_pattern_made_under_inference_mode(backend):
    with torch.inference_mode():
        pattern = _pattern()
    q, k, v = _inputs()
    y = _attend(q, k, v, pattern, backend)
    y.sum().backward()
    _, y_ref, _ = _oracle(q, k, v, pattern)
    assert rel_error(y.detach(), y_ref.detach()) < 1e-5
    with torch.inference_mode():
        y2 = _attend(q.detach(), k.detach(), v.detach(), pattern, backend)
    assert torch.equal(y2, y.detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["data", "numpy", "inplace"])
def test_writes_to_the_pattern_are_seen(backend, how):
    q, k, v = _inputs(requires_grad=False)
    pattern = _pattern() if how != "numpy" else _pattern().cpu()
    if how == "numpy" and DEVICE.type != "cpu":
        pytest.skip("numpy() needs a CPU pattern")
    y1 = _attend(q, k, v, pattern, backend)
    if how == "data":
        pattern.data[..., 2, 1] = False
    elif how == "numpy":
        pattern.numpy()[..., 2, 1] = False
    else:
        pattern[..., 2, 1] = False
    y2 = _attend(q, k, v, pattern, backend)
    _, y_ref, _ = _oracle(q, k, v, pattern)
    assert rel_error(y2, y_ref.detach()) < 1e-5
    assert not torch.allclose(y1, y2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pattern_layouts_agree_and_prepare_builds_once(backend, monkeypatch):
    q, k, v = _inputs(requires_grad=False)
    p4 = _pattern()
    layouts = {"bool4d": p4, "uint8": p4.to(torch.uint8), "flat": p4.reshape(1, H, 9),
               "view": p4[0][None], "broadcast": p4[:, :1]}
    y_ref = _attend(q, k, v, p4, backend)
    desc = bk.SdpaBlockSparseDescriptor.from_tensors(q, k, v, block_size=BS, is_causal=True)
    plan = bk.SdpaBlockSparsePlan.select(desc, device=DEVICE, backend=backend)
    builds = []
    original = BlockLists.build.__func__
    monkeypatch.setattr(BlockLists, "build",
                        classmethod(lambda cls, *a, **kw: builds.append(1) or original(cls, *a, **kw)))
    for name, raw in layouts.items():
        prepared = bk.prepare_pattern(raw, query_len=N, block_size=BS, is_causal=True)
        assert len(builds) == 1, name
        for _ in range(3):
            assert torch.equal(_attend(q, k, v, prepared, backend), y_ref), name
            assert torch.equal(plan.run(bk.SdpaBlockSparseArgs(q, k, v, prepared))[0], y_ref)
        assert len(builds) == 1, f"{name}: lists rebuilt for a prepared pattern"
        # A raw tensor: read afresh (one build) on every call.
        assert torch.equal(_attend(q, k, v, raw, backend), y_ref), name
        assert len(builds) == 2
        builds.clear()


def test_prepared_pattern_is_a_snapshot_and_checks_geometry():
    q, k, v = _inputs(requires_grad=False)
    raw = _pattern()
    prepared = bk.prepare_pattern(raw, query_len=N, block_size=BS, is_causal=True)
    y1 = bk.block_sparse_attention(q, k, v, prepared)
    raw.zero_()  # the prepared snapshot does not change
    assert torch.equal(bk.block_sparse_attention(q, k, v, prepared), y1)
    assert prepared.shape == (1, H, 3, 3) and "PreparedPattern" in repr(prepared)
    with pytest.raises(bk.InvalidProblem, match="prepared for"):
        bk.block_sparse_attention(q[:, :, :30], k[:, :, :30], v[:, :, :30], prepared)
    with pytest.raises(bk.InvalidProblem, match="is_causal"):
        bk.block_sparse_attention(q, k, v, prepared, is_causal=False)
    with pytest.raises(bk.InvalidProblem, match="block_size"):
        bk.prepare_pattern(raw, query_len=N)
    with pytest.raises(bk.InvalidProblem, match="expected"):
        bk.prepare_pattern(raw, query_len=N + 100, block_size=BS)
    heads3 = random_qkv(1, 3, N, N, D, D, torch.float32)
    with pytest.raises(bk.InvalidProblem, match="batch/heads"):
        bk.block_sparse_attention(*heads3, prepared)


def test_block_pattern_and_plan_prepare():
    pattern = sliding_window(N, window=20, block_size=BS, sinks=4).to(DEVICE)
    q, k, v = _inputs(requires_grad=False)
    y = bk.block_sparse_attention(q, k, v, pattern)
    prepared = pattern.prepare()
    assert prepared.is_causal and prepared.block_size == BS
    assert torch.equal(bk.block_sparse_attention(q, k, v, prepared), y)
    desc = bk.SdpaBlockSparseDescriptor.from_tensors(q, k, v, block_size=BS, is_causal=True,
                                                     **pattern.kernel_rules)
    plan = bk.SdpaBlockSparsePlan.select(desc, device=DEVICE)
    from_plan = plan.prepare(pattern.mask)
    assert torch.equal(plan.run(bk.SdpaBlockSparseArgs(q, k, v, from_plan))[0], y)


# ------------------------------------------------------------------------------ NaN / inf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q_nan", "q_inf", "k_nan"])
def test_nan_and_inf_propagate(backend, where):
    q, k, v = _inputs(requires_grad=False)
    pattern = torch.ones(1, 1, 3, 3, dtype=torch.bool, device=DEVICE)
    pattern[..., 0, 0] = False  # query block 0 sees nothing (with causal): stays 0 / -inf
    if where == "q_nan":
        q[0, 0, 20, 3] = float("nan")
    elif where == "q_inf":
        q[0, 0, 20] = float("inf")
    else:
        k[0, 0, 20, 3] = float("nan")  # every query >= 20 of head 0 attends key 20
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    y, lse = _attend(q, k, v, pattern, backend, return_lse=True)
    # The oracle masks before the softmax, so only NaN/inf scores of *allowed* pairs poison a
    # row (masked keys are never read, as in flash-style kernels); rows that see nothing
    # stay 0 / -inf, where torch SDPA's math path would give NaN.
    _, y_ref, _ = _oracle(q, k, v, pattern)
    bad_rows = torch.isnan(y_ref).any(-1)
    assert bad_rows.any()
    assert torch.equal(torch.isnan(y).any(-1), bad_rows)
    assert torch.isnan(y[bad_rows]).all() and not torch.isfinite(lse[bad_rows]).any()
    assert (y[:, :, :BS] == 0).all() and (lse[:, :, :BS] == float("-inf")).all()
    assert torch.isfinite(y[~bad_rows]).all()
    dq, dk, dv = torch.autograd.grad(y, (q, k, v), torch.ones_like(y))
    assert torch.isnan(dq[bad_rows]).all()
    assert (dq[:, :, :BS] == 0).all()


# ------------------------------------------------------------------------------ aliasing
@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_aliasing_inputs_are_rejected(backend):
    q, k, v = _inputs(requires_grad=False)
    desc = bk.SdpaBlockSparseDescriptor.from_tensors(q, k, v, block_size=BS, is_causal=True)
    plan = bk.SdpaBlockSparsePlan.select(desc, device=DEVICE, backend=backend)
    q_before = q.clone()
    with pytest.raises(bk.InvalidProblem, match="y shares memory with q"):
        plan.run(bk.SdpaBlockSparseArgs(q, k, v, _pattern(), y=q))
    assert torch.equal(q, q_before)
    lse_in_v = v.view(-1)[: B * H * N].view(B, H, N)
    with pytest.raises(bk.InvalidProblem, match="lse shares memory with v"):
        plan.run(bk.SdpaBlockSparseArgs(q, k, v, _pattern(), lse=lse_in_v))
    args = bk.SdpaBlockSparseArgs(q, k, v, _pattern())
    y, _ = plan.run(args)
    dy = torch.randn_like(y)
    with pytest.raises(bk.InvalidProblem, match="dq shares memory with dy"):
        plan.run_backward(args, dy, dq=dy)
    dk = torch.empty_like(k)
    with pytest.raises(bk.InvalidProblem, match="dk shares memory with dv"):
        plan.run_backward(args, dy, dk=dk, dv=dk)
    # Disjoint halves of one buffer are fine.
    buf = torch.empty((2,) + tuple(k.shape), device=DEVICE)
    plan.run_backward(args, dy, dk=buf[0], dv=buf[1])


# ------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_like_sdpa_and_keeps_f32_accumulation(backend):
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip("bf16 tl.dot is wrong under the Triton interpreter; the GPU run covers it")
    q, k, v = random_qkv(1, 2, 128, 128, 64, 64, torch.float32, seed=5)
    q, k = q * 3, k * 3  # peaked attention: downcast accumulation shows
    v_bf16 = v.to(torch.bfloat16)
    pattern = torch.ones(1, 1, 2, 2, dtype=torch.bool, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = bk.block_sparse_attention(q, k, v_bf16, pattern, block_size=64, is_causal=True,
                                      backend=backend)
        y_sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v_bf16, is_causal=True)
    assert y.dtype == torch.bfloat16 == y_sdpa.dtype
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.to(torch.bfloat16).double() for t in (q, k, v)), is_causal=True)
    assert rel_error(y, ref) <= 2 * rel_error(y_sdpa, ref) + 1e-3


# ------------------------------------------------------------------------------ odd inputs
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_width_values_still_give_lse(backend):
    q, k, _ = _inputs()
    v = torch.empty(B, H, N, 0, device=DEVICE, requires_grad=True)
    y, lse = _attend(q, k, v, _pattern(), backend, return_lse=True)
    assert y.shape == (B, H, N, 0)
    _, _, lse_ref = _oracle(q, k, torch.zeros(B, H, N, 1, device=DEVICE), _pattern())
    assert rel_error(lse, lse_ref.float()) < 1e-5
    dq, dk = torch.autograd.grad(lse.sum(), (q, k))
    leaves, _, lse_ref = _oracle(q, k, torch.zeros(B, H, N, 1, device=DEVICE), _pattern())
    rq, rk = torch.autograd.grad(lse_ref.sum(), leaves[:2])
    assert rel_error(dq, rq) < 1e-5 and rel_error(dk, rk) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_block_size_is_one_block(backend):
    q, k, v = _inputs(requires_grad=False)
    pattern = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=DEVICE)
    y = bk.block_sparse_attention(q, k, v, pattern, block_size=2**40, is_causal=True,
                                  backend=backend)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                           is_causal=True)
    assert rel_error(y, ref) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_device_without_cuda_is_a_typed_error():
    desc = bk.SdpaBlockSparseDescriptor(1, 1, 16, 16, 16, 16, block_size=16, element="f32")
    with pytest.raises(bk.InvalidProblem, match="CUDA is not available"):
        bk.SdpaBlockSparsePlan.select(desc, device="cuda")


def test_triton_interpret_is_parsed_in_one_place(monkeypatch):
    from baracuda_kernels.core.runtime import triton_interpreting
    from baracuda_kernels.attention.common import backends, triton_tma
    for value, expected in (("1", True), ("true", True), ("On", True), ("0", False), ("", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert triton_interpreting() is expected
    assert backends.triton_interpreting is triton_interpreting
    assert triton_tma.triton_interpreting is triton_interpreting


def test_wide_tile_offsets_rule():
    from baracuda_kernels.attention.common.numerics import wide_tile_offsets
    assert not wide_tile_offsets(128, 128, 128)
    assert wide_tile_offsets(128, 2**24, 128)       # 128 rows x 16M elements = 2^31
    assert not wide_tile_offsets(64, 2**24 - 1, 64)


def test_short_row_tiles_only_for_prepared_short_rows():
    from baracuda_kernels.attention.block_sparse.triton_bwd import short_row_backward_config
    from baracuda_kernels.attention.block_sparse.triton_fwd_configs import ForwardConfig, short_row_forward_config
    from baracuda_kernels.core import ArchSku, BackendKind
    assert short_row_forward_config(128, 128, torch.bfloat16, 128, ArchSku.SM90) is not None
    assert short_row_forward_config(128, 128, torch.float32, 128, ArchSku.SM90) is None
    assert short_row_backward_config(torch.bfloat16, 128, 64) is None
    desc = bk.SdpaBlockSparseDescriptor(1, 1, 256, 256, 64, 64, block_size=16, element="bf16")
    plan = bk.SdpaBlockSparsePlan(desc, torch.device("cpu"), BackendKind.TRITON, False)
    default, short_f = ForwardConfig(64, 64, 4, 2), ForwardConfig(32, 32, 4, 2)
    plan._config, plan._short_row_configs = default, (short_f, "short-bwd")
    sparse = torch.eye(16, dtype=torch.bool)[None, None]
    dense = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    assert plan._configs_for(BlockLists.build(sparse, 256, 256, 16, False)) == (default, None)
    assert plan._configs_for(BlockLists.build(sparse, 256, 256, 16, False).measured()) == \
        (short_f, "short-bwd")
    assert plan._configs_for(BlockLists.build(dense, 256, 256, 16, False).measured()) == \
        (default, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_calls_build_no_autograd_node(backend, monkeypatch):
    """Nothing to differentiate (no_grad, inference_mode, or no input requiring grad): the
    plan runs directly (no autograd.Function: its apply costs ~15 us of a CPU decode step),
    with the same outputs as the differentiable call."""
    from baracuda_kernels.attention.block_sparse import functional
    q, k, v = _inputs(requires_grad=True)
    y_grad, lse_grad = _attend(q, k, v, _pattern(), backend, return_lse=True)
    assert y_grad.grad_fn is not None
    applied = []
    real = functional.BlockSparseAttentionFunction.apply
    monkeypatch.setattr(functional.BlockSparseAttentionFunction, "apply",
                        lambda *a: applied.append(1) or real(*a))
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            y, lse = _attend(q, k, v, _pattern(), backend, return_lse=True)
        assert y.grad_fn is None and torch.equal(y, y_grad.detach())
        assert torch.equal(lse, lse_grad.detach())
    y = _attend(q.detach(), k.detach(), v.detach(), _pattern(), backend)
    assert y.grad_fn is None and torch.equal(y, y_grad.detach()) and applied == []
    y = _attend(q, k.detach(), v.detach(), _pattern(), backend)
    assert y.grad_fn is not None and applied == [1]
