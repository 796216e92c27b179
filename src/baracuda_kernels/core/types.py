"""Core vocabulary shared by every op family: element kinds, SKUs, guarantees.

Everything here is a frozen dataclass or an enum, so plans and descriptors that hold
them are hashable and safe to cache.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import InvalidProblem, Unsupported


class ElementKind(enum.Enum):
    """Element type of a problem's main tensors."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    F64 = "f64"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _KIND_TO_DTYPE[self]

    @classmethod
    def from_torch(cls, dtype: torch.dtype) -> "ElementKind":
        try:
            return _DTYPE_TO_KIND[dtype]
        except KeyError:
            supported = ", ".join(str(d) for d in _DTYPE_TO_KIND)
            raise Unsupported(
                f"dtype {dtype} is not supported; expected one of {supported}. "
                f"Cast the tensors with .to(torch.bfloat16) (or another supported dtype)."
            ) from None

    @classmethod
    def coerce(cls, value: "ElementKind | torch.dtype | str") -> "ElementKind":
        """Accept an ElementKind, a torch.dtype, or a name such as 'bf16'."""
        if isinstance(value, ElementKind):
            return value
        if isinstance(value, torch.dtype):
            return cls.from_torch(value)
        if isinstance(value, str):
            key = value.lower().removeprefix("torch.")
            aliases = {"float32": "f32", "float": "f32", "float16": "f16", "half": "f16",
                       "bfloat16": "bf16", "float64": "f64", "double": "f64"}
            key = aliases.get(key, key)
            for kind in cls:
                if kind.value == key:
                    return kind
        raise InvalidProblem(
            f"element has value {value!r}; expected an ElementKind, a torch.dtype or one of "
            f"'f32', 'f16', 'bf16', 'f64'."
        )

    @property
    def math_precision(self) -> "MathPrecision":
        """Precision of the products of a kernel that multiplies this element as it is (no
        TF32 or other reduced mode)."""
        return MathPrecision(self.value)

    @property
    def accumulator(self) -> "ElementKind":
        """Accumulation type used by every kernel of the library for this element."""
        return ElementKind.F64 if self is ElementKind.F64 else ElementKind.F32


_KIND_TO_DTYPE = {
    ElementKind.F32: torch.float32,
    ElementKind.F16: torch.float16,
    ElementKind.BF16: torch.bfloat16,
    ElementKind.F64: torch.float64,
}
_DTYPE_TO_KIND = {v: k for k, v in _KIND_TO_DTYPE.items()}


class OpCategory(enum.Enum):
    """The op families of the library; each family names its ops in an enum of its own
    (``attention.AttentionKind``), which ``KernelSku.op`` holds."""

    ATTENTION = "attention"


class BackendKind(enum.Enum):
    """Who runs a plan: our Triton kernels, the pure-PyTorch reference, or one of PyTorch's
    own SDPA backends (library backends, used where they are correct and faster)."""

    TRITON = "triton"
    REFERENCE = "reference"
    CPU = "cpu"            # PyTorch's fused CPU flash kernel on gathered blocks
    TORCH_CUDNN = "torch_cudnn"
    TORCH_FLASH = "torch_flash"

    @classmethod
    def coerce(cls, value: "BackendKind | str | None") -> "BackendKind | None":
        if value is None or isinstance(value, BackendKind):
            return value
        if isinstance(value, str):
            for kind in cls:
                if kind.value == value.lower():
                    return kind
        names = ", ".join(repr(k.value) for k in cls)
        raise InvalidProblem(f"backend is {value!r}; expected None (automatic) or one of {names}.")


class ArchSku(enum.Enum):
    """Where a kernel runs: a CUDA compute capability family, or the CPU."""

    CPU = "cpu"
    SM80 = "sm80"
    SM86 = "sm86"
    SM89 = "sm89"
    SM90 = "sm90"
    SM100 = "sm100"
    SM120 = "sm120"
    CUDA_OTHER = "cuda_other"

    @classmethod
    def from_device(cls, device: torch.device | str | None) -> "ArchSku":
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type != "cuda":
            return cls.CPU
        major, minor = torch.cuda.get_device_capability(device)
        name = f"SM{major}{minor}"
        return cls.__members__.get(name, cls.SM100 if major == 10 else cls.CUDA_OTHER)


class MathPrecision(enum.Enum):
    """Precision of the products inside the kernel's matrix multiplies."""

    F16 = "f16"
    BF16 = "bf16"
    TF32 = "tf32"
    F32 = "f32"
    F64 = "f64"


class PlanPreference(enum.Enum):
    """How hard Plan.select may work. FASTEST may autotune once at select time."""

    DEFAULT = "default"
    FASTEST = "fastest"


@dataclass(frozen=True)
class PrecisionGuarantee:
    math_precision: MathPrecision
    accumulator: ElementKind
    bit_stable_on_same_hardware: bool
    deterministic: bool


@dataclass(frozen=True)
class KernelSku:
    """Names the kernel a plan will launch, for any op family."""

    category: OpCategory
    op: enum.Enum  # the family's op kind, e.g. AttentionKind.BLOCK_SPARSE_ATTENTION
    element: ElementKind
    aux_element: Optional[ElementKind]  # dtype of an auxiliary output (attention: lse)
    arch: ArchSku
    backend: BackendKind
    precision_guarantee: PrecisionGuarantee
    config: str = ""  # kernel configuration, e.g. "BM=128,BN=64,warps=8,stages=3"
