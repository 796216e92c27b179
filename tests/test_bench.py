"""The benchmark harness itself (CPU): argument parsing, the FLOP convention on hand-computed
cases, the files of a --quick CPU run, unavailable/crashing baselines reported as rows, and the
host-overhead modes (step, unprepared, step-graph: its CUDA path is the GPU run's). The
grouped-query sweep: test_bench_gqa.py."""

import csv
import json
import types

import pytest
import torch

from baracuda_kernels import cli
from baracuda_kernels.attention.patterns import causal as causal_pattern
from baracuda_kernels.attention.patterns import random_blocks
from baracuda_kernels.bench import baselines, graphs, report, summaries
from baracuda_kernels.bench import cli as bench_cli
from baracuda_kernels.bench import runner as bench_runner
from baracuda_kernels.bench.cases import (HOST_MODES, MAIN_MODES, Geometry, PatternSpec,
                                          merge_cases, preset_grids)
from baracuda_kernels.bench.flops import computed_pairs, mode_flops, tflops
from baracuda_kernels.bench.runner import Sweep, derive

FAST = ["--threads", "1", "--rep-ms", "1", "--warmup-ms", "0", "--no-progress"]


def parse(*argv):
    return cli.build_parser().parse_args(["bench", *argv])


# ------------------------------------------------------------------ argument parsing
def test_parse_lists_and_aliases():
    a = parse("--quick", "--patterns", "causal,random", "--densities", "0.5,10%",
              "--modes", "fwd,fwdbwd", "--dtypes", "bf16,float16", "--seq-lens", "256,512",
              "--impls", "ours,flex", "--device", "cpu")
    assert a.preset == "quick" and a.run is bench_cli.run
    assert a.densities == (0.5, 0.1) and a.modes == ("fwd", "step")
    assert a.dtypes == ("bf16", "f16") and a.seq_lens == (256, 512) and a.impls == ("ours", "flex")
    cases = bench_cli.build_cases(a, on_gpu=False)
    names = [c.pattern.name for c in cases if c.geometry.seq_len == 256 and c.geometry.dtype == "bf16"]
    assert names == ["dense", "causal", "random50", "random10"]      # dense first: the yardstick
    assert {c.modes for c in cases} == {("fwd", "step")}


def test_mode_names_and_the_fwd_bwd_alias():
    assert parse("--modes", "fwd+bwd").modes == ("step",)          # the old name of step
    a = parse("--modes", "fwd,bwd,step,step-graph,unprepared")
    assert a.modes == ("fwd", "bwd", "step", "step-graph", "unprepared")
    assert parse("--modes", "train,graph,Step_Graph").modes == ("step", "step-graph", "step-graph")


def test_densities_alone_redensify_the_preset():
    a = parse("--quick", "--densities", "0.2")
    names = [c.pattern.name for c in bench_cli.build_cases(a, on_gpu=False)]
    assert "random20" in names and "random50" not in names and "bigbird" in names


@pytest.mark.parametrize("bad", [["--modes", "sideways"], ["--impls", "cudnn"],
                                 ["--densities", "0"], ["--seq-lens", "-4"], ["--dtypes", "int8"],
                                 ["--preset", "huge"]])
def test_bad_arguments_exit_with_usage_error(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*bad)
    assert exc.value.code == 2


def test_unknown_pattern_is_a_clear_error(capsys):
    assert cli.main(["bench", "--patterns", "zigzag", "--list"]) == 2
    assert "unknown pattern 'zigzag'" in capsys.readouterr().err


