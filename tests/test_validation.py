"""Every user-input rule raises a typed exception whose message names the field."""

import math

import pytest
import torch

import baracuda_kernels as bk
from baracuda_kernels import (InvalidProblem, SdpaBlockSparseArgs, SdpaBlockSparseDescriptor,
                              SdpaBlockSparsePlan, Unsupported)


def desc(**kw):
    base = dict(batch_size=2, num_heads=3, query_len=40, key_len=40, d_k=16, d_v=16,
                block_size=16, element=torch.float32)
    base.update(kw)
    return SdpaBlockSparseDescriptor(**base)


def tensors(d, dtype=torch.float32):
    q = torch.randn(d.query_shape(), dtype=dtype)
    k = torch.randn(d.key_shape(), dtype=dtype)
    v = torch.randn(d.value_shape(), dtype=dtype)
    p = torch.ones(d.batch_size, d.num_heads, d.num_blocks_q, d.num_blocks_k, dtype=torch.bool)
    return q, k, v, p


def plan(d):
    return SdpaBlockSparsePlan.select(d, device="cpu", backend="reference")


@pytest.mark.parametrize("field", ["batch_size", "num_heads", "query_len", "key_len", "d_k", "d_v"])
def test_negative_extent(field):
    with pytest.raises(InvalidProblem, match=field):
        desc(**{field: -1})


@pytest.mark.parametrize("bad", [0, -3])
def test_block_size_below_one(bad):
    with pytest.raises(InvalidProblem, match="block_size"):
        desc(block_size=bad)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_scale(bad):
    with pytest.raises(InvalidProblem, match="scale"):
        desc(scale=bad)


def test_unsupported_dtype():
    with pytest.raises(Unsupported, match="int32"):
        desc(element=torch.int32)
    with pytest.raises(InvalidProblem, match="element"):
        desc(element="f8")


def test_not_an_int_extent():
    with pytest.raises(InvalidProblem, match="query_len"):
        desc(query_len=4.0)


def test_from_tensors_memo_never_skips_a_check():
    """from_tensors gives back the descriptor of an earlier call with the same arguments;
    an argument equal to a valid one but of another type (64.0, True, a bool in the
    window) still meets validation."""
    q = torch.randn(1, 2, 40, 8)
    make = SdpaBlockSparseDescriptor.from_tensors
    first = make(q, q, q, block_size=16, window_size=(1, 0), scale=0.5)
    assert make(q, q, q, block_size=16, window_size=(1, 0), scale=0.5) is first
    assert make(q, q, q, block_size=16, window_size=(1, 0), scale=0.25) is not first
    for bad in (dict(block_size=16.0), dict(window_size=(True, 0)), dict(sink_tokens=False),
                dict(is_causal=1.0), dict(scale=float("nan"))):
        kwargs = dict(dict(block_size=16, window_size=(1, 0), scale=0.5), **bad)
        with pytest.raises(InvalidProblem):
            make(q, q, q, **kwargs)
    with pytest.raises(InvalidProblem, match="window_size"):
        make(q, q, q, block_size=16, window_size=[[1], 0])   # unhashable: validated, no memo


def test_element_vs_tensor_dtype():
    d = desc()
    q, k, v, p = tensors(d, torch.float64)
    with pytest.raises(InvalidProblem, match="q has dtype torch.float64"):
        plan(d).can_implement(SdpaBlockSparseArgs(q, k, v, p))


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_shape_mismatch_each_input(name):
    d = desc()
    q, k, v, p = tensors(d)
    bad = {"q": q, "k": k, "v": v}
    bad[name] = bad[name][:, :, :-1]
    with pytest.raises(InvalidProblem, match=f"{name} has shape"):
        plan(d).can_implement(SdpaBlockSparseArgs(bad["q"], bad["k"], bad["v"], p))


@pytest.mark.parametrize("name", ["y", "lse"])
def test_output_shape_and_dtype(name):
    d = desc()
    q, k, v, p = tensors(d)
    y = torch.empty(d.output_shape())
    lse = torch.empty(d.lse_shape())
    wrong_shape = {"y": dict(y=y[:, :1]), "lse": dict(lse=lse[:, :1])}[name]
    with pytest.raises(InvalidProblem, match=f"{name} has shape"):
        plan(d).run(SdpaBlockSparseArgs(q, k, v, p, **wrong_shape))
    wrong_dtype = {"y": dict(y=y.double()), "lse": dict(lse=lse.half())}[name]
    with pytest.raises(InvalidProblem, match=f"{name} has dtype"):
        plan(d).run(SdpaBlockSparseArgs(q, k, v, p, **wrong_dtype))


def test_nothing_written_on_failure():
    d = desc()
    q, k, v, p = tensors(d)
    y = torch.full(d.output_shape(), 7.0)
    lse = torch.full(d.lse_shape(), 7.0)
    with pytest.raises(InvalidProblem):
        plan(d).run(SdpaBlockSparseArgs(q, k, v[:, :, :3], p, y=y, lse=lse))
    with pytest.raises(InvalidProblem):
        plan(d).run(SdpaBlockSparseArgs(q, k, v, p[..., :1], y=y, lse=lse))
    assert (y == 7).all() and (lse == 7).all()


def test_pattern_shape_message_is_specific():
    d = SdpaBlockSparseDescriptor(2, 8, 512, 512, 16, 16, block_size=64, element=torch.float32)
    q, k, v, _ = tensors(d)
    bad = torch.ones(2, 8, 63, dtype=torch.uint8)
    with pytest.raises(InvalidProblem, match=r"\(2, 8, 63\); expected \(2, 8, 64\).*nq=8, nk=8"):
        plan(d).can_implement(SdpaBlockSparseArgs(q, k, v, bad))


