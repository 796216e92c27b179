"""Attention of new queries against a KV cache (decode, chunked prefill), contiguous or paged,
in flash-attn's ``flash_attn_with_kvcache`` layout: block_sparse_attention_with_kvcache.

Key j of batch row b exists when j < L_b (L_b = cache_seqlens[b] + new tokens), and query i
of row b sits at position L_b - Nq + i (bottom-right per row), which the causal rule, the
window and ALiBi compare with key positions.

Two paths, one meaning:
* the decode kernel (launch.py, triton_decode.py): forward only, f16/bf16/f32 on the triton
  backend; reads ``cache_seqlens`` and the block table on the device, appends with one
  launch, packs each GQA group into one tile and splits long caches over several programs.
* on the CPU, a call whose rule does not depend on the query row (Nq = 1, or not causal
  and no window) and has no ALiBi or pattern: PyTorch's fused flash CPU kernel (with a
  softcap, the cpu backend's capped matmuls) over the cache's views with one [B, 1, 1, L]
  mask for lengths, key_mask and the window, learnable sinks folded in after
  (cpu_dense.py);
* the block-sparse path otherwise (float64, the reference and cpu backends, a gradient
  wanted for q, per-query-head patterns): the cache rows become token rules of one
  ``block_sparse_attention`` call (key blocks wholly past L_b are skipped); a paged cache
  is gathered into a contiguous view first (a copy of the pages the table names).
"""

from __future__ import annotations

from typing import Optional

import torch

from ...core import InvalidProblem
from ..block_sparse.functional import block_sparse_attention
from ..common.backends import triton_unavailable_reason
from ..common.problem import check_window
from ..common.score_mods import ScoreMods, check_softcap
from ..common.token_rules import K_PAD, TokenRules
from ..patterns.checks import check_int
from .cpu_dense import cpu_dense_decode, cpu_dense_decode_takes
from .launch import DECODE_DTYPES, append_to_cache, decode_forward_triton


