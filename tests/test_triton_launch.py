"""Reuse of compiled Triton kernels across launches (common/triton_launch.py).

The reuse key must tell apart everything Triton specialises on; a key too coarse would run
a kernel compiled for other arguments (an integer specialised to the constant 1, a pointer
assumed 16-byte aligned). The GPU tests launch one small kernel with arguments of changing
classes and check every result against torch; the CPU tests check the classes themselves.
"""

import pytest
import torch

from baracuda_kernels.attention.common import triton_launch
from baracuda_kernels.attention.common.triton_launch import _arg_class, launch

triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _scaled_shift(X, Y, n, shift, a, BLOCK: tl.constexpr, ADD: tl.constexpr = True):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + offs, mask=ok)
    y = x * a
    if ADD:
        y = y + shift
    tl.store(Y + offs, y, mask=ok)


def test_argument_classes_separate_what_triton_specialises():
    t = torch.zeros(64)
    assert _arg_class(1) != _arg_class(2)            # 1 becomes a compile-time constant
    assert _arg_class(16) != _arg_class(17)          # divisibility by 16
    assert _arg_class(2 ** 31) != _arg_class(2 ** 31 - 16)  # i64 vs i32
    assert _arg_class(17) == _arg_class(33)
    assert _arg_class(t) != _arg_class(t[1:])        # 16-byte alignment of the pointer
    assert _arg_class(t) != _arg_class(t.double())    # pointer dtype
    assert _arg_class(0.5) == _arg_class(2.0) != _arg_class(2)
    assert _arg_class(True) != _arg_class(False)
    with pytest.raises(TypeError):
        _arg_class(object())


def test_no_reuse_without_a_gpu_or_under_the_interpreter():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert triton_launch._reuse_key(_scaled_shift, (torch.zeros(4),), {}) is None


@pytest.mark.gpu
def test_reused_launches_match_torch_for_every_argument_class(monkeypatch):
    dev = torch.device("cuda")
    base = torch.randn(1000, device=dev)
    # (offset into base, n, shift, a, ADD): classes change between neighbours; the factors
    # are powers of two, so that x * a + shift is exact with or without a fused multiply-add.
    cases = [
        (0, 1000, 3, 0.5, True), (0, 1000, 3, 0.5, True), (0, 1000, 1, 0.5, True),
        (0, 1000, 2, 2.0, True), (1, 999, 2, 2.0, True), (1, 999, 1, 2.0, True),
        (0, 1, 5, 4.0, True), (0, 17, 5, 4.0, True), (0, 16, 5, 4.0, True),
        (0, 1000, 7, 0.25, False), (0, 1000, 7, 0.25, True), (4, 996, 1, -1.0, True),
    ]
    for off, n, shift, a, add in cases * 2:
        x = base[off:off + n]
        y = torch.full((n + 3,), float("nan"), device=dev)[3:]  # unaligned output too
        launch(_scaled_shift, (triton.cdiv(n, 128),), x, y, n, shift, a, BLOCK=128, ADD=add)
        want = x * a + (shift if add else 0)  # exact: a is a power of two
        torch.testing.assert_close(y, want, rtol=0, atol=0)
    hits = [k for k in triton_launch._COMPILED if k[0] is _scaled_shift]
    assert 1 < len(hits) < len(cases)

    # A key seen before never reaches Triton's own launch path again.
    def refuse(*args, **kwargs):
        raise AssertionError("ordinary launch taken for a known key")

    monkeypatch.setattr(_scaled_shift, "run", refuse)
    x = base.clone()
    y = torch.empty_like(x)
    launch(_scaled_shift, (8,), x, y, 1000, 3, 0.5, BLOCK=128, ADD=True)
    torch.testing.assert_close(y, x * 0.5 + 3, rtol=0, atol=0)


@pytest.mark.gpu
def test_reuse_can_be_switched_off(monkeypatch):
    monkeypatch.setitem(triton_launch._reuse_state, "on", False)
    x = torch.randn(256, device="cuda")
    y = torch.empty_like(x)
    assert triton_launch._reuse_key(_scaled_shift, (x, y, 256, 1, 1.0), {"BLOCK": 128}) is None
    launch(_scaled_shift, (2,), x, y, 256, 1, 1.0, BLOCK=128)
    torch.testing.assert_close(y, x + 1, rtol=0, atol=0)
