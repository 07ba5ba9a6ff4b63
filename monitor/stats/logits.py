"""Output-logit statistics: softmax collapse and logit growth (docs/metrics.md#logithealth)."""

from __future__ import annotations

import math

import torch

from ..functional import logits as L
from ..functional.token_entropy import HIST_BINS, histogram_bins
from .base import Statistic

_F64 = torch.float64


class LogitSums(Statistic):
    """Sums over the logit rows of a window: rows, softmax-collapsed rows, rows with targets and
    zero loss, ``log Z`` (nats), logit norms, the NLM cosine, rows skipped for NaN or Inf,
    targets outside the classes (``out_of_range``: their rows count without a target); maxima
    of ``log Z`` and of the logits (Prieto et al. 2025; Wortsman et al. 2023).

    Example:
        >>> import torch
        >>> from collapse_monitor.stats import LogitSums
        >>> s = LogitSums()
        >>> s.update(torch.tensor([[0.0, 200.0], [0.0, 0.0]]), torch.float32)  # rows with NaN or Inf
        tensor([False, False])
        >>> int(s.rows), int(s.collapsed)
        (2, 1)
    """

    LATER = frozenset({"out_of_range"})

    def __init__(self) -> None:
        super().__init__()
        for name in ("rows", "collapsed", "target_rows", "zero_loss", "log_z", "logit_norm"):
            self.add_state(name, (), _F64)
        self.add_state("skipped", (), torch.int64)
        self.add_state("out_of_range", (), torch.int64)
        self.add_state("nlm_cos", (), _F64)
        self.add_state("nlm_count", (), _F64)
        self.add_state("log_z_max", (), _F64, reduce="max")
        self.add_state("logit_max", (), _F64, reduce="max")

    @torch.no_grad()
    def update(
        self,
        logits: torch.Tensor,
        softmax_dtype: torch.dtype | None = None,
        loss: str = "softmax",
        targets: torch.Tensor | None = None,
        real: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Add logit rows ``(N, C)``; ``targets (N,)`` with ``-1`` where there is no target
        (any other value outside ``[0, C)`` is counted in ``out_of_range`` and the row
        kept without a target); ``real (N,)`` bool, false for padded positions (None: all real).
        Returns the rows with NaN or Inf ``(N,)`` bool (None for no rows).

        Rows with NaN or Inf, and padded rows, are counted in ``skipped`` and left out. ``softmax_dtype``: the
        training softmax's dtype in which "exactly 1" is tested (see
        :func:`~collapse_monitor.functional.logits.training_dtype`)."""
        if not logits.shape[0]:  # (a host-known shape: no sync)
            return None
        bad = ~torch.isfinite(logits).all(1)
        finite = ~bad if real is None else ~bad & real
        self.skipped += (~finite).sum()
        z = torch.where(finite[:, None], logits, 0.0)
        if targets is not None:
            outside = (targets < -1) | (targets >= logits.shape[1])
            self.out_of_range += (outside if real is None else outside & real).sum()
        r = L.logit_rows(z, softmax_dtype, loss, targets)
        self.rows += finite.sum()
        self.collapsed += (r["collapsed"] & finite).sum()
        if targets is not None:
            self.target_rows += (r["has_target"] & finite).sum()
            self.zero_loss += (r["zero_loss"] & finite).sum()
        self.log_z += torch.where(finite, r["log_z"], 0.0).sum()
        self.logit_norm += torch.where(finite, r["norm"], 0.0).sum()
        low = -float("inf")
        torch.maximum(
            self.log_z_max, torch.where(finite, r["log_z"], low).max(), out=self.log_z_max
        )
        row_max = z.to(_F64).amax(-1)
        torch.maximum(self.logit_max, torch.where(finite, row_max, low).max(), out=self.logit_max)
        return bad

    def add_nlm(self, cosine: torch.Tensor) -> None:
        """Add one cosine between ``-grad W`` and ``W`` (Prieto et al.'s NLM direction)."""
        self.nlm_cos += cosine.to(_F64)
        self.nlm_count += 1


class TokenEntropySums(Statistic):
    """Sums over a window's language-model tokens for :class:`~collapse_monitor.probes.TokenEntropy`:
    the tokens that count, the sum of their entropies (nats) and its sampling variance, the
    tokens below / above the two entropy bounds, a histogram of entropies in 0.01-nat bins,
    the rows computed and the rows skipped (NaN or Inf logits), and the sum of squared
    entropies (for the spread of token entropy). Every count is weighted by ``n / k`` (``k``
    rows sampled of ``n`` that count in a call), so each sum is an unbiased estimate of the
    sum over every token; with every row computed, ``n / k = 1`` (exact). ``out_of_range``
    (labels that name no token, left out before the draw) is an exact count.

    Example:
        >>> import torch
        >>> from collapse_monitor.stats import TokenEntropySums
        >>> s = TokenEntropySums()
        >>> s.add(torch.tensor([0.0, 0.5]), torch.tensor([2.0, 2.0]), torch.tensor(0.0))
        >>> float(s.tokens), float(s.total)
        (4.0, 1.0)
    """

    LATER = frozenset({"out_of_range"})

    def __init__(self) -> None:
        super().__init__()
        for name in (
            *("tokens", "total", "square", "variance", "dof", "unknown"),
            *("certain", "high", "sampled"),
            *("lp_weight", "lp_sum", "adv_weight", "adv_lp", "adv_a", "adv_lpa"),
        ):
            self.add_state(name, (), _F64)
        self.add_state("hist", (HIST_BINS,), _F64)
        self.add_state("skipped", (), torch.int64)
        self.add_state("out_of_range", (), torch.int64)

    @torch.no_grad()
    def add(
        self,
        entropy: torch.Tensor,
        weight: torch.Tensor,
        variance: torch.Tensor,
        dof: torch.Tensor | float = 0.0,
        certain: float = 0.01,
        high: float = 0.672,
        skipped: torch.Tensor | int = 0,
        unknown: torch.Tensor | bool = False,
    ) -> None:
        """Add computed rows: ``entropy (k,)`` nats (finite), ``weight (k,)`` the tokens each
        stands for (0: a row that does not count), ``variance`` of this call's weighted sum
        under the sampling and its degrees of freedom ``dof``; ``unknown``: a sampled call whose
        variance cannot be estimated (one row)."""
        h, w = entropy.to(_F64), weight.to(_F64)
        self.tokens += w.sum()
        wh = w * h
        self.total += wh.sum()
        self.square += (wh * h).sum()
        self.variance += variance.to(_F64)
        self.dof += dof
        self.unknown += unknown
        self.certain += (w * (h < certain)).sum()
        self.high += (w * (h > high)).sum()
        self.sampled += (w > 0).sum()
        self.hist.index_add_(0, histogram_bins(h), w)
        self.skipped += skipped

    def load_state_dict(self, state: dict) -> None:
        # a window saved before the sum of squares existed (state version 4 too): the spread
        # of what it holds is unknown, NaN for that window alone, rather than a checkpoint that
        # cannot resume (an empty window's sum is 0)
        if "square" not in state["states"]:
            held = bool(state["states"]["tokens"] != 0)
            square = torch.tensor(math.nan if held else 0.0, dtype=_F64)
            state = {**state, "states": {**state["states"], "square": square}}
        super().load_state_dict(state)

    @torch.no_grad()
    def add_logprob(
        self, logprob: torch.Tensor, weight: torch.Tensor, advantage: torch.Tensor | None
    ) -> None:
        """Add the computed rows' log-probabilities of their target tokens ``(k,)`` (weights as
        in :meth:`add`) and, with ``advantage (k,)``, the sums of the covariance's terms."""
        lp, w = logprob.to(_F64), weight.to(_F64)
        self.lp_weight += w.sum()
        self.lp_sum += (w * lp).sum()
        if advantage is not None:
            a = advantage.to(_F64)
            self.adv_weight += w.sum()
            self.adv_lp += (w * lp).sum()
            self.adv_a += (w * a).sum()
            self.adv_lpa += (w * lp * a).sum()
