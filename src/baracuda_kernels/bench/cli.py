"""`baracuda-kernels bench`: sweep patterns x sizes x dtypes x block sizes x modes, against
same-process baselines (FlexAttention, torch SDPA, our dense, the reference backend; for GQA
also ours on K/V expanded to all query heads).

    baracuda-kernels bench --preset kernels --out bench/results/h100   # the kernel-issue table
    baracuda-kernels bench --quick                                     # minutes on a GPU, seconds on CPU
    baracuda-kernels bench --patterns causal,random --densities 0.1 --seq-lens 16384 --modes fwd
    baracuda-kernels bench --patterns random --densities 0.05 --modes step,step-graph  # host overhead
    baracuda-kernels bench --preset gqa --out bench/results/h100-gqa   # GQA (H=32, Hkv=8) table

Without a CUDA GPU it runs on CPU with small sizes (the cpu backend) and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from ..core import ElementKind, InvalidProblem
from . import report, summaries, token_summary
from .cases import (DEFAULT_DENSITIES, IMPLS, MODES, PRESETS, PatternSpec, apply_overrides,
                    canonical_mode, merge_cases, preset_grids)
from .runner import Sweep
from .timing import timer_name


def _list(cast, name, allowed=None):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{name}: expected a comma-separated list, got {text!r}")
        out = []
        for t in items:
            try:
                value = cast(t)
            except (ValueError, InvalidProblem) as exc:
                raise argparse.ArgumentTypeError(f"{name}: cannot read {t!r} ({exc})") from None
            if allowed is not None and value not in allowed:
                raise argparse.ArgumentTypeError(
                    f"{name}: {t!r} is not one of {', '.join(allowed)}")
            out.append(value)
        return tuple(out)
    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("expected an int >= 1")
    return value


def _density(text: str) -> float:
    value = float(text.rstrip("%")) / (100 if text.endswith("%") or float(text.rstrip("%")) > 1 else 1)
    if not 0 < value <= 1:
        raise ValueError("expected a density in (0, 1] (or a percent such as 25%)")
    return value


def _dtype(text: str) -> str:
    return ElementKind.coerce(text).value


def _mode(text: str) -> str:
    return canonical_mode(text)      # fwd+bwd (the old name of step) and other aliases


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the bench subcommand; ``parser.set_defaults(run=run)``."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sel = parser.add_argument_group("what to run (each option overrides the preset)")
    sel.add_argument("--preset", choices=PRESETS, default="full",
                     help="quick: a few cases; kernels: the forward/backward issue table (bf16, "
                          "B=2, H=16, N=8192, D=128, block 128, + block 64, + N=32768 D=64, + "
                          "host overhead: random 10/5/2%% and sliding_window in fwd, step, "
                          "step-graph, unprepared); full (default): all patterns, N 4k-16k, "
                          "D 64/128, blocks 64/128; gqa: grouped-query attention (bf16, B=2, "
                          "H=32, Hkv=8, N=8192, D=128, block 128; dense, causal, sliding_window, "
                          "random25, random10; ours vs ours-expanded, flex, sdpa); tokens: token "
                          "rules (bf16, B=2, H=16, N=8192, D=128: exact 1000-token window + 4 "
                          "sinks vs its coarsened blocks, 8 documents, also through varlen; the "
                          "window at N=65536; ours vs flex with the same rule)")
    sel.add_argument("--quick", dest="preset", action="store_const", const="quick",
                     help="same as --preset quick")
    sel.add_argument("--patterns", type=str, default=None,
                     help="comma list of dense, causal, sliding_window, bigbird, document, random, "
                          "random<percent> (random expands over --densities)")
    sel.add_argument("--densities", type=_list(_density, "--densities"), default=None,
                     help="densities of 'random', e.g. 0.5,0.25,0.1,0.05")
    sel.add_argument("--seq-lens", type=_list(_positive_int, "--seq-lens"), default=None)
    sel.add_argument("--head-dims", type=_list(_positive_int, "--head-dims"), default=None)
    sel.add_argument("--dtypes", type=_list(_dtype, "--dtypes"), default=None, help="bf16,f16,f32")
    sel.add_argument("--block-sizes", type=_list(_positive_int, "--block-sizes"), default=None)
    sel.add_argument("--batch", type=_positive_int, default=None)
    sel.add_argument("--heads", type=_positive_int, default=None, help="query heads H")
    sel.add_argument("--kv-heads", type=_positive_int, default=None,
                     help="K/V heads Hkv (grouped-query attention when < H; H a multiple of it)")
    sel.add_argument("--modes", type=_list(_mode, "--modes", MODES), default=None,
                     help="fwd, bwd, step (forward + backward through autograd; alias "
                          "fwd+bwd), step-graph (the step replayed from a CUDA graph, CUDA "
                          "only), unprepared (ours' forward with a new pattern object per call)")
    sel.add_argument("--impls", type=_list(str.lower, "--impls", IMPLS), default=None,
                     help="ours, ours-expanded (GQA only: ours on K/V repeated to H heads once), "
                          "ours-varlen (document patterns only: the varlen entry point), "
                          "flex, sdpa, reference (our dense is the 'dense' pattern, always run)")
    how = parser.add_argument_group("how")
    how.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    how.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up per measurement (ms)")
    how.add_argument("--rep-ms", type=float, default=100.0, help="repeat time per measurement (ms)")
    how.add_argument("--flex-mode", choices=("auto", "compiled", "eager"), default="auto",
                     help="auto: compiled on CUDA, eager on CPU (a CPU compile takes ~1 min/shape)")
    how.add_argument("--no-check", dest="check", action="store_false",
                     help="skip the error check against the reference backend")
    how.add_argument("--seed", type=int, default=0)
    how.add_argument("--threads", type=_positive_int, default=None,
                     help="CPU threads for torch (default: torch's choice); 1 is steadiest on a busy machine")
    how.add_argument("--list", action="store_true", help="print the cases and exit")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("bench_results"),
                     help="folder for bench.csv, bench.json, summary.md and PNGs (default ./bench_results)")
    out.add_argument("--no-plots", dest="plots", action="store_false")
    out.add_argument("--no-progress", dest="progress", action="store_false")
    parser.set_defaults(run=run)


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise InvalidProblem("--device cuda was given but torch sees no CUDA GPU; expected a GPU. "
                             "Fix: run without --device (CPU fallback) or on a GPU machine.")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _pattern_specs(names: str, densities) -> tuple:
    out = []
    for name in names.split(","):
        if name.strip():
            out += PatternSpec.parse(name, densities or DEFAULT_DENSITIES)
    return tuple(dict.fromkeys(out))


def build_cases(args, on_gpu: bool):
    """The cases selected by ``args``: the preset's grids with the command-line overrides."""
    grids = preset_grids(args.preset, on_gpu)
    if args.patterns is not None:
        grids = apply_overrides(grids, patterns=_pattern_specs(args.patterns, args.densities))
    elif args.densities is not None:   # re-density the preset's random patterns
        grids = [dataclasses.replace(g, patterns=tuple(dict.fromkeys(
            [p for p in g.patterns if p.kind != "random"]
            + ([PatternSpec("random", d) for d in args.densities]
               if any(p.kind == "random" for p in g.patterns) else [])))) for g in grids]
    grids = apply_overrides(grids, seq_lens=args.seq_lens, head_dims=args.head_dims,
                            dtypes=args.dtypes, block_sizes=args.block_sizes, batch=args.batch,
                            heads=args.heads, num_kv_heads=args.kv_heads, modes=args.modes,
                            impls=args.impls)
    cases = []
    for g in grids:
        cases.extend(g.cases())          # InvalidProblem for H not a multiple of Hkv
    return merge_cases(cases)


