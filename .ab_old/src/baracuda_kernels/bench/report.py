"""Output of a sweep: terminal table, CSV, JSON, a markdown summary and PNG plots.

Files written to the output folder:
    bench.csv        one row per (case, implementation, mode), tagged with the metadata
    bench.json       {"meta": {...}, "unavailable": [...], "rows": [...]}
    summary.md       the headline table (markdown, for the README) with card, date, versions
    time_vs_density_<geometry>.png, tflops_<geometry>.png   (needs matplotlib)
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from .runner import ROW_FIELDS, first, geometry_of
from .text import fmt, tflops_text
from .summaries import gqa_markdown, host_markdown

META_FIELDS = ["card", "device", "torch", "triton", "cuda", "baracuda_kernels", "git_commit",
               "date", "command", "preset", "timer"]


# ---------------------------------------------------------------------------------- meta
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except Exception:
        return ""


def collect_meta(device: torch.device, command: str = "", preset: str = "", timer: str = "") -> dict:
    """Card name, versions, date and the command line of this run."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    from .. import __version__
    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
        cap = torch.cuda.get_device_capability(device)
        card_full = f"{card} (sm{cap[0]}{cap[1]})"
    else:
        card_full = f"CPU: {_cpu_name()} ({os.cpu_count()} cores)"
    command = command or shlex.join(sys.argv)
    return dict(card=card_full, device=str(device), torch=torch.__version__, triton=triton_version,
                cuda=torch.version.cuda or "", baracuda_kernels=__version__, git_commit=_git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command=command, preset=preset, timer=timer)


# --------------------------------------------------------------------------------- table
def impl_label(row: dict) -> str:
    detail = row.get("impl_detail")
    if not detail:
        return row["impl"]
    return f"{row['impl']}[{detail.split(' ')[0]}]"


IMPL_WIDTH = 26    # "ours-expanded[reference]" and a space


def _has_memory(rows: list[dict]) -> bool:
    return any(r.get("peak_mib") is not None for r in rows)


def format_table(rows: list[dict]) -> str:
    """Terminal table grouped by geometry and pattern (see the legend at its end). An
    implementation unavailable in every mode of a pattern is shown once, with why. The
    peak MiB column is there where memory was measured (CUDA)."""
    lines = []
    base_head = (f"{'pattern':<15}{'density':>8}  {'mode':<11}{'impl':<{IMPL_WIDTH}}{'ms':>9}{'TFLOP/s':>9}"
                 f"{'x dense':>9}{'vs flex':>9}{'skip':>7}{'rel.err':>9}")
    for geo in geometry_of(rows):
        g_rows = [x for x in rows if x["geometry"] == geo]
        memory = _has_memory(g_rows)
        head = base_head + (f"{'peak MiB':>10}" if memory else "")
        lines += ["", f"== {geo}", head, "-" * len(head)]
        for pat in dict.fromkeys(r["pattern"] for r in g_rows):
            p_rows = [r for r in g_rows if r["pattern"] == pat]
            label = f"{pat:<15}{p_rows[0]['work_fraction'] * 100:>7.1f}%"
            modes = list(dict.fromkeys(r["mode"] for r in p_rows))
            collapsed = set()
            for impl in dict.fromkeys(r["impl"] for r in p_rows):
                mine = [r for r in p_rows if r["impl"] == impl]
                # (not len(modes): an impl has no row in modes that are not its own)
                if all(r.get("status") == "unavailable" for r in mine) \
                        and len({r.get("reason") for r in mine}) == 1:
                    collapsed.add(impl)
            for mode in modes:
                first_line = True
                for r in (x for x in p_rows if x["mode"] == mode and x["impl"] not in collapsed):
                    lead = (label if mode == modes[0] and first_line else " " * 23) + "  " + \
                        (f"{mode:<11}" if first_line else " " * 11)
                    first_line = False
                    if r.get("status") != "ok":
                        lines.append(f"{lead}{impl_label(r):<{IMPL_WIDTH}}{r.get('status', '')}: "
                                     f"{(r.get('reason') or '')[:80]}")
                        continue
                    err = fmt(r.get("rel_err"), ".1e") + ("!" if r.get("check") == "FAIL" else "")
                    mem = f"{fmt(r.get('peak_mib'), '.1f'):>10}" if memory else ""
                    lines.append(f"{lead}{impl_label(r):<{IMPL_WIDTH}}{r['time_ms']:>9.3f}{tflops_text(r['tflops'])}"
                                 f"{fmt(r.get('x_dense'), '8.2f', 'x'):>9}"
                                 f"{fmt(r.get('vs_flex'), '8.2f', 'x'):>9}"
                                 f"{fmt(r.get('skip_ratio'), '7.2f'):>7}{err:>9}{mem}".rstrip())
            for impl in collapsed:
                r = next(x for x in p_rows if x["impl"] == impl)
                lines.append(f"{' ' * 23}  {'all':<11}{impl:<{IMPL_WIDTH}}unavailable: {(r.get('reason') or '')[:80]}")
    lines += ["", "density: computed token pairs / dense pairs (the FLOP convention's work). "
              "TFLOP/s: 4*D*pairs per forward (fwd, unprepared), x2.5 backward (bwd), x3.5 a "
              "training step (step, step-graph).",
              "step: forward + backward through autograd; step-graph: the same step replayed "
              "from a CUDA graph (no host work); unprepared: ours' forward given a new pattern "
              "object per call (block lists rebuilt each call).",
              "x dense: our dense time / this time. vs flex: FlexAttention time / this time "
              "(>1 = faster than Flex). skip: time / (density x the same implementation's "
              "dense time), 1.00 = time proportional to work. rel.err: ||out - ref|| / ||ref|| "
              "vs the reference backend (bwd rows: worst of dq, dk, dv; ! = check failed).",
              "H=32/8: 32 query heads sharing 8 K/V heads (GQA); ours-expanded: ours on K/V "
              "repeated to H heads once, before timing. peak MiB (CUDA): peak memory allocated "
              "during one call above what was allocated before it (step-graph: the capture)."]
    return "\n".join(lines)


