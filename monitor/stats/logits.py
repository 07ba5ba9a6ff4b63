"""Output-logit statistics: softmax collapse and logit growth (METRICS.md sections 3.2 and 6)."""

from __future__ import annotations

import torch

from ..functional import logits as L
from .base import Statistic

_F64 = torch.float64


class LogitSums(Statistic):
    """Sums over the logit rows of a window: rows, softmax-collapsed rows, rows with targets and
    zero loss, ``log Z``, logit norms, the NLM cosine; maxima of ``log Z`` and of the logits.

    Example:
        >>> import torch
        >>> from collapse_monitor.stats import LogitSums
        >>> s = LogitSums()
        >>> s.update(torch.tensor([[0.0, 200.0], [0.0, 0.0]]), torch.float32)
        >>> int(s.rows), int(s.collapsed)
        (2, 1)
    """

    def __init__(self) -> None:
        super().__init__()
        for name in ("rows", "collapsed", "target_rows", "zero_loss", "log_z", "logit_norm"):
            self.add_state(name, (), _F64)
        self.add_state("nlm_cos", (), _F64)
        self.add_state("nlm_count", (), _F64)
        self.add_state("log_z_max", (), _F64, reduce="max")
        self.add_state("logit_max", (), _F64, reduce="max")

    @torch.no_grad()
    def update(
        self,
        logits: torch.Tensor,
        softmax_dtype: torch.dtype,
        loss: str = "softmax",
        targets: torch.Tensor | None = None,
    ) -> None:
        """Add logit rows ``(N, C)``; ``targets (N,)`` with ``-1`` where there is no target.

        ``softmax_dtype``: the training softmax's dtype in which "exactly 1" is tested
        (``loss="stablemax"``: StableMax in float64)."""
        z = logits
        self.rows += z.shape[0]
        if loss == "stablemax":
            self.collapsed += L.stablemax_collapsed(z).sum()
        else:
            self.collapsed += L.softmax_collapsed(z, softmax_dtype).sum()
        if targets is not None:
            keep = targets >= 0
            zero = L.zero_loss(z, torch.where(keep, targets, 0), softmax_dtype, loss) & keep
            self.target_rows += keep.sum()
            self.zero_loss += zero.sum()
        z64 = z.to(_F64)
        log_z = torch.logsumexp(z64, -1)
        self.log_z += log_z.sum()
        self.logit_norm += z64.norm(dim=-1).sum()
        torch.maximum(self.log_z_max, log_z.max(), out=self.log_z_max)
        torch.maximum(self.logit_max, z64.max(), out=self.logit_max)

    def add_nlm(self, cosine: torch.Tensor) -> None:
        """Add one cosine between ``-grad W`` and ``W`` (Prieto et al.'s NLM direction)."""
        self.nlm_cos += cosine.to(_F64)
        self.nlm_count += 1
