"""`baracuda-kernels bench`: the benchmark harness.

Modules: cases (patterns, geometries, presets), flops (the DESIGN.md FLOP convention),
timing (do_bench / CPU wall clock), baselines (ours, FlexAttention, torch SDPA, reference),
runner (check against the reference backend, then time every implementation in every mode),
graphs (mode step-graph: a training step captured in a CUDA graph and replayed), report
(terminal table, host-overhead summary, CSV, JSON, summary.md, PNG plots), cli (options and
entry point).

One command for the kernel issues' table (same process, same card)::

    baracuda-kernels bench --preset kernels --out bench/results/<card>

and one for grouped-query attention (H=32, Hkv=8: ours vs ours on expanded K/V, Flex and
SDPA with enable_gqa, peak memory per row)::

    baracuda-kernels bench --preset gqa --out bench/results/<card>-gqa
"""
