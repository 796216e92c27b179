"""The implementations a case is timed with, all in the same process on the same device.

* ``ours``: ``SdpaBlockSparsePlan`` (forward timing: ``plan.run`` with preallocated outputs)
  and ``block_sparse_attention`` (autograd: bwd, step, step-graph), both given the pattern
  prepared once (``BlockPattern.prepare()``: block lists built once, no pattern work per
  call), as a model that keeps its pattern would. Mode ``unprepared`` calls
  ``block_sparse_attention`` with a new view of the mask every call, so the lists are
  rebuilt each time. Triton on CUDA, the reference backend on CPU. With GQA (Hkv < H) it
  gets k, v of Hkv heads as they are.
* ``ours-expanded``: ours on K/V repeated to H heads (``repeat_interleave``) once, at
  preparation, so the copy is outside every timed call: a throughput reference for ours'
  GQA, which must match it without the copies. Only for GQA cases (NotApplicable otherwise).
  Its ``train`` differentiates the expanded K/V (``Prepared.train_inputs``); the check sums
  their gradients over each group (``Prepared.case_grads``) to compare with the case's.
* ``flex``: FlexAttention with a ``BlockMask`` of the same pattern (``to_flex_block_mask``:
  full blocks without mask_mod, ``kv_idx <= q_idx`` on the blocks the diagonal crosses, and
  a builder's window / documents / prefix as the mask_mod: the same exact rule as ours),
  compiled (``torch.compile(flex_attention, dynamic=False)``) on CUDA, eager on CPU, where a
  compile takes about a minute per shape. Compile time is excluded (first call = warm-up).
  With GQA it is called with ``enable_gqa=True`` (torch >= 2.5; Unavailable before).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the dense and causal
  patterns only (the problems it computes), pinned to the backend torch picks, which is named.
  With GQA it is called with ``enable_gqa=True`` (torch >= 2.5; Unavailable before).
* ``reference``: our pure-PyTorch backend, when ``ours`` is not already it.

``prepare`` raises ``Unavailable`` (with the reason, reported in the table and the files)
or ``NotApplicable`` (silently skipped: SDPA on a sparse pattern).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..attention import (SdpaBlockSparseArgs, SdpaBlockSparseDescriptor, SdpaBlockSparsePlan,
                         block_sparse_attention)
from ..core import BackendKind
from .cases import Geometry, PatternSpec


class Unavailable(Exception):
    """The implementation cannot run this case; ``str(exc)`` says why."""


class NotApplicable(Exception):
    """The implementation does not compute this problem (skipped without a row)."""


@dataclass
class Inputs:
    """One case's tensors: q [B, H, N, D], k, v [B, Hkv, N, D] (Hkv = H without GQA), all
    without grad, dy like q, and its pattern."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dy: torch.Tensor
    pattern: object          # BlockPattern on the device
    spec: PatternSpec
    geometry: Geometry

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def is_causal(self) -> bool:
        return bool(self.pattern.is_causal)

    @property
    def group_size(self) -> int:
        """Query heads per K/V head, H // Hkv (1 without GQA)."""
        return self.q.shape[1] // self.k.shape[1]


