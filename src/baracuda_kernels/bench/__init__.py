"""`baracuda-kernels bench`: the benchmark harness.

Modules: cases (patterns, geometries, presets), flops (the DESIGN.md FLOP convention),
timing (do_bench / CPU wall clock), baselines (ours, FlexAttention, torch SDPA, reference),
runner (check against the reference backend, then time every implementation in every mode),
graphs (mode step-graph: a training step captured in a CUDA graph and replayed), report
(terminal table, host-overhead summary, CSV, JSON, summary.md, PNG plots), cli (options and
entry point).

One command for the kernel issues' table (same process, same card)::

    baracuda-kernels bench --preset kernels --out bench/results/<card>
"""
