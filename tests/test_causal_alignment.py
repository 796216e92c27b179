"""Bottom-right causal (is_causal="bottom_right"): query i sees key j iff j <= i + Nk - Nq,
flash-attn's alignment for a KV cache (chunked prefill: Nq < Nk; decode: Nq = 1). Checked
against the float64 oracle on both backends, forward and gradients, with block patterns,
GQA, Nq < Nk, Nq > Nk (leading rows that see nothing) and Nq = 1.

CPU: reference in f64 and triton under the interpreter in f32; the GPU grid runs every dtype."""

import pytest
import torch

import baracuda_kernels as bk
from baracuda_kernels.attention.block_sparse.block_lists import BlockLists, classify_blocks
from cases import ALL_DTYPES, DEVICE, HAS_CUDA, check_token_rule, nblocks
from oracle import token_mask

SHAPES = [(1, 77, 16), (13, 77, 16), (40, 77, 32), (77, 40, 16), (45, 45, 16)]  # Nq, Nk, bs


def _check(backend, dtype, Nq, Nk, bs, *, H=4, Hkv=2, B=1, prepared=False):
    y, lse, grads = check_token_rule(backend, dtype, Nq, Nk, bs, "bottom_right", H=H, Hkv=Hkv,
                                     B=B, prepared=prepared)
    if Nq > Nk:  # rows before the first key see nothing: y = 0, lse = -inf, no gradient
        dead = Nq - Nk
        assert (y[:, :, :dead] == 0).all() and (lse[:, :, :dead] == float("-inf")).all()
        assert (grads[0][:, :, :dead] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("Nq,Nk,bs", SHAPES)
def test_bottom_right_matches_oracle_cpu(backend, Nq, Nk, bs):
    if HAS_CUDA:
        pytest.skip("the GPU grid below covers this")
    _check(backend, torch.float32 if backend == "triton" else torch.float64, Nq, Nk, bs,
           prepared=(Nq == 13))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("Nq,Nk,bs", [(1, 1000, 128), (64, 1000, 128), (300, 1000, 64),
                                      (1000, 300, 64), (257, 257, 128)])
def test_bottom_right_matches_oracle_gpu(backend, dtype, Nq, Nk, bs):
    _check(backend, dtype, Nq, Nk, bs, H=8, Hkv=2, B=2, prepared=(Nq == 64))


@pytest.mark.parametrize("Nq,Nk,bs", SHAPES + [(5, 300, 7), (300, 5, 7)])
def test_bottom_right_block_classes_are_exact(Nq, Nk, bs):
    """FULL blocks hold only allowed pairs, SKIP blocks none, PARTIAL some (token oracle)."""
    p = torch.ones(1, 1, nblocks(Nq, bs), nblocks(Nk, bs), dtype=torch.bool)
    cls = classify_blocks(p, Nq, Nk, bs, "bottom_right")
    allowed = token_mask(p, Nq, Nk, bs, "bottom_right")[0, 0]
    for qb in range(cls.shape[2]):
        for kb in range(cls.shape[3]):
            cell = allowed[qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs]
            want = 0 if not cell.any() else (1 if cell.all() and cell.shape == (bs, bs) else 2)
            assert int(cls[0, 0, qb, kb]) == want, (qb, kb)
    lists = BlockLists.build(p.to(DEVICE), Nq, Nk, bs, "bottom_right", use_triton=True)
    # A shifted diagonal takes the exact torch build (it keeps block_class); a square
    # problem's diagonal is the top-left one, built by the Triton builder.
    assert (lists.block_class is not None) == (Nq != Nk)


def test_bottom_right_equals_top_left_when_square_and_validates():
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float64) for _ in range(3))
    p = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    a = bk.block_sparse_attention(q, k, v, p, block_size=16, is_causal="bottom_right")
    b = bk.block_sparse_attention(q, k, v, p, block_size=16, is_causal=True)
    assert torch.equal(a, b)
    assert bk.SdpaBlockSparseDescriptor(1, 2, 40, 40, 16, 16, 16,
                                        is_causal="top_left").is_causal is True
    with pytest.raises(bk.InvalidProblem, match="'bottom_right'"):
        bk.block_sparse_attention(q, k, v, p, block_size=16, is_causal="bottom-left")


def test_decode_step_sees_every_key_and_dense_plan_keeps_it_exact():
    """Nq = 1 bottom-right: the one query sees all keys (top-left would see key 0 only)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 1, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 50, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    y = bk.flash_sdpa(q, k, v, is_causal="bottom_right")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                                           v.repeat_interleave(2, 1))
    torch.testing.assert_close(y, ref)
    desc = bk.FlashSdpaDescriptor.from_tensors(q, k, v, is_causal="bottom_right")
    plan = bk.FlashSdpaPlan.select(desc, device="cpu")
    assert plan.backend is bk.BackendKind.REFERENCE


def test_bottom_right_under_compile_cpu():
    q = torch.randn(1, 2, 9, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    p = torch.ones(1, 1, 1, 3, dtype=torch.bool)

    def f(q, k, v):
        return bk.block_sparse_attention(q, k, v, p, block_size=16,
                                         is_causal="bottom_right").square().sum()
    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v),
                              (q, k, v))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)
