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
