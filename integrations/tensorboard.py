"""TensorBoard sink: scalars, alerts as text, and a custom-scalars layout grouping each probe."""

from __future__ import annotations

import json
import re

from torch.utils.tensorboard import SummaryWriter

from .. import distributed
from ..keys import MetricKey
from ..rules import Alert
from ..sinks import Sink, threshold_tags


def scalar_layout(keys, thresholds=()) -> dict:
    """Custom-scalars layout of the :class:`~collapse_monitor.keys.MetricKey` keys among ``keys``
    (other tags are left out): a category per probe (and per snapshot prefix), a chart per metric
    (per-head values of one metric share a chart), a chart per alert rule and mitigation, and for
    each key in ``thresholds`` a margin chart drawing the metric between its rule thresholds
    (see :func:`threshold_tags`)."""
    layout: dict[str, dict[str, list]] = {}
    for k in sorted(k for k in keys if isinstance(k, MetricKey)):
        prefix = f"{k.prefix}/" if k.prefix else ""
        if k.is_probe_metric:
            category = f"{prefix}collapse/{k.probe}"
            chart = f"{k.layer}/{k.metric}" if k.layer else k.metric
            series = k.series
        elif k.metric:  # alert and mitigation counters: a chart per rule or mitigation
            category, chart, series = f"{prefix}collapse/{k.probe}", k.metric, k
        else:  # collapse/errors
            category, chart, series = f"{prefix}collapse", k.probe, k
        charts = layout.setdefault(category, {})
        charts[chart] = ["Multiline", ["^" + re.escape(series) + "(/.*)?$"]]
        if k in thresholds:
            label = chart + (f"/{k.index}" if k.index else "")
            charts[label + " vs threshold"] = ["Margin", [str(k), *threshold_tags(k)]]
    return layout


class TensorBoardSink(Sink):
    """Write the monitor's output to TensorBoard.

    Args:
        log_dir: a directory (a ``SummaryWriter`` is created on the first write and owned), or
            an existing ``SummaryWriter`` (shared; not closed by the sink).
        layout: write the custom-scalars layout (rewritten when new metrics appear).
        all_ranks: write from every rank (to ``<log_dir>/rank<r>``) instead of rank 0 only.
    """

    def __init__(self, log_dir, layout: bool = True, all_ranks: bool = False) -> None:
        self._writer = log_dir if isinstance(log_dir, SummaryWriter) else None
        self._owned = self._writer is None
        self.log_dir = log_dir
        self.main_process_only = not all_ranks
        self.layout = layout
        self._layout_written: dict | None = None
        self._keys: set[str] = set()
        self._thresholded: set[str] = set()

    @property
    def writer(self) -> SummaryWriter:
        """The writer, made on first use: ranks that never write leave no event file."""
        if self._writer is None:
            log_dir = str(self.log_dir)
            if not self.main_process_only:
                log_dir = f"{log_dir}/rank{distributed.rank()}"
            self._writer = SummaryWriter(log_dir=log_dir)
        return self._writer

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        if self.layout:
            self.write_layout(metrics)

    def log_thresholds(self, thresholds: dict[str, list[float]], step: int) -> None:
        """Thresholds as scalars next to their metric, every log (a margin chart needs points
        at the metric's steps), and margin charts in the layout."""
        for key, values in thresholds.items():
            lower, upper = threshold_tags(key)
            self.writer.add_scalar(lower, min(values), step)
            self.writer.add_scalar(upper, max(values), step)
        if self.layout and not self._thresholded.issuperset(thresholds):
            self._thresholded |= set(thresholds)
            self.write_layout(())

    def log_image(self, tag: str, image, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def write_layout(self, metrics) -> None:
        """Add ``metrics``' keys to the custom-scalars layout; written when it changed."""
        self._keys |= set(metrics)
        new = scalar_layout(self._keys, self._thresholded)
        merged = {c: dict(charts) for c, charts in (self._layout_written or {}).items()}
        for category, charts in new.items():
            merged.setdefault(category, {}).update(charts)
        if merged != self._layout_written:
            self.writer.add_custom_scalars(merged)
            self._layout_written = merged

    def log_histogram(self, tag: str, values, step: int) -> None:
        self.writer.add_histogram(tag, values.detach().double().cpu().numpy(), step)

    def log_alert(self, alert: Alert) -> None:
        self.writer.add_text("collapse/alerts", alert.message, alert.step)

    def log_event(self, name: str, info: dict, step: int) -> None:
        self.writer.add_text(f"collapse/events/{name}", json.dumps(info, default=str), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is None:
            return
        if self._owned:
            self._writer.close()
        else:
            self._writer.flush()
