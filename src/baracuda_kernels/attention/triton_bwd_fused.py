"""Fused Triton backward: dK, dV and dQ in one pass, deterministic without a second sweep.

The two-kernel backward (``triton_bwd``) recomputes ``Q K^T`` and ``dY V^T`` in its dQ
kernel: 7 matmuls per block pair. Here the dK/dV program of a key tile also forms its share
of dQ (``dS K``) and adds it into an f32 (f64) buffer per query tile: 5 matmuls. Floating
point addition is not associative, so the additions into one query tile take turns in a
fixed order, enforced by a counter per (query tile, chain):

* ``BlockLists.dq_order`` ranks every (key block, query block) pair in one of two chains
  of its query block (key blocks at or below it / above it, each in descending key order)
  and gives where each key block's walk starts.
* A program waits until the counter equals its rank, adds (or stores, rank 0), then bumps
  the counter. Programs take work tickets from an atomic counter in ascending order and
  every wait is on a ticket handed out earlier (a higher key tile of the same head), so
  all waited-on programs are already running: no deadlock, whatever the grid size.
* Each key block walks its query blocks upward from its own diagonal (wrapping around):
  in dense, causal and banded patterns that is exactly the chain order, so turns arrive
  in sequence and programs rarely wait.
* ``_dq_finish_kernel`` adds the two chains and writes dQ in the input dtype.

Layout of the workspace: ``acc[chain, b*h, row, d]`` (rows padded to whole pattern blocks,
d to the power-of-two tile) and ``locks[chain, b*h, query tile]`` plus one ticket counter.
Used when the tiles divide the pattern block (block sizes 16, 32, 64, 128, 256...).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_bwd import _list_step, _load_2d


@triton.jit
def _wait_turn(lock, arrivals, SPIN_ASM: tl.constexpr):
    """Spin until ``*lock >= arrivals`` with acquire semantics in every thread; returns the
    value seen (callers make their buffer writes depend on it, so no compiler pass can
    move them above the wait)."""
    if SPIN_ASM:
        seen = tl.inline_asm_elementwise(
            asm="""{
            .reg .pred not_yet;
            WAIT_TURN:
            ld.global.acquire.gpu.b32 $0, [$1];
            setp.lt.s32 not_yet, $0, $2;
            @not_yet bra WAIT_TURN;
            }""",
            constraints="=r,l,r", args=[lock, arrivals], dtype=tl.int32, is_pure=False, pack=1)
    else:  # interpreter: programs run one after another, so the turn has come already
        seen = tl.atomic_add(lock, 0, sem="acquire")
        while seen < arrivals:
            seen = tl.atomic_add(lock, 0, sem="acquire")
    return seen


@triton.jit
def _pass_turn(lock, NUM_WARPS: tl.constexpr, SPIN_ASM: tl.constexpr):
    """Publish this program's buffer writes: every warp adds 1 to ``*lock`` (release) once
    all its lanes' writes are fenced, so the next program waits for NUM_WARPS arrivals.
    (A CTA-wide barrier would do with one add, but a barrier in the loop stops Triton from
    pipelining its loads.)"""
    if SPIN_ASM:
        tl.inline_asm_elementwise(
            asm="""{
            .reg .pred leader;
            .reg .b32 lane;
            fence.acq_rel.gpu;
            bar.warp.sync 0xffffffff;
            mov.u32 lane, %laneid;
            setp.eq.u32 leader, lane, 0;
            @leader red.release.gpu.global.add.s32 [$1], 1;
            mov.u32 $0, 0;
            }""",
            constraints="=r,l", args=[lock], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.atomic_add(lock, NUM_WARPS, sem="release")


@triton.jit
def _position(e, n_full, n_all, shift, ROTATE: tl.constexpr):
    """List position of the e-th visited entry. ROTATE: start at ``shift`` and wrap (the
    first query block at or after the diagonal). Otherwise (causal) entries go in list
    order with the diagonal entry, visited apart at ``n_full``, skipped when shift = 1."""
    if ROTATE:
        p = e + shift
        p = tl.where(p >= n_all, p - n_all, p)
    else:
        p = tl.where(e >= n_full, e + shift, e)
    return p


@triton.jit
def _fused_walk(
    dk, dv, k, v, key_ok, q_base, dy_base, lse_base, delta_base, list_row, rank_row,
    e_lo, e_hi, n_full, n_all, shift, kb, rank_in_block, lock_base, acc_base,
    lock_chain_stride, acc_chain_stride, stride_qn, stride_gn, offs_n, Nq, qk_scale,
    BS: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    SUBS_M: tl.constexpr, TILES_N: tl.constexpr, CHECK_ROWS: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, KEY_MASK: tl.constexpr, ROTATE: tl.constexpr,
    IS_F64: tl.constexpr, PRECISION: tl.constexpr, SPIN_ASM: tl.constexpr,
    NUM_WARPS: tl.constexpr,
):
    """Visit entries e_lo..e_hi of one key tile's walk: accumulate dK, dV; add dQ in turn.

    Query rows past Nq load q = dy = 0 and lse2 = +inf (P = 0 exactly); key rows past Nk
    (KEY_MASK) get P = 0 by mask, since their dS would multiply k = 0 into dQ (0 * inf).
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ok = offs_dk < D_K
    dv_ok = offs_dv < D_V
    # dQ^T tile addresses inside one query tile of the buffer ([row, d] row-major).
    acc_tile = offs_m0[None, :] * BLOCK_DK + offs_dk[:, None]
    it_lo = e_lo * SUBS_M
    it_hi = e_hi * SUBS_M
    # Next entry (query block and its chain rank) loaded one step ahead, so addresses
    # never wait on a load of the same iteration.
    pos = _position(e_lo, n_full, n_all, shift, ROTATE)
    nxt_qb = tl.load(list_row + pos, mask=it_lo < it_hi, other=0)
    nxt_rank = tl.load(rank_row + pos, mask=it_lo < it_hi, other=0)
    for it in range(it_lo, it_hi):
        qb = nxt_qb
        rank = nxt_rank * TILES_N + rank_in_block
        pos = _position((it + 1) // SUBS_M, n_full, n_all, shift, ROTATE)
        nxt_qb = tl.load(list_row + pos, mask=it + 1 < it_hi, other=0)
        nxt_rank = tl.load(rank_row + pos, mask=it + 1 < it_hi, other=0)

        offs_m, row_ok = _list_step(qb, it, offs_m0, Nq, BS, BLOCK_M, SUBS_M, CHECK_ROWS)
        rows = offs_m.to(tl.int64)[:, None]
        q = _load_2d(q_base + rows * stride_qn + offs_dk[None, :], row_ok, dk_ok,
                     CHECK_ROWS, BLOCK_DK != D_K)
        dy = _load_2d(dy_base + rows * stride_gn + offs_dv[None, :], row_ok, dv_ok,
                      CHECK_ROWS, BLOCK_DV != D_V)
        if CHECK_ROWS:
            lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            lse2 = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION, out_dtype=dk.dtype)
        if IS_F64:
            p_t = tl.exp(qk_t * qk_scale - lse2[None, :])
        else:
            p_t = tl.exp2(qk_t * qk_scale - lse2[None, :])
        if CAUSAL_MASK:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :], p_t, 0.0)
        if KEY_MASK:
            p_t = tl.where(key_ok[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(dy.dtype), dy, dv, input_precision=PRECISION, out_dtype=dv.dtype)
        dp_t = tl.dot(v, tl.trans(dy), input_precision=PRECISION, out_dtype=dk.dtype)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION, out_dtype=dk.dtype)
        # dQ^T share [BLOCK_DK, BLOCK_M]: the long dim (d) is the MMA's M.
        dq_t = tl.dot(tl.trans(k), ds_t, input_precision=PRECISION, out_dtype=dk.dtype)

        upper = (qb < kb).to(tl.int64)
        q_tile = qb.to(tl.int64) * SUBS_M + (it % SUBS_M)
        lock = lock_base + upper * lock_chain_stride + q_tile
        acc = acc_base + upper * acc_chain_stride + q_tile * (BLOCK_M * BLOCK_DK) + acc_tile
        seen = _wait_turn(lock, rank * NUM_WARPS, SPIN_ASM)
        # Rank 0 stores, later ranks add in place (red.global: no read back into registers,
        # and the turn order keeps the sum reproducible). Masks tied to the value the wait
        # returned keep both after it; one compare per element builds them.
        turn = seen >= rank * NUM_WARPS
        first = tl.where(turn, tl.where(rank == 0, BLOCK_M * BLOCK_DK, 0), 0)
        later = tl.where(turn, tl.where(rank > 0, BLOCK_M * BLOCK_DK, 0), 0)
        tl.store(acc, dq_t, mask=acc_tile < first)
        tl.atomic_add(acc, dq_t, mask=acc_tile < later, sem="relaxed", scope="gpu")
        _pass_turn(lock, NUM_WARPS, SPIN_ASM)
    return dk, dv


