"""The functional, autograd-aware entry point: block_sparse_attention(q, k, v, pattern, ...)."""

from __future__ import annotations

from typing import Optional

import torch

from ...core import InvalidProblem
from ..common.autograd_pieces import autocast_inputs
from ..common.problem import check_qkv
from ..flash_sdpa.library_autograd import library_attention
from ..flash_sdpa.routing import all_blocks_active, dense_route
from ..common.token_rules import TokenRules, check_token_rules, token_rules_for
from .autograd import (BlockSparseAttentionFunction, attention_forward,
                       block_sparse_attention_op, causal_arg, plan_for, token_args)
from .descriptor import SdpaBlockSparseDescriptor
from .prepared import PreparedPattern
from .validation import canonical_pattern, with_pattern_rules


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_pattern, *,
                           block_size: Optional[int] = None, is_causal=None,
                           scale: Optional[float] = None, return_lse: bool = False,
                           backend: Optional[str] = None, deterministic: Optional[bool] = None,
                           window_size: Optional[tuple] = None,
                           sink_tokens: Optional[int] = None, document_ids=None,
                           query_range=None, key_range=None, prefix_lengths=None,
                           token_rules: Optional[TokenRules] = None,
                           softcap: Optional[float] = None,
                           alibi_slopes: Optional[torch.Tensor] = None,
                           sinks: Optional[torch.Tensor] = None,
                           bias: Optional[torch.Tensor] = None):
    """Block-sparse scaled-dot-product attention, differentiable in q, k and v (and in the
    sinks and the bias when they require grad).

    y = softmax(scale * q @ k^T + mask) @ v, where mask is -inf outside the active blocks of
    ``block_pattern`` (and where key > query when ``is_causal``). Inactive blocks are skipped.

    Args:
        q: [B, H, Nq, Dk] float16, bfloat16, float32 or float64.
        k: [B, Hkv, Nk, Dk], same dtype and device. Hkv < H is grouped-query attention
            (Hkv = 1: multi-query): H must be a multiple of Hkv, and query head h reads K/V
            head h // (H // Hkv), as torch SDPA's ``enable_gqa=True`` and flash-attn do.
            K/V are never expanded (no copy); dK/dV sum over each group deterministically.
        v: [B, Hkv, Nk, Dv], same dtype and device. Any strides with a unit last stride.
        block_pattern: bool or uint8 [B|1, Hp, nq, nk] (or flat [B|1, Hp, nq*nk]) with
            nq = ceil(Nq / block_size), nk = ceil(Nk / block_size); non-zero = compute the
            block. Hp = H: one pattern per query head; Hp = Hkv: one per K/V head, shared by
            the query heads of its group; Hp = 1: one for all heads. (When H == Hkv, or
            Hkv == 1, two of these readings coincide and mean the same thing.)
            A BlockPattern (baracuda_kernels.patterns) is accepted too and carries
            its block_size, and (``kernel_rules``) the window, documents or prefix of the
            builder's token rule, which the call applies: such patterns are exact. Either is read afresh on every call (its lists are rebuilt: one
            Triton launch on CUDA). A PreparedPattern (``prepare_pattern`` or
            ``BlockPattern.prepare()``) carries lists built once: no pattern work per call.
        block_size: side of a pattern block in tokens (required unless block_pattern is a
            BlockPattern).
        is_causal: True: query i attends key j only when j <= i (top-left, like torch SDPA).
            "bottom_right": only when j <= i + Nk - Nq (queries aligned to the end of the
            keys, flash-attn's convention: a KV cache, chunked prefill, decode with Nq = 1).
            The two agree when Nq == Nk. None (default) takes the BlockPattern's
            ``is_causal`` (False for raw tensors).
        window_size: (left, right) sliding window in tokens, flash-attn's convention (-1 =
            unbounded on that side): query i sees key j only when
            -left <= j - i - off <= right, with off = 0 for is_causal=True (top-left) and
            Nk - Nq otherwise (bottom-right, as flash-attn). Exact per token (blocks the
            window cuts are masked, blocks it empties skipped); ANDed with the pattern and
            the causal rule. None: (-1, -1), or the PreparedPattern's.
        sink_tokens: with a window, the first ``sink_tokens`` keys stay visible to every
            query (still subject to the causal rule; StreamingLLM's attention sinks).
            None: 0, or the PreparedPattern's.
        document_ids: int tensor [B|1, N] (Nq == Nk; [N] for every row) or a pair
            (q_ids [B|1, Nq], k_ids [B|1, Nk]): query i sees key j only when their ids are
            equal (packed documents). A negative id marks a padding token.
        query_range, key_range: (start, end), each an int, an int tensor [B] or None (0 /
            the length): only tokens start <= index < end of each batch row are valid.
            Keys outside are padding, seen by no query (left or right padding, a KV cache's
            unused tail); queries outside get y = 0, lse = -inf and zero gradients. The
            causal rule and the window keep counting in indices (as a padded batch does).
        prefix_lengths: int or int tensor [B], with is_causal: prefix-LM: the keys [0, P) of
            a row are visible to every query of it (bidirectional inside the prefix, causal
            after it). Not with a window.
            Document ids, ranges and a prefix are exact per token: blocks they cut are
            masked, blocks they empty skipped; NaN in padding never reaches a valid output.
            With a PreparedPattern pass them to prepare_pattern instead.
        token_rules: ready TokenRules (``plan.token_rules(...)``, or a varlen pack's) instead
            of the four arguments above.
        softcap: float > 0: scores become softcap * tanh(score / softcap) (Gemma 2, Grok);
            gradients go through the tanh. None: no cap.
        alibi_slopes: float32 [H] or [B, H]: score(i, j) -= slope * |j - i - off|, off the
            diagonal of the window (0 with is_causal=True, else Nk - Nq: flash-attn's
            bottom-right); positions replace indices under token positions (varlen,
            prefix-LM). No gradient for the slopes (as flash-attn).
        sinks: [H] learnable sink logits (gpt-oss): one extra logit per head in every
            row's softmax denominator, with no value; lse includes it; a valid row with no
            allowed key gets y = 0, lse = sink. Gets a gradient when it requires one.
        bias: additive score bias, float32 or q's dtype, broadcastable to [B, H, Nq, Nk]
            (any of B, H, Nq may be 1; the key dim is full; fewer dims broadcast from the
            left, e.g. [Nq, Nk]): score(i, j) += bias[b, h, i, j], after the softcap,
            before the softmax (T5 relative bias, a float attention mask: -inf masks a
            pair). Read only in the blocks the pattern computes, so a bias over a sparse
            pattern costs only its active blocks. Gets a gradient when it requires one: dS
            summed over its broadcast dims, deterministically (a bias broadcast over B or H
            takes a float32 [B, H, Nq, Nk] buffer during the backward for that sum).
            Modifiers compose with patterns, token rules, windows, GQA and varlen, on
            every backend (the cpu backend runs softcapped calls in batched matmuls: not an
            additive term, the fused CPU kernel cannot apply it).
        scale: softmax scale, default 1 / sqrt(Dk).
        return_lse: also return lse [B, H, Nq], the natural-log log-sum-exp of each row's
            scaled scores (float32; float64 for float64 inputs), differentiable.
        backend: None (automatic: triton on CUDA, the fused "cpu" backend on the CPU,
            reference elsewhere, or a dense route as below), "triton", "cpu" or "reference".
        deterministic: True forbids the dense route below (as does
            torch.use_deterministic_algorithms(True)); None/False allow it.

    Dense route: when ``backend`` is None, the pattern is a PreparedPattern with every
    reachable block active (all blocks, or with is_causal every block on or below the
    diagonal), ``return_lse`` is False, determinism was not asked for, and torch SDPA's cuDNN
    or flash kernel can run the problem (CUDA, f16/bf16, d_k == d_v, square when causal),
    the call runs there: the problem is dense attention, and those kernels are faster than
    ours on it. Their backward is not promised bitwise reproducible; pass deterministic=True
    to keep our kernels. Under torch.compile the block-sparse op always carries the call.

    Returns:
        y [B, H, Nq, Dv] in q's dtype (and lse when return_lse). A query row with no allowed
        key gives y = 0 and lse = -inf, and zero gradients; NaN or inf in a row's scores
        gives that row NaN (as torch SDPA does).

    Autograd: gradients for q, k, v (only those that require them) from y's and lse's
    gradients; differentiable once (double backward raises Unsupported). Under
    torch.autocast, q/k/v are cast to the autocast dtype as for torch SDPA.

    Example:
        >>> q = k = v = torch.randn(1, 2, 256, 64)
        >>> pattern = torch.ones(1, 1, 4, 4, dtype=torch.bool)
        >>> y = block_sparse_attention(q, k, v, pattern, block_size=64, is_causal=True)
        >>> q8, k2 = torch.randn(1, 8, 256, 64), torch.randn(1, 2, 256, 64)   # GQA 8 / 2
        >>> y = block_sparse_attention(q8, k2, k2, pattern, block_size=64)
    """
    token_kwargs = dict(document_ids=document_ids, query_range=query_range,
                        key_range=key_range, prefix_lengths=prefix_lengths)
    has_tokens = any(v is not None for v in token_kwargs.values())
    if isinstance(block_pattern, PreparedPattern):
        block_size, is_causal, window_size, sink_tokens = _from_prepared(
            block_pattern, block_size, is_causal, window_size, sink_tokens)
        if has_tokens or token_rules is not None:
            raise InvalidProblem(
                "document_ids / query_range / key_range / prefix_lengths were passed with a "
                "PreparedPattern; expected them in prepare_pattern(...) (its lists are built "
                "with them), or a raw pattern here.")
    else:
        window_size, sink_tokens, token_kwargs = with_pattern_rules(
            block_pattern, window_size, sink_tokens, token_kwargs)
        has_tokens = any(v is not None for v in token_kwargs.values())
    _check_alibi_positions(alibi_slopes, token_kwargs.get("prefix_lengths"), block_pattern)
    if token_rules is not None and has_tokens:
        raise InvalidProblem("token_rules was passed with document_ids / query_range / key_range "
                             "/ prefix_lengths (or a pattern carrying documents / a prefix); "
                             "expected one or the other.")
    if block_size is None:
        block_size = getattr(block_pattern, "block_size", None)
        if block_size is None:
            raise InvalidProblem("block_size is None; expected an int >= 1 (or pass a BlockPattern "
                                 "or PreparedPattern, which carry their block_size).")
    if is_causal is None:
        is_causal = bool(getattr(block_pattern, "is_causal", False))
    q, k, v, no_autocast = autocast_inputs(q, k, v)
    desc = SdpaBlockSparseDescriptor.from_tensors(
        q, k, v, block_size=block_size, scale=scale, is_causal=is_causal,
        window_size=(-1, -1) if window_size is None else window_size,
        sink_tokens=sink_tokens or 0, softcap=softcap, alibi=alibi_slopes is not None,
        sinks=sinks is not None, bias=bias is not None)
    device = check_qkv(desc, q, k, v)
    tokens = token_rules_for(desc.batch_size, desc.query_len, desc.key_len, device,
                             desc.is_causal, desc.window_size,
                             block_size=desc.kernel_block_size, **token_kwargs) \
        if has_tokens else token_rules
    if token_rules is not None:
        check_token_rules(token_rules, desc.batch_size, desc.query_len, desc.key_len, device)
    if backend is not None and not isinstance(backend, str):
        backend = backend.value  # a BackendKind
    with no_autocast:
        if _tracing(q):
            if isinstance(block_pattern, PreparedPattern):
                block_pattern.check_matches(desc, device)
                pattern, tokens = block_pattern.mask, block_pattern.token_rules
            else:
                pattern = canonical_pattern(desc, block_pattern, device)
            y, lse = block_sparse_attention_op(q, k, v, pattern, desc.block_size,
                                               desc.softmax_scale, causal_arg(desc.is_causal),
                                               backend or "", *desc.window_size,
                                               desc.sink_tokens, *token_args(tokens),
                                               desc.softcap, alibi_slopes, sinks, bias)
        else:
            # The dense route is asked only for a fully active prepared pattern (a memoised
            # answer), so sparse calls pay nothing here; plan.block_lists checks the
            # pattern's geometry on the other path.
            if not backend and not return_lse and isinstance(block_pattern, PreparedPattern) \
                    and not desc.score_mods.any and all_blocks_active(block_pattern):
                block_pattern.check_matches(desc, device)
                dense = dense_route(desc, device, True, deterministic)
                if dense is not None:
                    return library_attention(dense, q, k, v)
            plan = plan_for(desc, device, backend or None)
            mods = plan.score_mods(alibi_slopes, sinks, bias)
            if getattr(block_pattern, "kernel_rules", None):
                # Its rules are merged into desc / tokens above: hand over the checked mask.
                block_pattern = canonical_pattern(desc, block_pattern, device)
            lists = plan.block_lists(block_pattern, tokens)
            if torch.is_grad_enabled() and any(
                    t is not None and t.requires_grad for t in (q, k, v, sinks, bias)):
                y, lse = BlockSparseAttentionFunction.apply(q, k, v, sinks, bias, plan, lists,
                                                            mods)
            else:  # nothing to differentiate (inference): no autograd node, ~15 us less
                y, lse = attention_forward(plan, q, k, v, lists, mods)
    return (y, lse) if return_lse else y