_FLAGS = {"check": "--no-check", "plots": "--no-plots", "progress": "--no-progress", "list": "--list"}


def command_line(args) -> str:
    """The command that ran: sys.argv when this process is the CLI, else the equivalent
    command rebuilt from ``args`` (e.g. when called as ``cli.main([...])`` from Python)."""
    import shlex
    if "bench" in sys.argv[1:]:
        return shlex.join(["baracuda-kernels"] + sys.argv[sys.argv.index("bench"):])
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    default = vars(defaults.parse_args([]))
    words = ["baracuda-kernels", "bench"]
    for name, value in vars(args).items():
        if name in ("run", "command") or name not in default or value == default[name]:
            continue
        if name in _FLAGS:
            words.append(_FLAGS[name])
            continue
        if isinstance(value, tuple):
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        words += ["--" + name.replace("_", "-"), str(value)]
    return shlex.join(words)


def run(args) -> int:
    try:
        device = resolve_device(args.device)
        cases = build_cases(args, device.type == "cuda")
    except InvalidProblem as exc:
        print(f"baracuda-kernels bench: {exc}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device, cases)
    finally:
        torch.set_num_threads(threads)


def _run(args, device: torch.device, cases) -> int:
    on_gpu = device.type == "cuda"
    if args.list:
        for c in cases:
            runs = ("" if c.runs is None else "  only " + ",".join(
                f"{i}:{m}" for i, m in c.pairs()))
            print(f"{c.geometry.label}  {c.pattern.name:<15} modes={','.join(c.modes)} "
                  f"impls={','.join(c.impls)}{runs}")
        return 0
    meta = report.collect_meta(device, command_line(args), preset=args.preset,
                               timer=timer_name(device))
    print(f"baracuda-kernels bench ({args.preset}) on {meta['card']}; torch {meta['torch']}, "
          f"triton {meta['triton']}; {len(cases)} cases; timer: {meta['timer']}")
    if not on_gpu:
        flex = "compiled" if args.flex_mode == "compiled" else "eager (unfused)"
        print("No CUDA GPU: running on CPU with small sizes. 'ours' is the cpu backend "
              f"(PyTorch's fused CPU kernel on the active blocks) here and FlexAttention runs "
              f"{flex}; these are not GPU numbers.")
    sweep = Sweep(cases, device, args, progress=args.progress)
    rows = sweep.run()
    unavailable = report.unavailable_summary(rows)
    print(report.format_table(rows))
    for extra in (summaries.format_gqa(rows), summaries.format_host_overhead(rows),
                  token_summary.format_tokens(rows)):
        if extra:
            print()
            print(extra)
    print()
    print(report.format_unavailable(unavailable))

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "bench.csv", out_dir / "bench.json", out_dir / "summary.md"]
    report.write_csv(written[0], rows, meta)
    report.write_json(written[1], rows, meta, unavailable)
    written[2].write_text(report.summary_markdown(rows, meta))
    if args.plots:
        missing = report.matplotlib_missing()
        if missing:
            print(missing)
        else:
            written += report.write_plots(out_dir, rows)
    print("wrote " + ", ".join(str(p) for p in written))
    if sweep.check_failures:
        print("CHECK FAILED (ours vs reference, or a CUDA graph replay vs the eager step):\n  "
              + "\n  ".join(sweep.check_failures))
        return 1
    return 0
