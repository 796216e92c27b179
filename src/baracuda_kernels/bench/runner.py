"""The sweep: for every case, check ours (and the baselines) against the reference backend,
then time every implementation in every mode. Produces one row (a dict) per
(case, implementation, mode), including rows for unavailable implementations. The CUDA graph
mode (step-graph) lives in graphs.py.

Memory (CUDA only; None on CPU): ``peak_mib`` is the peak memory allocated during one call
of the timed function (one more call after the timing) above what was allocated before it;
for step-graph, during the capture (the replay allocates nothing: the graph's pool holds it).
``prep_mib`` is what the implementation keeps allocated from its preparation (preallocated
outputs, prepared lists, BlockMasks; ours-expanded's K/V copies)."""

from __future__ import annotations

import gc
import math
import sys
import time
import warnings
from typing import Optional

import torch

from ..attention import block_sparse_attention
from . import baselines, graphs
from .cases import TRAIN_MODES, Case, Geometry, build_pattern
from .flops import computed_pairs, mode_flops, tflops
from .timing import PeakMemory, allocated_mib, median_ms, peak_memory_mib

# Relative error (||out - ref|| / ||ref||) above which ours' check fails. About 10x what a
# correct kernel shows in each dtype (outputs rounded to the dtype, float32 accumulation).
CHECK_TOLERANCE = {"bf16": 5e-2, "f16": 1e-2, "f32": 1e-3, "f64": 1e-8}
# Implementations whose check verdict (ok / FAIL) fails the run: our kernels. The
# baselines' errors are shown, not judged.
CHECKED_IMPLS = ("ours", "ours-expanded", "ours-varlen")

ROW_FIELDS = ["geometry", "batch", "heads", "kv_heads", "seq_len", "head_dim", "dtype", "block_size",
              "pattern", "pattern_description", "causal", "block_density", "work_fraction",
              "pairs", "mode", "impl", "impl_detail", "status", "reason", "time_ms", "flops", "tflops",
              "x_dense", "vs_flex", "skip_ratio", "rel_err", "max_abs_err", "check", "setup_s",
              "overhead_ms", "peak_mib", "prep_mib"]

# Which check result a mode's row shows: the forward check (plan.run), the check of the
# unprepared call, or the gradient check of train() (which step-graph replays).
CHECK_OF_MODE = {"fwd": "fwd", "unprepared": "unprepared", "bwd": "bwd", "step": "bwd",
                 "step-graph": "bwd"}


class Progress:
    """A one-line progress indicator on stderr (overwritten in a terminal, one line per step
    otherwise, e.g. in a log file)."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done, self.t0 = max(1, total), 0, time.perf_counter()
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, label: str, advance: int = 1) -> None:
        self.done = min(self.total, self.done + advance)
        if not self.enabled:
            return
        frac = self.done / self.total
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        text = (f"[{bar}] {self.done}/{self.total} {time.perf_counter() - self.t0:5.0f}s  {label}")
        if self.tty:
            self.stream.write("\r" + text[:150].ljust(150))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r" + " " * 150 + "\r")
            self.stream.flush()


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = out.detach().to(ref.dtype) - ref.detach()
    denom = float(ref.detach().norm())
    rel = float(diff.norm()) / denom if denom > 0 else float(diff.norm())
    return rel, float(diff.abs().max()) if diff.numel() else 0.0


def _inputs(geo: Geometry, device: torch.device, seed: int):
    """[q, k, v, dy]: q and dy [B, H, N, D], k and v [B, Hkv, N, D]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q_shape = (geo.batch, geo.heads, geo.seq_len, geo.head_dim)
    kv_shape = (geo.batch, geo.kv_heads, geo.seq_len, geo.head_dim)
    return [torch.randn(shape, dtype=geo.torch_dtype, device=device, generator=gen)
            for shape in (q_shape, kv_shape, kv_shape, q_shape)]