@triton.jit
def _bwd_fused_kernel(
    Q, K, V, DY, LSE2, DELTA, DK, DV, SCALE64, ACC, LOCKS,
    Q_INDEX, Q_COUNT_FULL, Q_COUNT, DQ_RANK, DQ_START,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_ib, stride_ih, stride_ir,
    stride_cb, stride_ch,
    H, BH, n_tiles, n_q_tiles, rows_pad, Nq, Nk, scale, qk_scale,
    BS: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SUBS_M: tl.constexpr, TILES_N: tl.constexpr,
    RAGGED_Q: tl.constexpr, RAGGED_K: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_F64: tl.constexpr, PRECISION: tl.constexpr,
    SPIN_ASM: tl.constexpr, NUM_WARPS: tl.constexpr,
):
    """Grid (B*H*n_tiles,): one key tile each. Work goes by ticket (the last slot of LOCKS):
    (b, h)-major, and within a head the last key tile first (see the module docstring)."""
    ticket = tl.atomic_add(LOCKS + 2 * BH * n_q_tiles, 1)
    bh = ticket // n_tiles
    tile = n_tiles - 1 - (ticket - bh * n_tiles)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    kb = tile // TILES_N
    rank_in_block = TILES_N - 1 - tile % TILES_N
    offs_n = kb * BS + (tile % TILES_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n.to(tl.int64)[:, None]
    key_ok = offs_n < Nk
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ok = offs_dk < D_K
    dv_ok = offs_dv < D_V

    if IS_F64:
        scale = tl.load(SCALE64)
        qk_scale = scale
    k = tl.load(K + b * stride_kb + h * stride_kh + rows * stride_kn + offs_dk[None, :],
                mask=key_ok[:, None] & dk_ok[None, :], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + rows * stride_vn + offs_dv[None, :],
                mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
    if IS_F64:
        dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float64)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float64)
    else:
        dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    list_off = b * stride_ib + h * stride_ih + kb.to(tl.int64) * stride_ir
    list_row = Q_INDEX + list_off
    rank_row = DQ_RANK + list_off
    count_off = b * stride_cb + h * stride_ch + kb
    n_full = tl.load(Q_COUNT_FULL + count_off)
    n_all = tl.load(Q_COUNT + count_off)
    q_base = Q + b * stride_qb + h * stride_qh
    dy_base = DY + b * stride_gb + h * stride_gh
    lse_base = LSE2 + bh.to(tl.int64) * Nq
    delta_base = DELTA + bh.to(tl.int64) * Nq
    lock_base = LOCKS + bh.to(tl.int64) * n_q_tiles
    acc_base = ACC + bh.to(tl.int64) * rows_pad * BLOCK_DK
    lock_chain = BH.to(tl.int64) * n_q_tiles
    acc_chain = BH.to(tl.int64) * rows_pad * BLOCK_DK

    if IS_CAUSAL:
        # The diagonal block (the only one the causal mask cuts) comes first in the walk:
        # it is the first PARTIAL entry when listed, and the lowest query block.
        has_diag = n_all > n_full
        if has_diag:
            has_diag = tl.load(list_row + n_full) == kb
        shift = has_diag.to(tl.int32)
        dk, dv = _fused_walk(
            dk, dv, k, v, key_ok, q_base, dy_base, lse_base, delta_base, list_row, rank_row,
            n_full, n_full + shift, n_full, n_all, 0, kb, rank_in_block, lock_base, acc_base,
            lock_chain, acc_chain, stride_qn, stride_gn, offs_n, Nq, qk_scale,
            BS, D_K, D_V, BLOCK_DK, BLOCK_DV, BLOCK_M, SUBS_M, TILES_N, RAGGED_Q,
            CAUSAL_MASK=True, KEY_MASK=RAGGED_K, ROTATE=False, IS_F64=IS_F64,
            PRECISION=PRECISION, SPIN_ASM=SPIN_ASM, NUM_WARPS=NUM_WARPS)
        dk, dv = _fused_walk(
            dk, dv, k, v, key_ok, q_base, dy_base, lse_base, delta_base, list_row, rank_row,
            0, n_all - shift, n_full, n_all, shift, kb, rank_in_block, lock_base, acc_base,
            lock_chain, acc_chain, stride_qn, stride_gn, offs_n, Nq, qk_scale,
            BS, D_K, D_V, BLOCK_DK, BLOCK_DV, BLOCK_M, SUBS_M, TILES_N, RAGGED_Q,
            CAUSAL_MASK=False, KEY_MASK=RAGGED_K, ROTATE=False, IS_F64=IS_F64,
            PRECISION=PRECISION, SPIN_ASM=SPIN_ASM, NUM_WARPS=NUM_WARPS)
    else:
        # No element masks: ragged rows and keys are handled by RAGGED_Q / RAGGED_K.
        start = tl.load(DQ_START + count_off)
        dk, dv = _fused_walk(
            dk, dv, k, v, key_ok, q_base, dy_base, lse_base, delta_base, list_row, rank_row,
            0, n_all, n_full, n_all, start, kb, rank_in_block, lock_base, acc_base,
            lock_chain, acc_chain, stride_qn, stride_gn, offs_n, Nq, qk_scale,
            BS, D_K, D_V, BLOCK_DK, BLOCK_DV, BLOCK_M, SUBS_M, TILES_N, RAGGED_Q,
            CAUSAL_MASK=False, KEY_MASK=RAGGED_K, ROTATE=True, IS_F64=IS_F64,
            PRECISION=PRECISION, SPIN_ASM=SPIN_ASM, NUM_WARPS=NUM_WARPS)

    dk = dk * scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + rows * stride_dkn + offs_dk[None, :],
             dk.to(DK.dtype.element_ty), mask=key_ok[:, None] & dk_ok[None, :])
    tl.store(DV + b * stride_dvb + h * stride_dvh + rows * stride_dvn + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None] & dv_ok[None, :])


