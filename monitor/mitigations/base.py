"""Base class of mitigations."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..contracts import Component, Event, LogView, Setup
from ..hooks import HookSet
from ..keys import check_name


class Mitigation(Component):
    """An action the monitor may take on the model after a log.

    :meth:`attach` is called once with the monitor's :class:`~collapse_monitor.contracts.Setup`;
    :meth:`after_log` at every log on every rank with the same (all-reduced) view of the log, so a
    mitigation that decides from it decides identically everywhere. It returns the
    :class:`~collapse_monitor.contracts.Event` objects of the changes it made and read back; the
    monitor logs each to Python ``logging`` and to every sink, and routes it to the probe it
    names. Mitigations are saved and restored by name.

    Args:
        name: unique among the monitor's mitigations; default :attr:`kind`. No ``/``.
    """

    #: the default name, also the event name (``collapse/mitigations/<name>``)
    kind: ClassVar[str] = "mitigation"
    reads_parameters = True

    def __init__(self, name: str | None = None) -> None:
        super().__init__(check_name(name or self.kind, "mitigation name"))
        self._hooks = HookSet()

    def attach(self, setup: Setup) -> None:
        self.strict = setup.strict

    def after_log(self, view: LogView) -> list[Event]:
        return []

    def on_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Called by every ``monitor.step()`` (keep it cheap)."""

    def adopt_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """A freshly built optimizer (a resumed run's): give it the parameters this mitigation
        added, in the groups the original run had."""

    def restore_structure(self, state: dict) -> None:
        """Re-apply, from a checkpoint's :meth:`state_dict`, what this mitigation changed in the
        model's structure (before the model's own weights are loaded)."""

    def detach(self) -> None:
        self._hooks.remove()
        self.end_recording()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restore :meth:`state_dict`; ``optimizer`` for mitigations that add parameters."""
