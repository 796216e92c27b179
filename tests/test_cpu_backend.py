"""The fused ``cpu`` backend (PyTorch's flash CPU kernel on gathered blocks): chosen
automatically for CPU tensors, declining with a reason where it cannot run; low-precision
inputs against the float64 oracle; and work proportional to the active blocks (a time
ratio, not an absolute time). The float64 grids of test_forward / test_backward and the token
rule tests run it too (cases.BACKENDS)."""

import time

import pytest
import torch

import baracuda_kernels as bk
from cases import HAS_CUDA, assert_gqa_matches_oracle, nblocks

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="the cpu backend runs CPU tensors")


def test_selected_automatically_on_cpu_and_declines_elsewhere():
    desc = bk.SdpaBlockSparseDescriptor(1, 2, 64, 64, 16, 16, block_size=16, element="f32")
    plan = bk.SdpaBlockSparsePlan.select(desc, device="cpu")
    assert plan.backend is bk.BackendKind.CPU
    assert plan.sku.backend is bk.BackendKind.CPU and plan.precision_guarantee.deterministic
    with pytest.raises(bk.Unsupported, match="CPU tensors"):
        bk.SdpaBlockSparsePlan.select(desc, device="meta", backend="cpu")


@pytest.mark.parametrize("softcap", [0.0, 4.0, 50.0], ids=["plain", "softcap4", "softcap50"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_matches_oracle(dtype, causal, softcap):
    gen = torch.Generator().manual_seed(4)
    B, H, Hkv, N, bs = 2, 4, 2, 100, 32
    q = (torch.randn(B, H, N, 32, generator=gen) * 2).to(dtype).requires_grad_()
    k, v = (torch.randn(B, Hkv, N, 32, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    p = torch.rand(1, Hkv, nblocks(N, bs), nblocks(N, bs), generator=gen) < 0.7
    y, lse = bk.block_sparse_attention(q, k, v, p, block_size=bs, is_causal=causal,
                                       backend="cpu", return_lse=True, softcap=softcap or None)
    dy = torch.randn(y.shape, generator=gen).to(dtype)
    grads = torch.autograd.grad(y, (q, k, v), dy)

    assert_gqa_matches_oracle(y, lse, grads, (q, k, v), dy, p.repeat_interleave(H // Hkv, 1),
                              bs, causal, dtype, softcap=softcap)


def test_lse_gradient_takes_the_reference_backward():
    q, k, v = (torch.randn(1, 2, 48, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    p = torch.rand(1, 1, 3, 3) < 0.8
    outs = []
    for backend in ("cpu", "reference"):
        y, lse = bk.block_sparse_attention(q, k, v, p, block_size=16, backend=backend,
                                           return_lse=True)
        outs.append(torch.autograd.grad(y.sum() + lse.clamp(min=-1e9).sum(), (q, k, v)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def test_time_grows_with_active_blocks():
    """Forward time at 1/8 of the blocks is well under the time at all of them but one (a
    ratio on the same machine; work is proportional to the active blocks). One block off:
    every block on is dense attention, which takes one fused call (cpu_whole) instead of
    the block walk measured here."""
    N, bs = 4096, 64
    q, k, v = (torch.randn(1, 4, N, 64) for _ in range(3))
    nb = N // bs
    dense = torch.ones(1, 1, nb, nb, dtype=torch.bool)
    dense[..., 0, nb - 1] = False
    sparse = torch.zeros(1, 1, nb, nb, dtype=torch.bool)
    sparse[..., ::8] = True

    # The two patterns take turns, best of 7 each: a load burst from a neighbouring test
    # worker (2 cores, pytest -n auto) then slows both alike instead of one side's runs.
    preps = [bk.prepare_pattern(p, query_len=N, block_size=bs) for p in (sparse, dense)]
    best = [float("inf")] * 2
    for round_ in range(8):
        for i, prep in enumerate(preps):
            t0 = time.perf_counter()
            bk.block_sparse_attention(q, k, v, prep, backend="cpu")
            if round_:  # the first round warms up
                best[i] = min(best[i], time.perf_counter() - t0)
    ratio = best[0] / best[1]
    assert ratio < 0.5, f"1/8 of the blocks took {ratio:.2f} of the dense time"


@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("rule", [dict(), dict(window_size=(40, 0)),
                                  dict(window_size=(40, 0), sink_tokens=8),
                                  dict(window_size=(40, 0), softcap=5.0)], ids=str)
def test_a_non_finite_key_or_value_reaches_only_the_rows_that_read_it(where, rule):
    """The fused kernel masks by adding -inf: a NaN key the causal diagonal, a window edge or
    a group's padding slot hides from a row used to turn that row into NaN too (every row of
    a sparse causal pattern did). The cpu backend must give the reference's NaN rows and its
    values elsewhere, y, lse and gradients (the triton kernels apply the same rule)."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    (k if where == "k" else v)[:, :, 70] = float("nan")
    pattern = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    pattern[0, 0, 5, 1] = False                   # uneven rows: groups pad to their widest
    outs = []
    for backend in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        y, lse = bk.block_sparse_attention(*leaves, pattern, block_size=32, is_causal=True,
                                           backend=backend, return_lse=True, **rule)
        outs.append((y, lse, *torch.autograd.grad(y, leaves, torch.ones_like(y))))
    for got, want in zip(*outs):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        ok = ~torch.isnan(want)
        torch.testing.assert_close(got[ok], want[ok], rtol=1e-9, atol=1e-9)
    nan_rows = torch.isnan(outs[1][0]).any(-1)
    assert nan_rows.any() and not nan_rows[..., :64].any()  # some rows read it, block 0 not


def test_garbage_in_a_shorter_rows_unused_cache_slots_stays_out():
    """A decode step over rows of different lengths: the shorter row's tail (never written,
    e.g. torch.empty memory) may hold NaN; its one fused CPU call used to return NaN."""
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache = (torch.randn(2, 256, 2, 16, generator=gen) for _ in range(2))
    k_cache[0, 150:] = float("nan")
    v_cache[0, 150:] = float("inf")
    q = torch.randn(2, 1, 4, 16, generator=gen)
    lengths = torch.tensor([100, 200])
    y = bk.block_sparse_attention_with_kvcache(q, k_cache, v_cache, lengths)
    want = bk.block_sparse_attention_with_kvcache(q, k_cache, v_cache, lengths,
                                                  backend="reference")
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
