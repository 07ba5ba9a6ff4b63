"""Where logged metrics and alerts go. A sink knows nothing of probes."""

from __future__ import annotations

from .rules import Alert


class Sink:
    """Receives metrics and alerts at logging cadence. Subclass and override what you need."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """``metrics``: ``{"collapse/<probe>/<metric>": value}`` at training step ``step``."""

    def log_histogram(self, tag: str, values, step: int) -> None:
        """A 1-D tensor of values (e.g. hits per code) whose distribution is worth a plot."""

    def log_thresholds(self, thresholds: dict[str, list[float]], step: int) -> None:
        """The fixed thresholds of the rules on each logged key, at every log."""

    def log_image(self, tag: str, image, step: int) -> None:
        """A picture (``(H, W, 3) uint8`` numpy array) of a probe's last window."""

    def log_alert(self, alert: Alert) -> None:
        """One rule firing (also sent to Python ``logging`` by the monitor)."""

    def log_event(self, name: str, info: dict, step: int) -> None:
        """A mitigation that was applied (e.g. ``reset_dead_codes``) with its details."""

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