def block_sparse_attention_with_kvcache(
        q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        cache_seqlens=None, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
        *, block_table: Optional[torch.Tensor] = None, is_causal: bool = True,
        window_size: Optional[tuple] = None, sink_tokens: int = 0,
        softcap: Optional[float] = None, alibi_slopes: Optional[torch.Tensor] = None,
        sinks: Optional[torch.Tensor] = None, scale: Optional[float] = None,
        block_pattern=None, block_size: int = 128, return_lse: bool = False,
        backend: Optional[str] = None, num_splits: Optional[int] = None,
        key_mask: Optional[torch.Tensor] = None):
    """Attention of ``q`` against a KV cache, appending new keys / values first (inference:
    the decode kernel is forward only; with a gradient wanted for q or sinks the call takes
    the differentiable block-sparse path).

    Args:
        q: [B, Nq, H, D] (flash-attn's layout): the new tokens' queries (Nq = 1 for decode).
        k_cache, v_cache: the cache, either contiguous [B, Ncache, Hkv, D] / [B, Ncache,
            Hkv, Dv], or paged [num_pages, page_size, Hkv, D] with ``block_table``. H must be
            a multiple of Hkv (GQA: K/V are never expanded).
        cache_seqlens: int or int tensor [B]: tokens already in the cache of each row (None:
            all Ncache, contiguous caches only).
        k, v: None, or [B, Nnew, Hkv, D] / [B, Nnew, Hkv, Dv] new keys / values, written
            into the cache in place at positions cache_seqlens[b] .. + Nnew - 1 before the
            attention (as flash-attn does; the caller advances cache_seqlens). On CUDA the
            room left is trusted (checking it would synchronise); CPU tensors are checked.
        block_table: int32 [B, pages_per_row] for a paged cache: page p of row b holds its
            tokens p * page_size .. (p + 1) * page_size - 1. Entries past a row's last page
            (p >= ceil((cache_seqlens[b] + Nnew) / page_size)) are never read and may hold
            anything (e.g. -1); the pages a row uses are checked on the CPU and trusted on
            CUDA (checking would synchronise).
        is_causal: True: query i of row b sees keys at positions <= L_b - Nq + i, with L_b =
            cache_seqlens[b] + Nnew (bottom-right per row, flash-attn's rule). False: every
            key of the row.
        window_size, sink_tokens, softcap, alibi_slopes, sinks, scale: as in
            ``block_sparse_attention``, measured from each row's own diagonal.
        block_pattern: None (every block of the cache) or a pattern over blocks of
            ``block_size`` tokens, [B|1, H|Hkv|1, ceil(Nq / block_size), ceil(Ncache /
            block_size)] (for a paged cache Ncache = pages_per_row * page_size): e.g. the
            pages a selection method keeps (``select_key_blocks``); exact for the blocks it
            keeps, and only they are read. The decode kernel takes a bool pattern with one
            query block, shared by each GQA group ([B|1, Hkv|1, 1, nb]) and a power-of-two
            block_size >= 16; other patterns take the block-sparse path.
        block_size: the block of the pattern and of the block lists (default 128).
        return_lse: also return lse [B, H, Nq] (float32; float64 for float64).
        backend: None (automatic), "triton" or "reference" ("cpu" too for CPU tensors).
        num_splits: split-KV programs per (row, K/V head) in the decode kernel (flash-
            decoding; their partials merge in a fixed order, so results are deterministic);
            None (or 0, flash-attn's convention) chooses from the problem and the card's
            SM count (an eager step over at most 2048 cache slots takes one split: one
            launch instead of two; launch.py).
        key_mask: None, or bool [B, Ncache] (for a paged cache Ncache = pages_per_row *
            page_size, in the row's token order): False marks a cached key that no query
            sees, e.g. the padding of a left-padded batch kept in the cache (transformers'
            caches); positions keep counting in indices (padding does not shift them).

    Returns:
        y [B, Nq, H, Dv] (and lse). A query that sees no key (position < 0) gets y = 0.

    Example:
        >>> k_cache = torch.zeros(2, 1024, 2, 64); v_cache = torch.zeros(2, 1024, 2, 64)
        >>> lens = torch.tensor([10, 700])                    # tokens already cached
        >>> q, k_new, v_new = torch.randn(2, 1, 8, 64), torch.randn(2, 1, 2, 64), torch.randn(2, 1, 2, 64)
        >>> y = block_sparse_attention_with_kvcache(q, k_cache, v_cache, lens, k_new, v_new)
        >>> lens += 1                                         # the caller advances the lengths
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise InvalidProblem(f"q has shape {tuple(getattr(q, 'shape', ()))}; expected 4 dims "
                             f"[B, Nq, H, D] (flash-attn's layout).")
    B, Nq = q.shape[:2]
    paged = block_table is not None
    _check_cache(k_cache, v_cache, block_table, B, paged)
    n_new = 0 if k is None else k.shape[1]
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    if (k is None) != (v is None):
        raise InvalidProblem("k and v go together: pass both new keys and values, or neither.")
    if key_mask is not None:
        key_mask = _check_key_mask(key_mask, B, capacity, q.device)
    if num_splits is not None:
        check_int("num_splits", num_splits, 0)    # 0, like None: chosen from the problem
    if _decode_kernel_takes(q, k_cache, v_cache, block_pattern, block_size, backend, sinks):
        return _decode(q, k_cache, v_cache, cache_seqlens, k, v, block_table, capacity,
                       is_causal, window_size, sink_tokens, softcap, alibi_slopes, sinks,
                       scale, block_pattern, block_size, return_lse, num_splits, key_mask)
    cpu_rule = (is_causal, backend, window_size, sink_tokens, softcap, alibi_slopes, sinks,
                scale, block_pattern, return_lse, key_mask)
    host = capacity if cache_seqlens is None else _host_length(cache_seqlens, capacity)
    if k is None and not paged and host is not None and q.device.type == "cpu":
        # A CPU step over a plain cache of one host length: no length tensor to build.
        out = _cpu_dense_step(q, k_cache.transpose(1, 2), v_cache.transpose(1, 2), host,
                              *cpu_rule)
        if out is not None:
            return out
    lens = _cache_lengths(cache_seqlens, B, capacity, q.device, paged)
    total = lens + n_new                                       # L_b, int64 [B]
    if paged:
        _check_used_pages(block_table, total, k_cache.shape[1], k_cache.shape[0])
    if k is not None:
        _append(k_cache, v_cache, k, v, lens, block_table, capacity)
    keys, values = _cache_view(k_cache, block_table), _cache_view(v_cache, block_table)
    uniform = _uniform_length(cache_seqlens, lens, capacity)
    out = _cpu_dense_step(q, keys, values, total if uniform is None else uniform + n_new,
                          *cpu_rule)
    if out is not None:
        return out
    if uniform is not None and block_pattern is None and key_mask is None:
        # Every row holds L keys (known on the host): the cache's first L keys with the
        # bottom-right rule on indices are the same problem, with no per-token rules at all.
        L = uniform + n_new
        keys, values, tokens = keys[:, :, :L], values[:, :, :L], None
        # One query (decode) sits after every key: its causal rule allows them all, and
        # without it the lists come from the one-launch builder (no diagonal to place).
        causal = "bottom_right" if is_causal and Nq > 1 else False
    else:
        tokens = _cache_rules(total, B, Nq, keys.shape[2], is_causal, q.device, key_mask)
        causal = bool(is_causal)
    Nk = keys.shape[2]
    if block_pattern is None:
        block_pattern = torch.ones(1, 1, -(-Nq // block_size), -(-Nk // block_size),
                                   dtype=torch.bool, device=q.device)
    out = block_sparse_attention(
        q.transpose(1, 2), keys, values, block_pattern, block_size=block_size,
        is_causal=causal, scale=scale, return_lse=return_lse, backend=backend,
        window_size=window_size, sink_tokens=sink_tokens, token_rules=tokens,
        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    if return_lse:
        return out[0].transpose(1, 2), out[1]
    return out.transpose(1, 2)


def _cpu_dense_step(q, keys, values, total, is_causal, backend, window_size, sink_tokens,
                    softcap, alibi_slopes, sinks, scale, block_pattern, return_lse, key_mask):
    """The call as one fused CPU call (cpu_dense.py) over the cache views ``keys`` /
    ``values`` [B, Hkv, Ncache, D] with ``total`` keys per row, or None when it does not
    take the call."""
    if not cpu_dense_decode_takes(q, keys, values, is_causal, backend, window_size, softcap,
                                  alibi_slopes, sinks, scale, block_pattern):
        return None
    window, sink_tokens = check_window(window_size, sink_tokens) \
        if window_size is not None else (None, 0)
    return cpu_dense_decode(q, keys, values, total, key_mask, window, sink_tokens, scale,
                            return_lse, sinks, softcap)


def _host_length(cache_seqlens, capacity: int):
    """cache_seqlens as one host int when it is a valid int (no tensor built), else None."""
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool) \
            and 0 <= cache_seqlens <= capacity:
        return cache_seqlens
    return None


def _decode_kernel_takes(q, k_cache, v_cache, pattern, block_size: int, backend, sinks) -> bool:
    """Whether the decode kernel runs this call (see the module docstring)."""
    if backend not in (None, "triton") or q.dtype not in DECODE_DTYPES:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or (sinks is not None
                                                         and sinks.requires_grad)):
        return False  # the decode kernel has no backward
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype or k_cache.device != q.device \
            or q.shape[3] != k_cache.shape[3] or q.shape[2] % k_cache.shape[2] \
            or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        return False  # the block-sparse path raises the precise error
    if pattern is not None:
        if not isinstance(pattern, torch.Tensor) or pattern.dtype != torch.bool \
                or pattern.dim() != 4 or pattern.shape[2] != 1 \
                or pattern.shape[1] not in (1, k_cache.shape[2]) \
                or pattern.shape[0] not in (1, q.shape[0]) or pattern.device != q.device \
                or block_size < 16 or block_size & (block_size - 1):
            return False
    return triton_unavailable_reason(q.shape[3], v_cache.shape[3], q.device,
                                     explicit=backend == "triton") is None


def _decode(q, k_cache, v_cache, cache_seqlens, k, v, block_table, capacity: int,
            is_causal, window_size, sink_tokens, softcap, alibi_slopes, sinks, scale,
            pattern, block_size, return_lse, num_splits, key_mask):
    """The decode kernel's path: validate the options, append, launch."""
    B, Nq, H, D = q.shape
    if window_size is not None:
        window_size, sink_tokens = check_window(window_size, sink_tokens)
    mods = ScoreMods(alibi_slopes, sinks).check_for(B, H, q.device, q.dtype)
    if scale is None:
        scale = D ** -0.5
    host_len, seqlens = _decode_lengths(cache_seqlens, B, capacity, q.device,
                                        block_table is not None)
    # The kernels index the last dim of every tensor, the table's rows and the lengths with
    # unit strides: anything else is made dense here (small tensors; caches never copied).
    if block_table is not None and block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    if seqlens is not None and seqlens.stride(0) != 1:
        seqlens = seqlens.contiguous()
    n_new = 0
    if k is not None:
        _check_new(k_cache, v_cache, k, v, seqlens if seqlens is not None else host_len,
                   capacity)
        n_new = k.shape[1]
        k = k if k.stride(3) == 1 else k.contiguous()
        v = v if v.stride(3) == 1 else v.contiguous()
        append_to_cache(k, v, k_cache, v_cache, seqlens, host_len or 0, block_table)
    selection = None
    if pattern is not None:
        selection = _selection(pattern, Nq, capacity, block_size)
    return decode_forward_triton(
        q if q.stride(3) == 1 else q.contiguous(), k_cache, v_cache, seqlens=seqlens,
        host_len=host_len or 0, n_new=n_new, capacity=capacity, block_table=block_table,
        is_causal=bool(is_causal), scale=float(scale), window_size=window_size,
        sink_tokens=sink_tokens, softcap=check_softcap(softcap),
        alibi_slopes=mods.alibi_slopes, sinks=mods.sinks, selection=selection,
        block_size=block_size if pattern is not None else None, return_lse=return_lse,
        num_splits=num_splits, key_mask=key_mask)


