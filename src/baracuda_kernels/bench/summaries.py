"""Derived summary tables of a sweep: ours' host overhead (step vs step-graph) and the GQA
target table (ours vs ours on expanded K/V and Flex, peak memory)."""

from __future__ import annotations

from .runner import geometry_of
from .text import fmt, geometry_blocks, markdown_block, tflops_text


def host_overhead(rows: list[dict], impl: str = "ours") -> list[dict]:
    """Per (geometry, pattern) where ``impl`` has an overhead (see runner.derive): the times
    of its step, step-graph, fwd and unprepared rows, host = step - step-graph (per training
    step), lists = unprepared - fwd (per call), and vs Flex of step and step-graph."""
    out = []
    ok = [r for r in rows if r["impl"] == impl and r.get("status") == "ok"]
    for geo in geometry_of(ok):
        for pat in dict.fromkeys(r["pattern"] for r in ok if r["geometry"] == geo):
            by_mode = {r["mode"]: r for r in ok if r["geometry"] == geo and r["pattern"] == pat}
            step, unprep = by_mode.get("step", {}), by_mode.get("unprepared", {})
            if step.get("overhead_ms") is None and unprep.get("overhead_ms") is None:
                continue
            ms = {m: r["time_ms"] for m, r in by_mode.items()}
            host = step.get("overhead_ms")
            out.append(dict(geometry=geo, pattern=pat, work_fraction=step.get(
                "work_fraction", unprep.get("work_fraction")), step=ms.get("step"),
                graph=ms.get("step-graph"), host=host,
                host_share=host / ms["step"] if host is not None and ms["step"] > 0 else None,
                fwd=ms.get("fwd"), unprepared=ms.get("unprepared"), lists=unprep.get("overhead_ms"),
                step_vs_flex=step.get("vs_flex"),
                graph_vs_flex=by_mode.get("step-graph", {}).get("vs_flex")))
    return out


_HOST_COLUMNS = [("step ms", "step", ".3f"), ("graph ms", "graph", ".3f"), ("host ms", "host", ".3f"),
                 ("host %", "host_share", ".0%"), ("fwd ms", "fwd", ".3f"),
                 ("unprep ms", "unprepared", ".3f"), ("lists ms", "lists", ".3f"),
                 ("step vs flex", "step_vs_flex", ".2f"), ("graph vs flex", "graph_vs_flex", ".2f")]
_HOST_LEGEND = ("ours' host overhead: host = step - step-graph (Python, autograd and launches "
                "per training step; host % of the step). lists = unprepared - fwd: rebuilding "
                "the block lists of a new pattern object per call, plus the functional call's "
                "own cost (fwd is plan.run with preallocated outputs). vs flex = Flex time / "
                "ours in step and step-graph.")


def format_host_overhead(rows: list[dict]) -> str:
    """The host-overhead summary of the terminal report; '' when no case has the modes."""
    widths = [max(10, len(title) + 2) for title, _, _ in _HOST_COLUMNS]
    head = f"{'pattern':<15}{'density':>8}" + "".join(
        f"{title:>{w}}" for (title, _, _), w in zip(_HOST_COLUMNS, widths))

    def lines_of(entries):
        out = []
        for e in entries:
            cells = "".join(f"{fmt(e[key], spec, 'x' if 'flex' in key else ''):>{w}}"
                            for (_, key, spec), w in zip(_HOST_COLUMNS, widths))
            out.append(f"{e['pattern']:<15}{(e['work_fraction'] or 0) * 100:>7.1f}%{cells}".rstrip())
        return out
    return geometry_blocks("Host overhead (ours)", host_overhead(rows), head, lines_of,
                           _HOST_LEGEND)


# The GQA issue's targets: ours' GQA at least the throughput of ours on expanded K/V, and
# at least 1.2x FlexAttention (enable_gqa) on every pattern, in every mode.
GQA_TARGET_VS_EXPANDED = 1.0
GQA_TARGET_VS_FLEX = 1.2


def gqa_summary(rows: list[dict]) -> list[dict]:
    """Per GQA geometry (Hkv < H), pattern and mode where ours ran: TFLOP/s of ours,
    ours-expanded, Flex and SDPA; vs_expanded = ours / ours-expanded TFLOP/s (= the
    expanded time / ours); vs_flex = Flex time / ours; peak MiB of ours and ours-expanded
    (runner's peak_mib); kv_copy_mib = ours-expanded's prep_mib - ours' (the K/V copies it
    holds); misses: the targets not met; unmeasured: the comparisons without a time
    ("expanded", "flex")."""
    out = []
    ok = [r for r in rows if r.get("status") == "ok"]
    gqa = [r for r in ok if r.get("kv_heads") is not None and r["kv_heads"] < r["heads"]]
    for geo in geometry_of(gqa):
        g_rows = [r for r in gqa if r["geometry"] == geo]
        for pat in dict.fromkeys(r["pattern"] for r in g_rows):
            for mode in dict.fromkeys(r["mode"] for r in g_rows if r["pattern"] == pat):
                by = {r["impl"]: r for r in g_rows if r["pattern"] == pat and r["mode"] == mode}
                ours, exp, flex, sdpa = (by.get(i) for i in ("ours", "ours-expanded", "flex", "sdpa"))
                if ours is None:
                    continue
                vs_exp = exp["time_ms"] / ours["time_ms"] if exp and ours["time_ms"] > 0 else None
                vs_flex = flex["time_ms"] / ours["time_ms"] if flex and ours["time_ms"] > 0 else None
                copy = None
                if exp and exp.get("prep_mib") is not None and ours.get("prep_mib") is not None:
                    copy = exp["prep_mib"] - ours["prep_mib"]
                misses = []
                if vs_exp is not None and vs_exp < GQA_TARGET_VS_EXPANDED:
                    misses.append("< expanded")
                if vs_flex is not None and vs_flex < GQA_TARGET_VS_FLEX:
                    misses.append(f"< {GQA_TARGET_VS_FLEX:g}x flex")
                unmeasured = [name for name, x in (("expanded", vs_exp), ("flex", vs_flex))
                              if x is None]
                out.append(dict(
                    geometry=geo, pattern=pat, mode=mode, work_fraction=ours["work_fraction"],
                    ours=ours["tflops"], expanded=exp["tflops"] if exp else None,
                    flex=flex["tflops"] if flex else None, sdpa=sdpa["tflops"] if sdpa else None,
                    vs_expanded=vs_exp, vs_flex=vs_flex, ours_peak_mib=ours.get("peak_mib"),
                    expanded_peak_mib=exp.get("peak_mib") if exp else None, kv_copy_mib=copy,
                    misses=misses, unmeasured=unmeasured))
    return out


