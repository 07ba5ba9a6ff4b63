"""Per-latent-dimension sums of a diagonal-Gaussian posterior (posterior collapse, docs/metrics.md#posteriorcollapse)."""

from __future__ import annotations

import torch

from ..functional.representation import gaussian_kl_per_dim, posterior_polarity
from .base import Statistic

_F64 = torch.float64


class PosteriorSums(Statistic):
    """``sum_x KL_j(x)`` per latent dimension ``(d,)`` (nats), the counts of inputs whose
    variance looks passive (``sigma^2 > 1 - passive_delta``) or active (``< active_delta``), the
    rows skipped (NaN or Inf), and the highest share of units active within one call (Burda's
    activity of that call's rows alone: one encoder, where a window's pools the encoder's drift
    between steps). ``d`` is fixed by the first update (docs/metrics.md#posteriorcollapse).

    Example:
        >>> import torch
        >>> from collapse_monitor.stats import PosteriorSums
        >>> s = PosteriorSums()
        >>> s.update(torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(3, dtype=torch.bool), 0.1, 0.5)
        >>> s.kl, s.passive_like  # the prior itself: no KL, every input looks passive
        (tensor([0., 0.], dtype=torch.float64), tensor([3, 3]))
    """

    LATER = frozenset({"peak_active"})  # (a checkpoint of an earlier version has none)

    def __init__(self) -> None:
        super().__init__()
        self.add_size("d", "latent dimension")
        self.add_state("kl", ("d",), _F64)
        self.add_state("passive_like", ("d",), torch.int64)
        self.add_state("active_like", ("d",), torch.int64)
        self.add_state("skipped", (), torch.int64)
        self.add_state("peak_active", (), _F64, reduce="max")

    @torch.no_grad()
    def update(
        self,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        valid: torch.Tensor,
        passive_delta: float,
        active_delta: float,
        active_threshold: float = 0.01,
    ) -> None:
        """Add ``mu``, ``logvar`` ``(N, d)``; rows where ``valid (N,)`` is false are skipped."""
        self.fix_sizes(d=mu.shape[1])
        w = valid[:, None]
        # this call's own active share (unbiased variance of its valid rows; none under 2)
        rows = valid.sum()
        m = torch.where(w, mu, 0.0).to(_F64)
        centred = torch.where(w, m - m.sum(0) / rows.clamp_min(1), 0.0)
        activity = centred.square().sum(0) / (rows - 1).clamp_min(1)
        share = torch.where(rows >= 2, (activity > active_threshold).to(_F64).mean(), 0.0)
        torch.maximum(self.peak_active, share, out=self.peak_active)
        self.kl += torch.where(w, gaussian_kl_per_dim(mu, logvar), 0.0).sum(0)
        passive, active = posterior_polarity(logvar, passive_delta, active_delta)
        self.passive_like += (w & passive).sum(0)
        self.active_like += (w & active).sum(0)
        self.skipped += (~valid).sum()