def _check_key_mask(key_mask, B: int, capacity: int, device) -> torch.Tensor:
    """key_mask as bool [B, capacity] on the device with a unit last stride."""
    if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool \
            or tuple(key_mask.shape) != (B, capacity):
        raise InvalidProblem(
            f"key_mask is {getattr(key_mask, 'dtype', type(key_mask).__name__)} "
            f"{tuple(getattr(key_mask, 'shape', ()))}; expected bool [{B}, {capacity}] (False: "
            f"a cached key no query sees), or None.")
    if key_mask.device != device:
        raise InvalidProblem(f"key_mask is on {key_mask.device}; expected {device} like q. "
                             f"Fix: key_mask.to(q.device).")
    return key_mask if key_mask.stride(1) == 1 else key_mask.contiguous()


def _decode_lengths(cache_seqlens, B: int, capacity: int, device, paged: bool):
    """(host_len, None) when every row's length is known on the host, else (None, lengths
    [B] int32/int64 on the device): a device tensor of lengths is taken as it is (no copy,
    no check: that would synchronise)."""
    if isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.device == device \
            and device.type != "cpu" and cache_seqlens.dtype in (torch.int32, torch.int64) \
            and tuple(cache_seqlens.shape) == (B,):
        return None, cache_seqlens
    host = _host_length(cache_seqlens, capacity)
    if host is not None:
        return host, None
    lens = _cache_lengths(cache_seqlens, B, capacity, device, paged)  # validates
    host = _uniform_length(cache_seqlens, lens, capacity)
    return (host, None) if host is not None else (None, lens)