_GQA_COLUMNS = [("ours TF/s", "ours", "tflops"), ("exp. TF/s", "expanded", "tflops"),
                ("flex TF/s", "flex", "tflops"), ("sdpa TF/s", "sdpa", "tflops"),
                ("ours/exp.", "vs_expanded", ".2f"), ("vs flex", "vs_flex", ".2f"),
                ("ours peak MiB", "ours_peak_mib", ".1f"), ("exp. peak MiB", "expanded_peak_mib", ".1f"),
                ("exp. K/V copy MiB", "kv_copy_mib", ".1f")]
_GQA_LEGEND = ("GQA (ours on K/V of Hkv heads): TF/s = effective TFLOP/s (query-head FLOPs, the "
               "same for every implementation). ours/exp. = ours TFLOP/s / ours-expanded's (ours "
               "on K/V repeated to H heads once, outside the timing; target >= "
               f"{GQA_TARGET_VS_EXPANDED:g}). vs flex = Flex (enable_gqa) time / ours (target >= "
               f"{GQA_TARGET_VS_FLEX:g}). peak MiB = peak memory allocated during one call above "
               "what was allocated before it; exp. K/V copy MiB = memory ours-expanded keeps "
               "from its preparation beyond ours' (the expanded K/V). Empty memory columns: "
               "not on CUDA.")


def _gqa_cell(e: dict, key: str, spec: str) -> str:
    if spec == "tflops":
        return tflops_text(e[key]).strip()
    return fmt(e[key], spec, "x" if key in ("vs_expanded", "vs_flex") else "")


def _gqa_targets(e: dict) -> str:
    """'met', or the targets missed; '(no flex)' where a comparison was not measured."""
    if len(e["unmeasured"]) == 2:
        return "n/a"
    text = ", ".join(e["misses"]) if e["misses"] else "met"
    return text + "".join(f" (no {x})" for x in e["unmeasured"])


def format_gqa(rows: list[dict]) -> str:
    """The GQA summary of the terminal report; '' when no GQA case ran ours."""
    widths = [max(10, len(title) + 2) for title, _, _ in _GQA_COLUMNS]
    head = f"{'pattern':<15}{'density':>8}  {'mode':<6}" + "".join(
        f"{title:>{w}}" for (title, _, _), w in zip(_GQA_COLUMNS, widths)) + "  targets"

    def lines_of(entries):
        out, shown = [], None
        for e in entries:
            cells = "".join(f"{_gqa_cell(e, key, spec):>{w}}"
                            for (_, key, spec), w in zip(_GQA_COLUMNS, widths))
            lead = (f"{e['pattern']:<15}{e['work_fraction'] * 100:>7.1f}%" if e["pattern"] != shown
                    else " " * 23)
            shown = e["pattern"]
            out.append(f"{lead}  {e['mode']:<6}{cells}  {_gqa_targets(e)}")
        return out
    return geometry_blocks("GQA summary (ours vs ours on expanded K/V, vs FlexAttention)",
                           gqa_summary(rows), head, lines_of, _GQA_LEGEND)


def gqa_markdown(rows: list[dict]) -> list[str]:
    """The GQA summary as markdown lines for summary.md (empty without GQA rows)."""
    cells = [[e["geometry"], e["pattern"], fmt(e["work_fraction"] * 100, ".1f", "%"), e["mode"]]
             + [_gqa_cell(e, key, spec) for _, key, spec in _GQA_COLUMNS] + [_gqa_targets(e)]
             for e in gqa_summary(rows)]
    return markdown_block("GQA summary (ours vs ours on expanded K/V, vs FlexAttention)",
                          _GQA_LEGEND, ["geometry", "pattern", "density", "mode"]
                          + [t for t, _, _ in _GQA_COLUMNS] + ["targets"], cells)


def host_markdown(rows: list[dict]) -> list[str]:
    """ours' host overhead as markdown lines for summary.md (empty without step-graph rows)."""
    cells = [[e["geometry"], e["pattern"], fmt((e["work_fraction"] or 0) * 100, ".1f", "%")]
             + [fmt(e[key], spec, "x" if "flex" in key else "") for _, key, spec in _HOST_COLUMNS]
             for e in host_overhead(rows)]
    return markdown_block("Host overhead (ours)", _HOST_LEGEND,
                          ["geometry", "pattern", "density"] + [t for t, _, _ in _HOST_COLUMNS],
                          cells)
