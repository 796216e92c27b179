"""Split-KV forward (flash-decoding): several programs per query tile, partials merged in a
fixed order. Against the unsplit kernel and the float64 oracle for decode and short chunks:
GQA (packed and per-query-head patterns), both causal alignments, window + sink tokens,
learnable sinks (with padded queries, which take none), softcap, bias; splits that get no
block; bitwise determinism; the automatic choice.

CPU: the launcher under the interpreter in f32; GPU: bf16, automatic splits on real sizes."""

import math

import pytest
import torch

import baracuda_kernels as bk
from baracuda_kernels.attention.block_sparse.block_lists import BlockLists
from baracuda_kernels.attention.block_sparse.split_kv import choose_splits
from baracuda_kernels.attention.common.score_mods import ScoreMods
from baracuda_kernels.attention.common.token_rules import TokenRules
from cases import DEVICE, HAS_CUDA
from oracle import assert_matches_oracle, dense_attention

triton_fwd = pytest.importorskip("baracuda_kernels.attention.block_sparse.triton_fwd")

CASES = [  # (name, Nq, H, Hkv, pattern heads, causal, options)
    ("decode-packed", 1, 8, 2, 1, "bottom_right", {}),
    ("decode-per-head", 1, 4, 2, 4, False, {}),
    ("chunk-window", 7, 4, 1, 1, "bottom_right", dict(window=(50, 0), sink_tokens=3)),
    ("chunk-sinks-padding", 7, 4, 2, 1, "bottom_right", dict(sinks=True, pad_rows=2)),
    ("decode-softcap-bias", 1, 4, 4, 1, False, dict(softcap=4.0, bias=True)),
]


