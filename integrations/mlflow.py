"""An MLflow sink (``mlflow`` or ``mlflow-skinny`` is an optional dependency)."""

from __future__ import annotations

import json
import re
import time

from ..keys import MetricKey
from ..rules import Alert
from ..sinks import Sink, optional_import, threshold_scalars

_BATCH = 1000  # MLflow takes at most this many metrics per log_batch call
_INVALID = re.compile(r"[^A-Za-z0-9_\-. :/]")  # MLflow's allowed key characters


def metric_name(key: str) -> str:
    """``key`` as an MLflow metric name: the characters MLflow refuses (a glob's ``*``,
    brackets) replaced by ``_``, and a per-head or per-dimension element of a metric written
    ``.../entropy_norm.head_0``: MLflow's file store keeps each metric as a file named by its
    key, where ``.../entropy_norm`` could not be a file and a folder at once."""
    if isinstance(key, MetricKey) and key.index:
        loader = "" if key.loader is None else f"/dataloader_idx_{key.loader}"
        key = f"{key.series}.{key.index}{loader}"
    return _INVALID.sub("_", key)


class MLflowSink(Sink):
    """Log to an MLflow run: metrics and thresholds as metrics at the monitor's step; alerts and
    mitigation events as text artifacts (``collapse/alerts.txt``, ``collapse/events.txt``, one
    line each); histograms as JSON artifacts; pictures with ``log_image``.

    Args:
        run_id: an existing run; default a new run in ``experiment`` (created on first write).
        tracking_uri: where MLflow stores runs (a server URL, ``sqlite:///mlflow.db`` with
            ``sqlalchemy`` installed, or ``file:./mlruns``: MLflow 3 refuses a file store
            unless ``MLFLOW_ALLOW_FILE_STORE=true`` is set); default MLflow's own
            (``MLFLOW_TRACKING_URI``).
        experiment: experiment name for a new run (default MLflow's default experiment).
        client: an ``MlflowClient`` (Lightning's ``MLFlowLogger.experiment``) instead of a new one.
        all_ranks: log from every rank instead of rank 0 only.

    Raises:
        ImportError: ``mlflow`` is not installed (says how to install it).
    """

    def __init__(
        self,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        client=None,
        all_ranks: bool = False,
    ) -> None:
        tracking = optional_import("mlflow.tracking", "MLflowSink", "mlflow")
        self._entities = optional_import("mlflow.entities", "MLflowSink", "mlflow")
        self.client = client or tracking.MlflowClient(tracking_uri)
        self._run_id, self.experiment = run_id, experiment
        self._owned = False  # a run this sink created, ended by close()
        self.main_process_only = not all_ranks
        self._alerts: list[str] = []
        self._events: list[str] = []

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            exp = "0"
            if self.experiment is not None:
                found = self.client.get_experiment_by_name(self.experiment)
                exp = (
                    found.experiment_id if found else self.client.create_experiment(self.experiment)
                )
            self._run_id = self.client.create_run(exp).info.run_id
            self._owned = True
        return self._run_id

    def close(self) -> None:
        if self._owned:
            self.client.set_terminated(self._run_id)
            self._owned = False

    def _log(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [
            self._entities.Metric(metric_name(k), float(v), now, step) for k, v in values.items()
        ]
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + _BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._log(metrics, step)

    def log_thresholds(self, thresholds: dict[str, list[float]], step: int) -> None:
        values = threshold_scalars(thresholds)
        if values:
            self._log(values, step)

    def log_histogram(self, tag: str, values, step: int) -> None:
        record = {"tag": tag, "step": step, "values": values.detach().double().cpu().tolist()}
        self.client.log_dict(
            self.run_id, record, f"collapse/histograms/{metric_name(tag)}/{step}.json"
        )

    def log_image(self, tag: str, image, step: int) -> None:
        self.client.log_image(self.run_id, image, key=metric_name(tag), step=step)

    def log_alert(self, alert: Alert) -> None:
        self._alerts.append(alert.message)
        self.client.log_text(self.run_id, "\n".join(self._alerts) + "\n", "collapse/alerts.txt")

    def log_event(self, name: str, info: dict, step: int) -> None:
        self._events.append(json.dumps({"step": step, "name": name, "info": info}, default=str))
        self.client.log_text(self.run_id, "\n".join(self._events) + "\n", "collapse/events.txt")
