"""Token uniformity of one block's hidden states (rank collapse with depth, docs/metrics.md#tokenuniformity)."""

from __future__ import annotations

import torch

from ..functional.depth import token_uniformity
from .base import Statistic

_F64 = torch.float64


class TokenUniformitySums(Statistic):
    """Sums over sequences with at least two tokens of ``rho`` (mean token cosine) and ``r_F``
    (residual after removing the token mean); docs/metrics.md#tokenuniformity.

    Example:
        >>> import torch
        >>> from collapse_monitor.stats import TokenUniformitySums
        >>> s = TokenUniformitySums()
        >>> s.update(torch.ones(2, 3, 4))  # identical tokens
        >>> float(s.rho / s.sequences), float(s.r_f / s.sequences)
        (1.0, 0.0)
    """

    def __init__(self) -> None:
        super().__init__()
        for name in ("sequences", "rho", "r_f"):
            self.add_state(name, (), _F64)
        self.add_state("skipped", (), torch.int64)

    @torch.no_grad()
    def update(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add hidden states ``(B, T, D)``; ``mask (B, T)`` true for real tokens. Sequences with
        NaN or Inf in a real token, or whose real tokens are all zero (no direction: ``r_F``
        undefined), are counted in ``skipped`` and left out; those with fewer than two real
        tokens are left out (nothing to compare)."""
        real = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        real = real if mask is None else mask.bool()
        bad = (~torch.isfinite(hidden).all(-1) & real).any(1)
        rho, r_f = token_uniformity(torch.where(bad[:, None, None], 0.0, hidden), mask)
        ok = torch.isfinite(rho) & torch.isfinite(r_f) & ~bad
        self.skipped += (~ok & (real.sum(1) >= 2)).sum()
        self.sequences += ok.sum()
        self.rho += torch.where(ok, rho, 0.0).sum()
        self.r_f += torch.where(ok, r_f, 0.0).sum()
