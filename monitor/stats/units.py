"""Mean absolute activation per unit of one layer (dormant units, METRICS.md 8)."""

from __future__ import annotations

import torch

from .base import Statistic

_F64 = torch.float64


class UnitActivity(Statistic):
    """``sum |h_i|`` per unit ``(H,)`` and the rows summed; ``H`` is fixed by the first update."""

    def __init__(self) -> None:
        super().__init__()
        self.add_size("H", "unit count")
        self.add_state("abs_sum", ("H",), _F64)
        self.add_state("rows", (), _F64)

    @torch.no_grad()
    def update(self, activations: torch.Tensor) -> None:
        """Add ``activations (N, H)`` (units last)."""
        self.fix_sizes(H=activations.shape[1])
        self.abs_sum += activations.abs().to(_F64).sum(0)
        self.rows += activations.shape[0]