@dataclass
class Prepared:
    """A ready implementation: ``infer()`` runs the forward on the case's tensors without
    autograd; ``train(q, k, v)`` is a differentiable forward returning y; ``unprepared()``
    (ours only, else None: no such mode) is the forward given a new pattern object.

    ``train`` takes the case's q, k, v unless ``train_inputs`` gives the tensors it takes
    instead (``ours-expanded``: k, v repeated ``kv_repeats`` times per head, made once);
    ``leaves`` and ``case_grads`` hide the difference from the runner."""

    detail: str
    infer: Callable[[], torch.Tensor]
    train: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    train_detail: Optional[str] = None
    unprepared: Optional[Callable[[], torch.Tensor]] = None
    setup_s: float = 0.0
    notes: list = field(default_factory=list)
    train_error: Optional[tuple] = None   # (status, reason) once backward failed
    train_inputs: Optional[tuple] = None  # (q, k, v) that train() takes, if not the case's
    kv_repeats: int = 1                   # train_inputs' K/V heads per case K/V head
    unpack: Optional[Callable] = None     # train_inputs' layout -> the case's [B, H, N, D]

    def leaves(self, inputs: "Inputs") -> tuple:
        """The (q, k, v) to differentiate ``train`` at (no grad; the caller makes leaves)."""
        return self.train_inputs if self.train_inputs is not None else (inputs.q, inputs.k, inputs.v)

    def case_grads(self, grads):
        """Gradients for ``leaves`` -> gradients for the case's q, k, v: the gradient of a
        K/V head repeated r times is the sum of its copies' gradients."""
        if self.unpack is not None:
            return tuple(self.unpack(g) for g in grads)
        if self.kv_repeats == 1:
            return tuple(grads)
        dq, dk, dv = grads
        r = self.kv_repeats
        return (dq,) + tuple(t.unflatten(1, (t.shape[1] // r, r)).sum(2) for t in (dk, dv))


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Inductor wraps the real message; keep the most specific lines.
    keep = " | ".join(lines[:1] + [ln for ln in lines[1:] if "must be" in ln or "Error" in ln][:2])
    return keep[:limit]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ ours
def _descriptor(inputs: Inputs) -> SdpaBlockSparseDescriptor:
    g = inputs.geometry
    window = _window_rules(inputs.pattern)  # a builder's window: the kernels cut it per token
    return SdpaBlockSparseDescriptor(g.batch, g.heads, g.seq_len, g.seq_len, g.head_dim, g.head_dim,
                                     block_size=g.block_size, is_causal=inputs.is_causal,
                                     element=g.dtype, num_kv_heads=inputs.k.shape[1], **window)


def pattern_call(pattern, mask, block_size: int, is_causal) -> tuple:
    """(pattern argument, keyword arguments) of a block_sparse_attention call on ``mask``
    computing what ``pattern`` states: its kernel rules (window, documents, prefix) as the
    call's arguments; a pattern with block bits (from_mask_fn), which no argument states,
    is passed itself (its lists are still built per call)."""
    rules = getattr(pattern, "kernel_rules", None) or {}
    if "block_bits" in rules:
        return pattern, dict(is_causal=is_causal)
    return mask, dict(block_size=block_size, is_causal=is_causal, **rules)


def _window_rules(pattern) -> dict:
    """window_size / sink_tokens of a pattern's kernel rules (versions before kernel rules,
    and patterns without a window: none)."""
    rules = getattr(pattern, "kernel_rules", None) or {}
    return {k: v for k, v in rules.items() if k in ("window_size", "sink_tokens")}


def prepared_pattern(inputs: Inputs):
    """The case's pattern prepared once (block lists built now, none per call): a
    PreparedPattern where BlockPattern.prepare exists, else the BlockPattern itself (versions
    before it, whose plans cached the lists per pattern tensor). Either carries block_size
    and is_causal, so calls pass neither."""
    pattern = inputs.pattern
    return pattern.prepare() if hasattr(pattern, "prepare") else pattern


def _plan_based(inputs: Inputs, backend: Optional[str]) -> Prepared:
    g = inputs.geometry
    plan = SdpaBlockSparsePlan.select(_descriptor(inputs), device=inputs.device, backend=backend)
    t0 = time.perf_counter()
    prepared = prepared_pattern(inputs)
    args = SdpaBlockSparseArgs(inputs.q, inputs.k, inputs.v, prepared)
    plan.run(args)                 # allocates args.y / args.lse once; later runs reuse them
    _sync(inputs.device)
    chosen = plan.backend.value
    q, k, v, mask = inputs.q, inputs.k, inputs.v, inputs.pattern.mask

    def train(q_, k_, v_):
        return block_sparse_attention(q_, k_, v_, prepared, backend=chosen)

    def unprepared():
        # A fresh view (no copy) per call: a new pattern object, as when a model builds its
        # pattern inside forward, so nothing cached on the pattern can be reused.
        pattern, kwargs = pattern_call(inputs.pattern, mask.view(mask.shape), g.block_size,
                                       inputs.is_causal)
        return block_sparse_attention(q, k, v, pattern, backend=chosen, **kwargs)

    config = plan.sku.config
    detail = chosen if not config else f"{chosen} {config}"
    return Prepared(detail, lambda: plan.run(args)[0], train, unprepared=unprepared,
                    setup_s=time.perf_counter() - t0)


def prepare_ours(inputs: Inputs, options) -> Prepared:
    return _plan_based(inputs, None)


def prepare_reference(inputs: Inputs, options) -> Prepared:
    ours = SdpaBlockSparsePlan.select(_descriptor(inputs), device=inputs.device)
    if ours.backend is BackendKind.REFERENCE:
        raise Unavailable(f"ours runs the reference backend on {inputs.device.type}: it is the "
                          "implementation under test here")
    p = _plan_based(inputs, "reference")
    p.unprepared = None            # a mode of ours only
    return p


def expand_kv(t: torch.Tensor, repeats: int) -> torch.Tensor:
    """[B, Hkv, N, D] -> [B, Hkv * repeats, N, D], K/V head j becoming heads j*r .. j*r+r-1
    (query head h reads head h // (H // Hkv) either way): a copy."""
    return t.repeat_interleave(repeats, dim=1)


def prepare_ours_expanded(inputs: Inputs, options) -> Prepared:
    """Ours on K/V expanded to H heads once, here: the copy is outside every timed call."""
    r = inputs.group_size
    if r == 1:
        raise NotApplicable("ours-expanded is ours itself when K/V have all H heads")
    hp = inputs.pattern.mask.shape[1]
    if hp not in (1, inputs.q.shape[1]):
        raise Unavailable(f"a pattern per K/V head ({hp} heads) would need expanding too")
    t0 = time.perf_counter()
    k, v = expand_kv(inputs.k, r), expand_kv(inputs.v, r)
    _sync(inputs.device)
    expand_s = time.perf_counter() - t0
    p = _plan_based(dataclasses.replace(inputs, k=k, v=v), None)
    p.unprepared = None            # a mode of ours only
    p.train_inputs, p.kv_repeats = (inputs.q, k, v), r
    p.setup_s += expand_s
    return p


def prepare_ours_varlen(inputs: Inputs, options) -> Prepared:
    """A document pattern's batch as one packed varlen batch (block_sparse_attention_varlen,
    a sequence per document per batch row): the packing copies are made here, untimed; y
    comes back as a [B, H, N, D] view of the packed output (no copy)."""
    docs = (getattr(inputs.pattern, "kernel_rules", None) or {}).get("document_ids")
    if docs is None:
        raise NotApplicable("ours-varlen runs document patterns (packed sequences) only")
    from ..attention import block_sparse_attention_varlen
    B, H, N, D = inputs.q.shape
    t0 = time.perf_counter()
    ids = docs.to(inputs.device).expand(B, N).to(torch.int64)
    flat = (ids + torch.arange(B, device=inputs.device)[:, None] * (N + 1)).reshape(-1)
    starts = torch.nonzero(flat[1:] != flat[:-1]).reshape(-1) + 1
    zero = torch.zeros(1, dtype=torch.int64, device=inputs.device)
    cu = torch.cat([zero, starts, zero + B * N]).to(torch.int32)
    pack = lambda t: t.transpose(1, 2).reshape(B * N, t.shape[1], t.shape[3]).contiguous()  # noqa: E731
    unpack = lambda t: t.view(B, N, t.shape[1], t.shape[2]).transpose(1, 2)  # noqa: E731
    packed = tuple(pack(t) for t in (inputs.q, inputs.k, inputs.v))
    bs, causal = inputs.geometry.block_size, inputs.is_causal

    def run(q_, k_, v_):
        return unpack(block_sparse_attention_varlen(q_, k_, v_, cu, cu, block_size=bs,
                                                    is_causal=causal))
    run(*packed)
    _sync(inputs.device)
    return Prepared(f"varlen {cu.numel() - 1} sequences", lambda: run(*packed), run,
                    train_inputs=packed, unpack=unpack, setup_s=time.perf_counter() - t0)


# ------------------------------------------------------------------------------ flex
_COMPILED_FLEX = {}
_FLEX_FAILURES = {}   # (mode, geometry, causal) -> reason


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as fa
    except ImportError as exc:
        raise Unavailable(f"torch {torch.__version__} has no FlexAttention (needs torch >= 2.5): "
                          f"{exc}") from None
    if not hasattr(fa, "BlockMask") or not hasattr(fa.BlockMask, "from_kv_blocks"):
        raise Unavailable(f"torch {torch.__version__} has no BlockMask.from_kv_blocks (needs torch >= 2.5)")
    return fa


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def flex_block_mask(inputs: Inputs, compiled: bool = True):
    """BlockMask of the case's pattern (``BlockPattern.to_flex_block_mask``).

    For the compiled kernel, which visits only the listed blocks and applies the mask_mod
    only inside partial ones: when the length is a multiple of the block, every partial
    block is a computed block that the diagonal crosses, where the pattern lookup in the
    mask_mod is always true. The mask_mod is then replaced by the module-level causal one
    (or none) and B, H are expanded to the problem's, so that one compiled kernel per shape
    serves every pattern. Eager FlexAttention applies only the mask_mod (on the full score
    matrix), so it keeps the pattern's own mask_mod.
    """
    fa = _flex_module()
    g = inputs.geometry
    bm = inputs.pattern.to_flex_block_mask()
    if g.seq_len % g.block_size or not compiled:
        return bm
    rules = getattr(inputs.pattern, "kernel_rules", None)
    if rules:
        # The pattern's token rule (a window, documents, a prefix), which our kernels cut
        # per token too: Flex gets the same rule as its mask_mod, for the same work.
        from ..attention.patterns.kernel_rules import kernel_allows
        mask_mod = kernel_allows(rules, inputs.is_causal, g.seq_len, g.seq_len,
                                 inputs.pattern.token_rule)
    else:
        mask_mod = _causal_mask_mod if inputs.is_causal else None

    def full(t):  # [Bp, Hp, ...] -> [B, H, ...]
        return None if t is None else t.expand((g.batch, g.heads) + tuple(t.shape[2:])).contiguous()

    return fa.BlockMask.from_kv_blocks(full(bm.kv_num_blocks), full(bm.kv_indices),
                                       full(bm.full_kv_num_blocks), full(bm.full_kv_indices),
                                       BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=mask_mod,
                                       seq_lengths=tuple(bm.seq_lengths))


def _flex_gqa_kwargs(inputs: Inputs) -> dict:
    """``{"enable_gqa": True}`` for a GQA case ({} otherwise); Unavailable where
    flex_attention has no such argument (torch < 2.5)."""
    if inputs.group_size == 1:
        return {}
    fa = _flex_module()
    try:
        has = "enable_gqa" in inspect.signature(fa.flex_attention).parameters
    except (TypeError, ValueError):
        has = True           # no signature to read: let the call say
    if not has:
        raise Unavailable(f"torch {torch.__version__} flex_attention has no enable_gqa "
                          "(GQA needs torch >= 2.5)")
    return {"enable_gqa": True}


def _flex_function(mode: str):
    fa = _flex_module()
    if mode == "eager":
        return fa.flex_attention
    if "compiled" not in _COMPILED_FLEX:
        import torch._dynamo
        cfg = torch._dynamo.config
        # Every (shape, causal) variant compiles once; the default limit of 8 is too low.
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 512))
        # The backward-only timing replays one graph's backward (retain_graph=True), which
        # compiled backwards with donated buffers refuse; donation only saves memory.
        import torch._functorch.config as functorch_config
        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        _COMPILED_FLEX["compiled"] = torch.compile(fa.flex_attention, dynamic=False)
    return _COMPILED_FLEX["compiled"]


def prepare_flex(inputs: Inputs, options) -> Prepared:
    mode = getattr(options, "flex_mode", "auto")
    if mode == "auto":
        mode = "compiled" if inputs.device.type == "cuda" else "eager"
    try:
        bm = flex_block_mask(inputs, compiled=mode == "compiled")
    except Unavailable:
        raise
    except Exception as exc:
        raise Unavailable(f"building the BlockMask failed: {_first_line(exc)}") from None
    gqa = _flex_gqa_kwargs(inputs)
    compiled_fn = _flex_function(mode)

    def fn(q_, k_, v_, block_mask):
        return compiled_fn(q_, k_, v_, block_mask=block_mask, **gqa)

    q, k, v = inputs.q, inputs.k, inputs.v
    key = (mode, inputs.geometry, inputs.is_causal)
    if key in _FLEX_FAILURES:   # the same compile failed for another pattern: don't retry
        raise Unavailable(_FLEX_FAILURES[key])
    t0 = time.perf_counter()
    try:
        fn(q, k, v, block_mask=bm)   # compiles (excluded from timing); errors surface here
        _sync(inputs.device)
    except Exception as exc:
        _FLEX_FAILURES[key] = (f"FlexAttention ({mode}) failed at block "
                               f"{inputs.geometry.block_size}: {_first_line(exc)}")
        raise Unavailable(_FLEX_FAILURES[key]) from None
    setup = time.perf_counter() - t0
    detail = f"{mode}{' gqa' if gqa else ''}"
    notes = [] if mode == "compiled" else ["FlexAttention eager (unfused, materialises scores)"]
    return Prepared(detail, lambda: fn(q, k, v, block_mask=bm),
                    lambda q_, k_, v_: fn(q_, k_, v_, block_mask=bm), setup_s=setup, notes=notes)


# ------------------------------------------------------------------------------ sdpa
_SDPA_NAMES = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient",
               "CUDNN_ATTENTION": "cudnn", "MATH": "math", "OVERRIDEABLE": "overrideable"}