def run_split(case, splits, dtype=torch.float32, Nk=300, bs=32, seed=0):
    """(y, lse) of the launcher with ``splits``, and the oracle's (y64, ysame)."""
    name, Nq, H, Hkv, Hp, causal, opts = case
    gen = torch.Generator().manual_seed(seed)
    B, D = 2, 16
    q = (torch.randn(B, H, Nq, D, generator=gen) * 2).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=gen).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=gen).to(DEVICE, dtype)
    nk = -(-Nk // bs)
    pattern = torch.rand(B, Hp, 1, nk, generator=gen) < 0.7
    pattern[0, :, :, : nk // 2] = False          # many leading splits of row 0 see nothing
    pattern = pattern.to(DEVICE)
    window = opts.get("window")
    window_rule = None
    if window is not None:
        from baracuda_kernels.attention.common.problem import window_rule as make_rule
        window_rule = make_rule(window, opts.get("sink_tokens", 0), causal, Nq, Nk)
    tokens = None
    live = None
    if opts.get("pad_rows"):
        q_ids = torch.zeros(B, Nq, dtype=torch.int32)
        q_ids[1, -opts["pad_rows"]:] = -1         # padded queries: no sink, lse = -inf
        tokens = TokenRules(q_ids.to(DEVICE), torch.zeros(B, Nk, dtype=torch.int32, device=DEVICE))
        live = (q_ids >= 0).to(DEVICE)
    sinks = (torch.randn(H, generator=gen) * 2).to(DEVICE) if opts.get("sinks") else None
    bias = (torch.randn(1, H, Nq, Nk, generator=gen) * 2).to(DEVICE) if opts.get("bias") else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mods = ScoreMods(sinks=None if sinks is None else sinks.to(acc), bias=bias)
    mods = None if mods.empty else mods
    lists = BlockLists.build(pattern, Nq, Nk, bs, causal, window=window_rule, tokens=tokens)
    y = torch.full((B, H, Nq, D), float("nan"), dtype=dtype, device=DEVICE)
    lse = torch.full((B, H, Nq), float("nan"), dtype=acc, device=DEVICE)
    triton_fwd.block_sparse_attention_forward_triton(
        q, k, v, lists, block_size=bs, scale=1 / math.sqrt(D), is_causal=causal, y=y, lse=lse,
        window=window_rule, softcap=opts.get("softcap", 0.0), mods=mods, split_kv=splits)
    G = H // Hkv
    extra = None if live is None else live[:, None, :, None]

    def oracle(dt):
        yo, _ = dense_attention(q.to(dt), k.repeat_interleave(G, 1).to(dt),
                                v.repeat_interleave(G, 1).to(dt),
                                pattern if Hp != Hkv or G == 1 else
                                pattern.repeat_interleave(G, 1), bs, causal, dtype=dt,
                                window_size=window or (-1, -1),
                                sink_tokens=opts.get("sink_tokens", 0), extra_mask=extra,
                                softcap=opts.get("softcap", 0.0), sinks=sinks, live_rows=live,
                                bias=bias)
        return yo
    return y, lse, oracle(torch.float64), oracle(dtype)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_split_matches_unsplit_and_oracle(case):
    if HAS_CUDA:
        pytest.skip("the GPU test below covers this")
    y1, lse1, y64, ys = run_split(case, 1)
    for splits in (2, 5, 16):                     # 16 > key blocks: some splits get nothing
        y, lse, _, _ = run_split(case, splits)
        assert_matches_oracle(y, y64, ys)
        torch.testing.assert_close(y, y1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, lse1, rtol=1e-5, atol=1e-5)
    again = run_split(case, 5)
    assert torch.equal(run_split(case, 5)[0], again[0])   # a fixed merge order


def test_choose_splits():
    cpu = torch.device("cpu")
    assert choose_splits(3, cpu, 8, 1, 100) == 3          # asked for
    assert choose_splits(None, cpu, 8, 1, 100) == 1       # the interpreter: never automatic
    if HAS_CUDA:
        dev = torch.device("cuda")
        assert choose_splits(None, dev, 8, 1, 256) > 1    # decode: few programs, long cache
        assert choose_splits(None, dev, 8, 128, 256) == 1  # full query blocks: no split
        assert choose_splits(None, dev, 10_000, 1, 256) == 1  # the card is full already
        assert choose_splits(None, dev, 8, 1, 2) == 1      # too few key blocks to share


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_split_gpu(case):
    y1, lse1, y64, ys = run_split(case, 1, torch.bfloat16, Nk=5000, bs=128)
    for splits in (None, 3, 40):                  # None: the automatic choice
        y, lse, _, _ = run_split(case, splits, torch.bfloat16, Nk=5000, bs=128)
        assert_matches_oracle(y, y64, ys)


@pytest.mark.gpu
def test_decode_auto_split_gpu():
    """A real decode shape takes the split path automatically, and matches the oracle."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 32, 128, generator=gen).to(DEVICE, torch.bfloat16)
    kc = torch.randn(1, 32768, 8, 128, generator=gen).to(DEVICE, torch.bfloat16)
    vc = torch.randn(1, 32768, 8, 128, generator=gen).to(DEVICE, torch.bfloat16)
    assert choose_splits(None, torch.device("cuda"), 8, 1, 256) > 1
    y = bk.block_sparse_attention_with_kvcache(q, kc, vc, 30000)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).double(), kc[:, :30000].transpose(1, 2).double(),
        vc[:, :30000].transpose(1, 2).double(), enable_gqa=True).transpose(1, 2)
    assert (y.double() - ref).abs().max() < 2e-2


def test_eager_decode_steps_on_short_caches_take_one_split(monkeypatch):
    """The decode kernel's automatic split count (launch.choose_decode_splits) on a card of
    132 SMs: one split for an eager step over at most EAGER_ONE_SPLIT_KEYS keys (one launch
    instead of two), automatic splits under torch.compile and on longer caches, and an
    explicit count always wins."""
    from baracuda_kernels.attention.block_sparse import split_kv
    from baracuda_kernels.attention.decode.launch import (EAGER_ONE_SPLIT_KEYS,
                                                          choose_decode_splits)
    monkeypatch.setattr(split_kv, "sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    keys = EAGER_ONE_SPLIT_KEYS
    assert choose_decode_splits(None, cuda, 8, keys // 32, keys, eager=True) == 1
    assert choose_decode_splits(None, cuda, 8, keys // 32, keys, eager=False) > 1
    longer = 4 * keys
    assert choose_decode_splits(None, cuda, 8, longer // 32, longer, eager=True) > 1
    assert choose_decode_splits(3, cuda, 8, keys // 32, keys, eager=True) == 3
