"""Shared helpers to build random block-sparse attention problems for tests."""

from __future__ import annotations

import pytest
import torch

import baracuda_kernels as bk
from oracle import assert_matches_oracle, dense_attention, token_rule_mask

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# The reference backend runs everywhere; the triton grid of the same tests runs on the GPU
# (the interpreter covers triton on CPU in test_triton_fwd.py / test_triton_bwd.py).
BACKENDS = [
    pytest.param("reference", id="reference"),
    # The fused CPU backend runs CPU tensors: covered where the tests' device is the CPU.
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(HAS_CUDA, reason="CPU tensors only")),
    pytest.param("triton", id="triton", marks=pytest.mark.gpu),
]

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def nblocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def random_qkv(B, H, Nq, Nk, Dk, Dv, dtype, *, seed=0, device=DEVICE, requires_grad=False):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float32)  # noqa: E731
    q, k, v = make(B, H, Nq, Dk), make(B, H, Nk, Dk), make(B, H, Nk, Dv)
    out = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    for t in out:
        t.requires_grad_(requires_grad)
    return out


def random_pattern(Bp, Hp, Nq, Nk, block_size, density=0.6, *, seed=1, device=DEVICE):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    nq, nk = nblocks(Nq, block_size), nblocks(Nk, block_size)
    return (torch.rand(Bp, Hp, nq, nk, generator=gen) < density).to(device)


def check_token_rule(backend, dtype, Nq, Nk, bs, causal, window=(-1, -1), sinks=0, *, H=4, Hkv=2,
                     B=1, seed=0, prepared=False, tokens=None, density=0.85, nan_padding=False):
    """block_sparse_attention with a block pattern, a causal rule, a token window and the
    per-token rules of ``tokens`` (document_ids / query_range / key_range / prefix_lengths;
    GQA H / Hkv) against the float64 oracle, forward, lse and gradients.
    nan_padding: NaN in the padded q/k/v rows (negative ids, tokens outside the ranges) must
    not reach any valid output. -> (y, lse, grads)"""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = (torch.randn(B, H, Nq, 16, generator=gen) * 2).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, Nk, 16, generator=gen).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, Nk, 24, generator=gen).to(DEVICE, dtype)
    p = (torch.rand(B, 1, nblocks(Nq, bs), nblocks(Nk, bs), generator=gen) < density).to(DEVICE)
    tokens = {name: _to_device(t) for name, t in (tokens or {}).items()}
    extra = token_rule_mask(B, Nq, Nk, causal, **tokens) if tokens else None
    qx, kx, vx = q.clone(), k.clone(), v.clone()
    if nan_padding:
        q_pad = ~_valid_tokens(B, Nq, tokens, 0)  # [B, Nq]
        k_pad = ~_valid_tokens(B, Nk, tokens, 1)  # [B, Nk]
        qx[q_pad[:, None, :, None].expand_as(qx).to(DEVICE)] = float("nan")
        kx[k_pad[:, None, :, None].expand_as(kx).to(DEVICE)] = float("nan")
        vx[k_pad[:, None, :, None].expand_as(vx).to(DEVICE)] = float("nan")
    qx, kx, vx = (t.requires_grad_() for t in (qx, kx, vx))
    rule = dict(is_causal=causal, window_size=window, sink_tokens=sinks)
    if prepared:
        pattern = bk.prepare_pattern(p, query_len=Nq, key_len=Nk, block_size=bs, **rule,
                                     **tokens)
        y, lse = bk.block_sparse_attention(qx, kx, vx, pattern, backend=backend, return_lse=True)
    else:
        y, lse = bk.block_sparse_attention(qx, kx, vx, p, block_size=bs, backend=backend,
                                           return_lse=True, **rule, **tokens)
    dy = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, (qx, kx, vx), dy)

    prefix = tokens.get("prefix_lengths") is not None  # the oracle's mask states it in full
    assert_gqa_matches_oracle(y, lse, grads, (q, k, v), dy, p, bs, False if prefix else causal,
                              dtype, window_size=window, sink_tokens=sinks, extra_mask=extra)
    return y, lse, grads


def assert_gqa_matches_oracle(y, lse, grads, qkv, dy, pattern, bs, causal, dtype, **mask):
    """y, lse and the (dq, dk, dv) of upstream ``dy`` against the dense oracle in float64,
    K/V expanded to q's heads in the oracle only; the oracle run in ``dtype`` sets the
    tolerance. ``mask``: dense_attention's window_size / sink_tokens / extra_mask."""
    q, k, v = qkv
    G = q.shape[1] // k.shape[1]

    def oracle(dt):
        qo, ko, vo = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        yo, lo = dense_attention(qo, ko.repeat_interleave(G, 1), vo.repeat_interleave(G, 1),
                                 pattern, bs, causal, dtype=dt, **mask)
        return yo, lo, torch.autograd.grad(yo, (qo, ko, vo), dy.to(yo.dtype))
    y64, lse64, g64 = oracle(torch.float64)
    ys, lses, gs = oracle(dtype)
    assert_matches_oracle(y, y64, ys)
    assert_matches_oracle(lse, lse64, lses, what="lse")
    for name, g, r, s in zip(("dq", "dk", "dv"), grads, g64, gs):
        assert_matches_oracle(g, r, s, factor=3.0, what=name)


def _to_device(t):
    if isinstance(t, torch.Tensor):
        return t.to(DEVICE)
    if isinstance(t, (tuple, list)):
        return type(t)(_to_device(x) for x in t)
    return t


def _valid_tokens(B, N, tokens, side) -> torch.Tensor:
    """bool [B, N]: queries (side 0) or keys (side 1) that are not padding (a non-negative
    document id, inside query_range / key_range)."""
    ok = torch.ones(B, N, dtype=torch.bool)
    docs = tokens.get("document_ids")
    if docs is not None:
        d = docs[side] if isinstance(docs, (tuple, list)) else docs
        ok = ok & (d.cpu().reshape(-1, N) >= 0)
    rng = tokens.get(("query_range", "key_range")[side])
    if rng is not None:
        j = torch.arange(N)[None]
        for bound, keep in ((rng[0], lambda b: j >= b), (rng[1], lambda b: j < b)):
            if bound is not None:
                ok = ok & keep(torch.as_tensor(bound).cpu().reshape(-1, 1))
    return ok


def check_sinks_against_reference(N, bs, seed, **rule):
    """The cpu backend against the reference backend in float64 with learnable sinks
    (B=2, H=4, Hkv=2, every block of an N-token problem active, ``rule``: causal / window /
    sink tokens), y's gradient only (so the cpu backend's own backward runs, not the
    reference one an lse gradient takes): y and the gradients of q, k, v and the sinks."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, N, 16, generator=gen, dtype=torch.float64) * 2
    k, v = (torch.randn(2, 2, N, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    sinks = torch.randn(4, generator=gen, dtype=torch.float64)
    dy = torch.randn(2, 4, N, 16, generator=gen, dtype=torch.float64)
    pattern = torch.ones(1, 1, nblocks(N, bs), nblocks(N, bs), dtype=torch.bool)
    results = []
    for backend in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        y = bk.block_sparse_attention(*leaves[:3], pattern, block_size=bs, sinks=leaves[3],
                                      backend=backend, **rule)
        results.append((y, torch.autograd.grad(y, leaves, dy)))
    (y, grads), (y_ref, grads_ref) = results
    assert_matches_oracle(y, y_ref, y_ref)
    for name, g, r in zip(("dq", "dk", "dv", "dsinks"), grads, grads_ref):
        assert_matches_oracle(g, r, r, what=name)
