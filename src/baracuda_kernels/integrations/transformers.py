"""baracuda_kernels as a Hugging Face transformers attention implementation.

    from baracuda_kernels.integrations.transformers import register
    register()                                                # once per process
    model = AutoModelForCausalLM.from_config(config, attn_implementation="baracuda")

``register`` adds an attention function to ``transformers.AttentionInterface`` and a mask
function to ``transformers.AttentionMaskInterface`` under one name, so every attention layer
of a model loaded with that ``attn_implementation`` (``from_pretrained`` too, or
``model.set_attn_implementation(name)``) runs ``baracuda_kernels.block_sparse_attention``:

* the mask function returns an ``HFMaskRule`` (causal diagonal, sliding window, padding of
  the 2D ``attention_mask``, packed sequences) instead of a dense [B, 1, Nq, Nk] tensor; the
  attention function turns it into the library's exact token rules (``is_causal`` top-left
  or ``"bottom_right"`` for a KV cache, ``window_size``, ``document_ids`` with -1 for padded
  keys), so nothing of size Nq x Nk is built;
* GQA / MQA run without repeating K/V; Gemma 2's ``softcap`` and gpt-oss's sinks (``s_aux``)
  go to the kernels' score modifiers; ``scaling`` is the softmax scale;
* decode steps (at most DECODE_MAX_QUERIES new tokens against transformers' own cache,
  dynamic or static) go to ``block_sparse_attention_with_kvcache`` over the cache as it
  lies (no copy), with the padded keys as its ``key_mask``: on CUDA that is the decode
  kernel (split-KV, GQA packed, forward only); longer calls are bottom-right causal calls of
  ``block_sparse_attention``;
* on CUDA, calls with nothing block-sparse about them (no ``pattern``, no ``backend``
  forced, and a plain causal or full rule: no window, padding, documents, softcap or sinks)
  go to the library's dense ``flash_sdpa`` (cuDNN / flash kernels where they run, else
  ours), which beats an all-blocks-active pattern on dense causal training;
* an optional ``pattern`` callable adds per-layer block sparsity, ANDed with the model's rule.

Declined (a one-time ``warnings.warn`` and the model's own eager attention, or
transformers' sdpa where eager is not found / not needed; ``Unsupported`` with
``strict=True``): ``output_attentions=True`` (weights are never formed here), attention
dropout > 0 (training with ``attention_dropout``), ``position_bias`` / ``head_mask``, and a
mask object that is neither a rule nor a 4D tensor (e.g. a flex ``BlockMask``). A 4D mask
tensor (a user's custom mask, or a mask rule we do not recognise: chunked attention, image
token blocks) runs exactly as an additive ``bias`` of the library (dense memory).

transformers >= 4.53 (it has ``AttentionMaskInterface``): 4.5x and 5.x are supported (tested
with 4.57 and 5.24). Importing this module does not import transformers; ``register`` does.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Callable, Optional

import torch

from ..attention.block_sparse.functional import block_sparse_attention
from ..attention.block_sparse.prepared import PreparedPattern
from ..attention.decode.kvcache import block_sparse_attention_with_kvcache
from ..attention.flash_sdpa.functional import flash_sdpa
from ..core import InvalidProblem, Unsupported
from .hf_masks import HFMaskRule, mask_rule

PatternFn = Callable[[Optional[int], int, int], object]
# Calls with at most this many queries against a longer cache take the decode path.
DECODE_MAX_QUERIES = 16


def register(name: str = "baracuda", *, pattern: Optional[PatternFn] = None,
             block_size: int = 128, backend: Optional[str] = None,
             strict: bool = False) -> "HFAttention":
    """Register baracuda_kernels with transformers under ``name``.

    Args:
        name: the ``attn_implementation`` string to register (the attention function and the
            mask function both go under it).
        pattern: optional per-layer block sparsity, a callable
            ``pattern(layer_idx, q_len, kv_len) -> None | BlockPattern | bool tensor``:
            ``layer_idx`` is the attention module's ``layer_idx`` (None when it has none),
            ``q_len`` / ``kv_len`` the query and key lengths of this call (a decode step has
            q_len = 1 and kv_len = the cache length). Return None for every block, a
            ``baracuda_kernels.patterns`` BlockPattern built for (q_len, kv_len) (it carries
            its block size; its own token rules apply too, exactly, but must not repeat one
            the model's mask sets: a window on a model with a sliding window, document ids
            on a padded or packed batch), or a bool/uint8 tensor
            [B|1, H|Hkv|1, ceil(q_len / block_size), ceil(kv_len / block_size)] in blocks of
            ``block_size``. The pattern is ANDed with the model's causal rule, window and
            padding; with a pattern the model is no longer the dense model it was trained as.
            It is called on every layer's forward: return one object per (layer, lengths)
            (e.g. ``functools.lru_cache`` on the callable) to build each pattern once. Not
            a PreparedPattern: the model's rule (causal alignment, padding, window) joins
            each call, which a prepared pattern has already fixed.
        block_size: block side in tokens for the default all-blocks pattern and for tensor
            patterns (default 128).
        backend: passed to ``block_sparse_attention`` (None: automatic; "triton", "cpu",
            "reference").
        strict: raise ``baracuda_kernels.Unsupported`` instead of falling back to
            transformers' attention for what the library declines.

    Returns:
        The registered attention callable (``HFAttention``), whose options can be read back.

    Raises:
        InvalidProblem: an option has the wrong type or value.
        ImportError: transformers is not installed (``pip install "baracuda-kernels[transformers]"``).
    """
    if not isinstance(name, str) or not name or "/" in name:
        raise InvalidProblem(f"name is {name!r}; expected a non-empty str without '/' "
                             f"(transformers reads 'org/repo' names as hub kernels).")
    if pattern is not None and not callable(pattern):
        raise InvalidProblem(f"pattern is a {type(pattern).__name__}; expected a callable "
                             f"(layer_idx, q_len, kv_len) -> None | BlockPattern | bool tensor.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise InvalidProblem(f"block_size is {block_size!r}; expected an int >= 1 (e.g. 128).")
    try:
        from transformers import AttentionInterface
    except ImportError as exc:
        raise ImportError("baracuda_kernels.integrations.transformers needs transformers; "
                          "install it with pip install \"baracuda-kernels[transformers]\".") from exc
    fn = HFAttention(pattern=pattern, block_size=block_size, backend=backend, strict=strict)
    AttentionInterface.register(name, fn)
    try:
        from transformers import AttentionMaskInterface
    except ImportError:  # transformers < 4.53: models build 4D masks, run as a bias
        AttentionMaskInterface = None
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(name, mask_rule)
    return fn


class HFAttention:
    """The attention function transformers calls for every attention layer:

        out, weights = fn(module, query, key, value, attention_mask, dropout=0.0,
                          scaling=None, softcap=None, s_aux=None, **kwargs)

    query [B, H, Nq, D], key / value [B, Hkv, Nk, D] (not repeated for GQA; H % Hkv == 0),
    attention_mask an ``HFMaskRule``, None, or a 4D mask [B|1, 1|H, Nq, >=Nk] (bool: True =
    attend; float: additive). Returns out [B, Nq, H, D] (contiguous, in value's dtype) and
    weights None. Options (see ``register``) are attributes.
    """

    def __init__(self, *, pattern=None, block_size: int = 128, backend=None, strict=False):
        self.pattern = pattern
        self.block_size = block_size
        self.backend = backend
        self.strict = strict
        self._warned: set = set()

    def __repr__(self) -> str:
        return (f"HFAttention(pattern={self.pattern!r}, block_size={self.block_size}, "
                f"backend={self.backend!r}, strict={self.strict})")

    def __call__(self, module, query, key, value, attention_mask, dropout: float = 0.0,
                 scaling: Optional[float] = None, softcap: Optional[float] = None,
                 s_aux: Optional[torch.Tensor] = None, **kwargs):
        reason = _declined(attention_mask, dropout, kwargs)
        if reason is not None:
            return self._fallback(reason, module, query, key, value, attention_mask, dropout,
                                  scaling, softcap, s_aux, kwargs)
        q, k, v = _common_dtype(query, key, value)
        batch, heads, q_len, _ = q.shape
        if k.dim() != 4 or k.shape[0] != batch or heads % k.shape[1] or v.shape[:3] != k.shape[:3]:
            raise InvalidProblem(
                f"query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}; expected "
                f"[B, H, Nq, D], [B, Hkv, Nk, D], [B, Hkv, Nk, Dv] with H a multiple of Hkv "
                f"(transformers' layout before repeat_kv).")
        call = dict(scale=scaling, softcap=softcap or None, sinks=s_aux, backend=self.backend)
        if isinstance(attention_mask, HFMaskRule):
            keep, rule_args = _rule_args(attention_mask, q, k)
            k, v = k[:, :, :keep], v[:, :, :keep]      # views; keep < Nk for a static cache
            if self.pattern is None and _is_decode_step(rule_args, q_len, keep):
                return self._decode_step(q, k, v, attention_mask, rule_args, call), None
            call.update(rule_args)
        elif attention_mask is None:
            # transformers' sdpa semantics for "no mask": top-left causal for a causal module
            # when more than one query (a decode step with no mask sees every key).
            causal = kwargs.get("is_causal")
            causal = getattr(module, "is_causal", True) if causal is None else causal
            call["is_causal"] = bool(causal) and q_len > 1
        else:
            call.update(is_causal=False, bias=_bias(attention_mask, q, k.shape[2]))
        dense_causal = self._dense_rule(q, k, call)
        if dense_causal is not None:
            y = flash_sdpa(q, k, v, is_causal=dense_causal, scale=scaling)
            return y.transpose(1, 2).contiguous(), None
        layer_idx = getattr(module, "layer_idx", None)
        block_pattern, block_size = self._block_pattern(layer_idx, q_len, k.shape[2], q.device,
                                                        call)
        y = block_sparse_attention(q, k, v, block_pattern, block_size=block_size, **call)
        return y.transpose(1, 2).contiguous(), None

    def _decode_step(self, q, k, v, rule: HFMaskRule, rule_args: dict, call: dict):
        """A few queries at the end of the cache: the KV-cache entry point over K/V as they
        lie ([B, Hkv, Nk, D] viewed as [B, Nk, Hkv, D]), every row holding Nk keys, the
        padded ones masked out. Returns [B, Nq, H, D]."""
        keep = k.shape[2]
        key_mask = None if rule.key_ids is None else rule.valid_keys(keep, q.device)
        y = block_sparse_attention_with_kvcache(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), keep,
            is_causal=rule_args.get("is_causal") == "bottom_right",
            window_size=rule_args.get("window_size"), softcap=call["softcap"],
            sinks=call["sinks"], scale=call["scale"], backend=self.backend, key_mask=key_mask)
        return y.contiguous()

    def _dense_rule(self, q, k, call: dict):
        """is_causal (True / False) when this call is plain dense attention that the dense
        plan serves (module docstring), else None."""
        if self.pattern is not None or self.backend is not None or not q.is_cuda \
                or torch.compiler.is_compiling():
            return None
        if any(call.get(name) is not None for name in ("softcap", "sinks", "window_size",
                                                         "document_ids", "bias")):
            return None
        causal = call.get("is_causal", False)
        if causal == "bottom_right":
            return True if q.shape[2] == k.shape[2] else None
        return causal if isinstance(causal, bool) else None

    # -------------------------------------------------------------------------- pattern
    def _block_pattern(self, layer_idx, q_len: int, kv_len: int, device, call: dict):
        """(pattern, block_size) for one call: the user's, or every block."""
        user = self.pattern(layer_idx, q_len, kv_len) if self.pattern is not None else None
        if user is None:
            bs = self.block_size
            blocks = (1, 1, max(1, math.ceil(q_len / bs)), max(1, math.ceil(kv_len / bs)))
            return torch.ones(blocks, dtype=torch.bool, device=device), bs
        if isinstance(user, torch.Tensor):
            return user.to(device), self.block_size
        if isinstance(user, PreparedPattern):
            raise InvalidProblem(
                f"pattern(layer_idx={layer_idx}, q_len={q_len}, kv_len={kv_len}) returned a "
                f"PreparedPattern; expected a BlockPattern or a bool block tensor: the model's "
                f"rule (causal alignment, padding, window) joins each call, and a prepared "
                f"pattern has fixed its rule already. Fix: return the BlockPattern before "
                f".prepare() (functools.lru_cache on the callable keeps one per length).")
        rules = getattr(user, "kernel_rules", None) or {}
        clash = [n for n, ours in (("window_size", call.get("window_size")),
                                   ("document_ids", call.get("document_ids"))) if
                 n in rules and ours is not None]
        if clash:
            raise InvalidProblem(
                f"pattern(layer_idx={layer_idx}, q_len={q_len}, kv_len={kv_len}) returned "
                f"{getattr(user, 'description', type(user).__name__)} carrying its own "
                f"{', '.join(clash)}, and the model's mask has one too (window or padding); "
                f"expected a plain block mask there. Fix: return pattern.mask (its bool "
                f"block tensor) and register(..., block_size=pattern.block_size).")
        if getattr(user, "to", None) is not None and getattr(user, "device", device) != device:
            user = user.to(device)
        return user, None

    # ------------------------------------------------------------------------- fallback
    def _fallback(self, reason: str, module, query, key, value, mask, dropout, scaling,
                  softcap, sinks, kwargs):
        """Run transformers' own attention for a call the library declines: the model's
        eager function (it forms the weights, knows softcap and sinks), or sdpa when the
        model file has no eager function and neither softcap nor sinks are set."""
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        needs_eager = bool(kwargs.get("output_attentions")) or bool(softcap) or sinks is not None
        if self.strict or (needs_eager and eager is None):
            raise Unsupported(
                f"baracuda attention declined a call of {type(module).__name__}: {reason}. "
                f"Expected no output_attentions, no attention dropout, no position_bias / "
                f"head_mask and a mask rule, None or a 4D mask. Fix: "
                + ("register without strict=True to fall back to transformers' attention, "
                   if self.strict else "") +
                "pass output_attentions=False / call model.eval(), or load the model with "
                "attn_implementation='eager' for this use.")
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"baracuda attention: {reason}; this call (and such calls from now on) "
                          f"runs transformers' {'eager' if eager is not None else 'sdpa'} "
                          f"attention instead.", stacklevel=3)
        dense = _dense_additive(mask, query, key.shape[2], module, kwargs)
        extra = dict(kwargs)
        if softcap:
            extra["softcap"] = softcap
        if sinks is not None:
            extra["s_aux"] = sinks
        if eager is not None:
            return eager(module, query, key, value, dense, dropout=dropout, scaling=scaling,
                         **extra)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout,
                                      scaling=scaling, **extra)


