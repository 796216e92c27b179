"""Op-agnostic core, imported by every op family; imports nothing else of ours.

types (ElementKind, KernelSku, PrecisionGuarantee, ...), errors, generic tensor checks,
device resolution, the plan protocol with its cache, and the backend registry.
"""

from .checks import check_no_overlap, check_tensor
from .devices import device_guard, resolve_device
from .errors import Error, InvalidProblem, Unsupported
from .plan import Plan, PlanCache
from .registry import BackendChoice, BackendRegistry
from .types import (
    ArchSku,
    BackendKind,
    ElementKind,
    KernelSku,
    MathPrecision,
    OpCategory,
    PlanPreference,
    PrecisionGuarantee,
)

__all__ = [
    "ArchSku", "BackendChoice", "BackendKind", "BackendRegistry", "ElementKind", "Error",
    "InvalidProblem", "KernelSku", "MathPrecision", "OpCategory", "Plan", "PlanCache",
    "PlanPreference", "PrecisionGuarantee", "Unsupported", "check_no_overlap", "check_tensor",
    "device_guard", "resolve_device",
]
