"""GPU-only parts of the boundary: device guard, CUDA-graph capture of a training step,
64-bit tile offsets for huge K/V row strides. Run on the device (scripts/gpu_check.sh)."""

import dataclasses

import pytest
import torch

import baracuda_kernels as bk
from baracuda_kernels.attention.block_sparse.block_lists import BlockLists
from baracuda_kernels.patterns import sliding_window

pytestmark = pytest.mark.gpu


def _qkv(device, dtype=torch.bfloat16, B=2, H=4, N=1000, D=64, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=gen).to(device, dtype).requires_grad_()
            for _ in range(3)]


def _step(q, k, v, pattern, dy):
    y = bk.block_sparse_attention(q, k, v, pattern)
    return torch.autograd.grad(y, (q, k, v), dy)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_gpu_that_is_not_current():
    pattern = sliding_window(1000, window=256, block_size=64, sinks=64)
    results = []
    for dev in ("cuda:0", "cuda:1"):
        q, k, v = _qkv(dev)
        dy = torch.randn_like(q)
        with torch.cuda.device(0):  # current device 0 even for tensors on cuda:1
            y, lse = bk.block_sparse_attention(q, k, v, pattern.to(dev), return_lse=True)
            grads = torch.autograd.grad(y, (q, k, v), dy)
        torch.cuda.synchronize(dev)
        results.append([t.cpu() for t in (y, lse, *grads)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "raw"])
def test_training_step_captures_in_a_cuda_graph(prepared):
    """The README's recipe: warm up on a side stream, capture fwd + bwd, replay after
    writing new inputs (and, for a raw pattern, new pattern content) in place."""
    device = torch.device("cuda")
    q, k, v = _qkv(device)
    dy = torch.randn_like(q)
    window = sliding_window(1000, window=256, block_size=64, sinks=64).to(device)
    mask = window.mask.clone()       # a raw pattern tensor, read afresh by every replay
    pattern = window.prepare() if prepared else mask
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())

    def step():
        y = bk.block_sparse_attention(q, k, v, pattern, block_size=64, is_causal=True)
        return torch.autograd.grad(y, (q, k, v), dy)

    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_grads = step()

    for seed in (1, 2):
        fresh = _qkv(device, seed=seed)
        with torch.no_grad():
            for dst, src in zip((q, k, v), fresh):
                dst.copy_(src)
            dy.copy_(torch.randn_like(dy))
            if not prepared:
                mask[..., seed, :seed] = ~mask[..., seed, :seed]
        graph.replay()
        eager = step()
        for got, want in zip(static_grads, eager):
            assert torch.equal(got, want)


def test_prepared_training_step_does_no_pattern_work(monkeypatch):
    device = torch.device("cuda")
    q, k, v = _qkv(device)
    dy = torch.randn_like(q)
    prepared = sliding_window(1000, window=256, block_size=64, sinks=64).to(device).prepare()
    _step(q, k, v, prepared, dy)  # warm-up: plan selection, launch orders memoised
    calls = []
    monkeypatch.setattr(BlockLists, "build", classmethod(lambda *a, **kw: calls.append(a)))
    monkeypatch.setattr(BlockLists, "memo", lambda self, key, build: self.__dict__["_memo"][key])
    for _ in range(3):
        _step(q, k, v, prepared, dy)
    assert calls == []


def test_huge_k_row_stride_uses_64_bit_tile_offsets():
    """A K row stride of 2^26 + 16 elements: 32 rows of a tile span more than 2^31 elements,
    which overflowed 32-bit in-tile offsets (a crash or a wrong answer)."""
    from baracuda_kernels.attention.block_sparse.triton_fwd import (block_sparse_attention_forward_triton,
                                                       default_forward_config)
    from baracuda_kernels.core import ArchSku
    device = torch.device("cuda")
    Nk, D, stride = 64, 64, 2**26 + 16
    storage = torch.zeros(Nk, stride, dtype=torch.float16, device=device)   # 8.6 GB
    gen = torch.Generator(device="cpu").manual_seed(0)
    storage[:, :D] = torch.randn(Nk, D, generator=gen).to(device, torch.float16)
    k = storage[:, :D][None, None]                                           # strides (.., S, 1)
    q = torch.randn(1, 1, 16, D, generator=gen).to(device, torch.float16)
    v = torch.randn(1, 1, Nk, D, generator=gen).to(device, torch.float16)
    pattern = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    lists = BlockLists.build(pattern, 16, Nk, 64, False)
    config = dataclasses.replace(default_forward_config(D, D, torch.float16, 64,
                                                        ArchSku.from_device(device)), use_tma=False)
    y = torch.full((1, 1, 16, D), float("nan"), dtype=torch.float16, device=device)
    lse = torch.full((1, 1, 16), float("nan"), device=device)
    block_sparse_attention_forward_triton(q, k, v, lists, block_size=64, scale=D ** -0.5,
                                          is_causal=False, y=y, lse=lse, config=config)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    del storage
    assert (y.double() - ref).abs().max().item() < 2e-3


def test_make_graphed_callables_replays_forward_and_backward():
    """torch.cuda.make_graphed_callables around an attention call with a prepared pattern:
    every call replays the captured forward, every backward the captured backward."""
    device = torch.device("cuda")
    prepared = sliding_window(1000, window=256, block_size=64, sinks=64).to(device).prepare()

    def attend(q, k, v):
        return bk.block_sparse_attention(q, k, v, prepared)

    graphed = torch.cuda.make_graphed_callables(attend, tuple(_qkv(device)))
    for seed in (1, 2):
        inputs = _qkv(device, seed=seed)
        dy = torch.randn_like(inputs[0])
        got = torch.autograd.grad(graphed(*inputs), inputs, dy)
        want = torch.autograd.grad(attend(*inputs), inputs, dy)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