# ------------------------------------------------------------------------------ helpers
def _declined(mask, dropout, kwargs) -> Optional[str]:
    """Why the library cannot run this call exactly (None: it can)."""
    if kwargs.get("output_attentions"):
        return "output_attentions=True asks for the attention weights, which are never formed"
    if dropout and dropout > 0:
        return f"attention dropout {dropout} (training with config.attention_dropout > 0)"
    for name in ("position_bias", "head_mask"):
        if kwargs.get(name) is not None:
            return f"a {name} argument"
    if mask is not None and not isinstance(mask, HFMaskRule) and \
            not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
        return f"an attention_mask of type {type(mask).__name__} (expected a rule or a 4D tensor)"
    return None


def _is_decode_step(rule_args: dict, q_len: int, kv_len: int) -> bool:
    """A few queries aligned to the end of the keys, no rule beyond causal / window /
    padding (packed documents and dense biases keep the block-sparse path)."""
    return (q_len <= DECODE_MAX_QUERIES and q_len < kv_len
            and rule_args.get("is_causal") in ("bottom_right", False)
            and "bias" not in rule_args
            and not isinstance(rule_args.get("document_ids"), torch.Tensor))


def _common_dtype(query, key, value):
    """q, k, v in one dtype. Under autocast a projection may give f32 q/k beside a bf16 v;
    the value's dtype is the model's compute dtype, so q and k join it explicitly (the
    library then applies autocast itself, as SDPA does)."""
    dtype = value.dtype
    return query.to(dtype), key.to(dtype), value