def unavailable_summary(rows: list[dict]) -> list[dict]:
    """One entry per (implementation, reason) with the cases it concerns."""
    seen: dict = {}
    for r in rows:
        if r.get("status") in ("unavailable", "error"):
            key = (r["impl"], r["status"], r.get("reason", ""))
            seen.setdefault(key, []).append(f"{r['geometry']} {r['pattern']} {r['mode']}")
    return [dict(impl=i, status=s, reason=why, cases=sorted(set(c)))
            for (i, s, why), c in seen.items()]


def format_unavailable(entries: list[dict]) -> str:
    if not entries:
        return "All requested implementations ran."
    lines = ["Implementations not measured (with why):"]
    for e in entries:
        n = len(e["cases"])
        lines.append(f"  {e['impl']} ({e['status']}, {n} case{'s' if n != 1 else ''}): {e['reason']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- files
def _clean(value):
    if isinstance(value, float):
        return None if not math.isfinite(value) else float(f"{value:.6g}")
    return value


def write_csv(path: Path, rows: list[dict], meta: dict) -> None:
    fields = META_FIELDS + ROW_FIELDS
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _clean(v) for k, v in {**{m: meta.get(m, "") for m in META_FIELDS}, **r}.items()})


def write_json(path: Path, rows: list[dict], meta: dict, unavailable: list[dict]) -> None:
    tagged = [{**{m: meta.get(m, "") for m in ("card", "torch", "triton", "command")},
               **{k: _clean(r.get(k)) for k in ROW_FIELDS if k in r}} for r in rows]
    with open(path, "w") as f:
        json.dump(dict(meta=meta, unavailable=unavailable, rows=tagged), f, indent=1)


