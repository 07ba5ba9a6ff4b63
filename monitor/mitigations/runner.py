"""The monitor's side of its mitigations: every step, every log, the events, their state.

Each mitigation sees only its contract: a :class:`~collapse_monitor.contracts.StepView` after
every step and a :class:`~collapse_monitor.contracts.LogView` after every log. What it replaced
of a probe's elements comes back as :class:`~collapse_monitor.contracts.Replaced` (on an
:class:`~collapse_monitor.contracts.Event` at a log, or alone from a step) and is routed to that
probe through ``route``; the events are counted (``collapse/mitigations/<name>``) and logged by
the monitor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Union

import torch

from .._sharding import whole_parameters
from ..contracts import Event, LogView, Replaced, Setup, StepView
from ..keys import MetricKey, mitigations_key
from .base import Mitigation

#: what ``monitor.step(optimizer=)`` takes: an optimizer, a sequence of them, or None
Optimizers = Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer], None]


def as_optimizers(optimizer: Optimizers) -> tuple[torch.optim.Optimizer, ...]:
    """``optimizer`` as a tuple of optimizers.

    Raises:
        TypeError: something that is not an optimizer.
    """
    if optimizer is None:
        return ()
    if isinstance(optimizer, torch.optim.Optimizer):
        return (optimizer,)
    optimizers = tuple(optimizer)
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or a list of them, got {opt!r}"
            )
    return optimizers


class MitigationRunner:
    """The mitigations of one monitor.

    Args:
        mitigations: :class:`Mitigation` instances (names unique).
        route: ``route(replaced)`` hands a :class:`Replaced` to its probe.
    """

    def __init__(self, mitigations: Iterable[Mitigation], route: Callable[[Replaced], None]):
        self.mitigations = list(mitigations)
        self.route = route
        self.counts: dict[str, float] = {}

    def attach(self, setup: Setup) -> None:
        for m in self.mitigations:
            m.attach(setup)

    def detach(self) -> None:
        for m in self.mitigations:
            m.detach()

    @property
    def reads_parameters(self) -> bool:
        return any(m.reads_parameters and not m.disabled for m in self.mitigations)

    def after_step(self, view: StepView) -> None:
        """Every enabled mitigation's every-step action; what it replaced goes to its probe."""
        for m in self.mitigations:
            if not m.disabled:
                for replaced in m.run(m.on_step, view) or []:
                    self.route(replaced)

    def after_log(self, view: LogView, holder: torch.nn.Module) -> list[Event]:
        """Every enabled mitigation acts on this log (the same view on every rank); the events
        it returns are counted and what they replaced is routed to the probes."""
        events = []
        # FSDP (first generation): whole parameters, written back after
        with whole_parameters(holder) if self.reads_parameters else nullcontext():
            for m in self.mitigations:
                if not m.disabled:
                    events += m.run(m.after_log, view) or []
        for event in events:
            self.counts[event.name] = self.counts.get(event.name, 0.0) + event.count
            if event.replaced is not None:
                self.route(event.replaced)
        return events

    def metrics(self) -> dict[MetricKey, float]:
        """The running totals, ``collapse/mitigations/<name>``."""
        return {mitigations_key(name): total for name, total in self.counts.items()}

    # ----------------------------------------------------------------- resume
    def restore_structure(self, states: dict) -> None:
        for m in self.mitigations:
            m.restore_structure(states[m.name])

    def adopt_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for m in self.mitigations:
            m.adopt_optimizer(optimizer)

    def state_dict(self) -> dict:
        """Each mitigation's state, by name."""
        return {m.name: m.state_dict() for m in self.mitigations}

    def load_state_dict(self, states: dict, counts: dict, optimizers: tuple) -> None:
        self.counts = dict(counts)
        for m in self.mitigations:
            m.load_state_dict(states[m.name], optimizers=optimizers)
