"""The autograd boundary of block-sparse attention: one contract, two doors.

Both doors call the same two functions, ``attention_forward`` and ``attention_backward``,
which hold the whole contract:

* the plan's device is made current around every launch (``plan.device_guard``);
* any upstream ``dy`` is accepted (the stride-0 expanded gradient of ``y.sum()`` included:
  it is made contiguous once), ``dy`` absent when only lse was used;
* lse is differentiable: its gradient enters the backward as a per-row term (no kernel of
  its own);
* ``needs_input_grad`` is respected: the dQ kernel runs only when q needs a gradient, the
  dK/dV kernel only when k or v does; learnable sinks get their gradient from the forward's
  y and lse (``score_mods.sinks_grad``, torch ops) when they require one; a bias that
  requires grad gets dS summed over its broadcast dims (the dK/dV kernel writes it);
* outputs never alias inputs (fresh tensors);
* the backward is differentiable once: differentiating it again (double backward, e.g. a
  gradient penalty) raises ``Unsupported`` naming the limitation instead of a silent zero.

Autocast is handled before either door (functional.py): inputs are cast like torch SDPA
casts them and the internal float32 accumulation is never downcast.

Doors:

* ``BlockSparseAttentionFunction``: a plain autograd.Function for eager calls (the custom-op
  dispatcher costs host time, which shows at low density).
* ``block_sparse_attention_op``: a torch.library custom op with a fake implementation and a
  registered backward, so torch.compile keeps a model that calls block_sparse_attention in
  one graph, forward and backward. It takes the pattern tensor and rebuilds the lists from
  it (one Triton launch) in forward and backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...core import PlanCache, PlanPreference, Unsupported, resolve_device
from ..common.autograd_pieces import refuse_double_backward
from ..common.numerics import accumulator_dtype
from ..common.score_mods import row_delta, sinks_grad
from .descriptor import SdpaBlockSparseDescriptor
from ..patterns.block_bits import BlockBits
from ..common.token_rules import TokenRules
from .plan import SdpaBlockSparsePlan, output_like

_PLANS = PlanCache()  # (descriptor, device, backend) -> plan of the functional API

DOUBLE_BACKWARD_MESSAGE = (
    "block_sparse_attention is differentiable once: its backward has no derivative of its own "
    "(double backward, e.g. a gradient penalty through attention, is not implemented). Use "
    "torch.nn.functional.scaled_dot_product_attention with a dense mask for second-order "
    "gradients, or detach the attention output from the term you differentiate twice.")


def plan_for(desc: SdpaBlockSparseDescriptor, device, backend: Optional[str]) -> SdpaBlockSparsePlan:
    """The cached plan of the functional API for this problem."""
    return _PLANS.get((desc, device, backend), lambda: SdpaBlockSparsePlan.select(
        desc, PlanPreference.DEFAULT, device=resolve_device(device), backend=backend))


# ------------------------------------------------------------------------------ the contract
def attention_forward(plan: SdpaBlockSparsePlan, q, k, v, lists, mods=None):
    """(y, lse) in fresh tensors, launched on the plan's device; mods: the checked
    ScoreMods of the call (``plan.score_mods``) or None."""
    return plan._forward(q, k, v, lists, mods=mods)


def attention_backward(plan: SdpaBlockSparsePlan, lists, q, k, v, y, lse, dy, dlse,
                       needs_input_grad, mods=None, sinks=None, bias=None) -> tuple:
    """(dq, dk, dv, dsinks, dbias), None where ``needs_input_grad`` (for q, k, v, sinks,
    bias) says no gradient is wanted (dsinks / dbias also None without sinks / bias).

    dy / dlse: the upstream gradients of y and lse, either may be None (unused output).
    sinks / bias: the caller's tensors (the ones that may require grad), mods their
    checked copies; dbias comes back shaped like ``bias``."""
    need_q, need_k, need_v = needs_input_grad[:3]
    need_s = sinks is not None and len(needs_input_grad) > 3 and needs_input_grad[3]
    need_b = bias is not None and len(needs_input_grad) > 4 and needs_input_grad[4]
    if not (need_q or need_k or need_v or need_s or need_b) or (dy is None and dlse is None):
        return None, None, None, None, None
    if not torch.is_grad_enabled():
        dq = dk = dv = delta = db = None
        if need_q or need_k or need_v or need_b:
            dq, dk, dv, delta, *db = plan._backward(
                q, k, v, y, lse, dy, lists, dlse=dlse, need_dq=need_q,
                need_dkdv=need_k or need_v, mods=mods, want_delta=True, want_dbias=need_b)
            db = db[0].view(bias.shape) if need_b else None
        ds = None
        if need_s:  # the backward's own delta when it ran (no second read of y and dy)
            if delta is None:
                delta = row_delta(y, dy, dlse, lse.dtype)
            ds = sinks_grad(sinks, lse, delta)
        return dq, (dk if need_k else None), (dv if need_v else None), ds, db
    # create_graph=True: compute the gradients without history, then tie them to the inputs
    # through a node that refuses to be differentiated (no silent zero second derivative).
    with torch.no_grad():
        grads = attention_backward(plan, lists, q, k, v, y, lse, dy, dlse, needs_input_grad,
                                   mods, sinks, bias)
    return refuse_double_backward(grads, (q, k, v, dy, dlse, sinks, bias),
                                  DOUBLE_BACKWARD_MESSAGE)


# ------------------------------------------------------------------------------ eager door
class BlockSparseAttentionFunction(torch.autograd.Function):
    """Eager (y, lse) = f(q, k, v) for a selected plan and its block lists."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, bias, plan: SdpaBlockSparsePlan, lists, mods):
        y, lse = attention_forward(plan, q, k, v, lists, mods)
        ctx.save_for_backward(q, k, v, y, lse, sinks, bias)
        ctx.plan, ctx.lists, ctx.mods = plan, lists, mods
        ctx.set_materialize_grads(False)  # an unused y or lse arrives as None: no zeros made
        return y, lse

    @staticmethod
    def backward(ctx, dy, dlse):
        q, k, v, y, lse, sinks, bias = ctx.saved_tensors
        grads = attention_backward(ctx.plan, ctx.lists, q, k, v, y, lse, dy, dlse,
                                   ctx.needs_input_grad, ctx.mods, sinks, bias)
        # One gradient per forward input: q, k, v, sinks, bias, then none for the plan, the
        # lists and the modifiers.
        return (*grads, None, None, None)


