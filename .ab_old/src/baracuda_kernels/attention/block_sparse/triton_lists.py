"""One Triton launch that builds the compacted block lists of a raw block pattern.

Same result as ``block_lists.classify_blocks`` + ``_compact`` in both directions, which take
a chain of ~15 torch ops per call: at low density that host time costs more than the
attention itself. Here one launch, with no host synchronisation (so it can be captured in a
CUDA graph), writes (all int32, contiguous):

* rows (forward): per (b, h, query block), ``kv_index [Bp, Hp, nq, nk]`` holds the FULL key
  blocks ascending, then the PARTIAL key blocks ascending; ``kv_count_full`` /
  ``kv_count [Bp, Hp, nq]`` count FULL and FULL + PARTIAL. Entries at positions >= count
  are left unwritten (unspecified).
* columns (backward): per (b, h, key block), ``q_index [Bp, Hp, nk, nq]`` with the query
  blocks in the same order, and ``q_count_full`` / ``q_count [Bp, Hp, nk]``.

Grid ``(Bp*Hp*(nq + nk),)``: the first Bp*Hp*nq programs own one row each, the rest one
column each. A program walks its line in chunks of ``CHUNK`` cells, twice: walk 1 counts the
FULL and PARTIAL cells; walk 2 gives each cell its slot (FULL: running FULL count + inclusive
cumsum - 1; PARTIAL: the same, offset by the line's FULL total) and scatters it with a masked
store. A cell is classified identically by its row and its column program.

Class rules (block x covers tokens [x*bs, min((x+1)*bs, len)); it is ragged when
(x+1)*bs > len; causal is top-left: query i sees key j iff j <= i):

* SKIP: pattern cell zero, or causal and k_first > q_last (block above the diagonal).
* FULL: active, neither block ragged, and (causal) k_last <= q_first: every pair allowed.
* PARTIAL: every other active cell (the diagonal crosses it, or it touches a ragged tail).

In block indices (qb, kb) these are exact integer identities, so the kernel needs no token
arithmetic (the launcher does the divisions in Python integers, which cannot overflow):
ragged <=> x >= len // bs; k_first > q_last <=> kb > qb (q_last lies in [qb*bs, qb*bs+bs-1]);
k_last <= q_first (k not ragged) <=> kb*bs + bs - 1 <= qb*bs <=> kb + lag <= qb, with
lag = 0 for bs = 1 and 1 otherwise. So along a line the live cells form one index range and
the FULL-eligible cells a sub-range of it: per line, four scalar bounds. A causal line only
walks its live range (about half the cells). Row programs read the pattern along its last
dim (coalesced for a contiguous pattern); column programs read with the row stride.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["build_block_lists_triton"]

_DEFAULT_CHUNK = 256

# A cell's class as a packed code: FULL = 1, PARTIAL = 1 << 16, SKIP = 0. One cumsum of the
# codes then ranks the FULL cells (low half) and the PARTIAL cells (high half) of a chunk;
# a chunk holds at most 2^14 cells (launcher), so neither half overflows.
_PARTIAL_CODE = tl.constexpr(1 << 16)


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _classify_chunk(line_ptr, stride_walk, c0, live_hi, full_lo, full_hi, CHUNK: tl.constexpr):
    """Cells ``c0 .. c0+CHUNK-1`` of one line: (their index int32, packed class code int32).

    Only cells in [c0, live_hi) are read: the others (past the line, or above the causal
    diagonal) are SKIP whatever the pattern says. FULL-eligible: index in [full_lo, full_hi).
    Every comparison is vector-vs-scalar on purpose: under Triton's interpreter (3.9), `&` of
    a scalar int1 and a vector int1 yields int32 data, which tl.store rejects as a mask."""
    walk = c0 + tl.arange(0, CHUNK)
    pat = tl.load(line_ptr + walk.to(tl.int64) * stride_walk, mask=walk < live_hi, other=0)
    full = (walk >= full_lo) & (walk < full_hi)
    code = tl.where(full, 1, _PARTIAL_CODE)
    return walk, tl.where(pat != 0, code, 0)


@triton.jit
def _build_line(line_ptr, stride_walk, n_walk, live_lo, live_hi, full_lo, full_hi,
                INDEX, COUNT_FULL, COUNT, line, CHUNK: tl.constexpr):
    """Compact one line (``line`` = its flat index in the count arrays): FULL then PARTIAL."""
    # Walk 1 counts: the PARTIAL cells start after every FULL one of the whole line.
    n_full = tl.zeros((), dtype=tl.int32)
    n_part = tl.zeros((), dtype=tl.int32)
    for c0 in range(live_lo, live_hi, CHUNK):
        walk, code = _classify_chunk(line_ptr, stride_walk, c0, live_hi, full_lo, full_hi, CHUNK)
        total = tl.sum(code, 0)
        n_full += total & 0xFFFF
        n_part += total >> 16
    tl.store(COUNT_FULL + line, n_full)
    tl.store(COUNT + line, n_full + n_part)
    # Walk 2 places the cells (re-reading the pattern is cheaper than staging the classes);
    # empty lines, common at low density, skip it.
    if n_full + n_part > 0:
        out = INDEX + line.to(tl.int64) * n_walk
        full_seen = tl.zeros((), dtype=tl.int32)
        part_slot0 = n_full
        for c0 in range(live_lo, live_hi, CHUNK):
            walk, code = _classify_chunk(line_ptr, stride_walk, c0, live_hi, full_lo, full_hi,
                                         CHUNK)
            rank = tl.cumsum(code, 0)   # inclusive: a cell's own class counts
            slot = tl.where(code == 1, full_seen + (rank & 0xFFFF), part_slot0 + (rank >> 16))
            tl.store(out + (slot - 1), walk, mask=code != 0)
            total = tl.sum(code, 0)
            full_seen += total & 0xFFFF
            part_slot0 += total >> 16


@triton.jit
def _block_lists_kernel(
    P, stride_pb, stride_ph, stride_pq, stride_pk,
    KV_INDEX, KV_COUNT_FULL, KV_COUNT, Q_INDEX, Q_COUNT_FULL, Q_COUNT,
    Hp, nq, nk, n_rows, nq_even, nk_even, lag,
    IS_CAUSAL: tl.constexpr, CHUNK: tl.constexpr,
):
    """Grid (Bp*Hp*(nq + nk),): programs < n_rows = Bp*Hp*nq build a row (a query block's
    key list), the others a column (a key block's query list). P: uint8 cells, any strides
    (stride 0 on broadcast dims is fine: those dims have size 1 and index 0).
    nq_even / nk_even: number of non-ragged query / key blocks; lag: see module docstring."""
    pid = tl.program_id(0)
    if pid < n_rows:
        bh = pid // nq
        qb = pid - bh * nq
        base = ((bh // Hp).to(tl.int64) * stride_pb + (bh % Hp).to(tl.int64) * stride_ph
                + qb.to(tl.int64) * stride_pq)
        if IS_CAUSAL:
            live_hi = tl.minimum(qb + 1, nk)            # kb <= qb
            full_hi = tl.minimum(qb + 1 - lag, nk_even)  # kb + lag <= qb
        else:
            live_hi = nk
            full_hi = nk_even
        full_hi = tl.where(qb < nq_even, full_hi, 0)     # a ragged query block has no FULL
        _build_line(P + base, stride_pk, nk, 0, live_hi, 0, full_hi,
                    KV_INDEX, KV_COUNT_FULL, KV_COUNT, pid, CHUNK)
    else:
        line = pid - n_rows
        bh = line // nk
        kb = line - bh * nk
        base = ((bh // Hp).to(tl.int64) * stride_pb + (bh % Hp).to(tl.int64) * stride_ph
                + kb.to(tl.int64) * stride_pk)
        if IS_CAUSAL:
            live_lo = kb               # qb >= kb
            full_lo = kb + lag         # qb >= kb + lag
        else:
            live_lo = 0
            full_lo = 0
        full_hi = tl.where(kb < nk_even, nq_even, 0)     # a ragged key block has no FULL
        _build_line(P + base, stride_pq, nq, live_lo, nq, full_lo, full_hi,
                    Q_INDEX, Q_COUNT_FULL, Q_COUNT, line, CHUNK)


# --------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------


def build_block_lists_triton(pattern: torch.Tensor, query_len: int, key_len: int,
                             block_size: int, is_causal: bool, *,
                             chunk: int | None = None) -> tuple[torch.Tensor, ...]:
    """Build both block-list directions of ``pattern`` in one launch, no host synchronisation.

    Args:
        pattern: bool or uint8 ``[Bp, Hp, nq, nk]`` (nq = ceil(query_len / block_size),
            nk = ceil(key_len / block_size)), any strides (broadcast, transposed views);
            non-zero = active. Read in place, never copied.
        query_len, key_len: token counts; block_size: tokens per pattern block (>= 1).
        is_causal: top-left causal mask (query i sees key j iff j <= i).
        chunk: cells per loop step, a power of two (tests force small ones); None picks
            the next power of two of the longest line, between 16 and 256.
    Returns:
        (kv_index, kv_count_full, kv_count, q_index, q_count_full, q_count), int32,
        contiguous, on pattern.device; see the module docstring.
    """
    if pattern.dim() != 4:
        raise ValueError(f"build_block_lists_triton: pattern must be 4-D, "
                         f"got {tuple(pattern.shape)}")
    if block_size < 1:
        raise ValueError(f"build_block_lists_triton: block_size must be >= 1, got {block_size}")
    Bp, Hp, nq, nk = pattern.shape
    if (nq, nk) != (-(-query_len // block_size), -(-key_len // block_size)):
        raise ValueError(f"build_block_lists_triton: pattern {tuple(pattern.shape)} does not "
                         f"match query_len={query_len}, key_len={key_len}, block={block_size}")
    if pattern.dtype == torch.bool:
        # Same element size: one uint8 specialisation serves both dtypes, without a copy.
        pattern = pattern.view(torch.uint8)
    elif pattern.dtype != torch.uint8:
        raise TypeError(f"build_block_lists_triton: pattern must be bool or uint8, "
                        f"got {pattern.dtype}")

    if chunk is None:
        # Short lines get a small chunk (few lanes idle); long ones loop over 256-cell steps.
        chunk = min(_DEFAULT_CHUNK, max(16, triton.next_power_of_2(max(nq, nk, 1))))
    if chunk < 1 or chunk & (chunk - 1) or chunk > 2**14:
        raise ValueError(f"build_block_lists_triton: chunk must be a power of two <= 2^14, "
                         f"got {chunk}")

    dev = pattern.device
    i32 = dict(dtype=torch.int32, device=dev)
    kv_index = torch.empty(Bp, Hp, nq, nk, **i32)
    q_index = torch.empty(Bp, Hp, nk, nq, **i32)
    if Bp * Hp * nq * nk == 0:
        # Every line is empty (or there are no lines): zero counts, nothing to launch.
        return (kv_index, torch.zeros(Bp, Hp, nq, **i32), torch.zeros(Bp, Hp, nq, **i32),
                q_index, torch.zeros(Bp, Hp, nk, **i32), torch.zeros(Bp, Hp, nk, **i32))
    kv_count_full, kv_count = torch.empty(Bp, Hp, nq, **i32), torch.empty(Bp, Hp, nq, **i32)
    q_count_full, q_count = torch.empty(Bp, Hp, nk, **i32), torch.empty(Bp, Hp, nk, **i32)

    n_rows = Bp * Hp * nq
    n_programs = n_rows + Bp * Hp * nk
    if n_programs >= 2**31:
        raise RuntimeError("build_block_lists_triton: grid over 2^31 programs")

    args = (pattern, *pattern.stride(),
            kv_index, kv_count_full, kv_count, q_index, q_count_full, q_count,
            Hp, nq, nk, n_rows, query_len // block_size, key_len // block_size,
            0 if block_size == 1 else 1)
    launch = _block_lists_kernel[(n_programs,)]
    kwargs = dict(IS_CAUSAL=bool(is_causal), CHUNK=chunk, num_warps=max(1, min(4, chunk // 64)))
    if dev.type == "cuda":
        # Triton launches on the current device: make it the pattern's.
        with torch.cuda.device(dev):
            launch(*args, **kwargs)
    else:
        launch(*args, **kwargs)
    return kv_index, kv_count_full, kv_count, q_index, q_count_full, q_count