def test_kernels_preset_matches_the_kernel_issues():
    grids = preset_grids("kernels", on_gpu=True)
    main_geo = Geometry(2, 16, 8192, 128, "bf16", 128)
    assert [c.pattern.name for c in grids[0].cases()] == [
        "dense", "causal", "sliding_window", "random50", "random25", "random10", "random5"]
    assert all(g.modes == MAIN_MODES for g in grids[:3])
    host = grids[3]
    assert host.modes == HOST_MODES and host.impls == ("ours", "flex")
    assert [c.pattern.name for c in host.cases()] == ["dense", "random10", "random5", "random2",
                                                      "sliding_window"]
    assert {c.geometry for c in host.cases()} == {main_geo}
    cases = bench_cli.build_cases(parse("--preset", "kernels"), on_gpu=True)
    assert len(cases) == len({(c.geometry, c.pattern) for c in cases})     # merged, once each
    main = {c.pattern.name: c for c in cases if c.geometry == main_geo}
    assert list(main) == ["dense", "causal", "sliding_window", "random50", "random25",
                          "random10", "random5", "random2"]
    assert main["causal"].pairs() == [(i, m) for i in ("ours", "flex", "sdpa") for m in MAIN_MODES]
    r5 = set(main["random5"].pairs())
    assert {("ours", "step-graph"), ("flex", "step-graph"), ("ours", "unprepared"),
            ("sdpa", "step")} <= r5
    assert ("flex", "unprepared") not in r5 and ("sdpa", "step-graph") not in r5
    assert main["random2"].pairs() == [("ours", m) for m in HOST_MODES] + [
        ("flex", m) for m in HOST_MODES if m != "unprepared"]
    b64 = [c for c in cases if c.geometry.block_size == 64]
    assert [c.pattern.name for c in b64] == ["dense", "random25"] and b64[0].impls == ("ours", "flex")
    long = [c for c in cases if c.geometry.seq_len == 32768]
    assert {c.geometry.head_dim for c in long} == {64} and "sliding_window" in [c.pattern.name for c in long]
    assert all(c.modes == MAIN_MODES for c in b64 + long)


def test_quick_presets_have_no_step_graph():
    for on_gpu in (False, True):
        for g in preset_grids("quick", on_gpu):
            assert "step-graph" not in g.modes
    assert "unprepared" in preset_grids("quick", on_gpu=False)[0].modes


def test_low_densities_parse_and_name():
    assert PatternSpec("random", 0.02).name == "random2"
    assert PatternSpec.parse("random2") == [PatternSpec("random", 0.02)]
    assert PatternSpec.parse("random", (0.1, 0.05, 0.02)) == PatternSpec.parse("random10") + \
        PatternSpec.parse("random5") + PatternSpec.parse("random0.02")
    assert parse("--densities", "0.02,2%").densities == (0.02, 0.02)
    assert PatternSpec("random", 0.005).name == "random0.5"


def test_merge_cases_keeps_each_grid_pairs():
    from baracuda_kernels.bench.cases import Case
    geo, pat = Geometry(1, 2, 128, 16, "f32", 32), PatternSpec("dense")
    a = Case(geo, pat, ("fwd", "bwd"), ("ours", "sdpa"))
    b = Case(geo, pat, ("fwd", "step-graph", "unprepared"), ("ours", "flex"))
    (m,) = merge_cases([a, b])
    assert m.modes == ("fwd", "bwd", "step-graph", "unprepared") and m.impls == ("ours", "sdpa", "flex")
    assert set(m.pairs()) == {("ours", "fwd"), ("ours", "bwd"), ("ours", "step-graph"),
                              ("ours", "unprepared"), ("sdpa", "fwd"), ("sdpa", "bwd"),
                              ("flex", "fwd"), ("flex", "step-graph")}
    assert merge_cases([a, a]) == [a]


def test_list_prints_cases(capsys):
    assert cli.main(["bench", "--quick", "--device", "cpu", "--list"]) == 0
    out = capsys.readouterr().out
    assert "sliding_window" in out and "random25" in out


# ------------------------------------------------------------------ FLOP convention
def test_flops_dense_with_broadcast_and_ragged_tail():
    ones = torch.ones(1, 1, 3, 3, dtype=torch.bool)           # N = 10, block 4: 4 + 4 + 2
    assert computed_pairs(ones, 10, 10, 4, False, batch=2, heads=3) == 6 * 100
    last = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    last[..., 2, 2] = True                                     # the ragged corner: 2 x 2
    assert computed_pairs(last, 10, 10, 4, False, batch=1, heads=1) == 4
    edge = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    edge[..., 0, 2] = True                                     # 4 rows x 2 ragged columns
    assert computed_pairs(edge, 10, 10, 4, False, 1, 1) == 8


