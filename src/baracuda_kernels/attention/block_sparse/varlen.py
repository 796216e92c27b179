"""Packed variable-length batches in flash-attn's conventions: block_sparse_attention_varlen.

The pack is one long sequence of Tq queries and Tk keys. It runs as a batch of one: q
[Tq, H, D] is viewed as [1, H, Tq, D] (no copy), and the sequences are token rules
(common.token_rules): every token carries its sequence index as a document id, so a pair
across two sequences is never computed (blocks that lie across sequences are SKIPped, blocks
a sequence boundary cuts are masked per token), and, when a causal rule or a window applies,
its position inside its sequence, so that each sequence gets its own diagonal. Nothing is
padded to the longest sequence and no Tq x Tk mask exists. Per-sequence block patterns
become a pack pattern plus the bits of the pack blocks they cut (varlen_pattern.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from ...core import InvalidProblem
from ..common.problem import causal_mode, check_window
from ..common.token_rules import TokenRules
from ..patterns.checks import check_block_size
from .descriptor import kernel_block_size
from .functional import block_sparse_attention
from .validation import pattern_head_counts
from .varlen_pattern import check_sequence_pattern, sequence_pattern_rules


def block_sparse_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *,
                                  max_seqlen_q: Optional[int] = None,
                                  max_seqlen_k: Optional[int] = None,
                                  block_pattern=None, sequence_pattern=None,
                                  block_size: int = 128, is_causal=False,
                                  window_size: Optional[tuple] = None, sink_tokens: int = 0,
                                  scale: Optional[float] = None, return_lse: bool = False,
                                  backend: Optional[str] = None,
                                  softcap: Optional[float] = None,
                                  alibi_slopes: Optional[torch.Tensor] = None,
                                  sinks: Optional[torch.Tensor] = None,
                                  bias: Optional[torch.Tensor] = None):
    """Attention over a pack of variable-length sequences, differentiable in q, k and v.

    Sequence s owns queries ``cu_seqlens_q[s] <= t < cu_seqlens_q[s+1]`` of q and keys
    ``cu_seqlens_k[s] <= t < cu_seqlens_k[s+1]`` of k and v; a query attends only keys of
    its own sequence, under that sequence's causal rule and window.

    Args:
        q: [Tq, H, Dk] float16, bfloat16, float32 or float64 (unit last stride).
        k: [Tk, Hkv, Dk]; v: [Tk, Hkv, Dv]. H a multiple of Hkv (GQA/MQA as in
            ``block_sparse_attention``).
        cu_seqlens_q, cu_seqlens_k: int32/int64 [S + 1] cumulative sequence starts (0 first,
            non-decreasing), on q's device. Tokens past the last entry are padding (y = 0).
            As in flash-attn they are trusted on CUDA (checking them would synchronise);
            CPU tensors are checked.
        max_seqlen_q, max_seqlen_k: accepted for flash-attn compatibility; not needed.
        block_pattern: None (every block of the pack) or a bool pattern over the pack,
            ``[1, H|Hkv|1, ceil(Tq / block_size), ceil(Tk / block_size)]`` in pack
            coordinates, ANDed with the sequences (e.g. to drop far blocks).
        sequence_pattern: None or a bool pattern per sequence in the sequence's own
            coordinates, ``[S, H|Hkv|1, a, b]`` with a >= ceil(longest query sequence /
            block_size), b likewise for keys: query i and key j of sequence s meet only when
            block (i // block_size, j // block_size) of its pattern is active (i, j counted
            from the sequence's start). Exact per token whatever the sequence offsets (pack
            blocks a sequence block cuts carry bits); ANDed with block_pattern, the causal
            rule and the window. Building it synchronises with the device once per call.
        block_size: tile of the pack's block lists, and the block of sequence_pattern
            (default 128).
        is_causal: False, True (top-left inside each sequence: query i of a sequence sees its
            keys j <= i) or "bottom_right" (flash-attn's alignment when a sequence has fewer
            queries than keys: query i sees keys j <= i + Lk - Lq of its sequence).
        window_size: (left, right) per sequence, flash-attn's convention (-1 unbounded),
            centred on that sequence's causal diagonal (bottom-right unless is_causal=True).
        sink_tokens: with a window, the first keys of each sequence stay visible.
        scale: softmax scale, default 1 / sqrt(Dk).
        return_lse: also return lse [H, Tq] (flash-attn's varlen layout; float32, float64
            for f64), differentiable.
        backend: None (automatic), "triton", "cpu" or "reference".
        softcap, sinks: score modifiers as in ``block_sparse_attention``; alibi_slopes
            float32 [H] (one slope per head, for every sequence), distances measured inside
            each sequence from its causal diagonal (bottom-right unless is_causal=True).
        bias: additive score bias in pack coordinates, broadcastable to [1, H, Tq, Tk]
            (e.g. [H, Tq, Tk], or [1, 1, 1, Tk] per key); only pairs inside a sequence are
            ever read. Differentiable as in ``block_sparse_attention``.

    Returns:
        y [Tq, H, Dv] (and lse [H, Tq] when return_lse).

    Example:
        >>> cu = torch.tensor([0, 17, 145, 1145], dtype=torch.int32)      # 3 sequences
        >>> q = torch.randn(1145, 8, 64); k = v = torch.randn(1145, 2, 64)
        >>> y = block_sparse_attention_varlen(q, k, v, cu, cu, is_causal=True)
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise InvalidProblem(
                f"{name} has shape {tuple(getattr(t, 'shape', ()))}; expected 3 dims [T, heads, "
                f"D] (a packed varlen batch, flash-attn's layout).")
    is_causal = causal_mode(is_causal)
    Tq, Tk = q.shape[0], k.shape[0]
    cu_q = _cu_seqlens(cu_seqlens_q, "cu_seqlens_q", Tq, q.device)
    cu_k = _cu_seqlens(cu_seqlens_k, "cu_seqlens_k", Tk, q.device)
    if cu_q.shape != cu_k.shape:
        raise InvalidProblem(
            f"cu_seqlens_q has {cu_q.numel() - 1} sequences and cu_seqlens_k "
            f"{cu_k.numel() - 1}; expected one count (sequence s: its queries and its keys).")
    check_block_size(block_size)
    window = (-1, -1) if window_size is None else check_window(window_size, sink_tokens)[0]
    if alibi_slopes is not None and (not isinstance(alibi_slopes, torch.Tensor)
                                     or alibi_slopes.dim() != 1):
        raise InvalidProblem(
            f"alibi_slopes has shape {tuple(getattr(alibi_slopes, 'shape', ()))}; expected "
            f"[{q.shape[1]}] (one slope per head) for a varlen pack.")
    # Positions inside each sequence when a rule measures them: the causal rule's alignment,
    # else bottom-right (the window's and ALiBi's diagonal without is_causal=True).
    positioned = bool(is_causal) or window != (-1, -1) or alibi_slopes is not None
    alignment = is_causal if is_causal else "bottom_right"
    tokens = pack_token_rules(cu_q, cu_k, Tq, Tk, alignment if positioned else False)
    nq, nk = -(-Tq // block_size), -(-Tk // block_size)
    if sequence_pattern is not None:
        seq_pattern, bits = _sequence_pattern(sequence_pattern, cu_q, cu_k, Tq, Tk, block_size,
                                              q.shape[1], k.shape[1])
        tokens = TokenRules(tokens.q_ids, tokens.k_ids, tokens.q_pos, tokens.k_pos,
                            bits.for_block_size(kernel_block_size(block_size, Tq, Tk)))
        block_pattern = seq_pattern if block_pattern is None else \
            _and_patterns(block_pattern, seq_pattern, nq, nk)
    if block_pattern is None:
        block_pattern = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=q.device)
    q4, k4, v4 = (t.permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))
    out = block_sparse_attention(
        q4, k4, v4, block_pattern, block_size=block_size, is_causal=is_causal, scale=scale,
        return_lse=return_lse, backend=backend, window_size=window, sink_tokens=sink_tokens,
        token_rules=tokens, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
        bias=bias)
    if return_lse:
        y, lse = out
        return y[0].transpose(0, 1), lse[0]
    return out[0].transpose(0, 1)


