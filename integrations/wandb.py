"""A Weights & Biases sink (``wandb`` is an optional dependency: ``pip install wandb``)."""

from __future__ import annotations

from ..rules import Alert
from ..sinks import Sink, optional_import, threshold_scalars

_ALERT_COLUMNS = ["step", "rule", "metric", "value", "threshold", "message"]


class WandbSink(Sink):
    """Log to a W&B run: metrics and thresholds as scalars, histograms as ``wandb.Histogram``,
    pictures as ``wandb.Image``, alerts and mitigation events as tables (``collapse/alert_log``,
    ``collapse/event_log``: ``collapse/alerts/<rule>`` are the alert counters), one row per
    log, with the monitor's step as the metric ``step_key`` and the collapse keys plotted
    against it (``define_metric``), beside whatever the user logs with ``wandb.log``.

    Args:
        run: a ``wandb`` run; default the active one (``wandb.run``), else one started on the
            first write with ``wandb.init(**init)`` (on rank 0 only, unless ``all_ranks``).
        all_ranks: log from every rank (each its own run) instead of rank 0 only.
        step_key: the metric holding the step (``"trainer/global_step"``, as Lightning's
            ``WandbLogger`` does); ``None``: W&B's own step, ``run.log(..., step=)``, which
            W&B drops once a ``wandb.log`` of the user's has moved its step past the monitor's
            (with a warning of its own).
        **init: keyword arguments of ``wandb.init`` (``project=``, ``mode="offline"``, ...).

    Raises:
        ImportError: ``wandb`` is not installed (says how to install it).
    """

    def __init__(
        self, run=None, all_ranks: bool = False, step_key: str | None = "collapse/step", **init
    ) -> None:
        self._wandb = optional_import("wandb", "WandbSink", "wandb")
        self._run, self._init = run, init
        self.step_key = step_key
        self._owned = False
        self.main_process_only = not all_ranks
        self._alerts: list[list] = []
        self._events: list[list] = []
        self._row: dict = {}  # this log's values, written as one row at flush
        self._row_step: int | None = None
        self._defined: set[str] = set()  # key prefixes plotted against step_key

    @property
    def run(self):
        if self._run is None:
            self._run = self._wandb.run
            if self._run is None:  # started here, so finished here
                self._run, self._owned = self._wandb.init(**self._init), True
        return self._run

    def _log(self, values: dict, step: int) -> None:
        if self._row_step is not None and step != self._row_step:
            self.flush()
        self._row.update(values)
        self._row_step = step

    def flush(self) -> None:
        if self._row_step is None:
            return
        row, step = self._row, self._row_step
        self._row, self._row_step = {}, None
        if self.step_key is None:
            self.run.log(row, step=step)
            return
        # e.g. collapse/*, val/collapse/*, thresholds/collapse/*: against the monitor's step
        # (a user's own keys keep theirs)
        for key in row:
            at = key.find("collapse/")
            glob = key[: at + len("collapse/")] + "*" if at >= 0 else None
            if glob is not None and glob not in self._defined:
                if not self._defined:
                    self.run.define_metric(self.step_key)
                self._defined.add(glob)
                self.run.define_metric(glob, step_metric=self.step_key)
        self.run.log({**row, self.step_key: step})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._log(dict(metrics), step)

    def log_thresholds(self, thresholds: dict[str, list[float]], step: int) -> None:
        values = threshold_scalars(thresholds)
        if values:
            self._log(values, step)

    def log_histogram(self, tag: str, values, step: int) -> None:
        sequence = values.detach().double().cpu().numpy()
        self._log({tag: self._wandb.Histogram(sequence)}, step)

    def log_image(self, tag: str, image, step: int) -> None:
        self._log({tag: self._wandb.Image(image)}, step)

    def log_alert(self, alert: Alert) -> None:
        row = [alert.step, alert.rule, alert.metric, alert.value, alert.threshold, alert.message]
        self._alerts.append(row)
        table = self._wandb.Table(columns=_ALERT_COLUMNS, data=list(self._alerts))
        self._log({"collapse/alert_log": table}, alert.step)

    def log_event(self, name: str, info: dict, step: int) -> None:
        self._events.append([step, name, str(info)])
        table = self._wandb.Table(columns=["step", "mitigation", "info"], data=list(self._events))
        self._log({"collapse/event_log": table}, step)

    def close(self) -> None:
        self.flush()
        if self._owned and self._run is not None:
            self._run.finish()