# ------------------------------------------------------------------------------ compiled door
def causal_arg(is_causal) -> str:
    """The causal rule as the custom ops carry it (a string: their schema has no union)."""
    return {False: "none", True: "top_left"}.get(is_causal, is_causal)


# The optional trailing arguments of the forward op, in order, with their defaults: the
# window, the six token-rule tensors, the score modifiers.
_OPTIONAL = (("window_left", -1), ("window_right", -1), ("sink_tokens", 0),
             ("q_ids", None), ("k_ids", None), ("q_pos", None), ("k_pos", None),
             ("bits_slots", None), ("bits_words", None),
             ("softcap", 0.0), ("alibi_slopes", None), ("sinks", None), ("bias", None))


def _plan(q, k, v, block_size, scale, causal: str, backend, window_left=-1, window_right=-1,
          sink_tokens=0, softcap=0.0, alibi=False, sinks=False,
          bias=False) -> SdpaBlockSparsePlan:
    is_causal = False if causal == "none" else causal
    desc = SdpaBlockSparseDescriptor.from_tensors(
        q, k, v, block_size=block_size, scale=scale, is_causal=is_causal,
        window_size=(window_left, window_right), sink_tokens=sink_tokens, softcap=softcap,
        alibi=alibi, sinks=sinks, bias=bias)
    return plan_for(desc, q.device, backend or None)


def _op_plan(q, k, v, block_size, scale, is_causal, backend, window_left, window_right,
             sink_tokens, softcap, alibi_slopes, sinks, bias):
    """(plan, checked ScoreMods or None) of a custom op call."""
    plan = _plan(q, k, v, block_size, scale, is_causal, backend, window_left, window_right,
                 sink_tokens, softcap, alibi_slopes is not None, sinks is not None,
                 bias is not None)
    return plan, plan.score_mods(alibi_slopes, sinks, bias)


@torch.library.custom_op("baracuda::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              pattern: torch.Tensor, block_size: int, scale: float,
                              is_causal: str, backend: str, window_left: int = -1,
                              window_right: int = -1, sink_tokens: int = 0,
                              q_ids: Optional[torch.Tensor] = None,
                              k_ids: Optional[torch.Tensor] = None,
                              q_pos: Optional[torch.Tensor] = None,
                              k_pos: Optional[torch.Tensor] = None,
                              bits_slots: Optional[torch.Tensor] = None,
                              bits_words: Optional[torch.Tensor] = None,
                              softcap: float = 0.0,
                              alibi_slopes: Optional[torch.Tensor] = None,
                              sinks: Optional[torch.Tensor] = None,
                              bias: Optional[torch.Tensor] = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, lse) for a validated problem; pattern is a checked bool/uint8 [Bp, Hp, nq, nk];
    q_ids .. bits_words: the tensors of a TokenRules (each None when absent); softcap,
    alibi_slopes, sinks, bias: the score modifiers (common.score_mods)."""
    plan, mods = _op_plan(q, k, v, block_size, scale, is_causal, backend, window_left,
                          window_right, sink_tokens, softcap, alibi_slopes, sinks, bias)
    return attention_forward(plan, q, k, v, plan.block_lists(
        pattern, _token_rules(q_ids, k_ids, q_pos, k_pos, bits_slots, bits_words)), mods)


def _token_rules(q_ids, k_ids, q_pos, k_pos, bits_slots, bits_words) -> Optional[TokenRules]:
    bits = None if bits_slots is None else BlockBits(bits_slots, bits_words)
    if q_ids is None and q_pos is None and bits is None:
        return None
    return TokenRules(q_ids, k_ids, q_pos, k_pos, bits)


def token_args(tokens: Optional[TokenRules]) -> tuple:
    """The custom op's six token tensors of a TokenRules (Nones where absent)."""
    if tokens is None:
        return (None,) * 6
    bits = (None, None) if tokens.bits is None else (tokens.bits.slots, tokens.bits.words)
    return (tokens.q_ids, tokens.k_ids, tokens.q_pos, tokens.k_pos) + bits


