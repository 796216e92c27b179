"""Randomised agreement of the fast backends with the reference, on the options combined.

Each case draws a problem (batch, GQA ratio, odd lengths, Nq != Nk both ways, d_k != d_v,
block size, density, pattern heads, every causal mode, a window with sink tokens, documents
with padding, a key range, learnable sinks, softcap, prepared or not) from its seed, with a
NaN or inf written into q, k or v in a quarter of the cases, and checks the ``cpu`` backend
(CPU) or the triton kernels (the interpreter on CPU; CUDA on a GPU) against the reference
backend run on the same inputs in float64: y, lse and every gradient, their NaN / inf
pattern exactly and their values elsewhere. Half of the cases give lse an upstream gradient
too (on the cpu backend that takes the reference backward; the other half run its own).

A fuzz of this kind found that the cpu backend spread a NaN key to rows that never read it
(its fused kernel masks by adding -inf); the seeds here cover that case."""

import random

import pytest
import torch

import baracuda_kernels as bk
from cases import DEVICE, HAS_CUDA

CPU_SEEDS = range(40, 90)       # 10 of them failed before the NaN fix (42, 45, 47, ...)
TRITON_SEEDS = range(100, 112)


def _problem(seed: int, max_len: int):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, G = rng.choice([1, 2]), rng.choice([1, 2]), rng.choice([1, 2, 3])
    H, bs = Hkv * G, rng.choice([16, 32])
    Nk = rng.randint(1, max_len)
    Nq = rng.choice([Nk, rng.randint(1, max_len), 1])
    Dk = rng.choice([16, 32])
    Dv = rng.choice([Dk, 24])
    causal = rng.choice([False, True, "bottom_right"])
    rules = {}
    if rng.random() < 0.4:
        rules["window_size"] = (rng.choice([-1, rng.randint(0, 60)]), rng.choice([-1, 0, 9]))
        rules["sink_tokens"] = rng.choice([0, 5])
    if rng.random() < 0.2 and Nq == Nk:
        ids = torch.sort(torch.randint(0, 3, (B, Nq), generator=gen), dim=1).values
        ids[:, :rng.randint(0, Nq)] = -1                  # left padding
        rules["document_ids"] = ids
    elif rng.random() < 0.2:
        rules["key_range"] = (rng.randint(0, Nk // 2), Nk - rng.randint(0, Nk // 3))
    n_q, n_k = -(-Nq // bs), -(-Nk // bs)
    pattern = torch.rand(rng.choice([1, B]), rng.choice([1, Hkv, H]), n_q, n_k,
                         generator=gen) < rng.choice([1.0, 0.6, 0.3])
    q = torch.randn(B, H, Nq, Dk, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(B, Hkv, Nk, Dk, generator=gen, dtype=torch.float64) * 2
    v = torch.randn(B, Hkv, Nk, Dv, generator=gen, dtype=torch.float64)
    if rng.random() < 0.25:                               # a non-finite entry somewhere
        t = rng.choice([q, k, v])
        t[tuple(rng.randrange(n) for n in t.shape)] = rng.choice([float("nan"), float("inf")])
    sinks = torch.randn(H, generator=gen, dtype=torch.float64) if rng.random() < 0.2 else None
    prepared = rng.random() < 0.3
    softcap = rng.choice([2.0, 10.0]) if rng.random() < 0.25 else None
    return dict(q=q, k=k, v=v, sinks=sinks, pattern=pattern, bs=bs, causal=causal,
                rules=rules, prepared=prepared, softcap=softcap, lse_grad=rng.random() < 0.5)


def _run(p, backend, dtype, device):
    """(outputs, gradients) of one backend: y, lse, then dq, dk, dv (and dsinks)."""
    leaves = [p[n].to(device, dtype).requires_grad_() for n in ("q", "k", "v")]
    if p["sinks"] is not None:
        leaves.append(p["sinks"].to(device, dtype).requires_grad_())
    rules = {n: (r.to(device) if torch.is_tensor(r) else r) for n, r in p["rules"].items()}
    pattern = p["pattern"].to(device)
    extra = dict(softcap=p["softcap"])
    if p["sinks"] is not None:
        extra["sinks"] = leaves[3]
    if p["prepared"]:
        Nq, Nk = p["q"].shape[2], p["k"].shape[2]
        pattern = bk.prepare_pattern(pattern, query_len=Nq, key_len=Nk, block_size=p["bs"],
                                     is_causal=p["causal"], **rules)
        y, lse = bk.block_sparse_attention(*leaves[:3], pattern, backend=backend,
                                           return_lse=True, **extra)
    else:
        y, lse = bk.block_sparse_attention(*leaves[:3], pattern, block_size=p["bs"],
                                           is_causal=p["causal"], backend=backend,
                                           return_lse=True, **rules, **extra)
    gen = torch.Generator().manual_seed(7)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device, y.dtype)
    dlse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(device, lse.dtype)
    loss = (y * dy).sum()
    if p["lse_grad"]:
        loss = loss + (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) * dlse).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [y, lse, *grads]


def _check_agree(seed, backend, dtype, tol, max_len, exact_non_finite: bool):
    """exact_non_finite: every output's NaN and inf entries equal the reference's (the cpu
    backend redoes a non-finite call on the reference path). Else (the triton kernels) the
    non-finite rows of y and lse are the reference's, and gradients agree where both are
    finite: a NaN query row reaches the dK of the keys its blocks compute in the kernels and
    of every key in the reference's dense matmul (0 * NaN), and an inf score gives lse NaN
    in the kernels, +inf in the reference."""
    p = _problem(seed, max_len)
    got = _run(p, backend, dtype, DEVICE)
    want = _run(p, "reference", torch.float64, DEVICE)
    for name, a, b in zip(["y", "lse", "dq", "dk", "dv", "dsinks"], got, want):
        a = torch.zeros_like(b) if a is None else a.double()
        b = torch.zeros_like(a) if b is None else b
        if exact_non_finite:
            assert torch.equal(torch.isnan(a), torch.isnan(b)), f"seed {seed}: {name} NaN"
            assert torch.equal(torch.isinf(a), torch.isinf(b)), f"seed {seed}: {name} inf"
        elif name in ("y", "lse"):
            assert torch.equal(torch.isfinite(a), torch.isfinite(b)), \
                f"seed {seed}: {name} non-finite entries"
        ok = torch.isfinite(b) & torch.isfinite(a)
        if ok.any():
            err = (a[ok] - b[ok]).abs().max().item() / (b[ok].abs().max().item() + 1)
            assert err <= tol, f"seed {seed}: {name} off by {err:.2e}"


@pytest.mark.skipif(HAS_CUDA, reason="the cpu backend runs CPU tensors")
@pytest.mark.parametrize("seed", CPU_SEEDS)
def test_cpu_backend_agrees_with_the_reference(seed):
    _check_agree(seed, "cpu", torch.float64, 1e-9, 200, exact_non_finite=True)


@pytest.mark.parametrize("seed", TRITON_SEEDS)
def test_triton_agrees_with_the_reference(seed):
    """The interpreter on CPU (conftest sets TRITON_INTERPRET=1), CUDA on a GPU."""
    _check_agree(seed, "triton", torch.float32, 3e-4, 80, exact_non_finite=False)
