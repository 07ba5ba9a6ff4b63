"""Where a log goes: the sinks, the pictures and the alert callbacks, each behind its own guard.

Every outlet fails alone: an exception in one sink (a tracker that refuses a key, a full disk)
or one ``on_alert`` callable is logged once with its name, counted in ``collapse/errors`` and
``collapse/outlet_errors/<name>``, and that outlet is switched off; the others receive the
log. A probe whose pictures fail loses its
pictures only. Under ``torch.distributed`` a sink with ``main_process_only`` is written by rank 0
only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from . import _dist
from . import pictures as pictures_
from .contracts import Event, Readout
from .keys import MetricKey, outlet_errors_key
from .rules import Alert
from .sinks import Sink

log = logging.getLogger(__name__)


class Outlets:
    """The sinks, pictures and alert callbacks of one monitor.

    Args:
        sinks: :class:`~collapse_monitor.Sink` objects.
        pictures: names of the probes whose pictures are drawn.
        on_alert: callables ``f(alert)``.
        strict: raise the first error instead of switching the outlet off (tests).
        pictures_every_n_logs: draw the pictures at every n-th log only.
    """

    def __init__(
        self,
        sinks: Iterable[Sink],
        pictures: Iterable[str] = (),
        on_alert: Iterable[Callable[[Alert], None]] = (),
        strict: bool = False,
        pictures_every_n_logs: int = 1,
    ) -> None:
        self.sinks: list[Sink] = []
        self.names: dict[int, str] = {}  # each outlet's name, unique (by id)
        self.failures: dict[str, int] = {}  # errors per outlet name
        for sink in sinks:
            self.add(sink)
        self.on_alert = list(on_alert)
        for fn in self.on_alert:  # a function by its name, any other callable by its type's
            self._name(fn, getattr(fn, "__name__", type(fn).__name__))
        self.picture_probes = set(pictures)
        self.strict = strict
        self.pictures_every_n_logs = pictures_every_n_logs
        self.errors = 0
        self._off: set[int] = set()  # outlets switched off after an error (by id)

    def add(self, sink: Sink) -> None:
        """One more sink (a tracker whose run exists only once training began)."""
        if not isinstance(sink, Sink):
            raise TypeError(f"sinks must be Sink instances, got {type(sink).__name__}")
        self.sinks.append(sink)
        self._name(sink, sink.name)

    def _name(self, outlet, base: str) -> str:
        if id(outlet) not in self.names:
            taken = set(self.names.values())
            name, k = base, 1
            while name in taken:
                k += 1
                name = f"{base}_{k}"
            self.names[id(outlet)] = name
        return self.names[id(outlet)]

    def _guard(self, outlet, what: str, fn, *args) -> None:
        if id(outlet) in self._off:
            return
        try:
            fn(*args)
        except Exception as exc:
            if self.strict:
                raise
            name = self.names[id(outlet)]
            self.errors += 1
            self.failures[name] = self.failures.get(name, 0) + 1
            self._off.add(id(outlet))
            log.error(
                "collapse monitor: %s %r failed and is switched off (the other outlets go "
                "on; collapse/outlet_errors/%s counts it): %s: %s",
                what,
                name,
                name,
                type(exc).__name__,
                exc,
            )

    def error_metrics(self) -> dict[MetricKey, float]:
        """``collapse/outlet_errors/<name>`` of every outlet that failed."""
        return {outlet_errors_key(n): float(c) for n, c in self.failures.items()}

    def each_sink(self, method: str, *args) -> None:
        """``sink.<method>(*args)`` on every sink this rank writes, each guarded."""
        rank = _dist.rank()
        for sink in self.sinks:
            if not (sink.main_process_only and rank != 0):
                self._guard(sink, "sink", getattr(sink, method), *args)

    # ----------------------------------------------------------------- one log
    def log(
        self,
        step: int,
        metrics: Mapping[MetricKey, float],
        thresholds: Mapping[MetricKey, list[float]],
        readouts: Mapping[str, Readout],
        alerts: Iterable[Alert],
        events: Iterable[Event],
        index: int = 0,
    ) -> None:
        """Everything of one training log, to every outlet; ``index``: the log's number in the
        run (0 first; from the step, so that a resumed run draws pictures at the same logs)."""
        self.each_sink("log_metrics", metrics, step)
        self.each_sink("log_thresholds", thresholds, step)
        for r in readouts.values():
            for tag, values in r.histograms.items():
                self.each_sink("log_histogram", tag, values, step)
        if index % self.pictures_every_n_logs == 0:
            for tag, image in self._pictures(readouts).items():
                self.each_sink("log_image", tag, image, step)
        for alert in alerts:
            self.alert(alert)
        for event in events:
            log.info("step %d: mitigation %s applied: %s", step, event.name, event.info)
            self.each_sink("log_event", event.name, {**event.info, "count": event.count}, step)
        self.each_sink("flush")

    def alert(self, alert: Alert) -> None:
        """One alert to Python logging, every sink and every ``on_alert`` callable."""
        prefix = f"[rank {_dist.rank()}] " if _dist.is_distributed() else ""
        log.warning("%scollapse alert: %s", prefix, alert.message)
        self.each_sink("log_alert", alert)
        for fn in self.on_alert:
            self._guard(fn, "on_alert callable", fn, alert)

    def _pictures(self, readouts: Mapping[str, Readout]) -> dict[MetricKey, np.ndarray]:
        """Rendered pictures of the opted-in probes (only where a sink will receive them)."""
        if not (self.picture_probes and self.sinks):
            return {}
        if not pictures_.available():
            log.warning(
                "collapse monitor: pictures are off, matplotlib is not installed "
                "(pip install matplotlib, or collapse-monitor[pictures])"
            )
            self.picture_probes = set()
            return {}
        out = {}
        for name, r in readouts.items():
            if name not in self.picture_probes:
                continue
            try:
                for key, pic in r.pictures.items():
                    out[key] = pictures_.render(pic)
            except Exception as exc:  # a picture never costs the probe its metrics
                if self.strict:
                    raise
                self.errors += 1
                self.picture_probes.discard(name)
                log.error(
                    "collapse monitor: pictures of %r are off: %s: %s",
                    name,
                    type(exc).__name__,
                    exc,
                )
        return out

    def close(self) -> None:
        """Close every sink, each alone: one that fails (again) never keeps another open."""
        for sink in self.sinks:
            if id(sink) in self._off:  # failed before and said so: closed quietly, if it can be
                with contextlib.suppress(Exception):
                    sink.close()
            else:
                self._guard(sink, "sink", sink.close)
