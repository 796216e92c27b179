"""Pictures of block patterns: text (always available) and matplotlib (optional)."""

from __future__ import annotations

import textwrap

import torch

from baracuda_kernels.core import Unsupported

from .counting import cdiv

ACTIVE, MIXED, EMPTY = "█", "▒", "·"

# Patterns this small get their coarsening computed for the text header.
_CHEAP_PAIRS = 1 << 22


def _pool(m: torch.Tensor, rs: int, cs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all) of ``m`` [R, C] over rs x cs windows (ragged last windows allowed)."""
    r, c = m.shape
    pr, pc = cdiv(r, rs) * rs - r, cdiv(c, cs) * cs - c
    shape = (cdiv(r, rs), rs, cdiv(c, cs), cs)
    any_ = torch.nn.functional.pad(m, (0, pc, 0, pr), value=False).view(shape).any(3).any(1)
    all_ = torch.nn.functional.pad(m, (0, pc, 0, pr), value=True).view(shape).all(3).all(1)
    return any_, all_


def _grid(m: torch.Tensor, max_rows: int, max_cols: int) -> list[str]:
    rs, cs = cdiv(m.shape[0], max_rows), cdiv(m.shape[1], max_cols)
    any_, all_ = _pool(m.cpu(), rs, cs)
    lines = []
    for a_row, f_row in zip(any_.tolist(), all_.tolist()):
        lines.append("".join(ACTIVE if f else (MIXED if a else EMPTY) for a, f in zip(a_row, f_row)))
    if rs > 1 or cs > 1:
        lines.append(f"(each character = {rs} x {cs} blocks; {MIXED} = partly active)")
    return lines


def _coarsening_line(p) -> str:
    cheap = ("rule_pairs" in p._cache or p._rule_pairs_fn is not None or p._rule_is_default
             or p.mask.numel() * p.block_size ** 2 <= _CHEAP_PAIRS)
    if not cheap:
        return "exactness not computed here (call .coarsening_report())"
    return str(p.coarsening_report(per_block=False))


def to_text(p, max_rows: int = 32, max_cols: int = 64, max_slices: int = 4) -> str:
    """Header (shape, block size, lengths, causal, density, bytes, coarsening) and a grid per
    stored (batch, head) slice: rows = query blocks, columns = key blocks, ``█`` computed,
    ``·`` skipped. Large patterns are pooled to at most ``max_rows`` x ``max_cols``
    characters; at most ``max_slices`` slices are drawn."""
    b, h, nq, nk = p.shape
    active = p.num_active_blocks()
    lines = [
        f"BlockPattern {p.description}",
        f"  mask [B={b}, H={h}, nq={nq}, nk={nk}] ({p.nbytes} bytes), block_size={p.block_size}, "
        f"tokens {p.query_len} x {p.key_len}, is_causal={p.is_causal}",
        f"  density {p.density():.4f} ({active}/{p.mask.numel()} blocks active)",
        "  " + _coarsening_line(p),
    ]
    shown = 0
    for bi in range(b):
        for hi in range(h):
            if shown == max_slices:
                lines.append(f"... ({b * h - shown} more slices)")
                return "\n".join(lines)
            if b * h > 1:
                lines.append(f"[b={bi}, h={hi}]")
            lines.extend(_grid(p.mask[bi, hi], max_rows, max_cols))
            shown += 1
    return "\n".join(lines)


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise Unsupported("drawing a BlockPattern with matplotlib needs matplotlib, which is not "
                          "installed. Fix: pip install matplotlib (or pip install "
                          "'baracuda-kernels[plot]'); str(pattern) draws it as text.") from exc
    return matplotlib


def _image(p, batch: int, head: int, max_pixels: int = 2048) -> torch.Tensor:
    m = p.mask[min(batch, p.batch - 1), min(head, p.num_heads - 1)].cpu()
    step = max(cdiv(m.shape[0], max_pixels), cdiv(m.shape[1], max_pixels))
    if step > 1:
        m, _ = _pool(m, step, step)
    return m.to(torch.float32)


def _draw(p, ax, batch: int, head: int):
    img = _image(p, batch, head)
    span_q = p.num_blocks_q * p.block_size
    span_k = p.num_blocks_k * p.block_size
    ax.imshow(img.numpy(), cmap="Greys", vmin=0.0, vmax=1.0, interpolation="nearest",
              extent=(0, span_k, span_q, 0), aspect="auto")
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    title = textwrap.fill(p.description, 60)
    ax.set_title(f"{title}\nblock {p.block_size}, density {p.density():.3f}"
                 f"{', causal' if p.is_causal else ''} [b={batch}, h={head}]", fontsize=9)
    return ax


def plot(p, ax=None, *, batch: int = 0, head: int = 0):
    """Draw one (batch, head) slice on ``ax`` (a new pyplot figure when None); returns ax.
    Broadcast dims ignore the index. Raises ``Unsupported`` without matplotlib."""
    _matplotlib()
    if ax is None:
        import matplotlib.pyplot as plt
        _, ax = plt.subplots(figsize=(5, 5))
    return _draw(p, ax, batch, head)


def save_png(p, path, *, batch: int = 0, head: int = 0, dpi: int = 100) -> None:
    """Write a PNG of one slice, without touching pyplot's global state."""
    _matplotlib()
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5, 5))
    _draw(p, fig.subplots(), batch, head)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
