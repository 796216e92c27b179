"""Additive-mask scaled-dot-product attention: softmax(scale * q @ k^T + bias) @ v behind the
plan surface (descriptor.py, plan.py) and a functional door (functional.py), run by the
block-sparse kernels with their bias modifier."""

from .descriptor import SdpaMaskedArgs, SdpaMaskedDescriptor
from .functional import masked_sdpa
from .plan import SdpaMaskedPlan

__all__ = ["SdpaMaskedArgs", "SdpaMaskedDescriptor", "SdpaMaskedPlan", "masked_sdpa"]