def _from_prepared(prepared: PreparedPattern, block_size, is_causal, window_size, sink_tokens):
    """A PreparedPattern fixes block_size, is_causal and the window; explicit values must
    agree."""
    for name, given, own in (("block_size", block_size, prepared.block_size),
                             ("is_causal", is_causal, prepared.is_causal),
                             ("window_size", window_size, prepared.window_size),
                             ("sink_tokens", sink_tokens, prepared.sink_tokens)):
        if given is not None and (tuple(given) if name == "window_size" else given) != own:
            raise InvalidProblem(
                f"{name}={given} was passed with a PreparedPattern prepared for {name}={own}; "
                f"expected them to agree. Leave {name} out, or prepare the pattern again.")
    return prepared.block_size, prepared.is_causal, prepared.window_size, prepared.sink_tokens


def _check_alibi_positions(alibi_slopes, prefix_lengths, block_pattern) -> None:
    """ALiBi measures distances between token positions; a prefix-LM moves the query
    positions of its prefix (that is how its causal rule is stated), so the two do not mix."""
    if alibi_slopes is None:
        return
    prepared_prefix = isinstance(block_pattern, PreparedPattern) and \
        block_pattern.token_rules is not None and block_pattern.token_rules.has_positions
    if prefix_lengths is not None or prepared_prefix:
        raise InvalidProblem(
            "alibi_slopes was given with a prefix-LM (prefix_lengths, or a prefix_lm pattern); "
            "expected one of them: the prefix rule shifts query positions, which ALiBi would "
            "read as distances. Use a block pattern / token mask for the prefix instead.")


def _tracing(q: torch.Tensor) -> bool:
    """True under torch.compile or on fake/meta tensors: then the custom op (which has a fake
    implementation) must carry the call; eager calls take the cheaper autograd.Function."""
    from torch._subclasses.fake_tensor import FakeTensor
    return torch.compiler.is_compiling() or q.device.type == "meta" or isinstance(q, FakeTensor)
