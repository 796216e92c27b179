"""Backend registry: each op lists the backends that can run it, and each backend says, for a
concrete problem, whether it can and why not.

A plan's ``select`` asks the op's registry; the registry asks every backend in priority
order and returns the first that accepts together with the reasons of those that declined
(``BackendChoice.declined``), so a plan can always say why it did not pick something.
Nothing here is import-time global state that changes behaviour: a registry is a plain
object owned by its op, and the answers are computed per problem at select time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import Unsupported
from .types import BackendKind

# (descriptor, device, options, explicitly requested) -> None when the backend can run the
# problem, else a sentence saying why not. ``options`` holds selection options of the op
# (say, whether determinism was asked for).
Verdict = Callable[[Any, Any, dict, bool], Optional[str]]


@dataclass(frozen=True)
class BackendEntry:
    kind: BackendKind
    verdict: Verdict
    priority: int  # lower is asked first in automatic selection


@dataclass(frozen=True)
class BackendChoice:
    """The backend a selection picked and, per backend asked before it, why it declined."""

    kind: BackendKind
    declined: dict = field(default_factory=dict)  # BackendKind -> reason

    def describe_declined(self) -> str:
        return "; ".join(f"{k.value}: {why}" for k, why in self.declined.items())


class BackendRegistry:
    """The backends of one op. ``register`` them once (at the op module's import, pure data);
    ``choose`` picks one for a problem."""

    def __init__(self, op_name: str):
        self.op_name = op_name
        self._entries: dict[BackendKind, BackendEntry] = {}

    def register(self, kind: BackendKind, verdict: Verdict, priority: int) -> None:
        self._entries[kind] = BackendEntry(kind, verdict, priority)

    @property
    def kinds(self) -> tuple[BackendKind, ...]:
        return tuple(e.kind for e in sorted(self._entries.values(), key=lambda e: e.priority))

    def reasons(self, desc, device, options: Optional[dict] = None) -> dict:
        """BackendKind -> None (can run) or the reason it cannot, for every backend."""
        options = options or {}
        return {kind: self._entries[kind].verdict(desc, device, options, False)
                for kind in self.kinds}

    def choose(self, desc, device, requested: Optional[BackendKind] = None,
               options: Optional[dict] = None) -> BackendChoice:
        """The requested backend (Unsupported with its reason when it declines), else the
        first in priority order that accepts (Unsupported listing every reason if none)."""
        options = options or {}
        if requested is not None:
            entry = self._entries.get(requested)
            if entry is None:
                names = ", ".join(repr(k.value) for k in self.kinds)
                raise Unsupported(f"backend={requested.value!r} does not implement "
                                  f"{self.op_name}; expected one of {names} or None (automatic).")
            reason = entry.verdict(desc, device, options, True)
            if reason:
                raise Unsupported(f"backend={requested.value!r} cannot run this {self.op_name} "
                                  f"problem: {reason}. Use backend=None (automatic) or another "
                                  f"backend.")
            return BackendChoice(requested)
        declined = {}
        for kind in self.kinds:
            reason = self._entries[kind].verdict(desc, device, options, False)
            if reason is None:
                return BackendChoice(kind, declined)
            declined[kind] = reason
        raise Unsupported(f"no backend can run this {self.op_name} problem: "
                          + BackendChoice(BackendKind.REFERENCE, declined).describe_declined())
