"""SdpaBlockSparsePlan: select once (validation, backend, kernel config), run many times."""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from ..core import (ArchSku, AttentionKind, BackendKind, ElementKind, InvalidProblem, KernelSku,
                    MathPrecision, OpCategory, PlanPreference, PrecisionGuarantee)
from .backends import choose_backend, resolve_device
from .block_lists import BlockLists
from .descriptor import SdpaBlockSparseArgs, SdpaBlockSparseDescriptor
from .reference import (block_sparse_attention_backward_reference,
                        block_sparse_attention_forward_reference)
from .validation import canonical_pattern, check_outputs, check_qkv, check_tensor

_MATH = {ElementKind.F16: MathPrecision.F16, ElementKind.BF16: MathPrecision.BF16,
         ElementKind.F32: MathPrecision.F32, ElementKind.F64: MathPrecision.F64}


class SdpaBlockSparsePlan:
    """A selected block-sparse attention kernel for one descriptor on one device.

    >>> desc = SdpaBlockSparseDescriptor(2, 8, 1024, 1024, 64, 64, block_size=64, element="f32")
    >>> plan = SdpaBlockSparsePlan.select(desc, device="cpu")
    >>> q, k, v = (torch.randn(2, 8, 1024, 64) for _ in range(3))
    >>> pattern = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    >>> y, lse = plan.run(SdpaBlockSparseArgs(q, k, v, pattern))

    ``run`` accepts preallocated ``y``/``lse`` in the args and writes only those; it checks
    that the tensors match the plan first, so nothing is written when a check fails.
    ``run_backward`` computes (dq, dk, dv) for an upstream gradient dy.
    """

    def __init__(self, desc: SdpaBlockSparseDescriptor, device: torch.device,
                 backend: BackendKind, allow_tf32: bool):
        self._desc = desc
        self._device = device
        self._backend = backend
        self._allow_tf32 = allow_tf32
        self._config = None  # triton forward config
        self._lists_cache: list[tuple] = []  # [(weakref to pattern tensor, version, lists)]

    # ---------------------------------------------------------------- selection
    @classmethod
    def select(cls, desc: SdpaBlockSparseDescriptor, preference: PlanPreference = PlanPreference.DEFAULT,
               device=None, backend=None, *, allow_tf32: bool = False) -> "SdpaBlockSparsePlan":
        """Validate ``desc`` and choose backend and kernel configuration.

        Args:
            desc: the problem.
            preference: DEFAULT uses the per-(head_dim, dtype, block_size, arch) table;
                FASTEST autotunes the triton kernel once here (on random data) and keeps it.
            device: where the tensors will live (default: the current CUDA device, else CPU).
            backend: None (automatic: triton on CUDA when it can run the problem, else
                reference), "triton" or "reference" (or a BackendKind) to force one.
            allow_tf32: let float32 problems use TF32 matrix math on the triton backend
                (about 1e-3 relative error instead of ~1e-6). Off by default.
        Raises:
            InvalidProblem for a malformed descriptor; Unsupported when a forced backend
            cannot run the problem.
        """
        if not isinstance(desc, SdpaBlockSparseDescriptor):
            raise InvalidProblem(f"desc is a {type(desc).__name__}; expected an SdpaBlockSparseDescriptor.")
        if not isinstance(preference, PlanPreference):
            raise InvalidProblem(f"preference is {preference!r}; expected a PlanPreference.")
        device = resolve_device(device)
        chosen = choose_backend(desc, device, BackendKind.coerce(backend))
        plan = cls(desc, device, chosen, bool(allow_tf32))
        if chosen is BackendKind.TRITON:
            plan._config = plan._select_triton_config(preference)
        return plan

    def _select_triton_config(self, preference: PlanPreference):
        from . import triton_configs
        desc = self._desc
        dtype = desc.element.torch_dtype
        if preference is PlanPreference.FASTEST and not desc.is_empty:
            from .triton_fwd import autotune_forward_config
            gen = torch.Generator(device=self._device).manual_seed(0)
            q, k, v = (torch.randn(shape, dtype=dtype, device=self._device, generator=gen)
                       for shape in (desc.query_shape(), desc.key_shape(), desc.value_shape()))
            pattern = torch.ones(1, 1, desc.num_blocks_q, desc.num_blocks_k, dtype=torch.bool,
                                 device=self._device)
            lists = BlockLists.build(pattern, desc.query_len, desc.key_len, desc.block_size, desc.is_causal)
            return autotune_forward_config(q, k, v, lists, block_size=desc.block_size,
                                           scale=desc.softmax_scale, is_causal=desc.is_causal,
                                           allow_tf32=self._allow_tf32)
        return triton_configs.default_forward_config(desc.d_k, desc.d_v, dtype, desc.block_size,
                                                     ArchSku.from_device(self._device),
                                                     allow_tf32=self._allow_tf32)

    # ---------------------------------------------------------------- properties
    @property
    def descriptor(self) -> SdpaBlockSparseDescriptor:
        return self._desc

    @property
    def backend(self) -> BackendKind:
        return self._backend

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_blocks_q(self) -> int:
        return self._desc.num_blocks_q

    @property
    def num_blocks_k(self) -> int:
        return self._desc.num_blocks_k

    @property
    def precision_guarantee(self) -> PrecisionGuarantee:
        element = self._desc.element
        math = _MATH[element]
        if element is ElementKind.F32 and self._allow_tf32 and self._backend is BackendKind.TRITON:
            math = MathPrecision.TF32
        return PrecisionGuarantee(math_precision=math, accumulator=element.accumulator,
                                  bit_stable_on_same_hardware=True, deterministic=True)

    @property
    def sku(self) -> KernelSku:
        config = self._config.describe() if self._config is not None else ""
        return KernelSku(OpCategory.ATTENTION, AttentionKind.BLOCK_SPARSE_ATTENTION,
                         self._desc.element, self._desc.element.accumulator,
                         ArchSku.from_device(self._device),
                         self._backend, self.precision_guarantee, config)

    def workspace_size(self) -> int:
        """Bytes of caller-provided workspace needed by run(): always 0 (lists are cached)."""
        return 0

    def __repr__(self) -> str:
        d = self._desc
        return (f"SdpaBlockSparsePlan(backend={self._backend.value}, device={self._device}, "
                f"B={d.batch_size}, H={d.num_heads}, Nq={d.query_len}, Nk={d.key_len}, "
                f"d_k={d.d_k}, d_v={d.d_v}, block_size={d.block_size}, causal={d.is_causal}, "
                f"element={d.element.value})")

    # ---------------------------------------------------------------- checks
    def can_implement(self, args: SdpaBlockSparseArgs) -> bool:
        """Check concrete tensors against the plan; raises InvalidProblem, else returns True."""
        self._checked_pattern(args)
        check_outputs(self._desc, self._device, args.y, args.lse)
        return True

    def _checked_pattern(self, args: SdpaBlockSparseArgs) -> torch.Tensor:
        if not isinstance(args, SdpaBlockSparseArgs):
            raise InvalidProblem(f"args is a {type(args).__name__}; expected SdpaBlockSparseArgs.")
        device = check_qkv(self._desc, args.q, args.k, args.v)
        if device != self._device:
            raise InvalidProblem(
                f"q is on {device}; this plan was selected for {self._device}. "
                f"Select a plan with device={device}.")
        return canonical_pattern(self._desc, args.block_pattern, self._device)

    def block_lists(self, block_pattern) -> BlockLists:
        """Compact active-block lists of a pattern; cached per pattern tensor and version,
        so a pattern reused across calls (the common case) is compacted once."""
        source = block_pattern.mask if hasattr(block_pattern, "mask") else block_pattern
        version = getattr(source, "_version", None)
        for ref, seen_version, lists in self._lists_cache:
            if ref() is source and seen_version == version:
                return lists
        pattern = canonical_pattern(self._desc, block_pattern, self._device)
        d = self._desc
        lists = BlockLists.build(pattern, d.query_len, d.key_len, d.block_size, d.is_causal)
        try:
            entry = (weakref.ref(source), version, lists)
            self._lists_cache = [entry] + self._lists_cache[:3]
        except TypeError:  # not weak-referenceable: skip caching
            pass
        return lists

    # ---------------------------------------------------------------- running
    def run(self, args: SdpaBlockSparseArgs, workspace: Optional[torch.Tensor] = None):
        """Compute (y, lse); writes into args.y / args.lse when given, else allocates them."""
        self.can_implement(args)
        args.y, args.lse = self._forward(args.q, args.k, args.v,
                                         self.block_lists(args.block_pattern), args.y, args.lse)
        return args.y, args.lse

    def _forward(self, q, k, v, lists: BlockLists, y=None, lse=None):
        """Launch the forward on checked tensors; allocates y / lse when None. -> (y, lse)"""
        d = self._desc
        if y is None:
            y = torch.empty(d.output_shape(), dtype=d.element.torch_dtype, device=q.device)
        if lse is None:
            lse = torch.empty(d.lse_shape(), dtype=d.lse_dtype, device=q.device)
        if d.is_empty:
            y.zero_()
            lse.fill_(float("-inf"))
            return y, lse
        kwargs = dict(block_size=d.block_size, scale=d.softmax_scale, is_causal=d.is_causal, y=y, lse=lse)
        if self._backend is BackendKind.TRITON:
            from .triton_fwd import block_sparse_attention_forward_triton
            block_sparse_attention_forward_triton(q, k, v, lists, config=self._config,
                                                  allow_tf32=self._allow_tf32, **kwargs)
        else:
            block_sparse_attention_forward_reference(q, k, v, lists, **kwargs)
        return y, lse

    def run_backward(self, args: SdpaBlockSparseArgs, dy: torch.Tensor, dq=None, dk=None, dv=None):
        """Gradients (dq, dk, dv) of the forward in ``args`` (whose y and lse must hold the
        forward's outputs) for the upstream gradient dy [B,H,Nq,Dv]. Preallocated dq/dk/dv
        (shaped like q/k/v) are written when given."""
        self.can_implement(args)
        d = self._desc
        if args.y is None or args.lse is None:
            raise InvalidProblem("args.y and args.lse are None; expected the forward's outputs. "
                                 "Call plan.run(args) first, then plan.run_backward(args, dy).")
        check_tensor("dy", dy, d.output_shape(), d.element.torch_dtype, self._device)
        for name, ref, given in (("dq", args.q, dq), ("dk", args.k, dk), ("dv", args.v, dv)):
            if given is not None:
                check_tensor(name, given, tuple(ref.shape), ref.dtype, self._device)
        return self._backward(args.q, args.k, args.v, args.y, args.lse, dy,
                              self.block_lists(args.block_pattern), dq, dk, dv)

    def _backward(self, q, k, v, y, lse, dy, lists: BlockLists, dq=None, dk=None, dv=None):
        """Launch the backward on checked tensors; allocates dq / dk / dv (shaped like q / k /
        v) when None. -> (dq, dk, dv)"""
        dq, dk, dv = (torch.empty_like(ref, memory_format=torch.contiguous_format)
                      if given is None else given for ref, given in ((q, dq), (k, dk), (v, dv)))
        d = self._desc
        if d.is_empty:
            for g in (dq, dk, dv):
                g.zero_()
            return dq, dk, dv
        kwargs = dict(block_size=d.block_size, scale=d.softmax_scale, is_causal=d.is_causal,
                      dq=dq, dk=dk, dv=dv)
        if self._backend is BackendKind.TRITON:
            from .triton_bwd import block_sparse_attention_backward_triton
            block_sparse_attention_backward_triton(q, k, v, y, lse, dy, lists,
                                                   allow_tf32=self._allow_tf32, **kwargs)
        else:
            block_sparse_attention_backward_reference(q, k, v, y, lse, dy, lists, **kwargs)
        return dq, dk, dv
