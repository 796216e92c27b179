"""The benchmark harness's grouped-query attention sweep (CPU): the gqa preset, geometry and
options, the expanded oracle check, enable_gqa for Flex and SDPA, the expanded-K/V variant,
summaries and memory columns. (test_bench.py has the rest of the harness.)"""

import time
import types

import pytest
import torch

from baracuda_kernels import cli
from baracuda_kernels.bench import baselines, report, summaries
from baracuda_kernels.bench import cli as bench_cli
from baracuda_kernels.bench import runner as bench_runner
from baracuda_kernels.bench.cases import MAIN_MODES, Geometry, PatternSpec, preset_grids
from baracuda_kernels.bench.runner import Sweep, derive
from test_bench import _options, _tiny_cases

FAST = ["--threads", "1", "--rep-ms", "1", "--warmup-ms", "0", "--no-progress"]


def parse(*argv):
    return cli.build_parser().parse_args(["bench", *argv])


@pytest.fixture
def fast_sweep(monkeypatch):
    """One timed call per measurement (the timing loop is the quick run's) on one CPU
    thread (as FAST's --threads 1: steadiest, and quickest for these tiny shapes)."""
    def once(fn, device, **kw):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    monkeypatch.setattr(bench_runner, "median_ms", once)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gqa_cases(impls, patterns=("dense", "random25"), modes=("fwd", "bwd"), heads=4, kv_heads=2):
    from baracuda_kernels.bench.cases import Grid
    specs = tuple(s for p in patterns for s in PatternSpec.parse(p))
    return Grid(1, heads, (128,), (16,), ("f32",), (32,), specs, modes, impls,
                num_kv_heads=kv_heads).cases()


def test_gqa_preset_matches_the_issue():
    from baracuda_kernels.bench.cases import GQA_IMPLS, PRESETS
    assert "gqa" in PRESETS and "ours-expanded" in GQA_IMPLS
    (grid,) = preset_grids("gqa", on_gpu=True)
    geo = Geometry(2, 32, 8192, 128, "bf16", 128, num_kv_heads=8)
    cases = bench_cli.build_cases(parse("--preset", "gqa"), on_gpu=True)
    assert {c.geometry for c in cases} == {geo} and geo.kv_heads == 8 and geo.is_gqa
    assert [c.pattern.name for c in cases] == ["dense", "causal", "sliding_window", "random25",
                                               "random10"]
    assert grid.modes == MAIN_MODES and grid.impls == ("ours", "ours-expanded", "flex", "sdpa")
    assert all(c.modes == MAIN_MODES and c.runs is None for c in cases)
    assert geo.label == "B=2 H=32/8 N=8192 D=128 bf16 block=128"
    (cpu,) = preset_grids("gqa", on_gpu=False)          # small, still grouped
    assert all(c.geometry.is_gqa for c in cpu.cases())
    assert {c.pattern.name for c in cpu.cases()} == {c.pattern.name for c in cases}


def test_gqa_geometry_and_options():
    assert Geometry(1, 8, 128, 16, "f32", 32, 8) == Geometry(1, 8, 128, 16, "f32", 32)  # Hkv = H
    assert Geometry(1, 8, 128, 16, "f32", 32).label == "B=1 H=8 N=128 D=16 f32 block=32"
    from baracuda_kernels.core import InvalidProblem
    with pytest.raises(InvalidProblem, match="multiple of the K/V heads"):
        Geometry(1, 8, 128, 16, "f32", 32, 3)
    cases = bench_cli.build_cases(parse("--quick", "--heads", "8", "--kv-heads", "2"), on_gpu=True)
    assert {(c.geometry.heads, c.geometry.kv_heads) for c in cases} == {(8, 2)}
    assert cli.main(["bench", "--heads", "8", "--kv-heads", "3", "--list"]) == 2


