"""Document ids in the kernels: where the time goes. bf16, B=2, H=16, D=128, N=8192, block 128,
8 causal documents of random lengths (the bench's docs8). Forward and step GPU time (graph
replay) for: the exact documents (ids in PARTIAL blocks), the same blocks without ids
(coarsened), each with the prepared pattern's short-row tiles and with the default tiles;
and the same documents through the varlen entry point.

    PYTHONPATH=src python scripts/probe_tokens.py
"""
import dataclasses

import torch

import baracuda_kernels as bk
from baracuda_kernels.attention.block_sparse.prepared import PreparedPattern
from baracuda_kernels.bench.cases import Geometry, PatternSpec, build_pattern
from probe_common import graph_ms, prepared_fwd_step_ms

B, H, N, D, BS = 2, 16, 8192, 128, 128


def default_tiles(prep: PreparedPattern) -> PreparedPattern:
    """The same lists without their measured row length: the plan's default tiles."""
    lists = dataclasses.replace(prep.lists, mean_row_blocks=None)
    return PreparedPattern(prep.mask, lists, block_size=prep.block_size,
                           query_len=prep.query_len, key_len=prep.key_len,
                           is_causal=prep.is_causal)


def main():
    print(torch.cuda.get_device_name(), flush=True)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dy = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    docs = build_pattern(PatternSpec("docs8"), Geometry(B, H, N, D, "bf16", BS), device="cuda")
    exact = docs.prepare()
    coarse = bk.prepare_pattern(docs.mask, query_len=N, block_size=BS, is_causal=True)
    print(f"documents {docs.kernel_rules['document_ids'].shape}, mean row blocks "
          f"{exact.lists.mean_row_blocks:.2f}", flush=True)
    variants = {"ids, short-row tiles": exact, "ids, default tiles": default_tiles(exact),
                "coarse, short-row tiles": coarse, "coarse, default tiles": default_tiles(coarse)}
    for name, prep in variants.items():
        f, s, (blocks, full) = prepared_fwd_step_ms(q, k, v, dy, prep)
        print(f"{name:<24} blocks {blocks:5d} (FULL {full:5d})  fwd {f:.3f} ms  step {s:.3f} ms",
              flush=True)
    # The varlen entry point on the same documents (packed once, outside the timing).
    ids = docs.kernel_rules["document_ids"].to("cuda").expand(B, N).long()
    flat = (ids + torch.arange(B, device="cuda")[:, None] * (N + 1)).reshape(-1)
    starts = torch.nonzero(flat[1:] != flat[:-1]).reshape(-1) + 1
    cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), B * N)]).int()
    qp, kp, vp = (t.detach().transpose(1, 2).reshape(B * N, H, D).contiguous().requires_grad_()
                  for t in (q, k, v))
    dyp = dy.transpose(1, 2).reshape(B * N, H, D).contiguous()

    def vfwd():
        with torch.no_grad():
            bk.block_sparse_attention_varlen(qp, kp, vp, cu, cu, is_causal=True)

    def vstep():
        y = bk.block_sparse_attention_varlen(qp, kp, vp, cu, cu, is_causal=True)
        torch.autograd.grad(y, (qp, kp, vp), dyp)
    try:
        print(f"{'varlen':<24} {cu.numel() - 1} sequences           fwd {graph_ms(vfwd):.3f} ms  "
              f"step {graph_ms(vstep):.3f} ms", flush=True)
    except Exception as exc:  # noqa: BLE001 - a probe reports and goes on
        print(f"varlen failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)


if __name__ == "__main__":
    main()
