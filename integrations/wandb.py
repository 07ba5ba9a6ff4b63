"""A Weights & Biases sink (``wandb`` is an optional dependency: ``pip install wandb``)."""

from __future__ import annotations

from ..rules import Alert
from ..sinks import Sink, optional_import, threshold_scalars

_ALERT_COLUMNS = ["step", "rule", "metric", "value", "threshold", "message"]


class WandbSink(Sink):
    """Log to a W&B run: metrics and thresholds as scalars, histograms as ``wandb.Histogram``,
    pictures as ``wandb.Image``, alerts and mitigation events as tables (``collapse/alert_log``,
    ``collapse/event_log``: ``collapse/alerts/<rule>`` are the alert counters), at the monitor's
    step.

    Args:
        run: a ``wandb`` run; default the active one (``wandb.run``), else one started on the
            first write with ``wandb.init(**init)`` (on rank 0 only, unless ``all_ranks``).
        all_ranks: log from every rank (each its own run) instead of rank 0 only.
        step_key: log the step as this metric (``"trainer/global_step"``, as Lightning's
            ``WandbLogger`` does) instead of W&B's own step.
        **init: keyword arguments of ``wandb.init`` (``project=``, ``mode="offline"``, ...).

    Raises:
        ImportError: ``wandb`` is not installed (says how to install it).
    """

    def __init__(
        self, run=None, all_ranks: bool = False, step_key: str | None = None, **init
    ) -> None:
        self._wandb = optional_import("wandb", "WandbSink", "wandb")
        self._run, self._init = run, init
        self.step_key = step_key
        self._owned = False
        self.main_process_only = not all_ranks
        self._alerts: list[list] = []
        self._events: list[list] = []

    @property
    def run(self):
        if self._run is None:
            self._run = self._wandb.run
            if self._run is None:  # started here, so finished here
                self._run, self._owned = self._wandb.init(**self._init), True
        return self._run

    def _log(self, values: dict, step: int) -> None:
        if self.step_key is None:
            self.run.log(values, step=step)
        else:
            self.run.log({**values, self.step_key: step})

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
        if self._owned and self._run is not None:
            self._run.finish()