def test_flops_causal_counts_diagonal_blocks_whole_and_drops_emptied_blocks():
    ones = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    # Blocks (0,0) 16, (1,0) 16, (1,1) 16, (2,0) 8, (2,1) 8, (2,2) 4: diagonal blocks whole.
    assert computed_pairs(ones, 10, 10, 4, True, 1, 1) == 68
    upper = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    upper[..., 0, 1] = upper[..., 1, 2] = True                 # entirely above the diagonal
    assert computed_pairs(upper, 10, 10, 4, True, 1, 1) == 0
    # The pattern helper counts only j <= i; ours adds the upper half of each diagonal block.
    p = causal_pattern(256, block_size=64)
    exact = p.computed_token_pairs()
    assert computed_pairs(p.mask, 256, 256, 64, True, 1, 1) == exact + 4 * (64 * 63 // 2)


def test_flops_per_head_patterns_and_mode_factors():
    p = random_blocks(512, block_size=64, density=0.25, seed=3, num_heads=4)
    assert computed_pairs(p.mask, 512, 512, 64, False, batch=2, heads=4) == 2 * int(p.mask.sum()) * 64 * 64
    pairs = 1000
    assert mode_flops(pairs, 64, 64, "fwd") == 4 * 64 * pairs
    assert mode_flops(pairs, 64, 32, "fwd") == 2 * (64 + 32) * pairs
    assert mode_flops(pairs, 64, 64, "bwd") == 2.5 * 4 * 64 * pairs
    assert mode_flops(pairs, 64, 64, "step") == 3.5 * 4 * 64 * pairs
    assert mode_flops(pairs, 64, 64, "step-graph") == 3.5 * 4 * 64 * pairs
    assert mode_flops(pairs, 64, 64, "unprepared") == 4 * 64 * pairs
    assert tflops(2e12, 1000.0) == pytest.approx(2.0)


def test_derived_columns():
    def row(pattern, impl, ms, wf):
        return dict(geometry="g", pattern=pattern, mode="fwd", impl=impl, status="ok",
                    time_ms=ms, work_fraction=wf)
    rows = [row("dense", "ours", 10.0, 1.0), row("dense", "flex", 8.0, 1.0),
            row("random25", "ours", 3.0, 0.25), row("random25", "flex", 4.0, 0.25),
            dict(row("random25", "sdpa", 0, 0.25), status="unavailable")]
    derive(rows)
    r = rows[2]
    assert r["x_dense"] == pytest.approx(10 / 3) and r["vs_flex"] == pytest.approx(4 / 3)
    assert r["skip_ratio"] == pytest.approx(3.0 / (0.25 * 10.0))
    assert rows[3]["skip_ratio"] == pytest.approx(4.0 / (0.25 * 8.0)) and "vs_flex" not in rows[3]


def test_derived_host_overhead():
    def row(mode, impl, ms, pattern="random5"):
        return dict(geometry="g", pattern=pattern, mode=mode, impl=impl, status="ok",
                    time_ms=ms, work_fraction=0.05)
    rows = [row("fwd", "ours", 0.20), row("unprepared", "ours", 0.26),
            row("step", "ours", 1.20), row("step-graph", "ours", 0.80),
            row("step", "flex", 1.00), row("step-graph", "flex", 0.96),
            row("step", "ours", 2.0, "random10"),                     # no graph: no overhead
            dict(row("step-graph", "ours", 0, "random10"), status="unavailable")]
    derive(rows)
    by = {(r["pattern"], r["impl"], r["mode"]): r for r in rows}
    assert by[("random5", "ours", "step")]["overhead_ms"] == pytest.approx(0.40)
    assert by[("random5", "ours", "unprepared")]["overhead_ms"] == pytest.approx(0.06)
    assert "overhead_ms" not in by[("random5", "ours", "step-graph")]
    assert "overhead_ms" not in by[("random10", "ours", "step")]
    assert by[("random5", "ours", "step-graph")]["vs_flex"] == pytest.approx(0.96 / 0.80)
    assert by[("random5", "ours", "step")]["vs_flex"] == pytest.approx(1.00 / 1.20)
    (e,) = summaries.host_overhead(rows)
    assert e["pattern"] == "random5" and e["host"] == pytest.approx(0.40)
    assert e["host_share"] == pytest.approx(0.40 / 1.20) and e["lists"] == pytest.approx(0.06)
    assert e["graph_vs_flex"] == pytest.approx(1.2)
    text = summaries.format_host_overhead(rows)
    assert "Host overhead (ours)" in text and "0.400" in text and "33%" in text and "1.20x" in text
    plain = [{k: v for k, v in r.items() if k != "overhead_ms"} for r in rows
             if r["mode"] in ("fwd", "step")]
    derive(plain)
    assert summaries.format_host_overhead(plain) == ""


# ------------------------------------------------------------------ a --quick CPU run
def test_quick_cpu_run_writes_csv_json_png(tmp_path, capsys):
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path), *FAST])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "No CUDA GPU: running on CPU" in out and "rel. error vs reference" in out
    # ours is the fused cpu backend there; the reference backend is measured beside it
    assert "ours[cpu]" in out and "reference[reference]" in out
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    ours = [r for r in rows if r["impl"] == "ours"]
    assert {r["mode"] for r in ours} == {"fwd", "bwd", "step", "unprepared"}
    assert all(r["status"] == "ok" and float(r["tflops"]) > 0 and r["check"] == "ok" for r in ours)
    assert all(r["overhead_ms"] != "" for r in ours if r["mode"] == "unprepared")
    assert not [r for r in rows if r["mode"] == "unprepared" and r["impl"] != "ours"]
    assert "Host overhead (ours)" in out
    assert all(r["card"].startswith("CPU") and r["torch"] == torch.__version__ and
               "bench --preset quick" in r["command"] for r in rows)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["device"] == "cpu" and len(data["rows"]) == len(rows)
    assert any(e["impl"] == "flex" for e in data["unavailable"])    # no CPU backward: listed
    assert any(r["impl"] == "reference" and r["status"] == "ok" for r in rows)
    assert "| pattern | density |" in (tmp_path / "summary.md").read_text()
    pytest.importorskip("matplotlib", reason="matplotlib not installed: PNG plots are skipped")
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) == 2 and pngs[0].startswith("tflops_") and pngs[1].startswith("time_vs_density_")
    assert all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_missing_matplotlib_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "matplotlib_missing", lambda: "matplotlib is not installed")
    rc = cli.main(["bench", "--device", "cpu", "--patterns", "dense", "--seq-lens", "128",
                   "--block-sizes", "64", "--modes", "fwd", "--out", str(tmp_path), *FAST])
    assert rc == 0 and "matplotlib is not installed" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png")) and (tmp_path / "bench.csv").exists()