@triton.jit
def _dq_finish_kernel(
    ACC, LOCKS, DQ, SCALE64, stride_qb, stride_qh, stride_qn,
    H, BH, n_q_tiles, rows_pad, n_row_tiles, Nq, scale,
    D_K: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    TWO_CHAINS: tl.constexpr, IS_F64: tl.constexpr,
):
    """dQ = scale * (lower chain + upper chain); a chain no key block added to counts 0.
    Grid (B*H*n_row_tiles,)."""
    bh = tl.program_id(0) // n_row_tiles
    r0 = (tl.program_id(0) - bh * n_row_tiles) * BLOCK_R
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_DK)
    row_ok = offs_r < Nq
    lock = LOCKS + bh.to(tl.int64) * n_q_tiles + offs_r // BLOCK_M
    acc = ACC + bh.to(tl.int64) * rows_pad * BLOCK_DK + offs_r[:, None] * BLOCK_DK + offs_d[None, :]
    used = tl.load(lock, mask=row_ok, other=0) > 0
    dq = tl.load(acc, mask=used[:, None], other=0.0)
    if TWO_CHAINS:
        used = tl.load(lock + BH.to(tl.int64) * n_q_tiles, mask=row_ok, other=0) > 0
        dq += tl.load(acc + BH.to(tl.int64) * rows_pad * BLOCK_DK, mask=used[:, None],
                      other=0.0)
    if IS_F64:
        scale = tl.load(SCALE64)
    dq = dq * scale
    tl.store(DQ + b * stride_qb + h * stride_qh + offs_r.to(tl.int64)[:, None] * stride_qn
             + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D_K))


