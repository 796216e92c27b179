"""block_sparse_attention under torch.compile: one graph (fullgraph=True), forward and backward."""

import pytest
import torch

import baracuda_kernels as bk
from cases import DEVICE, random_pattern


class TinyAttention(torch.nn.Module):
    def __init__(self, dim, heads, pattern, block_size):
        super().__init__()
        self.heads, self.pattern, self.block_size = heads, pattern, block_size
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).unbind(2)
        y = bk.block_sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      self.pattern, block_size=self.block_size, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, N, C))


def _check(compile_backend, dtype, device):
    torch.manual_seed(0)
    pattern = random_pattern(1, 2, 96, 96, 32, device=device)
    model = TinyAttention(64, 2, pattern, 32).to(device=device, dtype=dtype)
    x = torch.randn(2, 96, 64, device=device, dtype=dtype, requires_grad=True)
    eager_y = model(x)
    eager_grads = torch.autograd.grad(eager_y.square().sum(), [x, *model.parameters()])
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    y = compiled(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    torch.testing.assert_close(y, eager_y)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_compile_fullgraph_forward_backward_cpu():
    _check("aot_eager", torch.float64, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_inductor_gpu(dtype):
    _check("inductor", dtype, DEVICE)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(2, 3, 40, 16)
        v = torch.empty(2, 3, 50, 24)
        p = torch.ones(1, 1, 3, 4, dtype=torch.bool)
        y, lse = bk.block_sparse_attention(q, torch.empty(2, 3, 50, 16), v, p, block_size=16,
                                           return_lse=True)
        assert y.shape == (2, 3, 40, 24) and lse.shape == (2, 3, 40) and lse.dtype == torch.float32


def test_compile_with_token_rules_cpu():
    """Document ids, key padding and a prefix under torch.compile(fullgraph=True): the custom
    op carries the token tensors, forward and backward agree with eager."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 70, 8, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    p = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    docs = torch.tensor([[0] * 13 + [1] * 30 + [2] * 27, [0] * 40 + [1] * 30])

    def f(q, k, v):
        y = bk.block_sparse_attention(q, k, v, p, block_size=16, is_causal=True,
                                      document_ids=docs, key_range=(torch.tensor([0, 3]), None),
                                      prefix_lengths=torch.tensor([5, 0]))
        return y.square().sum()
    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v),
                                   (q, k, v))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
