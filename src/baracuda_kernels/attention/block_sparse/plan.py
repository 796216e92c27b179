"""SdpaBlockSparsePlan: select once (validation, backend, kernel config), run many times."""

from __future__ import annotations

from typing import Optional

import torch

from ...core import (ArchSku, BackendKind, BackendRegistry, ElementKind, InvalidProblem,
                     KernelSku, MathPrecision, OpCategory, Plan, PlanPreference,
                     PrecisionGuarantee, check_no_overlap, check_tensor, resolve_device)
from ..common.backends import triton_unavailable_reason
from ..common.kinds import AttentionKind
from ..common.problem import check_outputs, check_qkv
from ..common.numerics import accumulator_dtype
from ..common.score_mods import BiasGradTarget, ScoreMods, row_delta, sinks_grad
from ..common.token_rules import TokenRules, check_token_rules, token_rules_for
from .block_lists import BlockLists
from .cpu_fused import (block_sparse_attention_backward_cpu, block_sparse_attention_forward_cpu,
                        fused_cpu_unavailable_reason)
from .descriptor import SdpaBlockSparseArgs, SdpaBlockSparseDescriptor
from .prepared import PreparedPattern
from .reference import (block_sparse_attention_backward_reference,
                        block_sparse_attention_forward_reference)
from .triton_fwd_configs import SHORT_ROW_BLOCKS
from .validation import canonical_pattern, with_pattern_rules


# Who can run block-sparse attention: our Triton kernels (CUDA; the CPU interpreter only when
# asked for), else the pure-PyTorch reference, which runs anything anywhere.
BACKENDS = BackendRegistry("block-sparse attention")
BACKENDS.register(BackendKind.TRITON, lambda desc, device, options, explicit:
                  triton_unavailable_reason(desc.d_k, desc.d_v, device, explicit), priority=0)
BACKENDS.register(BackendKind.CPU, lambda desc, device, options, explicit:
                  cpu_unavailable_reason(desc, device), priority=5)
BACKENDS.register(BackendKind.REFERENCE, lambda desc, device, options, explicit: None,
                  priority=10)


def cpu_unavailable_reason(desc, device) -> Optional[str]:
    """Why the fused CPU backend cannot run this problem (None when it can)."""
    if device.type != "cpu":
        return f"the cpu backend runs CPU tensors; the problem is on {device}"
    return fused_cpu_unavailable_reason()


