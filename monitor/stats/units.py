"""Mean absolute activation per unit of one layer (dormant units, docs/metrics.md#dormantunits)."""

from __future__ import annotations

import torch

from .base import Statistic

_F64 = torch.float64


class UnitActivity(Statistic):
    """``sum |h_i|`` per unit ``(H,)``, the rows summed and the rows skipped; ``H`` (units) is
    fixed by the first update (Sokar et al. 2023's dormancy score is a function of these).

    Example:
        >>> import torch
        >>> from collapse_monitor.stats import UnitActivity
        >>> s = UnitActivity()
        >>> s.update(torch.tensor([[1.0, -2.0], [float("nan"), 0.0]]), torch.tensor([True, False]))
        >>> s.abs_sum, int(s.rows), int(s.skipped)
        (tensor([1., 2.], dtype=torch.float64), 1, 1)
    """

    def __init__(self) -> None:
        super().__init__()
        self.add_size("H", "unit count")
        self.add_state("abs_sum", ("H",), _F64)
        self.add_state("rows", (), _F64)
        self.add_state("skipped", (), torch.int64)

    @torch.no_grad()
    def update(self, activations: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add ``activations (N, H)`` (units last); rows where ``valid (N,)`` is false (NaN or
        Inf) are left out and counted in ``skipped``."""
        self.add(*self.sums(activations, valid))

    @staticmethod
    @torch.no_grad()
    def sums(
        activations: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | int, torch.Tensor | int]:
        """``(abs_sum (H,), rows, skipped)`` of ``activations (N, H)``, for :meth:`add` (one
        pass feeding several statistics)."""
        a = activations.abs().to(_F64)
        if valid is None:
            return a.sum(0), activations.shape[0], 0
        return torch.where(valid[:, None], a, 0.0).sum(0), valid.sum(), (~valid).sum()

    @torch.no_grad()
    def add(self, abs_sum: torch.Tensor, rows, skipped) -> None:
        self.fix_sizes(H=abs_sum.shape[0])
        self.abs_sum += abs_sum
        self.rows += rows
        self.skipped += skipped
