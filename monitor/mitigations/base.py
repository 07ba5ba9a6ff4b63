"""Base class of mitigations."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..monitor import CollapseMonitor
    from ..rules import Alert


class Mitigation:
    """An action the monitor may take on the model after a log.

    ``attach`` is called once by the monitor; ``after_log`` at every log on every rank with the
    same (all-reduced) metrics and alerts, so a mitigation that decides from them decides
    identically everywhere. It returns the events it applied (``[(name, info), ...]``); the
    monitor logs each to Python ``logging`` and to every sink.
    """

    name = "mitigation"

    def attach(self, model: torch.nn.Module, monitor: CollapseMonitor) -> None:
        pass

    def after_log(
        self,
        monitor: CollapseMonitor,
        metrics: dict[str, float],
        alerts: list[Alert],
        optimizer: torch.optim.Optimizer | None,
    ) -> list[tuple[str, dict]]:
        return []

    def on_step(self, monitor: CollapseMonitor, optimizer: torch.optim.Optimizer | None) -> None:
        """Called by every ``monitor.step()`` (keep it cheap)."""

    def detach(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restore :meth:`state_dict`; ``optimizer`` for mitigations that add parameters."""
