"""Rank collapse across depth (Dong et al. 2021; Noci et al. 2022), METRICS.md section 7."""

from __future__ import annotations

import torch

from ..contracts import Readout
from ..functional.logits import token_uniformity_from_sums
from ..pictures import Picture
from ..reading import Reading, first_tensor
from ..rules import RuleSpec
from ..stats import TokenUniformitySums, Window, to_device
from .base import Probe


def _is_hidden(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim == 3


class TokenUniformity(Probe):
    """Per block, how alike the tokens of a sequence are.

    Reads each selected module's output ``(B, T, D)`` (or the first tensor of a tuple output);
    padding from ``observe(mask=...)`` (``(B, T)``, true for real tokens). Reports per layer
    ``<layer>/rho`` (mean token cosine, 1 = all tokens aligned; inflated by a shared offset) and
    ``<layer>/r_f`` (Frobenius residual after removing the token mean, 0 = identical tokens),
    averaged over sequences with at least 2 tokens
    (:func:`~collapse_monitor.functional.mean_token_uniformity`).
    """

    reads = Reading(
        "floating-point hidden states (B, T, D)", _is_hidden, find=first_tensor, hint="hidden"
    )
    keywords = {"mask": False}
    rules = (
        RuleSpec(
            "*/r_f",
            0.1,
            "below",
            name="rank_collapse",
            message="tokens of a sequence are nearly identical at this depth (rank collapse)",
        ),
    )

    def new_window(self) -> Window:
        return Window({layer: TokenUniformitySums() for layer in self.paths})

    def update(self, window, x, call) -> None:
        mask = self.keyword("mask", call.path)
        if mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise self.error(
                    call.path,
                    f"mask of shape {tuple(mask.shape)} for hidden states {tuple(x.shape)}",
                )
            mask = to_device(mask, x.device)
        window[call.path].update(x.detach(), mask)

    def readout(self, window) -> Readout:
        metrics, depth = {}, []
        for layer in self.paths:  # model order
            st = window[layer]
            means = token_uniformity_from_sums(st.sequences.item(), st.rho.item(), st.r_f.item())
            for name, value in means.items():
                metrics[self.key(name, layer)] = value
            if means:
                depth.append(means["r_f"])
        pictures = {}
        if depth:
            pictures[self.key("r_f_by_depth")] = Picture(
                "bars",
                torch.tensor(depth),
                "token residual r_f by depth (0: all tokens identical)",
                "layer (in model order)",
                "r_f",
                reference=0.1,
            )
        return Readout(metrics, pictures=pictures)
