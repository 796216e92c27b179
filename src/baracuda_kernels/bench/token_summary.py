"""The token-rule target table of a sweep (the ``tokens`` preset): ours against FlexAttention
given the same rule, the exact window against the coarsened one, and the varlen entry point
against the mask-based call on the same documents."""

from __future__ import annotations

from .runner import geometry_of
from .text import fmt, geometry_blocks, markdown_block

# The token-rule issue's targets: ours >= 1.2x Flex forward and >= 1.1x backward on each
# rule; the exact window at most 10% slower than the same blocks computed whole.
TOKEN_TARGET_VS_FLEX = {"fwd": 1.2, "bwd": 1.1}
TOKEN_TARGET_EXACT_COST = 1.10
TOKEN_PATTERNS = ("swa1000", "swa1000_fn", "docs8")
# The same blocks computed whole: the exact window (closed form, or bits of cut blocks).
COARSE_OF = {"swa1000": "swa1000_coarse", "swa1000_fn": "swa1000_coarse"}


def token_summary(rows: list[dict]) -> list[dict]:
    """Per geometry, token pattern and mode where ours ran: ours / Flex / varlen times (ms),
    vs_flex = Flex time / ours, exact_cost = ours on the exact window / ours on its coarsened
    blocks, vs_varlen = mask-based time / varlen time, and the targets missed."""
    ok = [r for r in rows if r.get("status") == "ok"]
    out = []
    for geo in geometry_of(ok):
        g_rows = [r for r in ok if r["geometry"] == geo]

        def time(pattern, impl, mode):
            hit = [r["time_ms"] for r in g_rows
                   if (r["pattern"], r["impl"], r["mode"]) == (pattern, impl, mode)]
            return hit[0] if hit else None
        for pat in TOKEN_PATTERNS:
            for mode in dict.fromkeys(r["mode"] for r in g_rows if r["pattern"] == pat):
                ours = time(pat, "ours", mode)
                if ours is None or ours <= 0:
                    continue
                flex, varlen = time(pat, "flex", mode), time(pat, "ours-varlen", mode)
                coarse = time(COARSE_OF[pat], "ours", mode) if pat in COARSE_OF else None
                e = dict(geometry=geo, pattern=pat, mode=mode, ours_ms=ours, flex_ms=flex,
                         varlen_ms=varlen, vs_flex=flex / ours if flex else None,
                         exact_cost=ours / coarse if coarse else None,
                         vs_varlen=ours / varlen if varlen else None, misses=[])
                target = TOKEN_TARGET_VS_FLEX.get(mode)
                if target and e["vs_flex"] is not None and e["vs_flex"] < target:
                    e["misses"].append(f"< {target:g}x flex")
                if e["exact_cost"] is not None and e["exact_cost"] > TOKEN_TARGET_EXACT_COST:
                    e["misses"].append(f"exact > {TOKEN_TARGET_EXACT_COST:g}x coarse")
                out.append(e)
    return out


_COLUMNS = [("ours ms", "ours_ms", ".3f"), ("flex ms", "flex_ms", ".3f"),
            ("varlen ms", "varlen_ms", ".3f"), ("vs flex", "vs_flex", ".2f"),
            ("exact/coarse", "exact_cost", ".2f"), ("mask/varlen", "vs_varlen", ".2f")]
_LEGEND = ("Token rules (the same exact rule for every implementation): vs flex = Flex time / "
           "ours (targets >= 1.2x fwd, >= 1.1x bwd). exact/coarse = ours on the exact window "
           "/ ours on the same blocks computed whole (target <= 1.10: the cost of the per-token "
           "cut; swa1000_fn: the window as a from_mask_fn function, cut by block bits). mask/varlen = ours with document ids / ours through "
           "block_sparse_attention_varlen on the same documents.")


def _targets(e: dict) -> str:
    return ", ".join(e["misses"]) if e["misses"] else "met"


def format_tokens(rows: list[dict]) -> str:
    """The token-rule summary of the terminal report; '' when no token case ran ours."""
    head = f"{'pattern':<12}{'mode':<6}" + "".join(f"{t:>14}" for t, _, _ in _COLUMNS) + "  targets"

    def lines_of(entries):
        return [f"{e['pattern']:<12}{e['mode']:<6}"
                + "".join(f"{fmt(e[k], s, 'x' if k.startswith('vs') else ''):>14}"
                          for _, k, s in _COLUMNS) + f"  {_targets(e)}" for e in entries]
    return geometry_blocks("Token-rule summary (ours vs FlexAttention, exact vs coarsened, varlen)",
                           token_summary(rows), head, lines_of, _LEGEND)


def token_markdown(rows: list[dict]) -> list[str]:
    """The token-rule summary as markdown lines for summary.md (empty without token rows)."""
    cells = [[e["geometry"], e["pattern"], e["mode"]]
             + [fmt(e[k], s, "x" if k.startswith("vs") else "") for _, k, s in _COLUMNS]
             + [_targets(e)] for e in token_summary(rows)]
    return markdown_block("Token-rule summary", _LEGEND, ["geometry", "pattern", "mode"]
                          + [t for t, _, _ in _COLUMNS] + ["targets"], cells)
