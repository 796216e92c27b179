"""Score modifiers against FlexAttention given the same modification, one run on one card.
bf16, B=2, H=16, N=8192, D=128, block 128 (the score-modifier issue's geometry):

* causal + softcap 50 (Gemma 2's logit cap): Flex score_mod cap * tanh(score / cap);
* causal + ALiBi (slopes 2^(-8 (h + 1) / H)): Flex score_mod score - slope * |i - j|;
* causal sliding window of 1000 tokens + learnable sinks (gpt-oss): Flex has no sinks, so it
  returns lse and its output is rescaled by exp(lse - logaddexp(lse, sink)), the usual way
  (differentiable, sinks included);
* random 25% of the blocks per head + a learned bias [1, H, N, N] (bf16): Flex mask_mod
  reads the same block pattern, score_mod adds bias[h, i, j] (a captured buffer). The step
  compares both without a bias gradient (Flex's gradient for a captured buffer sorts all
  B*H*N*N score indices, over cub's INT_MAX limit at this size: it fails); "ours+dbias"
  adds ours with the bias's gradient;
* and ours on each pattern without modifiers (what a modifier costs us).

Forward and step (forward + backward) times are medians of the bench timer (ms); Flex's
BlockMask is built once, untimed; both compiled paths warmed up before timing.

    PYTHONPATH=src python scripts/probe_score_mods.py [case ...]   (default: every case)
"""
import sys

import torch
import torch._dynamo

import baracuda_kernels as bk
from baracuda_kernels.bench.timing import median_ms
from baracuda_kernels.patterns import causal, sliding_window

B, H, N, D, BS = 2, 16, 8192, 128, 128
CAP, WINDOW = 50.0, 1000


def main():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    # Each case (and grad mode) is a new specialisation of the compiled Flex: more than the
    # default 8 would silently fall back to Flex's unfused path.
    torch._dynamo.config.recompile_limit = 64
    flex = torch.compile(flex_attention)
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=gen)
               .requires_grad_() for _ in range(3))
    dy = torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=gen)
    slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], device=dev)
    sinks = torch.randn(H, device=dev, generator=gen).requires_grad_()

    def causal_mask(b, h, qi, ki):
        return ki <= qi

    def window_mask(b, h, qi, ki):
        return (ki <= qi) & (qi - ki < WINDOW)

    def softcap_mod(score, b, h, qi, ki):
        return CAP * torch.tanh(score / CAP)

    def alibi_mod(score, b, h, qi, ki):
        return score - slopes[h] * (qi - ki).abs()

    nb = N // BS
    blocks = torch.rand(1, H, nb, nb, device=dev, generator=gen) < 0.25
    blocks |= torch.eye(nb, dtype=torch.bool, device=dev)  # no empty row
    bias_grad = torch.randn(1, H, N, N, device=dev, generator=gen, dtype=torch.bfloat16) \
        .requires_grad_()
    bias = bias_grad.detach()

    def random_mask(b, h, qi, ki):
        return blocks[0, h, qi // BS, ki // BS]

    def bias_mod(score, b, h, qi, ki):
        return score + bias[0, h, qi, ki]

    bm_random = create_block_mask(random_mask, None, H, N, N, device=dev, BLOCK_SIZE=BS)
    p_random = bk.prepare_pattern(blocks, query_len=N, key_len=N, block_size=BS, device=dev)
    bm_causal = create_block_mask(causal_mask, None, None, N, N, device=dev, BLOCK_SIZE=BS)
    bm_window = create_block_mask(window_mask, None, None, N, N, device=dev, BLOCK_SIZE=BS)
    p_causal = causal(N, block_size=BS).to(dev).prepare()
    p_window = sliding_window(N, WINDOW, block_size=BS).to(dev).prepare()

    def flex_sinks(q, k, v):
        y, lse = flex(q, k, v, block_mask=bm_window, return_lse=True)
        total = torch.logaddexp(lse, sinks[None, :, None])
        return y * torch.exp(lse - total)[..., None].to(y.dtype)

    cases = {
        "causal+softcap": (
            lambda: bk.block_sparse_attention(q, k, v, p_causal, softcap=CAP),
            lambda: bk.block_sparse_attention(q, k, v, p_causal),
            lambda: flex(q, k, v, score_mod=softcap_mod, block_mask=bm_causal)),
        "causal+alibi": (
            lambda: bk.block_sparse_attention(q, k, v, p_causal, alibi_slopes=slopes),
            lambda: bk.block_sparse_attention(q, k, v, p_causal),
            lambda: flex(q, k, v, score_mod=alibi_mod, block_mask=bm_causal)),
        "window+sinks": (
            lambda: bk.block_sparse_attention(q, k, v, p_window, sinks=sinks),
            lambda: bk.block_sparse_attention(q, k, v, p_window),
            lambda: flex_sinks(q, k, v)),
        "random25+bias": (
            lambda: bk.block_sparse_attention(q, k, v, p_random, bias=bias),
            lambda: bk.block_sparse_attention(q, k, v, p_random),
            lambda: flex(q, k, v, score_mod=bias_mod, block_mask=bm_random),
            lambda: bk.block_sparse_attention(q, k, v, p_random, bias=bias_grad)),
    }
    wanted = sys.argv[1:] or list(cases)
    leaves = (q, k, v, sinks, bias_grad)
    print(f"{'case':<16}{'impl':<12}{'fwd ms':>9}{'step ms':>9}   (B={B} H={H} N={N} D={D} "
          f"bf16, block {BS})", flush=True)
    for name, (ours, plain, other, *extra) in cases.items():
        if name not in wanted:
            continue
        results = {}
        impls = (("ours", ours), ("ours-plain", plain), ("flex", other)) + \
            tuple(("ours+dbias", fn) for fn in extra)
        for impl, fn in impls:
            def fwd(fn=fn):
                with torch.no_grad():
                    fn()

            def step(fn=fn):
                y = fn()
                used = [t for t in leaves if t.requires_grad]
                torch.autograd.grad(y, used, dy, allow_unused=True)
            try:
                results[impl] = (median_ms(fwd, dev), median_ms(step, dev))
            except Exception as err:  # e.g. no gradient for a captured buffer: say so
                print(f"{name:<16}{impl:<12} failed: {type(err).__name__}: "
                      f"{str(err).splitlines()[0][:150]}", flush=True)
                results[impl] = (float("nan"), float("nan"))
                continue
            f, s = results[impl]
            print(f"{name:<16}{impl:<12}{f:9.3f}{s:9.3f}", flush=True)
        (of, os_), (pf, ps), (ff, fs) = results["ours"], results["ours-plain"], results["flex"]
        print(f"{name:<16}vs flex fwd {ff / of:.2f}x step {fs / os_:.2f}x; modifier cost "
              f"fwd {of / pf:.2f}x step {os_ / ps:.2f}x", flush=True)
    # Correctness at this size: ours vs Flex on the softcap and bias cases (bf16 outputs).
    with torch.no_grad():
        a = bk.block_sparse_attention(q, k, v, p_causal, softcap=CAP).float()
        b = flex(q, k, v, score_mod=softcap_mod, block_mask=bm_causal).float()
    print(f"softcap ours vs flex max |diff| {float((a - b).abs().max()):.3e} "
          f"(rel {float((a - b).norm() / b.norm()):.2e})", flush=True)
    with torch.no_grad():
        a = bk.block_sparse_attention(q, k, v, p_random, bias=bias).float()
        b = flex(q, k, v, score_mod=bias_mod, block_mask=bm_random).float()
    print(f"bias ours vs flex max |diff| {float((a - b).abs().max()):.3e} "
          f"(rel {float((a - b).norm() / b.norm()):.2e})", flush=True)


if __name__ == "__main__":
    main()
