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
        self.add(self.sums(entropy, keys), max_logit, skipped)

    @staticmethod
    def sums(entropy: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``(4, H)`` float64: per head the rows with an allowed key, their entropies' sum, the
        rows with at least two, and the sum of ``H_i / log n_i`` over those (one reduction)."""
        e = entropy.to(_F64)
        h, ok = normalised(e, keys)
        valid = keys >= 1
        parts = torch.stack([valid.to(_F64), torch.where(valid, e, 0.0), ok.to(_F64), h])
        return parts.sum([d + 1 for d in range(entropy.ndim) if d != 1])

    @torch.no_grad()
    def add(
        self,
        sums: torch.Tensor,
        max_logit: torch.Tensor | None = None,
        skipped: torch.Tensor | int = 0,
    ) -> None:
        """Add :meth:`sums` (the same sums can go to several statistics)."""
        self.fix_sizes(H=sums.shape[1])
        self.skipped += skipped
        mine = [self.queries, self.entropy, self.queries_norm, self.entropy_norm]
        torch._foreach_add_(mine, list(sums.unbind(0)))  # (one fused kernel on a GPU)
        if max_logit is not None:
            torch.maximum(self.max_logit, max_logit.to(_F64), out=self.max_logit)
