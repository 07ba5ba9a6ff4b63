"""Evaluation snapshots: the probes record into fresh windows, read out under a prefix.

While a snapshot is open every probe records every observed forward into a window of its own
(sharing persistent memories, such as usage EMAs, with training, but not advancing them); at its
end the windows are read out over all ranks under ``<prefix>/collapse/...`` and the training
windows come back untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .probes.probeset import ProbeSet


class Snapshots:
    """The snapshot state of one monitor's probes.

    Attributes:
        prefix: the open snapshot's prefix (``None``: none is open); loader: its evaluation
            dataloader's index, or None.
    """

    def __init__(self, probes: ProbeSet) -> None:
        self.probes = probes
        self.prefix: str | None = None
        self.loader: int | None = None

    def begin(self, prefix: str, loader: int | None = None) -> None:
        """Open a snapshot.

        Raises:
            RuntimeError: one is already open.
        """
        if self.prefix is not None:
            raise RuntimeError(f"snapshot '{self.prefix}' is already open")
        self.prefix, self.loader = prefix, loader
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
        try:
            yield prefix or self.prefix, self.loader
        finally:
            self.close()