def test_gqa_cpu_sweep_checks_against_the_expanded_oracle(monkeypatch, fast_sweep):
    # Ours gets K/V with 2 heads; the oracle (reference on 4 expanded heads) does not rely on
    # the GQA indexing; ours-expanded runs on K/V copied once to 4 heads.
    oracle_kv_heads = []
    real = bench_runner.block_sparse_attention
    monkeypatch.setattr(bench_runner, "block_sparse_attention",
                        lambda q, k, v, *a, **kw: oracle_kv_heads.append(k.shape[1]) or real(q, k, v, *a, **kw))
    sweep = Sweep(_gqa_cases(("ours", "ours-expanded", "sdpa", "reference")),
                  torch.device("cpu"), _options(), progress=False)
    rows = sweep.run()
    assert oracle_kv_heads == [4, 4] and not sweep.check_failures
    by = {(r["pattern"], r["impl"], r["mode"]): r for r in rows}
    for pat in ("dense", "random25"):
        for impl in ("ours", "ours-expanded"):
            for mode in ("fwd", "bwd"):
                r = by[(pat, impl, mode)]
                assert r["status"] == "ok" and r["tflops"] > 0, r
                assert r["rel_err"] < 1e-6 and r["heads"] == 4 and r["kv_heads"] == 2
                assert r["geometry"] == "B=1 H=4/2 N=128 D=16 f32 block=32"
                assert r["peak_mib"] is None and r["prep_mib"] is None      # CPU: no memory
        assert all(by[(pat, i, m)]["check"] == "ok" for i in ("ours", "ours-expanded")
                   for m in ("fwd", "bwd"))
        # FLOPs count query heads: the same for every implementation of the case
        assert by[(pat, "ours", "bwd")]["flops"] == by[(pat, "ours-expanded", "bwd")]["flops"]
    assert by[("dense", "ours", "fwd")]["flops"] == 4 * 16 * 4 * 128 * 128
    assert by[("dense", "sdpa", "bwd")]["status"] == "ok" and by[("dense", "sdpa", "bwd")]["rel_err"] < 1e-5
    assert ("random25", "sdpa", "fwd") not in by                    # SDPA: dense/causal only
    text = summaries.format_gqa(rows)
    assert "GQA summary" in text and "ours/exp." in text and "H=4/2" in text
    assert "| geometry | pattern | density | mode | ours TF/s" in report.summary_markdown(
        rows, report.collect_meta(torch.device("cpu")))


def test_flex_and_sdpa_get_enable_gqa(monkeypatch, fast_sweep):
    # FlexAttention eager takes seconds per call on CPU: a stand-in records the call, the
    # real one is the GPU run's. SDPA runs for real.
    seen = []

    def fake_flex(q, k, v, block_mask=None, **kw):
        seen.append((q.shape[1], k.shape[1], kw))
        return q.clone()
    monkeypatch.setattr(baselines, "_flex_function", lambda mode: fake_flex)
    case = _gqa_cases(("flex", "sdpa"), patterns=("causal",), modes=("fwd",))[1]
    from baracuda_kernels.bench.cases import build_pattern
    q, k, v, dy = bench_runner._inputs(case.geometry, torch.device("cpu"), 0)
    inputs = baselines.Inputs(q, k, v, dy, build_pattern(case.pattern, case.geometry),
                              case.pattern, case.geometry)
    p = baselines.prepare("flex", inputs, _options())
    p.infer()
    assert seen == [(4, 2, {"enable_gqa": True})] * 2 and "gqa" in p.detail
    y = baselines.prepare("sdpa", inputs, _options()).infer()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(y, ref)
    monkeypatch.setattr(baselines, "_sdpa_has_gqa", lambda: False)     # torch < 2.5
    with pytest.raises(baselines.Unavailable, match="enable_gqa"):
        baselines.prepare("sdpa", inputs, _options())
    monkeypatch.setattr(baselines, "_flex_module", lambda: types.SimpleNamespace(
        flex_attention=lambda q, k, v, block_mask=None: q))
    with pytest.raises(baselines.Unavailable, match="enable_gqa"):
        baselines._flex_gqa_kwargs(inputs)


def test_gqa_wrong_kv_head_fails_the_check(monkeypatch, fast_sweep):
    real = baselines.prepare_ours

    def swapped(inputs, options):      # query head h reading the other group's K/V head
        import dataclasses
        return real(dataclasses.replace(inputs, k=inputs.k.flip(1).contiguous(),
                                        v=inputs.v.flip(1).contiguous()), options)
    monkeypatch.setitem(baselines.PREPARE, "ours", swapped)
    sweep = Sweep(_gqa_cases(("ours",), patterns=("dense",), modes=("fwd",)),
                  torch.device("cpu"), _options(), progress=False)
    (row,) = sweep.run()
    assert row["check"] == "FAIL" and len(sweep.check_failures) == 1


