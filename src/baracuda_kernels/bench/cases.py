"""What the benchmark sweeps: pattern specs, geometries, grids and presets.

A *grid* is a cross product (sequence lengths x head dims x dtypes x block sizes x patterns)
with one batch size, head count, list of modes and list of implementations. A *preset* is a
list of grids (the `kernels` preset needs four: the main table, block 64, a long sequence
at D=64, and the host-overhead grid). Command-line options override the same field in every
grid of a preset. Cases of different grids with the same geometry and pattern are merged
(``merge_cases``), so a pattern in two grids is built, checked and timed once.

Modes: ``fwd`` (forward, plan with preallocated outputs and the prepared pattern), ``bwd``
(backward of one recorded forward), ``step`` (one training step: forward + autograd backward;
``fwd+bwd`` is its old name, still accepted), ``step-graph`` (the same step captured once in a
CUDA graph and replayed: the step without host overhead; CUDA only) and ``unprepared``
(forward of ours with a new pattern object on every call, so its block lists are rebuilt
each time, as in a model that builds its pattern inside forward; ours only).

Pattern names: ``dense``, ``causal``, ``sliding_window`` (8 blocks incl. the diagonal + 1
sink block, causal), ``bigbird`` (3 window blocks, 2 global blocks, 3 random blocks per row),
``document`` (6 packed documents, causal), ``random<P>`` (P percent of the blocks of every
head, seeded; ``random`` in a list expands over ``--densities``). Token rules (the ``tokens``
preset): ``swa1000`` (causal 1000-token window + 4 sinks, exact per token), ``swa1000_coarse``
(its blocks without the per-token cut), ``swa1000_fn`` (the same window written as a mask
function for ``from_mask_fn``: exact through the bits of the blocks it cuts, no closed form;
Flex gets the same function as its mask_mod), ``docs8`` (8 causal documents of random
lengths, exact; also run through the varlen entry point by ``ours-varlen``).

Grouped-query attention: a geometry (and a grid) with ``num_kv_heads`` = Hkv < H gives k and
v Hkv heads (query head h reads K/V head h // (H // Hkv)); patterns stay per query head
(random, bigbird) or broadcast. The ``gqa`` preset compares ours on such K/V with
``ours-expanded`` (ours on K/V repeated to H heads once, at preparation), FlexAttention and
SDPA with ``enable_gqa=True``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..attention.patterns import (BlockPattern, bigbird, causal, document_mask, from_mask_fn,
                                  random_blocks, sliding_window)
from ..core import ElementKind, InvalidProblem

MODES = ("fwd", "bwd", "step", "step-graph", "unprepared")
MAIN_MODES = ("fwd", "bwd", "step")                              # the kernel table
HOST_MODES = ("fwd", "step", "step-graph", "unprepared")         # the host-overhead grid
TRAIN_MODES = ("bwd", "step", "step-graph")                      # need autograd (train())
OURS_ONLY_MODES = ("unprepared",)
# Other spellings accepted on the command line; fwd+bwd was the name of step before.
MODE_ALIASES = {"forward": "fwd", "backward": "bwd", "fwd+bwd": "step", "fwdbwd": "step",
                "fwd_bwd": "step", "both": "step", "train": "step", "graph": "step-graph",
                "step_graph": "step-graph", "stepgraph": "step-graph", "cudagraph": "step-graph",
                "cuda-graph": "step-graph", "cuda_graph": "step-graph"}
IMPLS = ("ours", "ours-expanded", "ours-varlen", "flex", "sdpa", "reference")
PATTERN_KINDS = ("dense", "causal", "sliding_window", "bigbird", "document", "random",
                 "swa1000", "swa1000_coarse", "swa1000_fn", "docs8")
DEFAULT_DENSITIES = (0.5, 0.25, 0.1, 0.05)

SLIDING_WINDOW_BLOCKS = 8      # key blocks per query block row, diagonal included
SINK_BLOCKS = 1
BIGBIRD_WINDOW_BLOCKS = 3      # the block itself and one either side
BIGBIRD_GLOBAL_BLOCKS = 2
BIGBIRD_RANDOM_BLOCKS = 3
DOCUMENT_FRACTIONS = (0.30, 0.10, 0.25, 0.05, 0.20, 0.10)   # packed documents, not block aligned
# The token-rule issue's cases: a causal 1000-token window with 4 sinks, exact (the kernels
# cut it per token) and coarsened (the same blocks, whole); 8 documents of random lengths.
TOKEN_WINDOW, TOKEN_SINKS, TOKEN_DOCUMENTS = 1000, 4, 8


@dataclass(frozen=True)
class PatternSpec:
    """A named pattern: ``kind`` in PATTERN_KINDS, ``density`` only for ``random``."""

    kind: str
    density: Optional[float] = None

    @property
    def name(self) -> str:
        if self.kind == "random":
            pct = self.density * 100
            return f"random{pct:g}" if pct >= 1 else f"random{pct:.2g}"
        return self.kind

    @property
    def dense_equivalent(self) -> bool:
        """True when torch SDPA computes the same thing (dense or causal)."""
        return self.kind in ("dense", "causal")

    @classmethod
    def parse(cls, text: str, densities=DEFAULT_DENSITIES) -> list["PatternSpec"]:
        """``dense`` -> [dense]; ``random`` -> one per density; ``random25`` / ``random0.25``."""
        t = text.strip().lower().replace("-", "_")
        aliases = {"sliding": "sliding_window", "window": "sliding_window", "swa": "sliding_window",
                   "doc": "document", "document_mask": "document", "full": "dense"}
        t = aliases.get(t, t)
        if t in PATTERN_KINDS and t != "random":
            return [cls(t)]
        if t == "random":
            return [cls("random", float(d)) for d in densities]
        m = re.fullmatch(r"random_?([0-9.]+)(%?)", t)
        if m:
            value = float(m.group(1))
            density = value / 100 if (m.group(2) or value > 1) else value
            if 0 < density <= 1:
                return [cls("random", density)]
        raise InvalidProblem(f"unknown pattern {text!r}; expected one of {', '.join(PATTERN_KINDS)} "
                             "or random<percent> (e.g. random25).")


@dataclass(frozen=True)
class Geometry:
    """One problem shape: q [batch, heads, seq_len, head_dim] and k, v [batch, kv_heads,
    seq_len, head_dim] of ``dtype``, square blocks. ``num_kv_heads`` None means ``heads``
    (no GQA); else ``heads`` must be a multiple of it."""

    batch: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: str            # an ElementKind value: bf16, f16, f32, f64
    block_size: int
    num_kv_heads: Optional[int] = None

    def __post_init__(self):
        if self.num_kv_heads is None:
            return
        if self.num_kv_heads < 1 or self.heads % self.num_kv_heads:
            raise InvalidProblem(f"{self.heads} query heads and {self.num_kv_heads} K/V heads; "
                                 "expected the query heads to be a multiple of the K/V heads.")
        if self.num_kv_heads == self.heads:   # one spelling per problem (equal, same label)
            object.__setattr__(self, "num_kv_heads", None)

    @property
    def kv_heads(self) -> int:
        """Hkv: heads of k and v (``heads`` without GQA)."""
        return self.heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def is_gqa(self) -> bool:
        return self.kv_heads < self.heads

    @property
    def heads_text(self) -> str:
        """``32`` without GQA, ``32/8`` (query / K/V heads) with."""
        return f"{self.heads}/{self.kv_heads}" if self.is_gqa else f"{self.heads}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return ElementKind.coerce(self.dtype).torch_dtype

    @property
    def label(self) -> str:
        return (f"B={self.batch} H={self.heads_text} N={self.seq_len} D={self.head_dim} "
                f"{self.dtype} block={self.block_size}")

    @property
    def slug(self) -> str:
        gqa = f"_H{self.heads}kv{self.kv_heads}" if self.is_gqa else ""
        return f"N{self.seq_len}_D{self.head_dim}_{self.dtype}_bs{self.block_size}{gqa}"


def canonical_mode(text: str) -> str:
    """A mode name from the command line: lower case, aliases (``fwd+bwd`` -> ``step``)."""
    t = text.strip().lower().replace(" ", "")
    return MODE_ALIASES.get(t, t)


def mode_applies(impl: str, mode: str) -> bool:
    """False for (impl, mode) pairs that do not exist (``unprepared`` is ours' own cost):
    no row is made for them."""
    return mode not in OURS_ONLY_MODES or impl == "ours"


@dataclass(frozen=True)
class Case:
    """One pattern on one geometry, timed for ``impls`` x ``modes``; ``runs``, when set (a
    merge of cases from several grids), is the subset of (impl, mode) pairs to time."""

    geometry: Geometry
    pattern: PatternSpec
    modes: tuple
    impls: tuple
    runs: Optional[frozenset] = None

    def wants(self, impl: str, mode: str) -> bool:
        return mode_applies(impl, mode) and (self.runs is None or (impl, mode) in self.runs)

    def pairs(self) -> list:
        """The (impl, mode) pairs that get a row, impl-major."""
        return [(i, m) for i in self.impls for m in self.modes if self.wants(i, m)]


@dataclass
class Grid:
    batch: int
    heads: int
    seq_lens: tuple
    head_dims: tuple
    dtypes: tuple
    block_sizes: tuple
    patterns: tuple             # PatternSpec
    modes: tuple = MAIN_MODES
    impls: tuple = ("ours", "flex", "sdpa")
    num_kv_heads: Optional[int] = None      # Hkv (None: heads, no GQA)

    def cases(self) -> list[Case]:
        """Cases of the grid, the dense pattern first in every geometry (it is the yardstick
        of the 'x dense' and 'skip' columns and is always measured for ours)."""
        pats = list(dict.fromkeys(self.patterns))
        dense = PatternSpec("dense")
        pats = [dense] + [p for p in pats if p != dense]
        out = []
        for n in self.seq_lens:
            for d in self.head_dims:
                for dt in self.dtypes:
                    for bs in self.block_sizes:
                        geo = Geometry(self.batch, self.heads, n, d, dt, bs, self.num_kv_heads)
                        out.extend(Case(geo, p, tuple(self.modes), tuple(self.impls)) for p in pats)
        return out


def merge_cases(cases: list[Case]) -> list[Case]:
    """One case per (geometry, pattern), in first-seen order. Cases of several grids on the
    same geometry and pattern (the main and the host-overhead grid of ``kernels``) become
    one, with the union of their modes and impls and ``runs`` = the union of their
    (impl, mode) pairs, so that nothing is built, checked or timed twice and no (impl, mode)
    that no grid asked for is added."""
    groups: dict = {}
    for c in cases:
        groups.setdefault((c.geometry, c.pattern), []).append(c)
    out = []
    for (geo, pat), group in groups.items():
        if len(group) == 1:
            out.append(group[0])
            continue
        modes = tuple(dict.fromkeys(m for c in group for m in c.modes))
        impls = tuple(dict.fromkeys(i for c in group for i in c.impls))
        runs = frozenset(p for c in group for p in c.pairs())
        full = frozenset((i, m) for i in impls for m in modes if mode_applies(i, m))
        out.append(Case(geo, pat, modes, impls, None if runs == full else runs))
    order = {geo: i for i, geo in enumerate(dict.fromkeys(c.geometry for c in out))}
    return sorted(out, key=lambda c: order[c.geometry])     # stable: patterns keep their order


def _specs(names, densities=DEFAULT_DENSITIES) -> tuple:
    out = []
    for name in names:
        out.extend(PatternSpec.parse(name, densities))
    return tuple(out)


ALL_PATTERNS = ("dense", "causal", "sliding_window", "bigbird", "document", "random")
KERNEL_PATTERNS = ("dense", "causal", "sliding_window", "random50", "random25", "random10", "random5")
# Low densities, where the GPU work per step is short enough for the host to show.
HOST_PATTERNS = ("random", "sliding_window")
HOST_DENSITIES = (0.1, 0.05, 0.02)
# The GQA issue's grid: bf16, B=2, H=32, Hkv=8, N=8192, D=128 (block 128, as kernels).
GQA_PATTERNS = ("dense", "causal", "sliding_window", "random25", "random10")
GQA_HEADS, GQA_KV_HEADS = 32, 8
GQA_IMPLS = ("ours", "ours-expanded", "flex", "sdpa")
TOKEN_PATTERNS = ("swa1000", "swa1000_coarse", "swa1000_fn", "docs8")
TOKEN_IMPLS = ("ours", "ours-varlen", "flex")


def preset_grids(name: str, on_gpu: bool) -> list[Grid]:
    """Grids of a preset. On CPU the sizes are small (reference backend, seconds not hours)."""
    if not on_gpu:
        # No step-graph on CPU (it would only say 'needs a CUDA device'); unprepared is
        # cheap at these sizes and keeps that path exercised by the quick run.
        cpu_modes = MAIN_MODES + ("unprepared",)
        if name in ("quick", "kernels"):
            return [Grid(1, 2, (512,), (32,), ("f32",), (32,),
                         _specs(ALL_PATTERNS, (0.5, 0.25, 0.1)), cpu_modes,
                         ("ours", "flex", "sdpa", "reference"))]
        if name == "gqa":     # the same patterns, modes and impls at H=8, Hkv=2
            return [Grid(1, 8, (512,), (32,), ("f32",), (32,), _specs(GQA_PATTERNS), MAIN_MODES,
                         GQA_IMPLS + ("reference",), num_kv_heads=2)]
        if name == "tokens":
            return [Grid(1, 2, (2048,), (32,), ("f32",), (64,), _specs(TOKEN_PATTERNS),
                         MAIN_MODES, TOKEN_IMPLS + ("reference",))]
        if name not in PRESETS:
            raise InvalidProblem(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}.")
        return [Grid(1, 4, (1024, 2048), (64,), ("f32",), (64,),
                     _specs(ALL_PATTERNS, (0.5, 0.25, 0.1)), cpu_modes,
                     ("ours", "flex", "sdpa", "reference"))]
    if name == "quick":
        return [Grid(2, 16, (4096,), (128,), ("bf16",), (128,),
                     _specs(("dense", "causal", "sliding_window", "random25", "random10")),
                     ("fwd", "bwd"), ("ours", "flex", "sdpa"))]
    if name == "kernels":
        main = Grid(2, 16, (8192,), (128,), ("bf16",), (128,), _specs(KERNEL_PATTERNS), MAIN_MODES,
                    ("ours", "flex", "sdpa"))
        block64 = dataclasses.replace(main, block_sizes=(64,), patterns=_specs(("dense", "random25")),
                                      impls=("ours", "flex"))
        long = dataclasses.replace(main, seq_lens=(32768,), head_dims=(64,),
                                   patterns=_specs(("dense", "causal", "sliding_window")))
        # Same geometry as main (merged with it): step - step-graph is the host's share of
        # a training step, unprepared - fwd the cost of rebuilding the block lists per call.
        host = dataclasses.replace(main, patterns=_specs(HOST_PATTERNS, HOST_DENSITIES),
                                   modes=HOST_MODES, impls=("ours", "flex"))
        return [main, block64, long, host]
    if name == "full":
        return [Grid(2, 16, (4096, 8192, 16384), (64, 128), ("bf16",), (64, 128),
                     _specs(ALL_PATTERNS), MAIN_MODES, ("ours", "flex", "sdpa", "reference"))]
    if name == "gqa":
        # ours (K/V with Hkv heads) against ours-expanded (K/V repeated to H heads once,
        # outside the timed calls), FlexAttention and SDPA (dense, causal) with enable_gqa.
        return [Grid(2, GQA_HEADS, (8192,), (128,), ("bf16",), (128,), _specs(GQA_PATTERNS),
                     MAIN_MODES, GQA_IMPLS, num_kv_heads=GQA_KV_HEADS)]
    if name == "tokens":
        # The token-rule issue: bf16, H=16, D=128; the window also at 65536 tokens.
        main = Grid(2, 16, (8192,), (128,), ("bf16",), (128,), _specs(TOKEN_PATTERNS),
                    MAIN_MODES, TOKEN_IMPLS)
        long = dataclasses.replace(main, batch=1, seq_lens=(65536,),
                                   patterns=_specs(("swa1000", "swa1000_coarse")),
                                   impls=("ours", "flex"))
        return [main, long]
    raise InvalidProblem(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}.")


PRESETS = ("quick", "kernels", "full", "gqa", "tokens")


def apply_overrides(grids: list[Grid], **overrides) -> list[Grid]:
    """Replace the given (non-None) fields in every grid; ``patterns`` are PatternSpecs."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return [dataclasses.replace(g, **given) for g in grids]


# ---------------------------------------------------------------------------------------
def build_pattern(spec: PatternSpec, geo: Geometry, seed: int = 0,
                  device: Optional[torch.device] = None) -> BlockPattern:
    """The BlockPattern of ``spec`` for ``geo`` (built on CPU, moved to ``device``).

    Random and BigBird patterns differ per head ([1, H, nq, nk]); the others broadcast.
    """
    n, bs, h = geo.seq_len, geo.block_size, geo.heads
    nb = -(-n // bs)
    if spec.kind == "dense":
        p = BlockPattern(torch.ones(1, 1, nb, nb, dtype=torch.bool), block_size=bs, query_len=n,
                         description="dense")
    elif spec.kind == "causal":
        p = causal(n, block_size=bs)
    elif spec.kind == "sliding_window":
        # window = (blocks - 1) * bs + 1 tokens: every query block row touches exactly
        # SLIDING_WINDOW_BLOCKS key blocks, its own diagonal block included.
        p = sliding_window(n, window=(SLIDING_WINDOW_BLOCKS - 1) * bs + 1, block_size=bs,
                           sinks=SINK_BLOCKS * bs, causal=True)
    elif spec.kind == "bigbird":
        # window = bs + 1 tokens: the own block and one on either side.
        p = bigbird(n, block_size=bs, window=(BIGBIRD_WINDOW_BLOCKS // 2) * bs + 1,
                    global_tokens=range(min(n, BIGBIRD_GLOBAL_BLOCKS * bs)),
                    num_random_blocks=min(nb, BIGBIRD_RANDOM_BLOCKS), seed=seed, num_heads=h)
    elif spec.kind == "document":
        lens = [max(1, int(round(f * n))) for f in DOCUMENT_FRACTIONS[:-1]]
        lens = [x for x in lens if x > 0]
        rest = n - sum(lens)
        while rest < 1 and lens:          # tiny N: drop documents until the last one fits
            lens.pop()
            rest = n - sum(lens)
        p = document_mask(lens + [rest], block_size=bs, causal=True)
    elif spec.kind == "random":
        p = random_blocks(n, block_size=bs, density=spec.density, seed=seed, num_heads=h)
    elif spec.kind in ("swa1000", "swa1000_coarse"):
        p = sliding_window(n, window=TOKEN_WINDOW, block_size=bs, sinks=TOKEN_SINKS, causal=True)
        if spec.kind == "swa1000_coarse":   # the same blocks, no rule handed to the kernels
            p = BlockPattern(p.mask, block_size=bs, query_len=n, is_causal=True,
                             token_rule=p.token_rule, description=p.description + " coarsened")
    elif spec.kind == "swa1000_fn":
        p = from_mask_fn(_window_fn(TOKEN_WINDOW, TOKEN_SINKS), n, block_size=bs, is_causal=True,
                         device=device)
    elif spec.kind == "docs8":
        gen = torch.Generator().manual_seed(seed)
        cuts = torch.randperm(n - 1, generator=gen)[:TOKEN_DOCUMENTS - 1].sort().values + 1
        bounds = [0] + cuts.tolist() + [n]
        p = document_mask([b - a for a, b in zip(bounds, bounds[1:])], block_size=bs,
                          causal=True)
    else:
        raise InvalidProblem(f"unknown pattern kind {spec.kind!r}; expected one of {PATTERN_KINDS}.")
    return p if device is None else p.to(device)


def _window_fn(window: int, sinks: int):
    """The causal ``window``-token window with ``sinks`` sink keys as a mask function (query
    i sees keys i - window + 1 .. i, and keys 0 .. sinks - 1): what ``sliding_window`` states
    in closed form, here for ``from_mask_fn`` (and Flex's mask_mod)."""
    def window_with_sinks(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx < window) & (kv_idx <= q_idx)) | (kv_idx < sinks)
    return window_with_sinks