@block_sparse_attention_op.register_fake
def _(q, k, v, pattern, block_size, scale, is_causal, backend, *rest):
    lse_dtype = accumulator_dtype(q.dtype)
    y = output_like(q, v.shape[-1])
    return y, q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.custom_op("baracuda::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, y: torch.Tensor, lse: torch.Tensor,
        dy: Optional[torch.Tensor], dlse: Optional[torch.Tensor], pattern: torch.Tensor,
        block_size: int, scale: float, is_causal: str, backend: str, need_dq: bool,
        need_dkdv: bool, need_dsinks: bool, need_dbias: bool, window_left: int,
        window_right: int,
        sink_tokens: int, q_ids: Optional[torch.Tensor], k_ids: Optional[torch.Tensor],
        q_pos: Optional[torch.Tensor], k_pos: Optional[torch.Tensor],
        bits_slots: Optional[torch.Tensor], bits_words: Optional[torch.Tensor], softcap: float,
        alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
        bias: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks, dbias); a gradient that is not needed comes back as an empty
    tensor."""
    plan, mods = _op_plan(q, k, v, block_size, scale, is_causal, backend, window_left,
                          window_right, sink_tokens, softcap, alibi_slopes, sinks, bias)
    lists = plan.block_lists(pattern, _token_rules(q_ids, k_ids, q_pos, k_pos, bits_slots,
                                                   bits_words))
    grads = attention_backward(plan, lists, q, k, v, y, lse, dy, dlse,
                               (need_dq, need_dkdv, need_dkdv, need_dsinks, need_dbias), mods,
                               sinks, bias)
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@block_sparse_attention_backward_op.register_fake
def _(q, k, v, y, lse, dy, dlse, pattern, block_size, scale, is_causal, backend, need_dq,
      need_dkdv, need_dsinks, need_dbias, *rest):
    def grad(ref, needed):
        return torch.empty_like(ref, memory_format=torch.contiguous_format) \
            if needed and ref is not None else q.new_empty(0)
    sinks, bias = rest[-2:]
    return (grad(q, need_dq), grad(k, need_dkdv), grad(v, need_dkdv),
            grad(sinks, need_dsinks), grad(bias, need_dbias))


def _refuse(ctx, *grads):
    raise Unsupported(DOUBLE_BACKWARD_MESSAGE)


def _keep_nothing(ctx, inputs, output):
    pass


block_sparse_attention_backward_op.register_autograd(_refuse, setup_context=_keep_nothing)


def _setup_context(ctx, inputs, output):
    q, k, v, pattern, block_size, scale, is_causal, backend, *rest = inputs
    y, lse = output
    optional = list(rest) + [d for _, d in _OPTIONAL[len(rest):]]  # defaults for the rest
    window, tokens = optional[:3], optional[3:9]
    softcap, alibi_slopes, sinks, bias = optional[9:]
    ctx.save_for_backward(q, k, v, y, lse, pattern, *tokens, alibi_slopes, sinks, bias)
    ctx.static = (block_size, scale, is_causal, backend)
    ctx.window, ctx.softcap = tuple(window), softcap
    ctx.n_rest = len(rest)


def _backward(ctx, dy, dlse):
    q, k, v, y, lse, pattern, *tokens, alibi_slopes, sinks, bias = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    need_s = sinks is not None and ctx.needs_input_grad[8 + 11]
    need_b = bias is not None and ctx.needs_input_grad[8 + 12]
    dq, dk, dv, ds, db = block_sparse_attention_backward_op(
        q, k, v, y, lse, dy, dlse, pattern, *ctx.static, need_q, need_k or need_v, need_s,
        need_b, *ctx.window, *tokens, ctx.softcap, alibi_slopes, sinks, bias)
    # One gradient per op input: q, k, v, then none for the pattern, the four static
    # arguments and the optional arguments that were passed, except the sinks' own.
    grads = [dq if need_q else None, dk if need_k else None, dv if need_v else None,
             None, None, None, None, None] + [None] * ctx.n_rest
    if need_s:
        grads[8 + 11] = ds
    if need_b:
        grads[8 + 12] = db
    return tuple(grads)


block_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)