@pytest.mark.parametrize("shape", [(3, 3, 3, 3), (2, 2, 3, 3), (2, 3, 3, 2), (2, 3, 9, 1), (3, 3)])
def test_pattern_bad_shapes(shape):
    d = desc()
    q, k, v, _ = tensors(d)
    with pytest.raises(InvalidProblem, match="block_pattern has shape"):
        plan(d).can_implement(SdpaBlockSparseArgs(q, k, v, torch.ones(shape, dtype=torch.bool)))


def test_pattern_dtype():
    d = desc()
    q, k, v, p = tensors(d)
    with pytest.raises(InvalidProblem, match="block_pattern has dtype torch.float32"):
        plan(d).can_implement(SdpaBlockSparseArgs(q, k, v, p.float()))
    with pytest.raises(InvalidProblem, match="block_pattern is a list"):
        plan(d).can_implement(SdpaBlockSparseArgs(q, k, v, [[1]]))


def test_pattern_layouts_accepted():
    d = desc()
    q, k, v, p = tensors(d)
    for pattern in (p, p.to(torch.uint8), p.flatten(2), p[:1, :1], p[:, :1].flatten(2)):
        assert plan(d).can_implement(SdpaBlockSparseArgs(q, k, v, pattern))


def test_last_dim_stride():
    d = desc()
    q, k, v, p = tensors(d)
    q_bad = torch.randn(2, 3, 40, 32)[..., ::2]
    with pytest.raises(InvalidProblem, match="q has last-dimension stride 2"):
        plan(d).can_implement(SdpaBlockSparseArgs(q_bad, k, v, p))


def test_device_mismatch():
    d = desc()
    q, k, v, p = tensors(d)
    with pytest.raises(InvalidProblem, match="k is on meta"):
        plan(d).can_implement(SdpaBlockSparseArgs(q, k.to("meta"), v, p))
    with pytest.raises(InvalidProblem, match="block_pattern is on meta"):
        plan(d).can_implement(SdpaBlockSparseArgs(q, k, v, p.to("meta")))


def test_functional_errors():
    q = torch.randn(1, 2, 32, 16)
    p = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(InvalidProblem, match="block_size is None"):
        bk.block_sparse_attention(q, q, q, p)
    with pytest.raises(InvalidProblem, match="q has shape .* expected 4 dims"):
        bk.block_sparse_attention(q[0], q[0], q[0], p, block_size=16)
    with pytest.raises(InvalidProblem, match="backend"):
        bk.block_sparse_attention(q, q, q, p, block_size=16, backend="cudnn")


def test_forced_triton_on_plain_cpu_is_unsupported(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(Unsupported, match="triton"):
        SdpaBlockSparsePlan.select(desc(), device="cpu", backend="triton")


def test_head_dim_over_triton_limit_is_unsupported_for_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors may use triton only when interpreting
    with pytest.raises(Unsupported, match="head dims up to 256"):
        SdpaBlockSparsePlan.select(desc(d_k=320, d_v=320), device="cpu", backend="triton")
    # ...but the CPU backends run it.
    assert SdpaBlockSparsePlan.select(desc(d_k=320, d_v=320), device="cpu").backend.value == "cpu"


def test_run_backward_needs_forward_outputs():
    d = desc()
    q, k, v, p = tensors(d)
    with pytest.raises(InvalidProblem, match="plan.run"):
        plan(d).run_backward(SdpaBlockSparseArgs(q, k, v, p), torch.randn(d.output_shape()))


def test_causal_block_pattern_needs_causal_call():
    from baracuda_kernels.patterns import sliding_window
    p = sliding_window(64, window=32, block_size=16)
    q = torch.randn(1, 1, 64, 8)
    with pytest.raises(InvalidProblem, match="is_causal"):
        bk.block_sparse_attention(q, q, q, p, is_causal=False)
    y_default = bk.block_sparse_attention(q, q, q, p)           # follows the pattern
    y_causal = bk.block_sparse_attention(q, q, q, p.mask, block_size=16, is_causal=True,
                                         window_size=(31, 0))  # the builder's window, exact
    assert torch.equal(y_default, y_causal)
    with pytest.raises(InvalidProblem, match="block_size"):
        bk.block_sparse_attention(q, q, q, p, block_size=32)


@pytest.mark.parametrize("kwargs, field", [
    (dict(window_size=4), "window_size"),                       # an int, not a pair
    (dict(token_rules=5), "token_rules"),
    (dict(query_range=(5, 2)), "query_range"),                  # start > end
    (dict(key_range=(0, 41)), "key_range end"),                 # past the 40 keys
    (dict(key_range=(-1, None)), r"key_range\[0\]"),
    (dict(is_causal=True, prefix_lengths=-3), "prefix_lengths"),
])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_token_arguments_out_of_range_are_typed_errors(kwargs, field, backend):
    """Each raised a stray TypeError / AttributeError, or was accepted and silently meant
    something else (an empty or clamped range, no prefix)."""
    q, k, v, p = tensors(desc())
    with pytest.raises(InvalidProblem, match=field):
        bk.block_sparse_attention(q, k, v, p, block_size=16, backend=backend, **kwargs)


def test_plan_rejects_token_rules_of_another_type():
    d = desc()
    q, k, v, p = tensors(d)
    with pytest.raises(InvalidProblem, match="token_rules is a str"):
        plan(d).run(SdpaBlockSparseArgs(q, k, v, p, token_rules="documents"))


def test_empty_and_full_ranges_stay_valid():
    q, k, v, p = tensors(desc())
    y = bk.block_sparse_attention(q, k, v, p, block_size=16, query_range=(7, 7),
                                  key_range=(0, 40), backend="reference")
    assert (y == 0).all()
