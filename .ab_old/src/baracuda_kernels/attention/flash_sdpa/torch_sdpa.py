"""The library backends of dense attention: PyTorch's own SDPA forced to cuDNN or flash.

``library_unavailable_reason`` is their verdict (None: can run, else why not) and
``torch_sdpa`` their launcher. See plan.py's docstring for where they sit in the choice.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...core import BackendKind, ElementKind, device_guard
from .descriptor import FlashSdpaDescriptor

LIBRARY_MAX_HEAD_DIM = 256   # flash's limit; cuDNN's (128 or 256) is left to torch's check
# BackendKind -> (short name, torch SDPBackend, name of torch's capability check)
LIBRARY = {
    BackendKind.TORCH_CUDNN: ("cudnn", SDPBackend.CUDNN_ATTENTION, "can_use_cudnn_attention"),
    BackendKind.TORCH_FLASH: ("flash", SDPBackend.FLASH_ATTENTION, "can_use_flash_attention"),
}


def determinism_requested(deterministic: Optional[bool]) -> bool:
    """True when the caller (``deterministic=True``) or torch
    (``torch.use_deterministic_algorithms(True)``, warn-only included) asks for determinism."""
    return deterministic is True or torch.are_deterministic_algorithms_enabled()


def library_unavailable_reason(kind: BackendKind, desc: FlashSdpaDescriptor,
                               device: torch.device, options: dict) -> Optional[str]:
    """None when torch SDPA forced to ``kind`` runs ``desc`` on ``device`` as we define it,
    else a sentence saying why not (plan.py's module docstring lists the rules)."""
    name, _, _ = LIBRARY[kind]
    label = f"torch SDPA [{name}]"
    if device.type != "cuda":
        return f"not CUDA: {label} runs on CUDA devices only, got device {device}"
    if desc.element not in (ElementKind.F16, ElementKind.BF16):
        return f"dtype is {desc.element.torch_dtype}; {label} runs float16 and bfloat16 only"
    if determinism_requested(options.get("deterministic")):
        return (f"determinism was asked for (deterministic=True or torch.use_deterministic_"
                f"algorithms(True)) and {label}'s backward is not promised deterministic")
    if options.get("need_lse"):
        return "the caller needs lse, and torch SDPA's public API does not return it"
    if desc.is_empty:
        return "the problem is empty (a zero batch, head or sequence extent)"
    if desc.d_k != desc.d_v or desc.d_k > LIBRARY_MAX_HEAD_DIM:
        return (f"head dims d_k={desc.d_k}, d_v={desc.d_v}; {label} is used for equal head "
                f"dims up to {LIBRARY_MAX_HEAD_DIM}")
    if desc.is_causal and desc.query_len != desc.key_len:
        return (f"is_causal with query_len={desc.query_len} != key_len={desc.key_len}: flash "
                f"refuses it and the top-left diagonal is not promised for cuDNN")
    return _torch_refusal(kind, desc, device)


def _torch_refusal(kind: BackendKind, desc: FlashSdpaDescriptor, device: torch.device):
    """What torch's own capability check says about the real shape (None: it can run it).

    The tensors are zero-memory views (one row expanded) of the real shape and dtype that
    require grad, so the training constraints count too; the check runs with only this
    backend enabled, so the answer is about capability, not the caller's global toggles."""
    name, sdp_backend, check_name = LIBRARY[kind]
    check = getattr(torch.backends.cuda, check_name, None)
    params_type = getattr(torch.backends.cuda, "SDPAParams", None)
    if check is None or params_type is None:
        return f"torch {torch.__version__} cannot tell (no torch.backends.cuda.{check_name})"
    d = desc
    dtype = d.element.torch_dtype

    def zero_memory(heads: int, n: int, dim: int) -> torch.Tensor:
        row = torch.empty(1, 1, 1, dim, dtype=dtype, device=device, requires_grad=True)
        return row.expand(d.batch_size, heads, n, dim)
    try:
        with device_guard(device), torch.enable_grad(), sdpa_kernel([sdp_backend]), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q = zero_memory(d.num_heads, d.query_len, d.d_k)
            k = zero_memory(d.num_kv_heads, d.key_len, d.d_k)
            v = zero_memory(d.num_kv_heads, d.key_len, d.d_v)
            try:  # torch >= 2.5: (q, k, v, attn_mask, dropout, is_causal, enable_gqa)
                params = params_type(q, k, v, None, 0.0, bool(d.is_causal), d.is_gqa)
            except TypeError:
                if d.is_gqa:
                    raise
                params = params_type(q, k, v, None, 0.0, bool(d.is_causal))
            ok = bool(check(params, True))  # debug=True: torch warns why it refuses
    except Exception as exc:  # a signature or behaviour this torch version does not share
        return (f"torch cannot tell whether torch SDPA [{name}] runs this problem "
                f"(torch.backends.cuda.{check_name} raised {type(exc).__name__}: {exc})")
    if ok:
        return None
    why = "; ".join(str(w.message).strip() for w in caught) or "no reason given"
    return f"torch's own check (torch.backends.cuda.{check_name}) refuses this problem: {why}"


def torch_sdpa(kind: BackendKind, desc: FlashSdpaDescriptor, q, k, v) -> torch.Tensor:
    """y of torch SDPA forced to the library backend ``kind`` (autograd-aware as torch is)."""
    extra = {"enable_gqa": True} if desc.is_gqa else {}
    with sdpa_kernel([LIBRARY[kind][1]]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=bool(desc.is_causal),
                                              scale=desc.softmax_scale, **extra)
