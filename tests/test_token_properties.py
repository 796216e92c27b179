"""Property test of the token rules: random combinations of causal alignment, windows,
sinks, documents with random boundaries, query / key ranges and prefixes, with random block
patterns and GQA, against the float64 oracle (forward, lse, gradients) on both backends,
with NaN in the padding. Builders with kernel rules (and the token-mask builders, whose bits the kernels apply)
report exact and equal their rule."""

import random

import pytest
import torch

from baracuda_kernels.attention import patterns as P
from cases import HAS_CUDA, check_token_rule


def _random_case(seed: int):
    rnd = random.Random(seed)
    B = rnd.choice([1, 2])
    Nq = rnd.choice([1, 7, 33, 50])
    Nk = Nq if rnd.random() < 0.6 else rnd.choice([9, 40, 61])
    bs = rnd.choice([8, 16])
    causal = rnd.choice([False, True, "bottom_right"])
    window, sinks = (-1, -1), 0
    if rnd.random() < 0.5:
        window = (rnd.choice([-1, 0, 3, 11]), rnd.choice([-1, 0, 5]) if not causal else 0)
        sinks = rnd.choice([0, 2])
    tokens = {}
    if rnd.random() < 0.5 and Nq == Nk:
        cuts = sorted(rnd.sample(range(1, Nq), min(3, Nq - 1))) if Nq > 1 else []
        ids = torch.zeros(B, Nq, dtype=torch.int32)
        for c in cuts:
            ids[:, c:] += 1
        if rnd.random() < 0.3:
            ids[:, 0] = -1  # a padding token given as a negative id
        tokens["document_ids"] = ids
    if rnd.random() < 0.5:
        starts = torch.tensor([rnd.randrange(0, max(1, Nk // 3)) for _ in range(B)])
        tokens["key_range"] = (starts, None if rnd.random() < 0.5 else
                               torch.tensor([rnd.randrange(Nk // 2, Nk + 1) for _ in range(B)]))
    if rnd.random() < 0.3:
        tokens["query_range"] = (None, torch.tensor([rnd.randrange(0, Nq + 1) for _ in range(B)]))
    if causal and window == (-1, -1) and rnd.random() < 0.3:
        tokens["prefix_lengths"] = torch.tensor([rnd.randrange(0, Nk + 1) for _ in range(B)])
    return B, Nq, Nk, bs, causal, window, sinks, tokens


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
@pytest.mark.parametrize("seed", range(12))
def test_random_token_rules_match_oracle(backend, seed):
    if HAS_CUDA and backend == "cpu":
        pytest.skip("the cpu backend runs CPU tensors; the CPU suite covers it")
    if HAS_CUDA and backend == "triton":
        dtype = torch.bfloat16
    else:
        dtype = torch.float32 if backend == "triton" else torch.float64
    B, Nq, Nk, bs, causal, window, sinks, tokens = _random_case(seed)
    check_token_rule(backend, dtype, Nq, Nk, bs, causal, window, sinks, B=B, H=4, Hkv=2,
                     tokens=tokens, density=0.8, seed=seed, nan_padding=True)


@pytest.mark.parametrize("seed", range(6))
def test_random_builders_are_exact(seed):
    rnd = random.Random(100 + seed)
    n, bs = rnd.choice([37, 64, 90]), rnd.choice([4, 8, 16])
    lens = []
    while sum(lens) < n:
        lens.append(min(rnd.randrange(1, n // 2 + 2), n - sum(lens)))
    built = [P.sliding_window(n, rnd.randrange(1, n), block_size=bs, sinks=rnd.choice([0, 3]),
                              causal=rnd.random() < 0.5),
             P.document_mask(lens, block_size=bs, causal=rnd.random() < 0.5),
             P.prefix_lm(n, rnd.randrange(0, n + 1), block_size=bs),
             P.from_token_mask(torch.rand(n, n) < rnd.random(), block_size=bs,
                               is_causal=rnd.random() < 0.5),
             P.from_mask_fn(lambda b, h, q, kv, m=rnd.randrange(2, 7): (q * 3 + kv) % m == 0,
                            n, block_size=bs)]
    for p in built:
        assert p.kernel_rules and p.exact and p.extra_token_pairs == 0, p.coarsening_report()
        assert torch.equal(p.to_dense_token_mask(), p.to_dense_token_mask(rule=True))
