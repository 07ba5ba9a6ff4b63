"""Rank collapse across depth (Dong et al. 2021; Noci et al. 2022), docs/metrics.md#tokenuniformity."""

from __future__ import annotations

import torch

from ..contracts import Readout
from ..functional.depth import token_uniformity_from_sums
from ..pictures import Picture
from ..reading import Reading, first_tensor, token_mask
from ..rules import RuleSpec
from ..stats import TokenUniformitySums, Window
from .base import Probe, layer_name


def _is_hidden(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim == 3


class TokenUniformity(Probe):
    """Per block, how alike the tokens of a sequence are.

    Reads each selected module's output ``(B, T, D)`` (or the first tensor of a tuple output).
    Padding: ``observe(mask=...)`` ``(B, T)`` true for real tokens, else the model's own
    ``attention_mask`` input (``transformers`` models), right-aligned to ``T``; without either,
    every token counts. Reports per layer ``<layer>/rho`` (mean token cosine, 1 = all tokens
    aligned; inflated by a shared offset), ``<layer>/r_f`` (Frobenius residual after removing the
    token mean, 0 = identical tokens), averaged over sequences with at least 2 real tokens
    (:func:`~collapse_monitor.functional.mean_token_uniformity`), and ``<layer>/skipped``
    (sequences with NaN or Inf, left out).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from collapse_monitor import CollapseMonitor, probes
        >>> model = nn.Sequential(nn.Identity())
        >>> mon = CollapseMonitor(model, [probes.TokenUniformity("0", name="tok")], 1)
        >>> with mon.observe():
        ...     _ = model(torch.ones(2, 5, 3))  # every token the same
        >>> mon.step()["collapse/tok/0/r_f"]
        0.0
        >>> mon.close()
    """

    headline = ("rho",)

    reads = Reading(
        "floating-point hidden states (B, T, D)", _is_hidden, find=first_tensor, hint="hidden"
    )
    keywords = {"mask": False}
    per_layer = True
    uses_token_mask = True
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
        return Window({layer_name(p): TokenUniformitySums() for p in self.paths})

    def update(self, window, x, call) -> None:
        mask = token_mask(call, x.shape[0], x.shape[1], x.device)
        window[layer_name(call.path)].update(x.detach(), mask)

    def readout(self, window) -> Readout:
        metrics, depth = {}, []
        for layer in map(layer_name, self.paths):  # model order
            st = window[layer]
            means = token_uniformity_from_sums(st.sequences.item(), st.rho.item(), st.r_f.item())
            for name, value in means.items():
                metrics[self.key(name, layer)] = value
            metrics[self.key("skipped", layer)] = float(st.skipped)
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