def _rule_args(rule: HFMaskRule, q, k):
    """(keys to keep, kwargs of block_sparse_attention) for an HFMaskRule.

    The library aligns the causal diagonal top-left (offset 0) or bottom-right (offset
    Nk - Nq). transformers' offset d = q_offset - kv_offset is one of those for a full or
    dynamic cache; for any other d with d + Nq <= Nk (a static cache: its unused tail lies
    past every query's diagonal) the keys are cut to d + Nq (a view, no copy), which makes
    d bottom-right. Anything else runs the rule as a dense bias (exact)."""
    batch, _, q_len, _ = q.shape
    kv_len = k.shape[2]
    if (rule.q_length, rule.kv_length) != (q_len, kv_len) or rule.batch_size != batch:
        raise InvalidProblem(
            f"the mask rule was built for batch {rule.batch_size}, {rule.q_length} queries and "
            f"{rule.kv_length} keys, but this layer has query {tuple(q.shape)} and key "
            f"{tuple(k.shape)}; expected the same sizes (the cache and the mask disagree: "
            f"a hybrid cache whose layers hold different lengths needs one mask per layer type).")
    d = rule.offset
    args: dict = {}
    keep = kv_len
    if rule.causal:
        if d == kv_len - q_len:
            args["is_causal"] = "bottom_right"
        elif d == 0:
            args["is_causal"] = True
        elif 0 < d + q_len <= kv_len and rule.documents is None:
            keep = d + q_len
            args["is_causal"] = "bottom_right"
        else:
            return kv_len, dict(is_causal=False, bias=_bias(rule.dense(q.device), q, kv_len))
    else:
        args["is_causal"] = False
    if rule.window is not None:
        args["window_size"] = (rule.window - 1, 0)    # i + d - j < w  <=>  j - i - d >= -(w - 1)
    if rule.documents is not None:
        args["document_ids"] = rule.documents
    elif rule.key_ids is not None:
        q_ids = torch.zeros(1, q_len, dtype=torch.int32, device=q.device)
        args["document_ids"] = (q_ids, rule.key_ids[:, :keep].to(q.device))
    return keep, args


