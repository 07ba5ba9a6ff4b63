"""τ-dormant units per layer (Sokar et al. 2023), METRICS.md section 8."""

from __future__ import annotations

from ..contracts import Readout
from ..functional.logits import dormant_from_activity
from ..pictures import Picture
from ..reading import Reading, first_tensor, floating
from ..rules import RuleSpec
from ..stats import UnitActivity, Window
from .base import Probe


class DormantUnits(Probe):
    """τ-dormant units per layer, from post-activation outputs.

    Select the modules whose output is the activation (``"net.*.act"``, or Linear/Conv layers
    followed by nothing); units are the last dimension of ``(..., H)`` outputs and the channel
    dimension of 4-D/5-D conv outputs. Reports per layer ``<layer>/dormant_fraction`` (score
    ``E|h_i| / mean_k E|h_k| <= tau``) and ``<layer>/mean_abs`` (the raw ``E|h|``: a whole-layer
    shrink is invisible in the relative score), plus ``dormant_fraction`` over all units
    (:func:`~collapse_monitor.functional.dormant_units`); the mask ``<layer>`` of dormant units
    for ``ReDo``.

    Args:
        module: a path or glob of the activation modules.
        tau: the dormancy threshold on the score.
    """

    reads = Reading(
        "floating-point activations (N, ..., H) or (N, C, ...)",
        floating(2),
        find=first_tensor,
        hint="activations",
    )
    every_step = True  # O(B*D) per update
    rules = (
        RuleSpec(
            "*/dormant_fraction",
            0.1,
            "above",
            name="dormant",
            message="over 10% of the layer's units are dormant: consider ReDo",
        ),
    )

    def __init__(
        self, module: str, tau: float = 0.025, name: str | None = None, extract=None
    ) -> None:
        super().__init__(module, name, extract)
        self.tau = float(tau)

    def new_window(self) -> Window:
        return Window({layer: UnitActivity() for layer in self.paths})

    def update(self, window, a, call) -> None:
        a = a.detach()
        a = a.movedim(1, -1) if a.ndim in (4, 5) else a
        try:
            window[call.path].update(a.reshape(-1, a.shape[-1]))
        except ValueError as exc:  # a unit count that changed: say which layer
            raise self.error(call.path, str(exc)) from None

    def readout(self, window) -> Readout:
        metrics, masks, pictures = {}, {}, {}
        total = dormant = 0
        for layer, st in window.items():
            if not st.rows.item():
                continue
            r = dormant_from_activity(st.abs_sum, st.rows.item(), self.tau)
            masks[layer] = r["dormant"]
            metrics[self.key("dormant_fraction", layer)] = r["dormant_fraction"]
            metrics[self.key("mean_abs", layer)] = r["mean_abs"]
            total += r["dormant"].numel()
            dormant += int(r["dormant"].sum())
            pictures[self.key("unit_scores", layer)] = Picture(
                "bars",
                r["score"].sort().values,
                f"{layer}: unit score |a| / layer mean, sorted (dormant: <= tau = {self.tau:g})",
                "unit (sorted)",
                "score",
                reference=self.tau,
            )
        if total:
            metrics[self.key("dormant_fraction")] = dormant / total
        return Readout(metrics, pictures=pictures, masks=masks)
