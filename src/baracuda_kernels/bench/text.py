"""Number formatting shared by the bench's tables (report.py, summaries.py)."""

from __future__ import annotations

import math


def fmt(value, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return format(value, spec) + suffix


def tflops_text(value) -> str:
    if value is None or not math.isfinite(value):
        return ""
    return f"{value:9.1f}" if value >= 10 else f"{value:9.3f}"


def markdown_block(title: str, legend: str, headers: list, rows: list) -> list[str]:
    """A titled markdown table with its legend, as summary.md lines ([] without rows);
    ``rows`` are lists of cell texts."""
    if not rows:
        return []
    return ([f"**{title}**", "", legend, "", "| " + " | ".join(headers) + " |",
             "|---" * len(headers) + "|"]
            + ["| " + " | ".join(cells) + " |" for cells in rows] + [""])


def geometry_blocks(title: str, entries: list[dict], head: str, lines_of, legend: str) -> str:
    """A terminal summary: ``title``, then per geometry (first-seen order) a header and the
    lines ``lines_of(entries of that geometry)`` gives, then ``legend`` ('' without entries)."""
    if not entries:
        return ""
    lines = [title]
    for geo in dict.fromkeys(e["geometry"] for e in entries):
        lines += [f"== {geo}", head, "-" * len(head)]
        lines += lines_of([e for e in entries if e["geometry"] == geo])
    lines.append(legend)
    return "\n".join(lines)
