"""Per-head attention entropy sums of one attention layer (docs/metrics.md#attentionentropy)."""

from __future__ import annotations

import torch

from ..functional.attention import normalised
from .base import Statistic

_F64 = torch.float64


class HeadEntropy(Statistic):
    """Per-head sums of one layer: queries, entropy (nats), normalised entropy and the queries
    where it is defined (``n_i >= 2`` allowed keys); the largest ``|attention logit|`` seen.

    ``H`` (heads) is fixed by the first update. docs/metrics.md#attentionentropy (Zhai et al. 2023).

    Example:
        >>> import torch
        >>> from collapse_monitor.stats import HeadEntropy
        >>> s = HeadEntropy()
        >>> s.update(torch.tensor([[0.0, 0.6931471805599453]]), torch.tensor([[2, 2]]))  # (B, H)
        >>> s.entropy_norm / s.queries_norm
        tensor([0.0000, 1.0000], dtype=torch.float64)
    """

    def __init__(self) -> None:
        super().__init__()
        self.add_size("H", "head count")
        for name in ("queries", "entropy", "queries_norm", "entropy_norm"):
            self.add_state(name, ("H",), _F64)
        self.add_state("max_logit", (), _F64, reduce="max")
        self.add_state("skipped", (), torch.int64)

    @torch.no_grad()
    def update(
        self,
        entropy: torch.Tensor,
        keys: torch.Tensor,
        max_logit: torch.Tensor | None = None,
        skipped: torch.Tensor | int = 0,
    ) -> None:
        """Add row entropies ``entropy (B, H, ...)`` (nats) with their allowed-key counts
        ``keys`` (same shape); rows with no allowed key are ignored. ``skipped``: query rows
        left out before (padding, NaN or Inf)."""
        self.fix_sizes(H=entropy.shape[1])
        self.skipped += skipped
        valid = (keys >= 1).to(_F64)
        h, norm_ok = normalised(entropy.to(_F64), keys)
        dims = [d for d in range(entropy.ndim) if d != 1]
        self.queries += valid.sum(dims)
        self.entropy += (entropy.to(_F64) * valid).sum(dims)
        self.queries_norm += norm_ok.to(_F64).sum(dims)
        self.entropy_norm += h.sum(dims)
        if max_logit is not None:
            torch.maximum(self.max_logit, max_logit.to(_F64), out=self.max_logit)