class SdpaBlockSparsePlan(Plan):
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
                 backend: BackendKind, allow_tf32: bool, declined: Optional[dict] = None):
        super().__init__(desc, device, backend, declined)
        self._allow_tf32 = allow_tf32
        self._config = None  # triton forward config
        # Tiles for prepared patterns with short rows (triton_configs.SHORT_ROW_BLOCKS);
        # None: the default ones serve every pattern.
        self._short_row_configs = (None, None)

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
            backend: None (automatic: triton on CUDA when it can run the problem, the fused
                "cpu" backend on the CPU, else reference), "triton", "cpu" or "reference"
                (or a BackendKind) to force one.
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
        choice = BACKENDS.choose(desc, device, BackendKind.coerce(backend))
        chosen = choice.kind
        plan = cls(desc, device, chosen, bool(allow_tf32), choice.declined)
        if chosen is BackendKind.TRITON:
            plan._config = plan._select_triton_config(preference)
            if preference is not PlanPreference.FASTEST:
                plan._short_row_configs = plan._select_short_row_configs()
        return plan

    def _select_short_row_configs(self):
        from .triton_bwd_configs import short_row_backward_config
        from .triton_fwd_configs import short_row_forward_config
        d, dtype = self._desc, self._desc.element.torch_dtype
        return (short_row_forward_config(d.d_k, d.d_v, dtype, d.kernel_block_size,
                                         ArchSku.from_device(self._device)),
                short_row_backward_config(dtype, max(d.d_k, d.d_v), d.kernel_block_size))

    def _configs_for(self, lists: BlockLists):
        """(forward config, backward config or None = default) for these lists."""
        short = lists.mean_row_blocks is not None and lists.mean_row_blocks <= SHORT_ROW_BLOCKS
        fwd, bwd = self._short_row_configs if short else (None, None)
        return fwd or self._config, bwd

    def _select_triton_config(self, preference: PlanPreference):
        from . import triton_fwd_configs as triton_configs
        desc = self._desc
        dtype = desc.element.torch_dtype
        if preference is PlanPreference.FASTEST and not desc.is_empty:
            from .triton_fwd_tune import autotune_forward_config
            gen = torch.Generator(device=self._device).manual_seed(0)
            q, k, v = (torch.randn(shape, dtype=dtype, device=self._device, generator=gen)
                       for shape in (desc.query_shape(), desc.key_shape(), desc.value_shape()))
            pattern = torch.ones(1, 1, desc.num_blocks_q, desc.num_blocks_k, dtype=torch.bool,
                                 device=self._device)
            lists = BlockLists.build(pattern, desc.query_len, desc.key_len,
                                     desc.kernel_block_size, desc.is_causal, window=desc.window)
            return autotune_forward_config(q, k, v, lists, block_size=desc.kernel_block_size,
                                           scale=desc.softmax_scale, is_causal=desc.is_causal,
                                           window=desc.window,
                                           allow_tf32=self._allow_tf32)
        return triton_configs.default_forward_config(desc.d_k, max(desc.d_v, 1), dtype,
                                                     desc.kernel_block_size,
                                                     ArchSku.from_device(self._device),
                                                     allow_tf32=self._allow_tf32)

    # ---------------------------------------------------------------- properties
    @property
    def num_blocks_q(self) -> int:
        return self._desc.num_blocks_q

    @property
    def num_blocks_k(self) -> int:
        return self._desc.num_blocks_k

    @property
    def precision_guarantee(self) -> PrecisionGuarantee:
        element = self._desc.element
        math = element.math_precision
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

    def __repr__(self) -> str:
        d = self._desc
        window = f", window={d.window_size}, sinks={d.sink_tokens}" if d.window else ""
        return (f"SdpaBlockSparsePlan(backend={self._backend.value}, device={self._device}, "
                f"{d.problem_text()}, block_size={d.block_size}{window})")

    # ---------------------------------------------------------------- patterns
    def prepare(self, block_pattern, **token_rules) -> PreparedPattern:
        """Prepare a pattern (tensor or BlockPattern) once for this plan's problem: the
        result, passed as ``SdpaBlockSparseArgs.block_pattern``, costs no pattern work per call.
        ``token_rules``: document_ids / query_range / key_range / prefix_lengths, built into
        the lists (see ``block_sparse_attention``)."""
        if isinstance(block_pattern, PreparedPattern):
            if token_rules:
                raise InvalidProblem("prepare() got token rules with a PreparedPattern; expected "
                                     "a tensor or BlockPattern (prepared patterns keep theirs).")
            block_pattern.check_matches(self._desc, self._device)
            return block_pattern
        pattern = canonical_pattern(self._desc, block_pattern, None)
        d = self._desc
        if getattr(block_pattern, "kernel_rules", None):
            token_rules = self._with_pattern_rules(block_pattern, token_rules)
        return PreparedPattern.build(pattern, query_len=d.query_len, key_len=d.key_len,
                                     block_size=d.block_size, is_causal=d.is_causal,
                                     window_size=d.window_size, sink_tokens=d.sink_tokens,
                                     device=self._device, **token_rules)

    def token_rules(self, *, document_ids=None, query_range=None, key_range=None,
                    prefix_lengths=None, block_bits=None) -> Optional[TokenRules]:
        """Per-token rules for ``SdpaBlockSparseArgs.token_rules`` (see
        ``block_sparse_attention`` for each argument; ``block_bits``: the bits a
        ``from_mask_fn`` / ``from_token_mask`` pattern carries in ``kernel_rules``); None
        when none is given."""
        d = self._desc
        return token_rules_for(d.batch_size, d.query_len, d.key_len, self._device, d.is_causal,
                               d.window_size, document_ids=document_ids,
                               query_range=query_range, key_range=key_range,
                               prefix_lengths=prefix_lengths, block_bits=block_bits,
                               block_size=d.kernel_block_size)

    def _with_pattern_rules(self, pattern, token_kwargs: dict) -> dict:
        """``token_kwargs`` with the documents / prefix a BlockPattern's kernel rules carry
        (``with_pattern_rules``); InvalidProblem unless the pattern's window is the plan's
        (the descriptor fixes the window)."""
        d = self._desc
        window, sinks, merged = with_pattern_rules(pattern, None, None, token_kwargs)
        window, sinks = (-1, -1) if window is None else tuple(window), sinks or 0
        if (window, sinks) != (d.window_size, d.sink_tokens):
            raise InvalidProblem(
                f"BlockPattern {pattern.description} applies window_size={window}, "
                f"sink_tokens={sinks}; the plan's descriptor has {d.window_size}, "
                f"{d.sink_tokens}. Select the plan with the pattern's window.")
        return merged

    def block_lists(self, block_pattern, tokens: Optional[TokenRules] = None) -> BlockLists:
        """The active-block lists of a pattern for this plan.

        A PreparedPattern hands over its lists after a geometry check. A raw tensor or a
        BlockPattern is validated and its lists are built now, from its current content
        (one Triton launch on the triton backend; torch ops for the reference): never a
        cached copy that a write to the tensor could have made stale."""
        if isinstance(block_pattern, PreparedPattern):
            if tokens is not None:
                raise InvalidProblem(
                    "token rules were given with a PreparedPattern; expected them in "
                    "prepare_pattern(..., document_ids=..., ...) instead (its lists are built "
                    "with them), or a raw pattern.")
            block_pattern.check_matches(self._desc, self._device)
            return block_pattern.lists
        pattern = canonical_pattern(self._desc, block_pattern, self._device)
        d = self._desc
        if getattr(block_pattern, "kernel_rules", None):
            kwargs = {k: v for k, v in self._with_pattern_rules(block_pattern, {}).items()
                      if v is not None}
            if kwargs and tokens is not None:
                raise InvalidProblem(
                    f"token rules were given with BlockPattern {block_pattern.description}, "
                    f"which carries its own documents / prefix; expected one of them.")
            tokens = self.token_rules(**kwargs) if kwargs else tokens
        if tokens is not None:
            check_token_rules(tokens, d.batch_size, d.query_len, d.key_len, self._device)
        with self.device_guard():
            return BlockLists.build(pattern, d.query_len, d.key_len, d.kernel_block_size,
                                    d.is_causal, use_triton=self._backend is BackendKind.TRITON,
                                    window=d.window, tokens=tokens)

    # ---------------------------------------------------------------- checks
    def can_implement(self, args: SdpaBlockSparseArgs) -> bool:
        """Check concrete tensors against the plan; raises InvalidProblem, else returns True."""
        self._check_args(args)
        if isinstance(args.block_pattern, PreparedPattern):
            args.block_pattern.check_matches(self._desc, self._device)
        else:
            canonical_pattern(self._desc, args.block_pattern, self._device)
        if args.token_rules is not None:
            if isinstance(args.block_pattern, PreparedPattern):
                raise InvalidProblem("args.token_rules was given with a PreparedPattern; expected "
                                     "None (prepared patterns carry their own token rules).")
            d = self._desc
            check_token_rules(args.token_rules, d.batch_size, d.query_len, d.key_len,
                              self._device)
        return True

    def _check_args(self, args: SdpaBlockSparseArgs) -> None:
        """Everything but the pattern (``block_lists`` checks that, once per call)."""
        if not isinstance(args, SdpaBlockSparseArgs):
            raise InvalidProblem(f"args is a {type(args).__name__}; expected SdpaBlockSparseArgs.")
        device = check_qkv(self._desc, args.q, args.k, args.v)
        if device != self._device:
            raise InvalidProblem(
                f"q is on {device}; this plan was selected for {self._device}. "
                f"Select a plan with device={device}.")
        check_outputs(self._desc, self._device, args.y, args.lse)
        check_no_overlap({"y": args.y, "lse": args.lse}, self._inputs_of(args))

    @staticmethod
    def _inputs_of(args: SdpaBlockSparseArgs) -> dict:
        pattern = args.block_pattern
        pattern = pattern if isinstance(pattern, torch.Tensor) else getattr(pattern, "mask", None)
        return {"q": args.q, "k": args.k, "v": args.v, "block_pattern": pattern}

    # ---------------------------------------------------------------- running
    def run(self, args: SdpaBlockSparseArgs, workspace: Optional[torch.Tensor] = None):
        """Compute (y, lse); writes into args.y / args.lse when given, else allocates them.
        Every check (tensors, outputs, pattern) runs before anything is written."""
        self._check_args(args)
        mods = self.score_mods(args.alibi_slopes, args.sinks, args.bias)
        lists = self.block_lists(args.block_pattern, args.token_rules)
        args.y, args.lse = self._forward(args.q, args.k, args.v, lists, args.y, args.lse, mods)
        return args.y, args.lse

    def score_mods(self, alibi_slopes=None, sinks=None, bias=None) -> Optional[ScoreMods]:
        """The call's ALiBi slopes / sinks / bias checked against the descriptor (which
        announces them) and the problem's shapes; None when the problem has none."""
        d = self._desc
        mods = ScoreMods(alibi_slopes, sinks, bias)
        d.score_mods.check_mods(mods)
        if mods.empty:
            return None
        return mods.check_for(d.batch_size, d.num_heads, self._device, d.element.torch_dtype,
                              d.query_len, d.key_len)

    def _mod_kwargs(self, mods: Optional[ScoreMods]) -> dict:
        """The launchers' softcap / mods arguments (none at all without modifiers: the
        backends that have none never see them)."""
        d = self._desc
        return dict(softcap=d.softcap, mods=mods) if d.score_mods.any else {}

    def _forward(self, q, k, v, lists: BlockLists, y=None, lse=None,
                 mods: Optional[ScoreMods] = None):
        """Launch the forward on checked tensors; allocates y / lse when None. -> (y, lse)"""
        d = self._desc
        if y is None:
            y = output_like(q, d.d_v)
        if lse is None:
            lse = torch.empty(d.lse_shape(), dtype=d.lse_dtype, device=q.device)
        if d.is_empty:
            y.zero_()
            lse.fill_(float("-inf"))
            return y, lse
        if d.d_v == 0:
            # No value columns, but the scores (and so lse) exist: run on one zero column.
            v, y_out, y = v.new_zeros(v.shape[:-1] + (1,)), y, y.new_empty(y.shape[:-1] + (1,))
        kwargs = dict(block_size=d.kernel_block_size, scale=d.softmax_scale,
                      is_causal=d.is_causal, y=y, lse=lse, window=d.window,
                      **self._mod_kwargs(mods))
        with self.device_guard():
            if self._backend is BackendKind.TRITON:
                from .triton_fwd import block_sparse_attention_forward_triton
                block_sparse_attention_forward_triton(q, k, v, lists,
                                                      config=self._configs_for(lists)[0],
                                                      allow_tf32=self._allow_tf32, **kwargs)
            elif self._backend is BackendKind.CPU:
                block_sparse_attention_forward_cpu(q, k, v, lists, **kwargs)
            else:
                block_sparse_attention_forward_reference(q, k, v, lists, **kwargs)
        return (y_out if d.d_v == 0 else y), lse

    def run_backward(self, args: SdpaBlockSparseArgs, dy: Optional[torch.Tensor], dq=None, dk=None,
                     dv=None, *, dlse: Optional[torch.Tensor] = None):
        """Gradients (dq, dk, dv) of the forward in ``args`` (whose y and lse must hold the
        forward's outputs) for the upstream gradients dy [B,H,Nq,Dv] and, optionally, dlse
        [B,H,Nq] (the gradient of the returned lse; None = 0). dy may be None when only
        lse was used. Preallocated dq/dk/dv (shaped like q/k/v) are written when given.
        With learnable sinks (descriptor ``sinks=True``) dsinks [H] follows, with a bias
        (``bias=True``) dbias (shaped like the bias, its dtype): (dq, dk, dv[, dsinks][,
        dbias])."""
        self._check_args(args)
        mods = self.score_mods(args.alibi_slopes, args.sinks, args.bias)
        d = self._desc
        if args.y is None or args.lse is None:
            raise InvalidProblem("args.y and args.lse are None; expected the forward's outputs. "
                                 "Call plan.run(args) first, then plan.run_backward(args, dy).")
        if dy is None and dlse is None:
            raise InvalidProblem("dy and dlse are both None; expected at least one upstream "
                                 "gradient (dy [B,H,Nq,Dv] for y, dlse [B,H,Nq] for lse).")
        if dy is not None:
            check_tensor("dy", dy, d.output_shape(), d.element.torch_dtype, self._device)
        if dlse is not None:
            check_tensor("dlse", dlse, d.lse_shape(), d.lse_dtype, self._device)
        for name, ref, given in (("dq", args.q, dq), ("dk", args.k, dk), ("dv", args.v, dv)):
            if given is not None:
                check_tensor(name, given, tuple(ref.shape), ref.dtype, self._device)
        inputs = dict(self._inputs_of(args), y=args.y, lse=args.lse, dy=dy, dlse=dlse)
        check_no_overlap({"dq": dq, "dk": dk, "dv": dv}, inputs)
        dq, dk, dv, delta, *dbias = self._backward(
            args.q, args.k, args.v, args.y, args.lse, dy,
            self.block_lists(args.block_pattern, args.token_rules), dq, dk, dv, dlse=dlse,
            mods=mods, want_delta=True, want_dbias=d.bias)
        grads = (dq, dk, dv)
        if d.sinks:
            if delta is None:
                delta = row_delta(args.y, dy, dlse, args.lse.dtype)
            grads = grads + (sinks_grad(args.sinks, args.lse, delta),)
        if d.bias:
            grads = grads + (dbias[0].view(args.bias.shape),)
        return grads

    def _backward(self, q, k, v, y, lse, dy, lists: BlockLists, dq=None, dk=None, dv=None, *,
                  dlse=None, need_dq: bool = True, need_dkdv: bool = True,
                  mods: Optional[ScoreMods] = None, want_delta: bool = False,
                  want_dbias: bool = False):
        """Launch the backward on checked tensors. dy: None (y unused) or any strides; dlse:
        None or the lse gradient. Allocates the wanted gradients (shaped like q / k / v)
        when None; -> (dq or None, dk or None, dv or None), None where not wanted, and with
        ``want_delta`` the rows' delta = dy . y - dlse [B, H, Nq] the backward computed on
        the way (None where it had none): the sinks' gradient reuses it; with
        ``want_dbias`` (mods carry a bias) the bias's gradient last (shaped like the 4-d
        bias view, in its dtype)."""
        d = self._desc
        dbias = BiasGradTarget(mods.bias, d.batch_size, d.num_heads,
                               accumulator_dtype(q.dtype)) if want_dbias else None

        def result(dq, dk, dv, delta=None):
            out = (dq, dk, dv) + ((delta,) if want_delta else ())
            return out + ((dbias.finish(),) if want_dbias else ())
        if dy is None:
            dy = torch.zeros(d.output_shape(), dtype=y.dtype, device=y.device)
        elif dy.dim() and dy.stride(-1) != 1 and dy.shape[-1] > 1:
            # E.g. the stride-0 gradient of y.sum(): the kernels want a unit last stride.
            dy = dy.contiguous()
        dq = (torch.empty_like(q, memory_format=torch.contiguous_format) if dq is None else dq) \
            if need_dq else None
        if need_dkdv:
            dk = torch.empty_like(k, memory_format=torch.contiguous_format) if dk is None else dk
            dv = torch.empty_like(v, memory_format=torch.contiguous_format) if dv is None else dv
        else:
            dk = dv = None
        if d.is_empty:
            for g in (dq, dk, dv):
                if g is not None:
                    g.zero_()
            return result(dq, dk, dv)
        v_run, y_run, dy_run, dv_run = v, y, dy, dv
        if d.d_v == 0:  # as in _forward: one zero value column carries lse's gradient
            v_run = v.new_zeros(v.shape[:-1] + (1,))
            y_run = y.new_zeros(y.shape[:-1] + (1,))
            dy_run = dy.new_zeros(dy.shape[:-1] + (1,))
            dv_run = torch.empty_like(v_run) if need_dkdv else None
        kwargs = dict(block_size=d.kernel_block_size, scale=d.softmax_scale,
                      is_causal=d.is_causal, dq=dq, dk=dk, dv=dv_run, dlse=dlse,
                      window=d.window, **self._mod_kwargs(mods))
        if dbias is not None:
            kwargs["dbias"] = dbias
        with self.device_guard():
            if self._backend is BackendKind.TRITON:
                from .triton_bwd import block_sparse_attention_backward_triton
                delta = block_sparse_attention_backward_triton(
                    q, k, v_run, y_run, lse, dy_run, lists, config=self._configs_for(lists)[1],
                    allow_tf32=self._allow_tf32, **kwargs)
            elif self._backend is BackendKind.CPU:
                delta = block_sparse_attention_backward_cpu(q, k, v_run, y_run, lse, dy_run,
                                                            lists, **kwargs)
            else:
                delta = block_sparse_attention_backward_reference(q, k, v_run, y_run, lse,
                                                                  dy_run, lists, **kwargs)
        return result(dq, dk, dv, delta)


def output_like(q: torch.Tensor, d_v: int) -> torch.Tensor:
    """An empty y [B, H, Nq, d_v] in q's dtype, laid out like q: token-major ([B, Nq, H, D]
    in memory, as a packed varlen batch or a transposed [B, N, H, D] tensor is) when q is,
    so that the caller's transpose back costs no copy; else contiguous."""
    B, H, Nq, _ = q.shape
    if H > 1 and Nq > 1 and q.stride(1) < q.stride(2):
        return torch.empty(B, Nq, H, d_v, dtype=q.dtype, device=q.device).transpose(1, 2)
    return torch.empty(B, H, Nq, d_v, dtype=q.dtype, device=q.device)