def _status_of(exc: BaseException) -> str:
    """'unavailable' for a documented limitation (NotImplementedError, Unsupported), else 'error'."""
    return "unavailable" if isinstance(exc, (NotImplementedError, baselines.Unavailable)) else "error"


class GraphMismatch(Exception):
    """A captured step whose replay differs from the eager step (not timed: it would be a
    fast wrong number)."""


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Sweep:
    """Runs cases on one device and collects rows. ``options`` carries warmup_ms, rep_ms,
    check, flex_mode, seed (see cli.add_arguments)."""

    def __init__(self, cases: list[Case], device: torch.device, options, out=None,
                 progress: bool = True):
        self.cases, self.device, self.options = cases, device, options
        self.out = out or sys.stdout
        self.rows: list[dict] = []
        self.check_failures: list[str] = []
        steps = sum(1 + len(c.pairs()) for c in cases)
        self.progress = Progress(steps, enabled=progress)

    def log(self, text: str) -> None:
        self.progress.clear()
        print(text, file=self.out, flush=True)

    # ---------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        by_geo: dict[Geometry, list[Case]] = {}
        for c in self.cases:
            by_geo.setdefault(c.geometry, []).append(c)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            for geo, cases in by_geo.items():
                try:
                    self._run_geometry(geo, cases)
                except Exception as exc:  # e.g. out of memory for the inputs: go on
                    self.log(f"   {geo.label}: skipped, {baselines._first_line(exc)}")
                    _free(self.device)
        self.progress.clear()
        derive(self.rows)
        return self.rows

    def _run_geometry(self, geo: Geometry, cases: list[Case]) -> None:
        self.log(f"-- {geo.label}")
        tensors = _inputs(geo, self.device, self.options.seed)
        try:
            for case in cases:
                self._run_case(case, *tensors)
                _free(self.device)
        finally:
            del tensors
            _free(self.device)

    def _base_row(self, case: Case, pattern, pairs: int) -> dict:
        g = case.geometry
        dense = g.batch * g.heads * g.seq_len * g.seq_len
        return dict(geometry=g.label, batch=g.batch, heads=g.heads, kv_heads=g.kv_heads,
                    seq_len=g.seq_len,
                    head_dim=g.head_dim, dtype=g.dtype, block_size=g.block_size,
                    pattern=case.pattern.name, pattern_description=pattern.description,
                    causal=bool(pattern.is_causal), block_density=round(pattern.density(), 6),
                    work_fraction=pairs / dense, pairs=pairs)

    def _run_case(self, case: Case, q, k, v, dy) -> None:
        g, opts = case.geometry, self.options
        try:
            pattern = build_pattern(case.pattern, g, seed=opts.seed, device=self.device)
        except Exception as exc:
            self.log(f"   {case.pattern.name}: cannot build the pattern: {exc}")
            self.progress.step(case.pattern.name, 1 + len(case.pairs()))
            return
        pairs = computed_pairs(pattern.mask, g.seq_len, g.seq_len, g.block_size,
                               pattern.is_causal, g.batch, g.heads)
        base = self._base_row(case, pattern, pairs)
        inputs = baselines.Inputs(q, k, v, dy, pattern, case.pattern, g)

        prepared, prep_mib = {}, {}
        for impl in case.impls:
            before = allocated_mib(self.device)
            try:
                prepared[impl] = baselines.prepare(impl, inputs, opts)
            except baselines.NotApplicable:
                continue
            except baselines.Unavailable as exc:
                prepared[impl] = str(exc)
                continue
            if before is not None:
                prep_mib[impl] = max(0.0, allocated_mib(self.device) - before)
        need_bwd = any(m in TRAIN_MODES for m in case.modes)
        ready = {i: p for i, p in prepared.items() if isinstance(p, baselines.Prepared)}
        errors = self._check(case, inputs, ready, need_bwd) if opts.check else {}
        self.progress.step(f"{g.slug} {case.pattern.name} check")
        for impl in case.impls:
            modes = [m for m in case.modes if case.wants(impl, m)]
            p = prepared.get(impl)
            if not isinstance(p, baselines.Prepared):
                if p is not None:     # unavailable: one row per mode, with the reason
                    self.rows += [dict(base, mode=m, impl=impl, status="unavailable", reason=p)
                                  for m in modes]
                self.progress.step(f"{case.pattern.name} {impl} n/a", len(modes))
                continue
            for mode in modes:
                self.progress.step(f"{g.slug} {case.pattern.name} {impl} {mode}")
                if mode == "unprepared" and p.unprepared is None:
                    continue          # no such call for this implementation: no row
                train = mode in TRAIN_MODES
                row = dict(base, mode=mode, impl=impl,
                           impl_detail=(p.train_detail or p.detail) if train else p.detail,
                           flops=mode_flops(pairs, g.head_dim, g.head_dim, mode))
                err = errors.get((impl, CHECK_OF_MODE[mode]))
                if err is not None:
                    row.update(rel_err=err[0], max_abs_err=err[1], check=err[2])
                if train and p.train_error:
                    row.update(status=p.train_error[0], reason=p.train_error[1])
                    self.rows.append(row)
                    continue
                try:
                    if mode == "step-graph":
                        setup, ms, peak = self._time_graph(p, case, impl, inputs, row)
                    else:
                        setup, ms, peak = self._time(p, inputs, mode)
                    row.update(status="ok", time_ms=ms, tflops=tflops(row["flops"], ms),
                               setup_s=round(p.setup_s + setup, 3), peak_mib=peak,
                               prep_mib=prep_mib.get(impl))
                except Exception as exc:  # a crash in one baseline must not end the sweep
                    row.update(status=_status_of(exc), reason=baselines._first_line(exc))
                    if mode in ("bwd", "step"):   # the eager train() itself failed
                        p.train_error = (row["status"], row["reason"])
                self.rows.append(row)
        prepared.clear()

    # ---------------------------------------------------------------------------------
    def _check(self, case: Case, inputs, prepared: dict, need_bwd: bool) -> dict:
        """{(impl, 'fwd'|'bwd'): (rel_err, max_abs_err, 'ok'|'FAIL'|'')} against the reference
        backend run on the same inputs upcast (float32 on CUDA, float64 on CPU). With GQA
        the oracle gets K/V expanded to H heads (repeat_interleave, differentiable: the
        gradient of a K/V head is the sum over its group), so it does not rely on the GQA
        indexing under test; the implementations get the case's K/V."""
        g = case.geometry
        ref_dtype = torch.float64 if self.device.type == "cpu" else torch.float32
        leaves = [t.detach().to(ref_dtype).requires_grad_(need_bwd) for t in (inputs.q, inputs.k, inputs.v)]
        group = inputs.group_size
        try:
            q_ref, k_ref, v_ref = leaves
            mask = inputs.pattern.mask
            if group > 1:
                k_ref, v_ref = (baselines.expand_kv(t, group) for t in (k_ref, v_ref))
                if mask.shape[1] == inputs.k.shape[1] > 1:     # a pattern per K/V head
                    mask = mask.repeat_interleave(group, dim=1)
            # The pattern's kernel rules (a builder's window, documents, prefix) are part
            # of the problem: every implementation computes them exactly.
            pattern, kwargs = baselines.pattern_call(inputs.pattern, mask, g.block_size,
                                                     inputs.is_causal)
            y_ref = block_sparse_attention(q_ref, k_ref, v_ref, pattern, backend="reference",
                                           **kwargs)
            g_ref = torch.autograd.grad(y_ref, leaves, inputs.dy.to(ref_dtype)) if need_bwd else None
        except Exception as exc:
            self.log(f"   {case.pattern.name}: reference failed, no check: {baselines._first_line(exc)}")
            return {}
        y_ref = y_ref.detach()
        del leaves, q_ref, k_ref, v_ref
        out, parts = {}, []
        tol = CHECK_TOLERANCE.get(g.dtype, 1e-2)
        for impl, p in prepared.items():
            texts = []
            try:
                y = p.infer()
                rel, mx = _rel_err(y, y_ref)
                out[(impl, "fwd")] = (rel, mx, self._verdict(impl, rel, tol, case, "fwd"))
                texts.append(f"fwd {rel:.1e}")
                del y
            except Exception as exc:
                texts.append(f"fwd failed ({baselines._first_line(exc, 120)})")
            if "unprepared" in case.modes and p.unprepared is not None:
                try:
                    y = p.unprepared()
                    rel, mx = _rel_err(y, y_ref)
                    out[(impl, "unprepared")] = (rel, mx, self._verdict(impl, rel, tol, case,
                                                                        "unprepared"))
                    texts.append(f"unprepared {rel:.1e}")
                    del y
                except Exception as exc:
                    texts.append(f"unprepared failed ({baselines._first_line(exc, 120)})")
            if need_bwd:
                try:
                    xs = [t.detach().requires_grad_(True) for t in p.leaves(inputs)]
                    grads = p.case_grads(torch.autograd.grad(p.train(*xs), xs, inputs.dy))
                    errs = [_rel_err(a, b) for a, b in zip(grads, g_ref)]
                    rel_b, mx_b = max(e[0] for e in errs), max(e[1] for e in errs)
                    out[(impl, "bwd")] = (rel_b, mx_b, self._verdict(impl, rel_b, tol, case, "bwd"))
                    texts.append(f"bwd {rel_b:.1e}")
                    del xs, grads
                except Exception as exc:
                    p.train_error = (_status_of(exc), baselines._first_line(exc))
                    texts.append(f"bwd {p.train_error[0]}")
            parts.append(f"{impl} " + " ".join(texts))
        flag = " CHECK FAILED" if any(v[2] == "FAIL" for v in out.values()) else ""
        self.log(f"   {case.pattern.name:<15} rel. error vs reference: " + ", ".join(parts) + flag)
        return out

    def _verdict(self, impl: str, rel: float, tol: float, case: Case, what: str) -> str:
        if impl not in CHECKED_IMPLS:
            return ""
        if math.isfinite(rel) and rel <= tol:
            return "ok"
        who = "" if impl == "ours" else f" ({impl})"
        self.check_failures.append(f"{case.geometry.label} {case.pattern.name} {what}{who}: "
                                   f"rel. error {rel:.2e} > {tol:.0e}")
        return "FAIL"

    def _time(self, p, inputs, mode: str) -> tuple[float, float, Optional[float]]:
        """(warm-up seconds, median ms, peak MiB or None) of one implementation in one mode."""
        opts, dev = self.options, self.device
        # No torch.no_grad() for the forward: its inputs need no grad anyway, and a change of
        # grad mode would make torch.compile recompile FlexAttention.
        if mode in ("fwd", "unprepared"):
            fn = p.infer if mode == "fwd" else p.unprepared
            t0 = time.perf_counter()
            fn()
            baselines._sync(dev)
            setup = time.perf_counter() - t0
            ms = median_ms(fn, dev, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms)
            return setup, ms, peak_memory_mib(fn, dev)
        xs = [t.detach().requires_grad_(True) for t in p.leaves(inputs)]
        dy = inputs.dy
        if mode == "bwd":
            y = p.train(*xs)

            def fn():
                return torch.autograd.grad(y, xs, dy, retain_graph=True)
        else:
            def fn():
                return torch.autograd.grad(p.train(*xs), xs, dy)
        t0 = time.perf_counter()
        fn()
        baselines._sync(dev)
        setup = time.perf_counter() - t0
        ms = median_ms(fn, dev, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms)
        return setup, ms, peak_memory_mib(fn, dev)

    def _time_graph(self, p, case: Case, impl: str, inputs,
                    row: dict) -> tuple[float, float, Optional[float]]:
        """(capture seconds, median ms of a replay, peak MiB of the capture or None) of the
        captured training step, after checking once that a replay gives the eager step's y
        and grads (within the dtype's CHECK_TOLERANCE; a mismatch is a check failure for
        ours and is not timed)."""
        with PeakMemory(self.device) as mem:
            step = graphs.capture_step(p.train, *p.leaves(inputs), inputs.dy)
        try:
            err = graphs.replay_error(step, p.train)
            tol = CHECK_TOLERANCE.get(case.geometry.dtype, 1e-2)
            verdict = "bitwise equal" if err == 0 else f"rel. error {err:.1e}"
            self.log(f"   {case.pattern.name:<15} {impl} step-graph: replay vs eager step {verdict}")
            if not (math.isfinite(err) and err <= tol):
                if impl in CHECKED_IMPLS:    # like _verdict: only our kernels fail the run
                    row["check"] = "FAIL"
                    who = "" if impl == "ours" else f" ({impl})"
                    self.check_failures.append(
                        f"{case.geometry.label} {case.pattern.name} step-graph{who}: replay vs eager "
                        f"step rel. error {err:.2e} > {tol:.0e}")
                raise GraphMismatch(f"the CUDA graph replay differs from the eager step "
                                    f"(rel. error {err:.2e} > {tol:.0e}): not timed")
            ms = median_ms(step.replay, self.device, warmup_ms=self.options.warmup_ms,
                           rep_ms=self.options.rep_ms)
            return step.setup_s, ms, mem.mib
        finally:
            del step


