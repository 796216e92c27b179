"""Pieces shared by the cpu backend's general path (cpu_fused) and its banded path
(cpu_band): problems in the fused kernel's layout, masks of PARTIAL cells, row writes."""

from __future__ import annotations

from typing import Optional

import torch

from .reference import _allowed, _Group


def _as_problems(t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Rows ``tokens`` [G, n] of t [b, hk, g, N, D] as [G, b*hk, g*n, D]: one gather, then a
    strided view when g == 1 (the fused kernel reads strides), else one more copy."""
    b, hk, g, _, d = t.shape
    G, n = tokens.shape
    x = t.index_select(3, tokens.flatten()).view(b * hk, g, G, n, d)
    if g == 1:
        return x[:, 0].permute(1, 0, 2, 3)
    return x.permute(2, 0, 1, 3, 4).reshape(G, b * hk, g * n, d)


def _from_problems(x: torch.Tensor, b: int, hk: int, g: int) -> torch.Tensor:
    """[G, b*hk, g*n, ...] -> [b, hk, g, G*n, ...] (the inverse layout of _as_problems)."""
    G, _, gn = x.shape[:3]
    n = gn // g
    x = x.reshape(G, b, hk, g, n, *x.shape[3:])
    return x.permute(1, 2, 3, 0, 4, *range(5, x.dim())).reshape(b, hk, g, G * n, *x.shape[5:])


def _group_allowed(grp: _Group, cells, block_size: int, rb: int, rule) -> torch.Tensor:
    """bool [G, bs, L]: the padding / tail bounds everywhere, and the token rule (``rule``:
    reference._allowed's arguments after the group) in the PARTIAL cells only: FULL cells
    allow every pair, so the rule is evaluated on a fraction of the tile."""
    G, L = grp.cols.shape
    allowed = grp.col_ok[:, None, :].expand(G, rb, L).clone()
    if cells is not None:
        gi, wi = cells
        rows = grp.rows.view(G, rb)[gi]                                          # [P, rb]
        cols = grp.cols.view(G, -1, block_size)[gi, wi]                           # [P, bs]
        ok = grp.col_ok.view(G, -1, block_size)[gi, wi]
        sub = _allowed(_Group(rows.flatten(), rows.flatten() >= 0, cols, ok), rb, *rule)
        allowed.view(G, rb, -1, block_size)[gi, :, wi, :] = sub
    return allowed


def _mask(allowed: Optional[torch.Tensor], g: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Additive mask [G, 1, g*bs, L] of allowed [G, bs, L] (None: nothing is cut)."""
    if allowed is None:
        return None
    add = torch.where(allowed, torch.zeros((), dtype=dtype),
                      torch.full((), float("-inf"), dtype=dtype))
    return add.unsqueeze(1).repeat(1, 1, g, 1) if g > 1 else add.unsqueeze(1)


def _seen(lse: torch.Tensor, seen: Optional[torch.Tensor]) -> torch.Tensor:
    """lse with -inf on rows that see no key (``seen`` False; the kernel gives 0 there;
    None: every row sees one)."""
    if seen is None:
        return lse
    return torch.where(seen, lse, float("-inf"))


def _kernel_lse(lse: torch.Tensor) -> torch.Tensor:
    """lse as PyTorch's fused backward kernel takes it: a row that sees nothing has lse =
    -inf, and the kernel's convention there is 0 (its masked P is exactly 0 either way).
    NaN stays NaN."""
    return torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)


def _store_rows(dst: torch.Tensor, rows: torch.Tensor, row_ok: torch.Tensor, all_ok: bool,
                src: torch.Tensor) -> None:
    """dst[:, :, :, rows] = src (dim 3), only the valid rows (all of them: no gather)."""
    if all_ok:
        dst.index_copy_(3, rows, src.to(dst.dtype))
        return
    keep = row_ok.nonzero().flatten()
    dst.index_copy_(3, rows[keep], src[:, :, :, keep].to(dst.dtype))
