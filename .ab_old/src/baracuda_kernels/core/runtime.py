"""Facts about the running process that several layers ask about, answered in one place."""

from __future__ import annotations

import os

_TRUE = ("1", "true", "yes", "on")


def triton_interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET``).

    Parsed like Triton itself reads the variable (1/true/yes/on, any case); read on every
    call because tests set it before the first kernel is decorated."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE
