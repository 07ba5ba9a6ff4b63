"""The calls a probe recorded in a window, and those whose input held NaN or Inf (divergence)."""

from __future__ import annotations

import torch

from .base import Statistic


class CallCounts(Statistic):
    """``calls`` recorded, ``nonfinite`` calls whose input held NaN or Inf, and the training step
    ``first_nonfinite`` at which the window first saw one (the largest int64 before any), all
    on the device: recording one costs no host sync.

    Example:
        >>> import torch
        >>> c = CallCounts()
        >>> c.add(3, torch.tensor(False)); c.add(4, torch.tensor(True)); c.add(5, torch.tensor(True))
        >>> int(c.calls), int(c.nonfinite), int(c.first_nonfinite)
        (3, 2, 4)
    """

    def __init__(self) -> None:
        super().__init__()
        self.add_state("calls", (), torch.int64)
        self.add_state("nonfinite", (), torch.int64)
        self.add_state("first_nonfinite", (), torch.int64, reduce="min")

    def add(self, step: int, nonfinite: torch.Tensor | None) -> None:
        """One call at training step ``step``; ``nonfinite``: a 0-d bool, its input held NaN or
        Inf (None: nothing it could tell)."""
        self.calls += 1
        if nonfinite is not None:
            if nonfinite.device != self.nonfinite.device:  # (.to would be an op even so)
                nonfinite = nonfinite.to(self.nonfinite.device)
            self.nonfinite += nonfinite
            here = torch.where(nonfinite, step, self.first_nonfinite)
            torch.minimum(self.first_nonfinite, here, out=self.first_nonfinite)
