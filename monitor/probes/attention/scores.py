"""What an attention source hands the probe: the q and k a layer used, and its masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...reading import Checked

if TYPE_CHECKING:
    from .flex import FlexCall


@dataclass
class Scores(Checked):
    """The attention logits ``softmax(q k' * scale + mask)`` of one call, to be recomputed.

    Attributes:
        q: ``(B, H, Lq, d)``; k: ``(B, Hk, Lk, d)`` (``Hk`` divides ``H``: grouped-query).
        scale: the logit scale (``1/sqrt(d)`` by default).
        causal: key ``j`` allowed for query ``i`` iff ``j <= i`` (top-left aligned).
        allowed: bool broadcastable to ``(B, H, Lq, Lk)``, true where a key may be attended.
        additive: float broadcastable to ``(B, H, Lq, Lk)``, added to the logits; a key it makes
            negligible is masked (:func:`~collapse_monitor.functional.attention.attendable`).
        queries: ``(B, Lq)`` bool, true for real query positions (padding: false); None: all.
        flex: a ``flex_attention`` call's ``score_mod`` and block mask
            (:class:`~collapse_monitor.probes.attention.flex.FlexCall`), applied to the rows.
    """

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    causal: bool = False
    allowed: torch.Tensor | None = None
    additive: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    flex: FlexCall | None = None

    def checked(self) -> tuple[torch.Tensor, ...]:
        """What holds NaN or Inf when the run diverged (not the masks: -inf marks a key)."""
        return (self.q, self.k)


@dataclass
class Probabilities(Checked):
    """Explicit attention probabilities ``(B, H, Lq, Lk)`` and the keys allowed (or None)."""

    probs: torch.Tensor
    allowed: torch.Tensor | None = None

    def checked(self) -> tuple[torch.Tensor, ...]:
        return (self.probs,)


def bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """A call's arguments by name (positional ones first)."""
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    return bound