def _bias(mask: torch.Tensor, q, kv_len: int) -> torch.Tensor:
    """A 4D mask [B|1, 1|H, Nq|1, >=Nk] as the library's additive bias: bool -> 0 / -inf in
    q's dtype (True = attend, as SDPA), float -> itself (float32 or q's dtype). Keys past Nk
    are cut, as transformers' eager attention does."""
    batch, heads, q_len, _ = q.shape
    if mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads) \
            or mask.shape[2] not in (1, q_len) or mask.shape[3] < kv_len:
        raise InvalidProblem(
            f"attention_mask has shape {tuple(mask.shape)}; expected a 4D mask "
            f"[{batch} or 1, 1 or {heads}, {q_len} or 1, >= {kv_len}] for query "
            f"{tuple(q.shape)} and {kv_len} keys. Pass a 2D [B, L] padding mask instead.")
    mask = mask[..., :kv_len].to(q.device)
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        return torch.where(mask, zero, torch.full((), -math.inf, dtype=q.dtype, device=q.device))
    if mask.dtype not in (torch.float32, q.dtype):
        mask = mask.to(q.dtype)
    return mask


def _dense_additive(mask, query, kv_len: int, module, kwargs):
    """The mask transformers' eager / sdpa functions expect: float [B, 1, Nq, Nk] with 0 to
    attend and the dtype's minimum to mask (eager's convention, additive in sdpa too), or
    None for "no mask" where both agree on its meaning."""
    q_len = query.shape[2]
    if isinstance(mask, HFMaskRule):
        mask = mask.dense(query.device)
    elif mask is None:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        if not (causal and q_len > 1):
            return None
        i = torch.arange(q_len, device=query.device)[:, None]
        mask = (torch.arange(kv_len, device=query.device)[None, :] <= i)[None, None]
    elif not isinstance(mask, torch.Tensor):
        raise Unsupported(f"attention_mask of type {type(mask).__name__} cannot be handed to "
                          f"transformers' eager/sdpa attention; expected a tensor or None.")
    if mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(mask, zero, torch.finfo(query.dtype).min)