def pack_token_rules(cu_q: torch.Tensor, cu_k: torch.Tensor, Tq: int, Tk: int,
                     is_causal) -> TokenRules:
    """The TokenRules of a pack: sequence index as document id (tokens past the last
    sequence: padding), and, unless ``is_causal`` is False, positions that give each
    sequence its own diagonal: with the pack's own offset G (0 when is_causal is True, else
    Tk - Tq: what the kernels add) query t of sequence s sits at t - cu_q[s] + A_s - G and
    key t at t - cu_k[s], with A_s = Lk_s - Lq_s for bottom-right alignment, 0 top-left."""
    n_seq = cu_q.numel() - 1
    seq_q, idx_q = _sequence_positions(cu_q, Tq)
    seq_k, idx_k = _sequence_positions(cu_k, Tk)
    q_ids = torch.where(seq_q < n_seq, seq_q, -1).to(torch.int32)[None].contiguous()
    k_ids = torch.where(seq_k < n_seq, seq_k, -2).to(torch.int32)[None].contiguous()
    if is_causal is False:
        return TokenRules(q_ids, k_ids)
    sq = seq_q.clamp(max=max(n_seq - 1, 0))
    lq, lk = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    align = (lk - lq) if is_causal != True else torch.zeros_like(lq)  # noqa: E712
    G = 0 if is_causal is True else Tk - Tq
    q_pos = idx_q + align[sq] - G if n_seq else idx_q
    k_pos = idx_k
    return TokenRules(q_ids, k_ids, q_pos.to(torch.int32)[None].contiguous(),
                      k_pos.to(torch.int32)[None].contiguous())


