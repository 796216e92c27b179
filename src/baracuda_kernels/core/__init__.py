"""Core types and errors, imported by every op family; imports nothing else of ours."""

from .errors import Error, InvalidProblem, Unsupported
from .types import (
    ArchSku,
    AttentionKind,
    BackendKind,
    ElementKind,
    KernelSku,
    MathPrecision,
    OpCategory,
    PlanPreference,
    PrecisionGuarantee,
)

__all__ = [
    "ArchSku", "AttentionKind", "BackendKind", "ElementKind", "Error", "InvalidProblem",
    "KernelSku", "MathPrecision", "OpCategory", "PlanPreference", "PrecisionGuarantee",
    "Unsupported",
]