def summary_markdown(rows: list[dict], meta: dict) -> str:
    """Headline table: per geometry and pattern, ours vs FlexAttention in every mode."""
    out = [f"Measured on **{meta['card']}**, {meta['date']}; torch {meta['torch']}, triton "
           f"{meta['triton']}, baracuda-kernels {meta['baracuda_kernels']}"
           f"{' @' + meta['git_commit'] if meta.get('git_commit') else ''}.",
           f"Command: `{meta['command']}`. Timer: {meta.get('timer', '')}.", "",
           "TFLOP/s by the DESIGN.md convention (4*D*pairs per forward, x2.5 backward, x3.5 "
           "a training step). ours vs Flex = Flex time / our time (>1: ours faster). skip = time / "
           "(density x our dense time): 1.00 = time proportional to the work. x dense = our "
           "dense time / this time. Modes: fwd, bwd, step (forward + backward through "
           "autograd), step-graph (the step replayed from a CUDA graph), unprepared (forward "
           "with a new pattern object per call).", ""]
    for geo in geometry_of(rows):
        g_rows = [r for r in rows if r["geometry"] == geo]
        out += [f"**{geo}**", "",
                "| pattern | density | mode | ours ms | ours TFLOP/s | Flex TFLOP/s | ours vs Flex "
                "| skip | x dense |", "|---|---|---|---|---|---|---|---|---|"]
        for pat in dict.fromkeys(r["pattern"] for r in g_rows):
            any_row = first(g_rows, pattern=pat)
            for m in dict.fromkeys(r["mode"] for r in g_rows if r["pattern"] == pat):
                ours = first(g_rows, pattern=pat, mode=m, impl="ours") or {}
                flex = first(g_rows, pattern=pat, mode=m, impl="flex")
                ok = ours.get("status") == "ok"
                flex_text = "" if flex is None else (tflops_text(flex.get("tflops")).strip()
                                                     if flex.get("status") == "ok" else "n/a")
                cells = [pat, f"{any_row['work_fraction'] * 100:.1f}%", m,
                         fmt(ours.get("time_ms"), ".3f") if ok else "n/a",
                         tflops_text(ours.get("tflops")).strip() if ok else "n/a", flex_text,
                         fmt(ours.get("vs_flex"), ".2f", "x") if ok else "",
                         fmt(ours.get("skip_ratio"), ".2f") if ok else "",
                         fmt(ours.get("x_dense"), ".2f", "x") if ok else ""]
                out.append("| " + " | ".join(cells) + " |")
        sdpa = [r for r in g_rows if r["impl"] == "sdpa" and r.get("status") == "ok"]
        if sdpa:
            out += ["", "torch SDPA on the same card: " + "; ".join(
                f"{r['pattern']} {r['mode']} {tflops_text(r['tflops']).strip()} TFLOP/s "
                f"({r['impl_detail']})" for r in sdpa)]
        out.append("")
    out += gqa_markdown(rows) + host_markdown(rows)
    entries = unavailable_summary(rows)
    if entries:
        out += ["Not measured: " + "; ".join(f"{e['impl']}: {e['reason']}" for e in entries), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------- plots
def matplotlib_missing() -> Optional[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install 'baracuda-kernels[plot]'): PNG plots skipped"
    return None


def write_plots(out_dir: Path, rows: list[dict]) -> list[Path]:
    """time_vs_density_<geometry>.png and tflops_<geometry>.png; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {"ours": "C0", "flex": "C1", "sdpa": "C2", "reference": "C3", "ours-expanded": "C4"}
    ok = [r for r in rows if r.get("status") == "ok"]
    for geo in geometry_of(ok):
        g_rows = [r for r in ok if r["geometry"] == geo]
        slug = _slug(g_rows[0])
        modes = list(dict.fromkeys(r["mode"] for r in g_rows))
        impls = list(dict.fromkeys(r["impl"] for r in g_rows))

        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4.2), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            dense = first(g_rows, pattern="dense", mode=mode, impl="ours")
            if dense:
                ax.plot([0, 1], [0, dense["time_ms"]], "k--", lw=1, label="ideal: density x our dense")
            for impl in impls:
                pts = [r for r in g_rows if r["impl"] == impl and r["mode"] == mode]
                if not pts:
                    continue
                ax.scatter([r["work_fraction"] for r in pts], [r["time_ms"] for r in pts],
                           label=impl, s=28, color=colors.get(impl))
                if impl == "ours":
                    for r in pts:
                        ax.annotate(r["pattern"], (r["work_fraction"], r["time_ms"]), fontsize=7,
                                    xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("density (computed pairs / dense pairs)")
            ax.set_ylabel("time (ms)")
            ax.set_title(f"{mode}")
            ax.set_xlim(0, 1.05)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"time vs density, {geo}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"time_vs_density_{slug}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        fig, axes = plt.subplots(len(modes), 1, figsize=(10, 3.2 * len(modes)), squeeze=False)
        patterns = list(dict.fromkeys(r["pattern"] for r in g_rows))
        width = 0.8 / max(1, len(impls))
        for ax, mode in zip(axes[:, 0], modes):
            for j, impl in enumerate(impls):
                xs, ys = [], []
                for i, pat in enumerate(patterns):
                    r = first(g_rows, pattern=pat, mode=mode, impl=impl)
                    if r:
                        xs.append(i + (j - (len(impls) - 1) / 2) * width)
                        ys.append(r["tflops"])
                if xs:
                    ax.bar(xs, ys, width=width, label=impl, color=colors.get(impl))
            ax.set_xticks(range(len(patterns)))
            ax.set_xticklabels(patterns, fontsize=8)
            ax.set_ylabel(f"{mode} TFLOP/s")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"effective TFLOP/s per pattern, {geo}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"tflops_{slug}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _slug(row: dict) -> str:
    kv = row.get("kv_heads")
    heads = f"H{row['heads']}" + (f"kv{kv}" if kv is not None and kv != row["heads"] else "")
    return f"B{row['batch']}_{heads}_N{row['seq_len']}_D{row['head_dim']}_{row['dtype']}_bs{row['block_size']}"