def _selection(pattern: torch.Tensor, Nq: int, capacity: int, block_size: int) -> tuple:
    """(kv_index [Bp, Hp, nb], kv_count [Bp, Hp]) int32 of a bool pattern [Bp, Hp, 1, nb]:
    one list-building launch (triton_lists), no host synchronisation."""
    from ..block_sparse.triton_lists import build_block_lists_triton
    nb = -(-capacity // block_size)
    if pattern.shape[3] != nb:
        raise InvalidProblem(f"block_pattern has {pattern.shape[3]} key blocks; expected "
                             f"ceil({capacity} / {block_size}) = {nb} (the cache's capacity "
                             f"in blocks of block_size tokens).")
    idx, _, cnt = build_block_lists_triton(pattern, Nq, capacity, block_size, False)[:3]
    return idx[:, :, 0], cnt[:, :, 0]


def _check_cache(k_cache, v_cache, block_table, B: int, paged: bool) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InvalidProblem(
                f"{name} has shape {tuple(getattr(t, 'shape', ()))}; expected [B, Ncache, Hkv, "
                f"D] (contiguous cache) or [num_pages, page_size, Hkv, D] with block_table.")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise InvalidProblem(f"k_cache {tuple(k_cache.shape)} and v_cache "
                             f"{tuple(v_cache.shape)} differ before the head dim; expected the "
                             f"same pages / tokens and K/V heads.")
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 \
                or block_table.shape[0] != B or block_table.dtype not in (torch.int32, torch.int64):
            raise InvalidProblem(
                f"block_table is {getattr(block_table, 'dtype', type(block_table).__name__)} "
                f"{tuple(getattr(block_table, 'shape', ()))}; expected int32 [{B}, "
                f"pages_per_row] (page p of row b: block_table[b, p]).")
    elif k_cache.shape[0] != B:
        raise InvalidProblem(f"k_cache holds {k_cache.shape[0]} rows; q has batch {B}. Expected "
                             f"[B, Ncache, Hkv, D] (or pass block_table for a paged cache).")


def _cache_lengths(cache_seqlens, B: int, capacity: int, device, paged: bool) -> torch.Tensor:
    """cache_seqlens as int64 [B] on the device."""
    if cache_seqlens is None:
        if paged:
            raise InvalidProblem("cache_seqlens is None with a paged cache; expected the tokens "
                                 "already cached per row (int or int tensor [B]).")
        return torch.full((B,), capacity, dtype=torch.int64, device=device)
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= capacity:
            raise InvalidProblem(f"cache_seqlens is {cache_seqlens}; expected 0 <= length <= "
                                 f"{capacity} (the cache's capacity per row).")
        lens = torch.full((B,), cache_seqlens, dtype=torch.int64, device=device)
    elif isinstance(cache_seqlens, torch.Tensor) and not cache_seqlens.is_floating_point() \
            and cache_seqlens.dim() == 1 and cache_seqlens.shape[0] == B:
        lens = cache_seqlens.to(device=device, dtype=torch.int64)
    else:
        raise InvalidProblem(f"cache_seqlens is {cache_seqlens!r}; expected an int or an int "
                             f"tensor [{B}] (tokens already in each row's cache).")
    if lens.device.type == "cpu" and bool(((lens < 0) | (lens > capacity)).any()):
        raise InvalidProblem(f"cache_seqlens {lens.tolist()}; expected 0 <= length <= "
                             f"{capacity} (the cache's capacity per row).")
    return lens


def _check_new(k_cache, v_cache, k, v, lens, capacity: int) -> None:
    """k, v [B, Nnew, Hkv, D] fit the cache (shapes, dtypes, device; room in the rows when
    their lengths ``lens`` (an int or a tensor [B]) are on the host)."""
    B, n_new = k.shape[:2]
    if k.shape[2:] != k_cache.shape[2:] or v.shape[2:] != v_cache.shape[2:] \
            or v.shape[:2] != (B, n_new) or k.dtype != k_cache.dtype or v.dtype != v_cache.dtype \
            or k.device != k_cache.device or v.device != v_cache.device:
        raise InvalidProblem(
            f"new k {tuple(k.shape)} {k.dtype} / v {tuple(v.shape)} {v.dtype}; expected [B, "
            f"Nnew, {k_cache.shape[2]}, {k_cache.shape[3]}] / [B, Nnew, {v_cache.shape[2]}, "
            f"{v_cache.shape[3]}] in the caches' dtype {k_cache.dtype}, on {k_cache.device}.")
    if isinstance(lens, int):
        lens = torch.tensor([lens])
    if lens.device.type == "cpu" and n_new and bool((lens + n_new > capacity).any()):
        raise InvalidProblem(f"appending {n_new} tokens to rows of lengths {lens.tolist()} "
                             f"overflows the cache's {capacity} tokens per row.")


def _append(k_cache, v_cache, k, v, lens, block_table, capacity: int) -> None:
    """Write k, v [B, Nnew, Hkv, D] at positions lens[b] + t of each row, in place."""
    _check_new(k_cache, v_cache, k, v, lens, capacity)
    B, n_new = k.shape[:2]
    pos = lens[:, None] + torch.arange(n_new, device=lens.device)          # [B, Nnew]
    if block_table is None:
        rows = torch.arange(B, device=lens.device)[:, None].expand(-1, n_new)
        k_cache[rows, pos] = k
        v_cache[rows, pos] = v
        return
    page_size = k_cache.shape[1]
    pages = torch.gather(block_table.long(), 1, pos // page_size)
    k_cache[pages, pos % page_size] = k
    v_cache[pages, pos % page_size] = v


def _uniform_length(cache_seqlens, lens: torch.Tensor, capacity: int):
    """The one cached length of every row when the host knows it without a device sync
    (None: the capacity; an int; a CPU tensor whose rows agree), else None."""
    if cache_seqlens is None:
        return capacity
    if isinstance(cache_seqlens, int):
        return cache_seqlens
    if lens.device.type == "cpu" and lens.numel() and bool((lens == lens[0]).all()):
        return int(lens[0])
    return None


def _check_used_pages(block_table: torch.Tensor, total: torch.Tensor, page_size: int,
                      num_pages: int) -> None:
    """InvalidProblem when a page a row uses (p < ceil(total_b / page_size)) is not a page of
    the cache. CPU tables only: on CUDA the check would synchronise, and the table is
    trusted (as the room for appended tokens is)."""
    if block_table.device.type != "cpu":
        return
    used = torch.arange(block_table.shape[1])[None, :] * page_size < total.cpu()[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_pages))
    if bool(bad.any()):
        b, p = (int(i) for i in bad.nonzero()[0])
        raise InvalidProblem(
            f"block_table[{b}, {p}] is {int(block_table[b, p])}, a page row {b} uses (it holds "
            f"{int(total[b])} tokens); expected a page index in [0, {num_pages}). Entries past "
            f"a row's last page are never read (any value, e.g. -1).")


def _cache_view(cache: torch.Tensor, block_table) -> torch.Tensor:
    """[B, Hkv, N, D]: a view of a contiguous cache, or the rows' pages gathered (a copy).
    Table entries past a row's pages may hold anything (e.g. -1): they are clamped to a
    real page, whose keys the row's length masks out."""
    if block_table is None:
        return cache.transpose(1, 2)
    B, n_pages = block_table.shape
    pages = block_table.long().flatten().clamp(0, cache.shape[0] - 1)
    rows = cache[pages]                                        # [B * n_pages, page, Hkv, D]
    return rows.view(B, n_pages * cache.shape[1], *cache.shape[2:]).transpose(1, 2)


def _cache_rules(total: torch.Tensor, B: int, Nq: int, Nk: int, is_causal, device,
                 key_mask: Optional[torch.Tensor] = None) -> TokenRules:
    """Keys past L_b (or masked out by key_mask [B, Nk]) are padding; query i of row b sits
    at L_b - Nq + i, shifted by the kernels' own offset (0 with is_causal=True, else
    Nk - Nq, which the window and ALiBi add)."""
    j = torch.arange(Nk, device=device)
    present = j[None, :] < total[:, None]
    if key_mask is not None:
        present = present & key_mask
    k_ids = torch.where(present, 0, K_PAD).to(torch.int32)
    shift = 0 if is_causal else Nk - Nq
    q_pos = total[:, None] - Nq + torch.arange(Nq, device=device)[None, :] - shift
    return TokenRules(torch.zeros(B, Nq, dtype=torch.int32, device=device), k_ids.contiguous(),
                      q_pos.to(torch.int32).contiguous(),
                      j.to(torch.int32)[None].expand(B, -1).contiguous())