def test_ours_expanded_is_not_applicable_without_gqa(fast_sweep):
    case = _tiny_cases(("ours", "ours-expanded"), patterns=("dense",), modes=("fwd",))[0]
    assert not case.geometry.is_gqa
    from baracuda_kernels.bench.cases import build_pattern
    q, k, v, dy = bench_runner._inputs(case.geometry, torch.device("cpu"), 0)
    inputs = baselines.Inputs(q, k, v, dy, build_pattern(case.pattern, case.geometry),
                              case.pattern, case.geometry)
    with pytest.raises(baselines.NotApplicable):
        baselines.prepare("ours-expanded", inputs, _options())
    rows = Sweep([case], torch.device("cpu"), _options(), progress=False).run()
    assert [r["impl"] for r in rows] == ["ours"]                      # skipped without a row


def test_ours_expanded_folds_the_kv_gradients(fast_sweep):
    case = _gqa_cases(("ours-expanded",), patterns=("dense",), modes=("bwd",))[0]
    from baracuda_kernels.bench.cases import build_pattern
    q, k, v, dy = bench_runner._inputs(case.geometry, torch.device("cpu"), 0)
    assert q.shape[1] == 4 and k.shape[1] == v.shape[1] == 2 and dy.shape == q.shape
    inputs = baselines.Inputs(q, k, v, dy, build_pattern(case.pattern, case.geometry),
                              case.pattern, case.geometry)
    p = baselines.prepare("ours-expanded", inputs, _options())
    qe, ke, ve = p.leaves(inputs)
    assert qe is q and ke.shape[1] == 4 and torch.equal(ke[:, 1], k[:, 0]) and torch.equal(ke[:, 2], k[:, 1])
    grads = (torch.ones_like(q), torch.arange(4.).view(1, 4, 1, 1).expand_as(ke), torch.ones_like(ve))
    dq, dk, dv = p.case_grads(grads)
    assert dk.shape == k.shape and torch.equal(dk[0, :, 0, 0], torch.tensor([1., 5.]))
    assert torch.equal(dv, torch.full_like(v, 2.0))


def test_gqa_summary_targets_and_memory_columns():
    def row(pattern, impl, mode, ms, peak=None, prep=None):
        return dict(geometry="g", batch=2, heads=32, kv_heads=8, seq_len=8192, head_dim=128,
                    dtype="bf16", block_size=128, pattern=pattern, mode=mode, impl=impl,
                    status="ok", time_ms=ms, tflops=100.0 / ms, work_fraction=1.0,
                    peak_mib=peak, prep_mib=prep)
    rows = [row("dense", "ours", "fwd", 1.0, 0.0, 40.0), row("dense", "ours-expanded", "fwd", 1.1, 0.0, 552.0),
            row("dense", "flex", "fwd", 1.3, 64.0, 1.0), row("dense", "sdpa", "fwd", 0.9, 64.0, 0.0),
            row("dense", "ours", "bwd", 2.0, 300.0, 40.0), row("dense", "ours-expanded", "bwd", 1.8, 1068.0, 552.0),
            row("dense", "flex", "bwd", 3.0, 900.0, 1.0)]
    derive(rows)
    fwd, bwd = summaries.gqa_summary(rows)
    assert fwd["vs_expanded"] == pytest.approx(1.1) and fwd["vs_flex"] == pytest.approx(1.3)
    assert fwd["kv_copy_mib"] == pytest.approx(512.0) and fwd["misses"] == []
    assert bwd["vs_expanded"] == pytest.approx(0.9) and bwd["vs_flex"] == pytest.approx(1.5)
    assert bwd["misses"] == ["< expanded"] and bwd["expanded_peak_mib"] == 1068.0
    text = summaries.format_gqa(rows)
    assert "met" in text and "< expanded" in text and "512.0" in text and "1068.0" in text
    (step,) = summaries.gqa_summary(rows + [row("dense", "ours", "step", 3.0), row("dense", "flex", "step", 3.0)])[2:]
    assert step["unmeasured"] == ["expanded"] and summaries._gqa_targets(step) == "< 1.2x flex (no expanded)"
    table = report.format_table(rows)
    assert "peak MiB" in table and "1068.0" in table
    plain = [dict(r, peak_mib=None, kv_heads=32) for r in rows]
    assert "peak MiB  " not in report.format_table(plain) and summaries.format_gqa(plain) == ""


def test_peak_memory_is_none_off_cuda():
    from baracuda_kernels.bench.timing import PeakMemory, peak_memory_mib
    assert peak_memory_mib(lambda: torch.ones(1000), torch.device("cpu")) is None
    with PeakMemory(torch.device("cpu")) as m:
        torch.ones(1000)
    assert m.mib is None