# ------------------------------------------------------------------ unavailable baselines
def _tiny_cases(impls, patterns=("dense", "random25"), modes=("fwd", "bwd")):
    from baracuda_kernels.bench.cases import Grid
    specs = tuple(s for p in patterns for s in PatternSpec.parse(p))
    return Grid(1, 2, (128,), (16,), ("f32",), (32,), specs, modes, impls).cases()


def _options(**kw):
    base = dict(warmup_ms=0, rep_ms=1, check=True, flex_mode="auto", seed=0)
    return types.SimpleNamespace(**{**base, **kw})


def test_unavailable_and_crashing_baselines_become_rows(monkeypatch, capsys):
    def no_flex():
        raise baselines.Unavailable("torch 0.0 has no FlexAttention (needs torch >= 2.5)")

    def sdpa_crashes_at_run(inputs, options):
        p = baselines.prepare_sdpa(inputs, options)

        def boom(*a):
            raise RuntimeError("simulated kernel crash")
        return baselines.Prepared(p.detail, boom, boom)

    monkeypatch.setattr(baselines, "_flex_module", no_flex)
    monkeypatch.setitem(baselines.PREPARE, "sdpa", sdpa_crashes_at_run)
    sweep = Sweep(_tiny_cases(("ours", "flex", "sdpa", "reference")), torch.device("cpu"),
                  _options(), progress=False)
    rows = sweep.run()
    by = {(r["pattern"], r["impl"], r["mode"]): r for r in rows}
    assert by[("random25", "ours", "bwd")]["status"] == "ok"
    assert by[("random25", "flex", "fwd")]["status"] == "unavailable"
    assert "no FlexAttention" in by[("random25", "flex", "bwd")]["reason"]
    assert by[("dense", "sdpa", "fwd")]["status"] == "error"
    assert "simulated kernel crash" in by[("dense", "sdpa", "bwd")]["reason"]
    assert ("random25", "sdpa", "fwd") not in by                  # SDPA: dense/causal only
    text = report.format_table(rows) + report.format_unavailable(report.unavailable_summary(rows))
    assert "no FlexAttention" in text and "simulated kernel crash" in text
    assert not sweep.check_failures


def test_wrong_output_fails_the_check(monkeypatch, tmp_path, capsys):
    real = baselines.prepare_ours

    def broken(inputs, options):
        p = real(inputs, options)
        return baselines.Prepared(p.detail, lambda: p.infer() * 1.5, p.train)
    monkeypatch.setitem(baselines.PREPARE, "ours", broken)
    rc = cli.main(["bench", "--device", "cpu", "--patterns", "random25", "--seq-lens", "128",
                   "--block-sizes", "32", "--head-dims", "16", "--modes", "fwd", "--impls", "ours",
                   "--out", str(tmp_path), "--no-plots", *FAST])
    out = capsys.readouterr().out
    assert rc == 1 and "CHECK FAILED" in out