def _sequence_pattern(pattern, cu_q, cu_k, Tq: int, Tk: int, block_size: int, H: int,
                      Hkv: int):
    """(pack pattern [1, Hp, nq, nk], BlockBits) of a per-sequence pattern (one host sync)."""
    n_seq = cu_q.numel() - 1
    seq_q, pos_q = _sequence_positions(cu_q, Tq)
    seq_k, pos_k = _sequence_positions(cu_k, Tk)
    longest_q = int((cu_q[1:] - cu_q[:-1]).max()) if n_seq else 0
    longest_k = int((cu_k[1:] - cu_k[:-1]).max()) if n_seq else 0
    pattern = check_sequence_pattern(pattern, n_seq, pattern_head_counts(H, Hkv),
                                     -(-longest_q // block_size), -(-longest_k // block_size),
                                     cu_q.device)
    return sequence_pattern_rules(pattern, seq_q, seq_k, pos_q, pos_k, block_size)


def _sequence_positions(cu: torch.Tensor, total: int):
    """(sequence of every token (S past the last sequence), index inside it), int64."""
    t = torch.arange(total, device=cu.device, dtype=torch.int64)
    seq = torch.searchsorted(cu[1:], t, right=True)
    start = cu[seq.clamp(max=max(cu.numel() - 2, 0))] if cu.numel() > 1 else torch.zeros_like(t)
    return seq, t - start


def _and_patterns(block_pattern, seq_pattern: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
    """The pack-level block pattern AND the sequences' pack pattern (heads broadcast)."""
    if not isinstance(block_pattern, torch.Tensor) or block_pattern.dim() != 4 \
            or tuple(block_pattern.shape[2:]) != (nq, nk) or block_pattern.shape[0] != 1:
        raise InvalidProblem(
            f"block_pattern has shape {tuple(getattr(block_pattern, 'shape', ()))}; expected "
            f"[1, heads, {nq}, {nk}] (pack blocks) with a sequence_pattern.")
    hb, hs = block_pattern.shape[1], seq_pattern.shape[1]
    if hb != hs and 1 not in (hb, hs):
        raise InvalidProblem(
            f"block_pattern has {hb} heads and sequence_pattern {hs}; expected equal head "
            f"counts, or 1 for either (broadcast).")
    return block_pattern.to(device=seq_pattern.device, dtype=torch.bool) & seq_pattern


def _cu_seqlens(cu, name: str, total: int, device) -> torch.Tensor:
    """int64 [S + 1] on ``device``; checked when given on the CPU (no synchronisation)."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1 \
            or cu.dtype not in (torch.int32, torch.int64):
        raise InvalidProblem(
            f"{name} is {getattr(cu, 'dtype', type(cu).__name__)} of shape "
            f"{tuple(getattr(cu, 'shape', ()))}; expected an int32/int64 tensor [S + 1] of "
            f"cumulative sequence lengths starting at 0.")
    if cu.device.type == "cpu":
        bad = int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) > total
        if bad:
            raise InvalidProblem(
                f"{name} is {cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''}; expected 0 "
                f"first, non-decreasing, last entry <= {total} (the packed length).")
    return cu.to(device=device, dtype=torch.int64)
