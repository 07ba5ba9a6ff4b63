"""Evaluation snapshots: the probes record into fresh windows, read out under a prefix.

While a snapshot is open every probe records every observed forward into a window of its own
(sharing persistent memories, such as usage EMAs, with training, but not advancing them); at its
end the windows are read out over all ranks under ``<prefix>/collapse/...`` and the training
windows come back untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from .probes.probeset import ProbeSet

log = logging.getLogger(__name__)


class Snapshots:
    """The snapshot state of one monitor's probes.

    Attributes:
        prefix: the open snapshot's prefix (``None``: none is open); loader: its evaluation
            dataloader's index, or None; observed: the ``observe()`` blocks it holds.
    """

    def __init__(self, probes: ProbeSet) -> None:
        self.probes = probes
        self.prefix: str | None = None
        self.loader: int | None = None
        self.observed = 0
        self._said: set[str] = set()

    def note_observe(self) -> bool:
        """At an ``observe()``: whether a snapshot is open (it then holds one more block)."""
        self.observed += self.prefix is not None
        return self.prefix is not None

    def begin(self, prefix: str, loader: int | None = None) -> None:
        """Open a snapshot.

        Raises:
            RuntimeError: one is already open.
        """
        if self.prefix is not None:
            raise RuntimeError(f"snapshot '{self.prefix}' is already open")
        self.prefix, self.loader, self.observed = prefix, loader, 0
        self.probes.begin_snapshot()

    def close(self) -> None:
        """Give the probes their training windows back."""
        self.prefix = None
        self.probes.end_snapshot()

    @contextmanager
    def ending(self, prefix: str | None = None) -> Iterator[tuple[str, int | None]]:
        """Inside: read the snapshot out under ``(prefix, loader)`` (``prefix`` replaces the
        one it was opened with); it closes after, whatever happens.

        Raises:
            RuntimeError: no snapshot is open.
        """
        if self.prefix is None:
            raise RuntimeError("end_snapshot() without begin_snapshot()")
        if not self.observed and self.prefix not in self._said:  # (once per prefix)
            self._said.add(self.prefix)  # (forwards outside observe() are not recorded)
            log.warning(
                "collapse monitor: snapshot '%s' held no monitor.observe() block: its forwards "
                "were not recorded (run them inside `with monitor.observe(...)`)",
                self.prefix,
            )
        try:
            yield prefix or self.prefix, self.loader
        finally:
            self.close()