# ------------------------------------------------------------------ host-overhead modes
def test_step_graph_is_unavailable_on_cpu_and_unprepared_is_ours_only():
    sweep = Sweep(_tiny_cases(("ours", "flex", "sdpa"), patterns=("dense",),
                              modes=("step", "step-graph", "unprepared")),
                  torch.device("cpu"), _options(), progress=False)
    rows = sweep.run()
    by = {(r["impl"], r["mode"]): r for r in rows}
    assert by[("ours", "step")]["status"] == "ok" and by[("ours", "unprepared")]["status"] == "ok"
    assert by[("ours", "unprepared")]["check"] == "ok"
    assert by[("sdpa", "step-graph")]["status"] == "unavailable"
    graph = by[("ours", "step-graph")]
    assert graph["status"] == "unavailable" and "CUDA graphs need a CUDA device" in graph["reason"]
    assert ("flex", "unprepared") not in by and ("sdpa", "unprepared") not in by
    assert not sweep.check_failures


def test_ours_uses_the_prepared_pattern(monkeypatch):
    class Prepared:        # stands in for a PreparedPattern: a BlockPattern's geometry and mask
        def __init__(self, pattern):
            self._pattern = pattern

        def __getattr__(self, name):
            return getattr(self._pattern, name)

    class Preparable(Prepared):   # a BlockPattern with prepare() (the API being added)
        def prepare(self):
            seen.append("prepare")
            return Prepared(self._pattern)

    seen, calls = [], []
    case = _tiny_cases(("ours",), patterns=("random25",))[-1]
    from baracuda_kernels.bench.cases import build_pattern
    pattern = Preparable(build_pattern(case.pattern, case.geometry))
    q, k, v, dy = bench_runner._inputs(case.geometry, torch.device("cpu"), 0)
    inputs = baselines.Inputs(q, k, v, dy, pattern, case.pattern, case.geometry)
    real = baselines.block_sparse_attention
    monkeypatch.setattr(baselines, "block_sparse_attention",
                        lambda *a, **kw: calls.append(type(a[3]).__name__) or real(*a, **kw))
    p = baselines.prepare_ours(inputs, _options())
    assert seen == ["prepare"]                       # once, at setup
    xs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    torch.autograd.grad(p.train(*xs), xs, dy)
    p.unprepared()
    p.unprepared()
    assert seen == ["prepare"] and calls == ["Prepared", "Tensor", "Tensor"]


@pytest.mark.parametrize("error", [0.0, 0.5, float("nan")])
def test_step_graph_replay_is_checked_before_timing(monkeypatch, error):
    # The capture itself needs CUDA; this checks what the runner does with its verdict.
    step = types.SimpleNamespace(replay=lambda: None, setup_s=0.0)
    monkeypatch.setattr(graphs, "capture_step", lambda *a, **kw: step)
    monkeypatch.setattr(graphs, "replay_error", lambda s, train: error)
    sweep = Sweep(_tiny_cases(("ours",), patterns=("dense",), modes=("step-graph",)),
                  torch.device("cpu"), _options(), progress=False)
    (row,) = sweep.run()
    if error == 0.0:
        assert row["status"] == "ok" and row["time_ms"] >= 0 and row["check"] == "ok"
        assert not sweep.check_failures
    else:
        assert row["status"] == "error" and "time_ms" not in row and row["check"] == "FAIL"
        assert "differs from the eager step" in row["reason"]
        assert len(sweep.check_failures) == 1 and "step-graph" in sweep.check_failures[0]


# ------------------------------------------------------------------ GPU (the lead's run)
@pytest.mark.gpu
def test_gpu_small_sweep_with_compiled_flex(tmp_path):
    # Forward only: two FlexAttention compiles (with and without the causal mask_mod).
    rc = cli.main(["bench", "--device", "cuda", "--patterns", "causal,random25",
                   "--seq-lens", "1024", "--head-dims", "64", "--block-sizes", "128",
                   "--batch", "1", "--heads", "4", "--modes", "fwd",
                   "--impls", "ours,flex,sdpa", "--out", str(tmp_path), "--no-progress",
                   "--rep-ms", "20"])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert all(r["status"] == "ok" for r in rows if r["impl"] == "ours")
    for r in rows:   # the BlockMask given to Flex computes what ours computes
        if r["impl"] == "flex" and r["status"] == "ok":
            assert float(r["rel_err"]) < 5e-2, r
