"""Package layout rules, checked statically (ast only: nothing is imported, runs in ms).

* no import cycle between modules of ``baracuda_kernels`` (module-level and function-level
  imports both count: a lazy import hides a cycle from the interpreter, not from readers);
* no module longer than ``MAX_LINES`` lines (split it instead);
* ``baracuda_kernels.core`` imports nothing of the package outside ``core``;
* ``baracuda_kernels.attention.patterns`` imports nothing of the package outside itself and
  ``core``, except the single edge named in ``PATTERNS_UPWARD_EXCEPTIONS``.

How imports become edges of the graph (one node per module; a package is its ``__init__``):

* ``import a.b.c`` and ``from a.b import c`` where ``c`` is a submodule: an edge to
  ``a.b.c`` only;
* ``from a.b import name`` where ``name`` is not a submodule: an edge to ``a.b`` (the
  module, or the package ``__init__``, that defines or re-exports ``name``);
* relative imports are resolved against the importing module's package.

Python also runs the ``__init__`` of every parent package (``a``, ``a.b``) on such an import.
Those implicit parent edges are NOT added: a package ``__init__`` re-exports its submodules,
so with them every submodule that imports a sibling through its full name would be in a
cycle with its own package (``attention/__init__`` -> ``attention.block_sparse.functional``
-> ... -> ``attention.patterns.checks`` would imply -> ``attention/__init__``), i.e. a false
cycle on every package. This is the usual convention of import-cycle linters. Edges from an
``__init__`` to its own submodules are therefore kept as they are (none needs ignoring),
and a module that names its own ancestor package explicitly (``from .. import x`` where
``x`` is not a submodule) does get the edge to it: that is a real cycle through the
half-initialised package.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "baracuda_kernels"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE
MAX_LINES = 500

# Modules allowed above MAX_LINES for now: path relative to src/baracuda_kernels -> its line
# count when it was listed. Each is to be split; the test fails if one grows past its count
# (and asks for the entry to be removed once the file is back under MAX_LINES).
OVERSIZE_ALLOWED: dict[str, int] = {
}

# The one import from attention.patterns up into the attention layer above it.
# BlockPattern.prepare() returns a block_sparse PreparedPattern (public API: the pattern's
# block lists built once for the kernels). The patterns package cannot offer that method
# without reaching the class that builds those lists, which lives above it; the import is
# lazy (inside the method) and PreparedPattern.build only duck-types the pattern (mask,
# block_size, query_len, key_len, is_causal), so nothing below imports patterns back through
# it. Any other upward import from patterns fails the test.
PATTERNS_UPWARD_EXCEPTIONS = {
    (f"{PACKAGE}.attention.patterns.block_pattern", f"{PACKAGE}.attention.block_sparse.prepared"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(name: str, modules) -> str | None:
    """The deepest known module that ``name`` (a dotted path) names or lies in."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules) -> list[tuple[str, int, bool]]:
    """(target module, line, module_level) for every intra-package import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    top_level = {id(node) for node in tree.body}
    # Imports nested in top-level if/try blocks still run at import time.
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[:-(node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from base import sub`` where sub is a submodule imports sub; else base.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                     for a in node.names]
        else:
            continue
        for name in names:
            if name != PACKAGE and not name.startswith(PACKAGE + "."):
                continue
            target = _resolve(name, modules)
            assert target is not None, f"{path}:{node.lineno}: import of unknown module {name}"
            if target != module:
                out.append((target, node.lineno, id(node) in top_level))
    return out


def _graph():
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _find_cycles(graph) -> list[tuple[list[str], list[str]]]:
    """(a shortest cycle through its first module, as a path ending where it starts; all its
    modules) for each strongly connected component of more than one module."""
    adj = {m: sorted({t for t, _, _ in edges}) for m, edges in graph.items()}
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

    def strongconnect(v):                      # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in adj[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(set(scc))

    for v in sorted(adj):
        if v not in index:
            strongconnect(v)

    cycles = []
    for scc in sccs:                           # a shortest cycle through the SCC's first node
        start = min(scc)
        prev, frontier = {start: None}, [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in adj[v]:
                    if w == start:
                        found = v
                        break
                    if w in scc and w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        v = found
        while v is not None and v != start:
            path.append(v)
            v = prev[v]
        cycles.append(([start] + path[:0:-1] + [start], sorted(scc)))
    return cycles


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


# ---------------------------------------------------------------------------------------------
def test_graph_sees_the_package():
    graph = _graph()
    assert f"{PACKAGE}.attention.patterns.block_pattern" in graph
    assert f"{PACKAGE}.core" in graph
    # a function-level import is an edge too (the one documented upward import is one)
    edges = {(m, t): top for m, es in graph.items() for t, _, top in es}
    for edge in PATTERNS_UPWARD_EXCEPTIONS:
        assert edge in edges, f"stale exception {edge}: remove it from PATTERNS_UPWARD_EXCEPTIONS"
        assert edges[edge] is False, f"{edge} must stay a lazy (function-level) import"


def test_find_cycles_reports_a_path():
    graph = {"a": [("b", 1, True)], "b": [("c", 1, False)], "c": [("a", 1, True)], "d": []}
    assert _find_cycles(graph) == [(["a", "b", "c", "a"], ["a", "b", "c"])]
    assert _find_cycles({"a": [("b", 1, True)], "b": []}) == []


def test_no_import_cycles():
    graph = _graph()
    cycles = _find_cycles(graph)
    lines = {(m, t): ln for m, es in graph.items() for t, ln, _ in es}
    report = []
    for cycle, members in cycles:
        hops = [f"{a} (line {lines[a, b]})" for a, b in zip(cycle, cycle[1:])]
        report.append(" -> ".join(hops + [cycle[-1]]) +
                      f"\n    (that cycle's component: {', '.join(members)})")
    assert not cycles, "import cycles (function-level imports included):\n  " + "\n  ".join(report)


def test_module_length():
    offenders, grown, stale = [], [], []
    seen = set()
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        n = _lines(path)
        if rel in OVERSIZE_ALLOWED:
            seen.add(rel)
            if n > OVERSIZE_ALLOWED[rel]:
                grown.append(f"{rel}: {n} lines (allowed {OVERSIZE_ALLOWED[rel]} until it is split)")
            elif n <= MAX_LINES:
                stale.append(f"{rel}: {n} lines, now within {MAX_LINES}: remove its entry")
        elif n > MAX_LINES:
            offenders.append(f"{rel}: {n} lines")
    stale += [f"{rel}: no such file: remove its entry" for rel in set(OVERSIZE_ALLOWED) - seen]
    msg = []
    if offenders:
        msg.append(f"modules over {MAX_LINES} lines (split them):\n  " + "\n  ".join(offenders))
    if grown:
        msg.append("allow-listed oversize modules grew:\n  " + "\n  ".join(grown))
    if stale:
        msg.append("stale OVERSIZE_ALLOWED entries:\n  " + "\n  ".join(stale))
    assert not msg, "\n".join(msg)


def _outside(graph, prefix: str, allowed_prefixes: tuple[str, ...], exceptions=frozenset()):
    bad = []
    for m, edges in sorted(graph.items()):
        if m != prefix and not m.startswith(prefix + "."):
            continue
        for t, ln, _ in edges:
            if (m, t) in exceptions:
                continue
            if not any(t == p or t.startswith(p + ".") for p in allowed_prefixes):
                bad.append(f"{m} (line {ln}) imports {t}")
    return bad


def test_core_imports_only_core():
    core = f"{PACKAGE}.core"
    bad = _outside(_graph(), core, (core,))
    assert not bad, "baracuda_kernels.core must not import the rest of the package:\n  " + \
        "\n  ".join(bad)


def test_patterns_import_only_core():
    patterns = f"{PACKAGE}.attention.patterns"
    bad = _outside(_graph(), patterns, (patterns, f"{PACKAGE}.core"), PATTERNS_UPWARD_EXCEPTIONS)
    assert not bad, ("attention.patterns may import only itself and core (one documented "
                     "exception, PATTERNS_UPWARD_EXCEPTIONS):\n  " + "\n  ".join(bad))


def test_every_module_imports_first():
    """Each module imports cleanly as the *first* module of the package a program touches
    (a fresh interpreter state for the package each time): this catches the cycles the
    static graph leaves out on purpose, those that run through a parent package's
    ``__init__`` (importing ``a.b.c`` runs ``a/b/__init__`` first)."""
    import subprocess
    import sys
    names = sorted(m for m in _modules() if not m.endswith("__main__"))
    script = (
        "import importlib, sys, traceback\n"
        f"names = {names!r}\n"
        "bad = []\n"
        "for name in names:\n"
        f"    for m in [m for m in sys.modules if m == {PACKAGE!r} or m.startswith({PACKAGE + '.'!r})]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        bad.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=SRC.parent, timeout=300)
    assert done.returncode == 0, "modules that fail to import first:\n" + done.stdout + done.stderr[-2000:]