def _sdpa_choice(q, k, v, causal: bool, gqa: dict):
    """The SDPBackend torch's dispatcher picks for these tensors, or None if unknown."""
    try:
        from torch.nn.attention import SDPBackend
        return SDPBackend(int(torch._fused_sdp_choice(q, k, v, None, 0.0, causal, **gqa)))
    except Exception:
        return None


def _sdpa_has_gqa() -> bool:
    """Whether scaled_dot_product_attention takes ``enable_gqa`` (torch >= 2.5)."""
    import torch.nn.functional as F
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):       # a builtin without a signature: read its doc
        return "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def prepare_sdpa(inputs: Inputs, options) -> Prepared:
    if not inputs.spec.dense_equivalent:
        raise NotApplicable("SDPA computes dense and causal attention only")
    import torch.nn.functional as F
    try:
        from torch.nn.attention import sdpa_kernel
    except ImportError:
        sdpa_kernel = None
    causal = inputs.is_causal
    gqa = {}
    if inputs.group_size > 1:
        if not _sdpa_has_gqa():
            raise Unavailable(f"torch {torch.__version__} scaled_dot_product_attention has no "
                              "enable_gqa (GQA needs torch >= 2.5)")
        gqa = {"enable_gqa": True}
    q, k, v = inputs.q, inputs.k, inputs.v
    grads = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
    choice_infer = _sdpa_choice(q, k, v, causal, gqa)
    choice_train = _sdpa_choice(*grads, causal, gqa)

    def call(choice, q_, k_, v_):
        if sdpa_kernel is None or choice is None:
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal, **gqa)
        with sdpa_kernel([choice]):
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal, **gqa)

    def name(choice):
        return "default" if choice is None else _SDPA_NAMES.get(choice.name, choice.name.lower())

    t0 = time.perf_counter()
    try:
        call(choice_infer, q, k, v)
        _sync(inputs.device)
    except Exception as exc:
        raise Unavailable(f"scaled_dot_product_attention failed: {_first_line(exc)}") from None
    return Prepared(name(choice_infer), lambda: call(choice_infer, q, k, v),
                    lambda q_, k_, v_: call(choice_train, q_, k_, v_),
                    train_detail=name(choice_train), setup_s=time.perf_counter() - t0)


PREPARE = {"ours": prepare_ours, "ours-expanded": prepare_ours_expanded,
           "ours-varlen": prepare_ours_varlen, "flex": prepare_flex, "sdpa": prepare_sdpa,
           "reference": prepare_reference}


def prepare(impl: str, inputs: Inputs, options) -> Prepared:
    """Set ``impl`` up for ``inputs``; Unavailable / NotApplicable when it cannot run."""
    try:
        return PREPARE[impl](inputs, options)
    except (Unavailable, NotApplicable):
        raise
    except Exception as exc:
        raise Unavailable(_first_line(exc)) from None
