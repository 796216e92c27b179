"""SdpaMaskedPlan: attention with an additive score bias (a float mask), the additive-mask
sibling of the block-sparse plan: select once, run many times.

It runs on the block-sparse kernels with their bias modifier (common.score_mods): the plan
holds an ``SdpaBlockSparsePlan`` for the same problem with ``bias=True`` and, for calls
without a block pattern, an all-active pattern prepared once. A pattern given with a call
restricts the work to its active blocks (the bias is read only there). Backends: triton on
CUDA, else the reference (the fused cpu backend has no bias).
"""

from __future__ import annotations

from typing import Optional

import torch

from ...core import (ArchSku, InvalidProblem, KernelSku, OpCategory, Plan, PlanPreference,
                     PrecisionGuarantee)
from ..block_sparse.descriptor import SdpaBlockSparseArgs
from ..block_sparse.plan import SdpaBlockSparsePlan
from ..block_sparse.prepared import PreparedPattern, prepare_pattern
from ..common.kinds import AttentionKind
from .descriptor import SdpaMaskedArgs, SdpaMaskedDescriptor


class SdpaMaskedPlan(Plan):
    """A selected additive-mask attention kernel for one descriptor on one device.

    >>> desc = SdpaMaskedDescriptor(2, 8, 1024, 1024, 64, 64, element="f32",
    ...                             bias_shape=(1, 8, 1024, 1024))
    >>> plan = SdpaMaskedPlan.select(desc, device="cpu")
    >>> y, lse = plan.run(SdpaMaskedArgs(q, k, v, bias))
    >>> dq, dk, dv, dbias = plan.run_backward(SdpaMaskedArgs(q, k, v, bias, y=y, lse=lse), dy)

    ``run`` writes only the given ``y`` / ``lse`` (or allocates them), after every check.
    """

    def __init__(self, desc: SdpaMaskedDescriptor, inner: SdpaBlockSparsePlan,
                 everything: PreparedPattern):
        super().__init__(desc, inner.device, inner.backend, inner.declined)
        self._inner = inner
        self._everything = everything

    @classmethod
    def select(cls, desc: SdpaMaskedDescriptor, preference: PlanPreference = PlanPreference.DEFAULT,
               device=None, backend=None, *, allow_tf32: bool = False) -> "SdpaMaskedPlan":
        """Validate ``desc`` and choose backend and kernel configuration.

        Args:
            preference: DEFAULT, or FASTEST (autotunes the triton kernel once here).
            device: where the tensors will live (default: the current CUDA device, else CPU).
            backend: None (automatic: triton on CUDA, else reference), "triton" or
                "reference" (or a BackendKind).
            allow_tf32: float32 on the triton backend may use TF32 matrix math.
        Raises:
            InvalidProblem for a malformed descriptor; Unsupported when a forced backend
            cannot run the problem (the "cpu" backend has no bias: it always declines).
        """
        if not isinstance(desc, SdpaMaskedDescriptor):
            raise InvalidProblem(f"desc is a {type(desc).__name__}; expected an SdpaMaskedDescriptor.")
        bs_desc = desc.as_block_sparse()
        inner = SdpaBlockSparsePlan.select(bs_desc, preference, device=device, backend=backend,
                                           allow_tf32=allow_tf32)
        everything = torch.ones(1, 1, bs_desc.num_blocks_q, bs_desc.num_blocks_k,
                                dtype=torch.bool, device=inner.device)
        return cls(desc, inner, prepare_pattern(
            everything, query_len=desc.query_len, key_len=desc.key_len,
            block_size=desc.block_size, is_causal=desc.is_causal, device=inner.device))

    # ---------------------------------------------------------------- properties
    @property
    def block_sparse_plan(self) -> SdpaBlockSparsePlan:
        """The block-sparse plan (with bias) this plan runs on."""
        return self._inner

    @property
    def precision_guarantee(self) -> PrecisionGuarantee:
        return self._inner.precision_guarantee

    @property
    def sku(self) -> KernelSku:
        inner = self._inner.sku
        return KernelSku(OpCategory.ATTENTION, AttentionKind.MASKED_SDPA, self._desc.element,
                         inner.aux_element, ArchSku.from_device(self._device), self._backend,
                         self.precision_guarantee,
                         f"block_sparse + bias, block={self._desc.block_size}"
                         + (f"; {inner.config}" if inner.config else ""))

    def __repr__(self) -> str:
        d = self._desc
        return (f"SdpaMaskedPlan(backend={self._backend.value}, device={self._device}, "
                f"{d.problem_text()}, bias_shape={d.bias_shape})")

    # ---------------------------------------------------------------- checks
    def can_implement(self, args: SdpaMaskedArgs) -> bool:
        """Check concrete tensors against the plan; raises InvalidProblem, else True."""
        return self._inner.can_implement(self._delegate(args))

    def _delegate(self, args: SdpaMaskedArgs) -> SdpaBlockSparseArgs:
        if not isinstance(args, SdpaMaskedArgs):
            raise InvalidProblem(f"args is a {type(args).__name__}; expected SdpaMaskedArgs.")
        want = self._desc.bias_shape
        if want is not None and isinstance(args.bias, torch.Tensor):
            got = (1,) * (4 - args.bias.dim()) + tuple(args.bias.shape)
            if got != want:
                raise InvalidProblem(
                    f"bias has shape {tuple(args.bias.shape)}; the plan's descriptor has "
                    f"bias_shape={want}. Pass a bias of that shape, or select the plan with "
                    f"bias_shape=None (any broadcastable shape).")
        if args.bias is None:
            raise InvalidProblem("args.bias is None; expected a float tensor broadcastable to "
                                 "[B, H, Nq, Nk] (use FlashSdpaPlan for attention without one).")
        pattern = self._everything if args.block_pattern is None else args.block_pattern
        return SdpaBlockSparseArgs(args.q, args.k, args.v, pattern, args.y, args.lse,
                                   bias=args.bias)

    # ---------------------------------------------------------------- running
    def run(self, args: SdpaMaskedArgs, workspace: Optional[torch.Tensor] = None):
        """(y, lse); writes into args.y / args.lse when given, else allocates them."""
        inner = self._delegate(args)
        args.y, args.lse = self._inner.run(inner)
        return args.y, args.lse

    def run_backward(self, args: SdpaMaskedArgs, dy: Optional[torch.Tensor], dq=None, dk=None,
                     dv=None, *, dlse: Optional[torch.Tensor] = None):
        """(dq, dk, dv, dbias) of the forward in ``args`` (its y and lse must hold the
        forward's outputs) for upstream dy [B,H,Nq,Dv] and optional dlse [B,H,Nq]; dbias
        is shaped like the bias, in its dtype (dS summed over its broadcast dims)."""
        return self._inner.run_backward(self._delegate(args), dy, dq, dk, dv, dlse=dlse)