# ---------------------------------------------------------------------------------------
def derive(rows: list[dict]) -> None:
    """Fill the comparison columns from the measured times, in place.

    x_dense: our dense time (same geometry and mode) / this time.
    vs_flex: FlexAttention's time on the same case and mode / this time (> 1: faster).
    skip_ratio: time / (work_fraction x the same implementation's dense time); 1.0 means the
        time scales exactly with the computed work ("block skipping is real").
    overhead_ms: on ``step`` rows, step - step-graph of the same implementation and case
        (what the host adds to a training step: Python, autograd, launches); on
        ``unprepared`` rows, unprepared - fwd (the pattern work of a call that gets a new
        pattern object).
    """
    ok = [r for r in rows if r.get("status") == "ok"]
    dense = {(r["geometry"], r["mode"], r["impl"]): r["time_ms"] for r in ok if r["pattern"] == "dense"}
    flex = {(r["geometry"], r["pattern"], r["mode"]): r["time_ms"] for r in ok if r["impl"] == "flex"}
    for r in ok:
        ms = r["time_ms"]
        ours_dense = dense.get((r["geometry"], r["mode"], "ours"))
        if ours_dense:
            r["x_dense"] = ours_dense / ms
        own_dense = dense.get((r["geometry"], r["mode"], r["impl"]))
        if own_dense and r["impl"] != "sdpa" and r["work_fraction"] > 0:
            r["skip_ratio"] = ms / (r["work_fraction"] * own_dense)
        f = flex.get((r["geometry"], r["pattern"], r["mode"]))
        if f and r["impl"] != "flex":
            r["vs_flex"] = f / ms
    times = {(r["geometry"], r["pattern"], r["mode"], r["impl"]): r["time_ms"] for r in ok}
    for r in ok:
        base = OVERHEAD_BASE.get(r["mode"])
        other = times.get((r["geometry"], r["pattern"], base, r["impl"])) if base else None
        if other is not None:
            r["overhead_ms"] = r["time_ms"] - other


# mode -> the mode whose time, subtracted, leaves the overhead (see derive)
OVERHEAD_BASE = {"step": "step-graph", "unprepared": "fwd"}


def geometry_of(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["geometry"] for r in rows))


def first(rows: list[dict], **match) -> Optional[dict]:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None
