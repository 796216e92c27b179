"""The op-agnostic plan protocol, and the plan cache of the functional entry points.

Every op of the library is reached through a plan: a frozen descriptor states the problem,
``select`` validates it and picks backend and kernel once, ``can_implement`` checks concrete
tensors cheaply, ``run`` (and ``run_backward`` for differentiable ops) launches, and the plan
reports what it runs (``sku``) and what it promises (``precision_guarantee``).
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch

from .devices import device_guard
from .errors import Unsupported
from .types import BackendKind, KernelSku, PlanPreference, PrecisionGuarantee


class Plan(abc.ABC):
    """The surface every op's plan has. Subclasses fix the descriptor and args types, and
    call ``Plan.__init__`` with what ``select`` decided."""

    def __init__(self, desc, device: torch.device, backend: BackendKind,
                 declined: Optional[dict] = None):
        self._desc, self._device, self._backend = desc, device, backend
        self._declined = dict(declined or {})  # BackendKind -> why it was not chosen

    @classmethod
    @abc.abstractmethod
    def select(cls, desc, preference: PlanPreference = PlanPreference.DEFAULT, device=None,
               backend=None, **options) -> "Plan":
        """Validate ``desc`` and choose backend and kernel configuration once."""

    @abc.abstractmethod
    def can_implement(self, args) -> bool:
        """Check concrete tensors against the plan: InvalidProblem, else True."""

    @abc.abstractmethod
    def run(self, args, workspace: Optional[torch.Tensor] = None):
        """Launch the op on checked tensors."""

    def run_backward(self, args, *grads, **kwargs):
        """Gradients of ``run``'s inputs; ops without a backward raise Unsupported."""
        raise Unsupported(f"{type(self).__name__} has no backward.")

    def workspace_size(self) -> int:
        """Bytes of caller-provided workspace ``run`` needs (0: none)."""
        return 0

    @property
    def descriptor(self) -> Any:
        """The problem this plan was selected for."""
        return self._desc

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def backend(self) -> BackendKind:
        return self._backend

    @property
    def declined(self) -> dict:
        """Backends asked before the chosen one and why each declined (BackendKind -> reason);
        empty when the first choice ran or the backend was forced."""
        return dict(self._declined)

    @property
    @abc.abstractmethod
    def sku(self) -> KernelSku: ...

    @property
    @abc.abstractmethod
    def precision_guarantee(self) -> PrecisionGuarantee: ...

    def device_guard(self):
        """Context making the plan's CUDA device current around launches."""
        return device_guard(self.device)


class PlanCache:
    """Plans of a functional entry point, keyed by (descriptor, device, options): a plan is
    immutable once selected, so one per key serves every call. Least recently used plans
    go first past ``max_plans``."""

    def __init__(self, max_plans: int = 64):
        self._plans: OrderedDict = OrderedDict()
        self._max = max_plans

    def get(self, key, select: Callable[[], Plan]) -> Plan:
        plan = self._plans.get(key)
        if plan is None:
            plan = select()
            if len(self._plans) >= self._max:
                self._plans.popitem(last=False)
            self._plans[key] = plan
        else:
            self._plans.move_to_end(key)
        return plan

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)
