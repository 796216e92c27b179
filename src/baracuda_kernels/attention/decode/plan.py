"""SdpaDecodePlan: attention of new tokens against a KV cache behind the plan surface --
select once (validation, backend, tile config), check and run per step.

The plan runs what ``block_sparse_attention_with_kvcache`` runs (one implementation): the
decode kernel on the triton backend for f16/bf16/f32, the block-sparse path otherwise. It
adds the up-front validation of a descriptor, the per-call check of the tensors against
it, and the SKU of the kernel it will launch. Forward only.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...core import (ArchSku, BackendKind, InvalidProblem, KernelSku, OpCategory,
                     Plan, PlanPreference, PrecisionGuarantee, Unsupported)
from ...core.checks import check_tensor
from ...core.devices import resolve_device
from ..common.backends import triton_unavailable_reason
from ..common.kinds import AttentionKind
from .descriptor import SdpaDecodeArgs, SdpaDecodeDescriptor
from .kvcache import block_sparse_attention_with_kvcache
from .launch import DECODE_DTYPES, default_decode_config


class SdpaDecodePlan(Plan):
    """A selected KV-cache attention kernel for one descriptor on one device.

    >>> desc = SdpaDecodeDescriptor(4, 32, 1, 4096, 128, 128, element="bf16",
    ...                             num_kv_heads=8, new_tokens=1)
    >>> plan = SdpaDecodePlan.select(desc, device="cuda")
    >>> y, lse = plan.run(SdpaDecodeArgs(q, k_cache, v_cache, lens, k_new, v_new))
    >>> lens += 1
    """

    @classmethod
    def select(cls, desc: SdpaDecodeDescriptor, preference: PlanPreference = PlanPreference.DEFAULT,
               device=None, backend=None) -> "SdpaDecodePlan":
        """Validate ``desc`` and choose the backend.

        Args:
            preference: accepted for the common surface (the decode kernel has one config
                per problem shape; FASTEST changes nothing).
            device: where the tensors will live (default: the current CUDA device, else CPU).
            backend: None (automatic: triton where it can run, else reference), "triton",
                "reference" or "cpu" (the last two run the block-sparse path).
        Raises:
            InvalidProblem for a malformed descriptor; Unsupported when a forced triton
            backend cannot run on the device.
        """
        if not isinstance(desc, SdpaDecodeDescriptor):
            raise InvalidProblem(f"desc is a {type(desc).__name__}; expected an "
                                 f"SdpaDecodeDescriptor.")
        device = resolve_device(device)
        forced = BackendKind.coerce(backend)
        declined = {}
        reason = triton_unavailable_reason(desc.d_k, desc.d_v, device,
                                           explicit=forced is BackendKind.TRITON)
        if forced is BackendKind.TRITON and reason:
            raise Unsupported(f"backend 'triton' cannot run this problem: {reason}.")
        if forced is not None:
            chosen = forced
        elif reason is None:
            chosen = BackendKind.TRITON
        else:
            declined[BackendKind.TRITON] = reason
            chosen = BackendKind.REFERENCE
        if chosen not in (BackendKind.TRITON, BackendKind.REFERENCE, BackendKind.CPU):
            raise Unsupported(f"backend {chosen.value!r} has no KV-cache attention; expected "
                              f"'triton', 'reference' or 'cpu'.")
        return cls(desc, device, chosen, declined)

    @property
    def uses_decode_kernel(self) -> bool:
        """True when ``run`` launches the decode kernel (triton, f16/bf16/f32)."""
        return self._backend is BackendKind.TRITON and \
            self._desc.element.torch_dtype in DECODE_DTYPES

    @property
    def precision_guarantee(self) -> PrecisionGuarantee:
        element = self._desc.element
        return PrecisionGuarantee(math_precision=element.math_precision,
                                  accumulator=element.accumulator,
                                  bit_stable_on_same_hardware=True, deterministic=True)

    @property
    def sku(self) -> KernelSku:
        d = self._desc
        if self.uses_decode_kernel:
            c = default_decode_config(d.group_size * d.query_len, d.d_k, d.d_v,
                                      d.element.torch_dtype, d.block_size, d.page_size)
            config = (f"decode BM={c.block_m},BN={c.block_n},warps={c.num_warps},"
                      f"stages={c.num_stages},splits=auto"
                      + (",paged" if d.paged else "")
                      + (f",selected blocks of {d.block_size}" if d.block_size else ""))
        else:
            config = "block-sparse path (token rules per row)"
        return KernelSku(OpCategory.ATTENTION, AttentionKind.DECODE, d.element,
                         d.element.accumulator, ArchSku.from_device(self._device),
                         self._backend, self.precision_guarantee, config)

    def __repr__(self) -> str:
        d = self._desc
        return (f"SdpaDecodePlan(backend={self._backend.value}, device={self._device}, "
                f"{d.problem_text()}, page_size={d.page_size}, new_tokens={d.new_tokens})")

    def can_implement(self, args: SdpaDecodeArgs) -> bool:
        """Check concrete tensors against the descriptor: InvalidProblem, else True."""
        if not isinstance(args, SdpaDecodeArgs):
            raise InvalidProblem(f"args is a {type(args).__name__}; expected SdpaDecodeArgs.")
        d, dev = self._desc, self._device
        dtype = d.element.torch_dtype
        B, H, Hkv = d.batch_size, d.num_heads, d.num_kv_heads
        check_tensor("q", args.q, (B, d.query_len, H, d.d_k), dtype, dev)
        if d.paged:
            pages = args.k_cache.shape[0] if isinstance(args.k_cache, torch.Tensor) else 0
            check_tensor("k_cache", args.k_cache, (pages, d.page_size, Hkv, d.d_k), dtype, dev)
            check_tensor("v_cache", args.v_cache, (pages, d.page_size, Hkv, d.d_v), dtype, dev)
            table = args.block_table
            if not isinstance(table, torch.Tensor) or table.dtype not in (torch.int32, torch.int64) \
                    or tuple(table.shape) != (B, d.key_len // d.page_size) or table.device != dev:
                raise InvalidProblem(
                    f"block_table is {_describe(table)}; expected int32 [{B}, "
                    f"{d.key_len // d.page_size}] on {dev} (the descriptor's paged cache).")
        else:
            check_tensor("k_cache", args.k_cache, (B, d.key_len, Hkv, d.d_k), dtype, dev)
            check_tensor("v_cache", args.v_cache, (B, d.key_len, Hkv, d.d_v), dtype, dev)
            if args.block_table is not None:
                raise InvalidProblem("block_table given, but the descriptor's cache is "
                                     "contiguous (page_size=None); select a paged plan.")
        if d.new_tokens:
            check_tensor("k", args.k, (B, d.new_tokens, Hkv, d.d_k), dtype, dev)
            check_tensor("v", args.v, (B, d.new_tokens, Hkv, d.d_v), dtype, dev)
        elif args.k is not None or args.v is not None:
            raise InvalidProblem("k / v given, but the descriptor appends none "
                                 "(new_tokens=0); select a plan with new_tokens.")
        for name, wanted in (("alibi_slopes", d.alibi), ("sinks", d.sinks),
                             ("block_pattern", d.block_size is not None)):
            given = getattr(args, name) is not None
            if given != wanted:
                raise InvalidProblem(
                    f"{name} is {'given' if given else 'missing'}, but the descriptor "
                    f"{'has' if wanted else 'has no'} "
                    f"{'block_size' if name == 'block_pattern' else name}; pass it "
                    f"{'' if wanted else 'not '}or select a matching plan.")
        return True

    def run(self, args: SdpaDecodeArgs, workspace: Optional[torch.Tensor] = None):
        """(y [B, Nq, H, Dv], lse [B, H, Nq]) after every check; appends args.k / args.v into
        the cache first (the caller advances cache_seqlens afterwards)."""
        self.can_implement(args)
        d = self._desc
        with self.device_guard():
            return block_sparse_attention_with_kvcache(
                args.q, args.k_cache, args.v_cache, args.cache_seqlens, args.k, args.v,
                block_table=args.block_table, is_causal=d.is_causal,
                window_size=d.window_size, sink_tokens=d.sink_tokens,
                softcap=d.softcap or None, alibi_slopes=args.alibi_slopes, sinks=args.sinks,
                scale=d.scale, block_pattern=args.block_pattern,
                block_size=d.block_size or 128, return_lse=True, backend=self._backend.value,
                key_mask=args.key_mask)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {tuple(t.shape)} on {t.device}"
    return type(t).__name__

