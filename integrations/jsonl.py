"""A JSON-lines file sink: one JSON object per line, readable with any tool, no dependency."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .. import distributed
from ..rules import Alert
from ..sinks import Sink


class JSONLinesSink(Sink):
    """Append the monitor's output to a ``.jsonl`` file, one record per line.

    Records: ``{"type": "metrics", "step": s, "metrics": {...}}``, ``"thresholds"``,
    ``"histogram"`` (``values`` as a list), ``"alert"`` (the :class:`~collapse_monitor.Alert`
    fields), ``"event"`` (``name``, ``info``). Images are not written.

    Args:
        path: the file (created with its folder; appended to when it exists).
        all_ranks: write from every rank to ``<stem>.rank<r><suffix>`` instead of rank 0 only.

    Example:
        >>> import json, tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "collapse.jsonl"
        >>> sink = JSONLinesSink(path)
        >>> sink.log_metrics({"collapse/head/nc1": 0.25}, 10)
        >>> sink.close()
        >>> json.loads(path.read_text())["metrics"]
        {'collapse/head/nc1': 0.25}
    """

    def __init__(self, path, all_ranks: bool = False) -> None:
        self.path = Path(path)
        self.main_process_only = not all_ranks
        self._file = None

    def _write(self, record: dict) -> None:
        if self._file is None:  # opened on first write: ranks that never write leave no file
            path = self.path
            if not self.main_process_only:
                path = path.with_name(f"{path.stem}.rank{distributed.rank()}{path.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a")  # noqa: SIM115 (closed in close())
        self._file.write(json.dumps(record, default=str) + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._write({"type": "metrics", "step": step, "metrics": metrics})

    def log_thresholds(self, thresholds: dict[str, list[float]], step: int) -> None:
        if thresholds:
            self._write({"type": "thresholds", "step": step, "thresholds": thresholds})

    def log_histogram(self, tag: str, values, step: int) -> None:
        values = values.detach().double().cpu().tolist()
        self._write({"type": "histogram", "step": step, "tag": tag, "values": values})

    def log_alert(self, alert: Alert) -> None:
        self._write({"type": "alert", **dataclasses.asdict(alert)})

    def log_event(self, name: str, info: dict, step: int) -> None:
        self._write({"type": "event", "step": step, "name": name, "info": info})

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
