"""Exceptions raised by baracuda_kernels.

Every user-facing check raises one of these, never ``assert``. Messages say what
was expected, what was received, and how to fix it.
"""


class Error(Exception):
    """Base class of every exception raised on purpose by baracuda_kernels."""


class InvalidProblem(Error, ValueError):
    """The problem or its tensors are malformed (shape, dtype, device, value)."""


class Unsupported(Error, NotImplementedError):
    """The problem is well-formed but the selected backend cannot run it."""
