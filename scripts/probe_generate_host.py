"""Where a generate() decode step spends its host time: baracuda vs sdpa on the transformers
bench's Llama-like model (8 layers, hidden 2048, 16 heads / 4 K/V heads, bf16).

Prints decode ms per token (4k-token prompt), the host synchronisations per token that
torch.cuda's sync debug mode reports (with the first distinct call sites), and a cProfile
of a few decode tokens (own time), for each implementation.

    PYTHONPATH=src python scripts/probe_generate_host.py [--smoke]
"""
import collections
import cProfile
import pstats
import time
import warnings

import torch

import bench_transformers as bt  # noqa: E402  (its model builder and register())

PROMPT = 256 if bt.SMOKE else 2048
LAYERS = 2 if bt.SMOKE else 8


def generate(m, ids, new):
    with torch.no_grad():
        return m.generate(ids, max_new_tokens=new, do_sample=False)


def ms_per_token(m, ids, new=16):
    generate(m, ids, new + 1)
    bt.sync()
    t = time.perf_counter()
    generate(m, ids, 1)
    bt.sync()
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    generate(m, ids, new + 1)
    bt.sync()
    return (time.perf_counter() - t - prefill) * 1e3 / new


def syncs_per_token(m, ids, new=4):
    """Synchronising calls per decode token (sync debug mode), and the top call sites."""
    if bt.DEVICE != "cuda":
        return 0.0, []
    sites = collections.Counter()
    counts = []
    for n in (1, new + 1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                generate(m, ids, n)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(len(caught))
        if n > 1:
            for w in caught:
                sites[f"{w.filename}:{w.lineno}"] += 1
    return (counts[1] - counts[0]) / new, sites.most_common(8)


def main():
    bt.register()
    ids = torch.randint(0, 32000, (1, PROMPT), device=bt.DEVICE)
    for impl in ("baracuda", "sdpa"):
        m = bt.model("causal", impl, LAYERS, 0).eval()
        print(f"== {impl}: {ms_per_token(m, ids):.3f} ms per decode token "
              f"(prompt {PROMPT}, {LAYERS} layers)", flush=True)
        per_token, sites = syncs_per_token(m, ids)
        print(f"   host syncs per decode token: {per_token:.1f}; sites: {sites}", flush=True)
        generate(m, ids, 2)
        prof = cProfile.Profile()
        prof.enable()
        generate(m, ids, 6)
        bt.sync()
        prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(22)
        stats.sort_stats("cumtime").print_stats("baracuda_kernels|sdpa_attention", 14)
        del m
        torch.cuda.empty_cache() if bt.DEVICE == "cuda" else None


if __name__ == "__main__":
    main()