def fused_tiles_fit(block_size: int, block_n: int, block_m: int) -> bool:
    """The fused kernel needs tiles that divide the pattern block (after clipping)."""
    tn = min(block_n, max(16, triton.next_power_of_2(block_size)))
    tm = min(block_m, max(16, triton.next_power_of_2(block_size)))
    return block_size % tn == 0 and block_size % tm == 0


def launch_fused(q, k, v, dy, lse2, delta, lists, dq, dk, dv, scale64, *, block_size, scale,
                 qk_scale, is_causal, precision, block_n, block_m, num_warps, num_stages,
                 bhn, list_strides) -> None:
    """dK, dV and dQ with the fused kernel (inputs checked; delta / lse2 precomputed).

    ``bhn(t)`` gives the (b, h, n) strides of a tensor, ``list_strides(index, count)`` the
    strides of the block lists with 0 on broadcast dims (the two-kernel launcher's helpers).
    """
    B, H, Nq, Dk = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    BH = B * H
    block_dk = max(16, triton.next_power_of_2(Dk))
    block_dv = max(16, triton.next_power_of_2(Dv))
    bn = min(block_n, max(16, triton.next_power_of_2(block_size)))
    bm = min(block_m, max(16, triton.next_power_of_2(block_size)))
    nq, nk = -(-Nq // block_size), -(-Nk // block_size)
    tiles_n, subs_m = block_size // bn, block_size // bm
    rows_pad = nq * block_size
    n_q_tiles = nq * subs_m
    two_chains = not is_causal  # causal: no key block lies above its query block
    dev = q.device
    acc = torch.empty((2 if two_chains else 1, BH, rows_pad, block_dk), dtype=delta.dtype,
                      device=dev)
    # [chain, b*h, query tile] turn counters, then the work-ticket counter; zeroed per call.
    locks = torch.zeros(2 * BH * n_q_tiles + 1, dtype=torch.int32, device=dev)
    q_index, q_count_full, q_count = lists.transposed()
    dq_rank, dq_start = lists.dq_order()
    n_tiles = nk * tiles_n
    is_f64 = q.dtype == torch.float64
    _bwd_fused_kernel[(BH * n_tiles,)](
        q, k, v, dy, lse2, delta, dk, dv, scale64, acc, locks,
        q_index, q_count_full, q_count, dq_rank, dq_start,
        *bhn(q), *bhn(k), *bhn(v), *bhn(dy), *bhn(dk), *bhn(dv),
        *list_strides(q_index, q_count), H, BH, n_tiles, n_q_tiles, rows_pad, Nq, Nk,
        float(scale), qk_scale,
        BS=block_size, D_K=Dk, D_V=Dv, BLOCK_DK=block_dk, BLOCK_DV=block_dv,
        BLOCK_M=bm, BLOCK_N=bn, SUBS_M=subs_m, TILES_N=tiles_n,
        RAGGED_Q=Nq % block_size != 0, RAGGED_K=Nk % block_size != 0,
        IS_CAUSAL=bool(is_causal), IS_F64=is_f64, PRECISION=precision,
        SPIN_ASM=dev.type == "cuda", NUM_WARPS=num_warps, num_warps=num_warps,
        num_stages=num_stages)
    block_r = max(16, min(bm, 4096 // block_dk))
    n_row_tiles = triton.cdiv(Nq, block_r)
    _dq_finish_kernel[(BH * n_row_tiles,)](
        acc, locks, dq, scale64, *bhn(dq), H, BH, n_q_tiles, rows_pad, n_row_tiles, Nq,
        float(scale), D_K=Dk, BLOCK_DK=block_dk, BLOCK_M=bm, BLOCK_R=block_r,
        TWO_CHAINS=two_chains, IS_F64=is_f64, num_warps=4)


__all__ = ["fused_tiles_fit", "launch_fused"]
