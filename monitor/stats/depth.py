"""Token uniformity of one block's hidden states (rank collapse with depth, METRICS.md 7)."""

from __future__ import annotations

import torch

from ..functional.logits import token_uniformity
from .base import Statistic

_F64 = torch.float64


class TokenUniformitySums(Statistic):
    """Sums over sequences with at least two tokens of ``rho`` (mean token cosine) and ``r_F``
    (residual after removing the token mean)."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("sequences", "rho", "r_f"):
            self.add_state(name, (), _F64)

    @torch.no_grad()
    def update(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add hidden states ``(B, T, D)``; ``mask (B, T)`` true for real tokens."""
        rho, r_f = token_uniformity(hidden, mask)
        ok = torch.isfinite(rho)
        self.sequences += ok.sum()
        self.rho += torch.where(ok, rho, 0.0).sum()
        self.r_f += torch.where(ok, r_f, 0.0).sum()
