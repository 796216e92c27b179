"""FlashSdpaPlan: dense (optionally causal, top-left) scaled-dot-product attention with GQA,
behind the plan surface every op of the library has (select once, run many times).

Backend choice. ``select`` asks the backends of ``BACKENDS`` in this order and takes the first
that accepts; each one that declines leaves its reason in ``plan.declined``:

1. ``torch_cudnn``: ``torch.nn.functional.scaled_dot_product_attention`` forced to cuDNN
   attention (``sdpa_kernel([SDPBackend.CUDNN_ATTENTION])``, ``enable_gqa=True`` when Hkv < H).
2. ``torch_flash``: the same forced to FlashAttention-2 (``SDPBackend.FLASH_ATTENTION``).
   Both library backends decline, with a sentence saying why, when: the device is not CUDA;
   the dtype is not float16/bfloat16; determinism was asked for (``deterministic=True`` or
   ``torch.use_deterministic_algorithms(True)``: their backward is not promised
   deterministic, so they are never chosen silently then); the caller needs lse
   (``need_lse=True``: torch SDPA's public API does not return it); the problem is empty;
   d_k != d_v or a head dim above 256; causal with Nq != Nk (flash refuses it and our
   top-left rule is not promised for cuDNN there); or torch's own check
   (``torch.backends.cuda.can_use_*_attention`` on ``SDPAParams`` built from zero-memory
   tensors of the real shape) refuses the problem, or cannot be asked.
3. ``triton``: our block-sparse kernels with an all-active pattern (block 128), prepared once
   here; ``run``/``run_backward`` delegate to an ``SdpaBlockSparsePlan``. Deterministic.
4. ``reference``: the same delegation to the pure-PyTorch reference; runs anywhere.

A plan on a library backend computes no lse (``run`` returns ``(y, None)``; a preallocated
``lse`` is refused), and its ``run_backward`` recomputes the forward under autograd (the
library keeps its softmax statistics inside its autograd graph). The functional
``flash_sdpa`` keeps that graph instead, so training pays no recomputation.

Routing rule for block-sparse calls (``routing.dense_route``): a block-sparse problem whose
prepared pattern has every reachable block active (every block, or with ``is_causal`` every
block on or below the diagonal) IS dense attention; when determinism was not asked for, lse
is not needed, and a library backend accepts the dense problem, it runs on that library
backend; otherwise it stays on the block-sparse kernels.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...core import (ArchSku, BackendKind, BackendRegistry, ElementKind, InvalidProblem,
                     KernelSku, OpCategory, Plan, PlanPreference,
                     PrecisionGuarantee, check_no_overlap, check_tensor, resolve_device)
from ..block_sparse.descriptor import SdpaBlockSparseArgs
from ..block_sparse.plan import SdpaBlockSparsePlan
from ..block_sparse.prepared import PreparedPattern, prepare_pattern
from ..common.backends import triton_unavailable_reason
from ..common.kinds import AttentionKind
from ..common.problem import check_outputs, check_qkv
from .descriptor import FlashSdpaArgs, FlashSdpaDescriptor
from .torch_sdpa import LIBRARY, library_unavailable_reason, torch_sdpa

ALL_ACTIVE_BLOCK_SIZE = 128  # block of the all-active pattern the triton/reference path runs


# Who can run dense attention, in the order automatic selection asks them.
BACKENDS = BackendRegistry("dense attention")
BACKENDS.register(BackendKind.TORCH_CUDNN, lambda desc, device, options, explicit:
                  library_unavailable_reason(BackendKind.TORCH_CUDNN, desc, device, options),
                  priority=0)
BACKENDS.register(BackendKind.TORCH_FLASH, lambda desc, device, options, explicit:
                  library_unavailable_reason(BackendKind.TORCH_FLASH, desc, device, options),
                  priority=1)
BACKENDS.register(BackendKind.TRITON, lambda desc, device, options, explicit:
                  triton_unavailable_reason(desc.d_k, desc.d_v, device, explicit), priority=10)
BACKENDS.register(BackendKind.REFERENCE, lambda desc, device, options, explicit: None,
                  priority=20)


class FlashSdpaPlan(Plan):
    """A selected dense attention backend for one descriptor on one device.

    >>> desc = FlashSdpaDescriptor(2, 8, 1024, 1024, 64, 64, is_causal=True, element="f32")
    >>> plan = FlashSdpaPlan.select(desc, device="cpu")          # reference on the CPU
    >>> y, lse = plan.run(FlashSdpaArgs(q, k, v))
    >>> plan.backend, plan.declined[BackendKind.TORCH_CUDNN]     # why not cuDNN here
    """

    def __init__(self, desc: FlashSdpaDescriptor, device: torch.device, backend: BackendKind,
                 declined: Optional[dict] = None):
        super().__init__(desc, device, backend, declined)
        self._inner: Optional[SdpaBlockSparsePlan] = None   # triton / reference delegate
        self._pattern: Optional[PreparedPattern] = None     # its all-active pattern

    @classmethod
    def select(cls, desc: FlashSdpaDescriptor, preference: PlanPreference = PlanPreference.DEFAULT,
               device=None, backend=None, *, deterministic: Optional[bool] = None,
               need_lse: bool = False, allow_tf32: bool = False) -> "FlashSdpaPlan":
        """Validate ``desc`` and choose a backend (the module docstring gives the order).

        Args:
            preference: DEFAULT, or FASTEST (autotunes the triton kernel once here).
            device: where the tensors will live (default: the current CUDA device, else CPU).
            backend: None (automatic) or one of "torch_cudnn", "torch_flash", "triton",
                "reference" (or a BackendKind) to force it.
            deterministic: True: only deterministic backends (triton, reference). None or
                False: follow ``torch.are_deterministic_algorithms_enabled()``.
            need_lse: the caller needs lse: library backends (no lse) decline.
            allow_tf32: float32 on the triton backend may use TF32 matrix math.
        Raises:
            InvalidProblem for a malformed descriptor or option; Unsupported when a forced
            backend declines (with its reason) or no backend can run the problem.
        """
        if not isinstance(desc, FlashSdpaDescriptor):
            raise InvalidProblem(f"desc is a {type(desc).__name__}; expected a FlashSdpaDescriptor.")
        if not isinstance(preference, PlanPreference):
            raise InvalidProblem(f"preference is {preference!r}; expected a PlanPreference.")
        if deterministic not in (None, True, False):
            raise InvalidProblem(f"deterministic is {deterministic!r}; expected None, True or False.")
        device = resolve_device(device)
        options = {"deterministic": deterministic, "need_lse": bool(need_lse)}
        choice = BACKENDS.choose(desc, device, BackendKind.coerce(backend), options)
        plan = cls(desc, device, choice.kind, choice.declined)
        if choice.kind not in LIBRARY:
            bs_desc = desc.as_block_sparse(ALL_ACTIVE_BLOCK_SIZE)
            plan._inner = SdpaBlockSparsePlan.select(bs_desc, preference, device=device,
                                                     backend=choice.kind, allow_tf32=allow_tf32)
            everything = torch.ones(1, 1, bs_desc.num_blocks_q, bs_desc.num_blocks_k,
                                    dtype=torch.bool, device=device)
            plan._pattern = prepare_pattern(everything, query_len=desc.query_len,
                                            key_len=desc.key_len, block_size=bs_desc.block_size,
                                            is_causal=desc.is_causal, device=device)
        return plan

    # ---------------------------------------------------------------- properties
    @property
    def computes_lse(self) -> bool:
        """False on the library backends (torch SDPA's public API returns no lse)."""
        return self._backend not in LIBRARY

    @property
    def block_sparse_plan(self) -> Optional[SdpaBlockSparsePlan]:
        """The block-sparse plan triton/reference delegate to (None on library backends)."""
        return self._inner

    @property
    def prepared_pattern(self) -> Optional[PreparedPattern]:
        """The all-active pattern of the triton/reference path (None on library backends)."""
        return self._pattern

    @property
    def precision_guarantee(self) -> PrecisionGuarantee:
        if self._inner is not None:
            return self._inner.precision_guarantee
        # Not promised deterministic nor bit-stable: torch's SDPA docstring says cuDNN "may
        # select a nondeterministic algorithm", torch refuses cuDNN SDPA under
        # use_deterministic_algorithms (check_cudnn_deterministic in sdp_utils.cpp), and
        # flash-attn documents only its forward pass as always deterministic.
        return PrecisionGuarantee(math_precision=self._desc.element.math_precision,
                                  accumulator=ElementKind.F32,
                                  bit_stable_on_same_hardware=False, deterministic=False)

    @property
    def sku(self) -> KernelSku:
        d = self._desc
        if self._inner is not None:
            inner = self._inner.sku.config
            config = f"block_sparse all-active block={ALL_ACTIVE_BLOCK_SIZE}" + \
                (f"; {inner}" if inner else "")
            aux = d.element.accumulator
        else:
            config = f"torch.nn.functional.scaled_dot_product_attention[{LIBRARY[self._backend][0]}]"
            aux = None
        return KernelSku(OpCategory.ATTENTION, AttentionKind.FLASH_SDPA, d.element, aux,
                         ArchSku.from_device(self._device), self._backend,
                         self.precision_guarantee, config)

    def __repr__(self) -> str:
        d = self._desc
        return (f"FlashSdpaPlan(backend={self._backend.value}, device={self._device}, "
                f"{d.problem_text()})")

    # ---------------------------------------------------------------- checks
    def can_implement(self, args: FlashSdpaArgs) -> bool:
        """Check concrete tensors against the plan; raises InvalidProblem, else returns True."""
        self._check_args(args)
        return True

    def _check_args(self, args: FlashSdpaArgs) -> None:
        if not isinstance(args, FlashSdpaArgs):
            raise InvalidProblem(f"args is a {type(args).__name__}; expected FlashSdpaArgs.")
        d = self._desc
        device = check_qkv(d, args.q, args.k, args.v)
        if device != self._device:
            raise InvalidProblem(f"q is on {device}; this plan was selected for {self._device}. "
                                 f"Select a plan with device={device}.")
        check_outputs(d, device, args.y, None)
        if args.lse is not None and not self.computes_lse:
            raise InvalidProblem(
                f"lse was passed, but this plan runs on {self._backend.value}, which computes "
                f"no lse (torch SDPA's public API does not return it); expected lse=None. "
                f"Select the plan with need_lse=True to get lse (triton or reference).")
        check_outputs(d, device, None, args.lse)
        check_no_overlap({"y": args.y, "lse": args.lse}, {"q": args.q, "k": args.k, "v": args.v})

    # ---------------------------------------------------------------- running
    def run(self, args: FlashSdpaArgs, workspace: Optional[torch.Tensor] = None):
        """(y, lse) — lse None on library backends. Writes into args.y / args.lse when given,
        else allocates them; every check runs before anything is written."""
        self._check_args(args)
        if self._inner is not None:
            args.y, args.lse = self._inner.run(self._delegate_args(args))
            return args.y, args.lse
        with self.device_guard(), torch.no_grad():
            y = torch_sdpa(self._backend, self._desc, args.q, args.k, args.v)
        args.y = y if args.y is None else args.y.copy_(y)
        return args.y, None

    def _delegate_args(self, args: FlashSdpaArgs) -> SdpaBlockSparseArgs:
        return SdpaBlockSparseArgs(args.q, args.k, args.v, self._pattern, args.y, args.lse)

    def run_backward(self, args: FlashSdpaArgs, dy: Optional[torch.Tensor], dq=None, dk=None,
                     dv=None, *, dlse: Optional[torch.Tensor] = None):
        """Gradients (dq, dk, dv) for upstream dy [B,H,Nq,Dv] (and dlse [B,H,Nq] where the
        plan computes lse). triton/reference need the forward's y and lse in ``args``; library
        backends recompute the forward. Preallocated dq/dk/dv are written when given."""
        self._check_args(args)
        if self._inner is not None:
            return self._inner.run_backward(self._delegate_args(args), dy, dq, dk, dv, dlse=dlse)
        d = self._desc
        if dlse is not None:
            raise InvalidProblem(f"dlse was passed, but this plan runs on {self._backend.value}, "
                                 f"which computes no lse; expected dlse=None.")
        if dy is None:
            raise InvalidProblem("dy is None; expected the gradient of y [B,H,Nq,Dv].")
        check_tensor("dy", dy, d.output_shape(), d.element.torch_dtype, self._device)
        given = {"dq": (dq, args.q), "dk": (dk, args.k), "dv": (dv, args.v)}
        for name, (grad, ref) in given.items():
            if grad is not None:
                check_tensor(name, grad, tuple(ref.shape), ref.dtype, self._device)
        check_no_overlap({name: g for name, (g, _) in given.items()},
                         {"q": args.q, "k": args.k, "v": args.v, "y": args.y, "dy": dy})
        with self.device_guard(), torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (args.q, args.k, args.v)]
            y = torch_sdpa(self._backend, d, *leaves)
            grads = torch.autograd.grad(y, leaves, dy)
        return tuple(g if out is None else out.copy_(g)
                     for g, (out, _) in zip(grads, given.values()))
