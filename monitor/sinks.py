"""Where logged metrics and alerts go. A sink knows nothing of probes."""

from __future__ import annotations

import importlib
from types import ModuleType

from .rules import Alert


class Sink:
    """Receives metrics and alerts at logging cadence. Subclass and override what you need.

    Every sink is an outlet of its own: an exception in it is logged once with its
    :attr:`name`, counted (``collapse/errors`` and ``collapse/outlet_errors/<name>``) and that
    sink is switched off; the other sinks go on.

    Under ``torch.distributed`` every rank computes the same metrics; a sink with
    ``main_process_only = True`` (the default) is written by rank 0 only, so a run has one copy
    (in the manner of Accelerate's trackers). Set it False for a sink that writes a file per
    rank, or that does its own rank handling (Lightning's loggers).

    Example:
        >>> class Printer(Sink):
        ...     def log_metrics(self, metrics, step):
        ...         print(step, sorted(metrics))
        >>> Printer().log_metrics({"collapse/head/nc1": 0.3}, 50)
        50 ['collapse/head/nc1']
    """

    main_process_only: bool = True

    @property
    def name(self) -> str:
        """The outlet's name in messages and in ``collapse/outlet_errors/<name>``."""
        return type(self).__name__

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


def threshold_tags(key: str) -> tuple[str, str]:
    """The scalar tags holding the lowest and highest rule threshold on ``key``."""
    return f"thresholds/{key}/lower", f"thresholds/{key}/upper"


def threshold_scalars(thresholds: dict[str, list[float]]) -> dict[str, float]:
    """Each key's rule thresholds as two scalars (:func:`threshold_tags`), for loggers that
    take numbers only."""
    out = {}
    for key, limits in thresholds.items():
        lower, upper = threshold_tags(key)
        out[lower], out[upper] = min(limits), max(limits)
    return out


def optional_import(module: str, sink: str, extra: str) -> ModuleType:
    """Import an optional dependency of a sink or integration, or say in one line how to
    install it (``ImportError``); a package that is installed but fails to import raises its
    own error."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name is not None and (module + ".").startswith(exc.name + ".")
        if not missing:  # the package is there, but something it imports is broken
            raise
        raise ImportError(
            f"{sink} needs the '{module}' package: pip install {module} "
            f"(or pip install 'collapse-monitor[{extra}]')"
        ) from None
