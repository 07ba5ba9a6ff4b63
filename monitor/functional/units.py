"""τ-dormant units (Sokar et al. 2023; Dopamine's NeuronRecycler), docs/metrics.md#dormantunits.
Whole-tensor reference and the readout the probe shares."""

from __future__ import annotations

import torch

_F64 = torch.float64


def dormant_units(activations: torch.Tensor, tau: float = 0.025, channel_dim: int = -1) -> dict:
    """τ-dormant units (Sokar et al. 2023) of a layer's post-activation outputs (the reference).

    Args:
        activations: any shape; ``channel_dim`` holds the units, every other axis is a sample.

    Returns:
        See :func:`dormant_from_activity`.
    """
    a = activations.detach().to(_F64).abs().movedim(channel_dim, -1)
    a = a.reshape(-1, a.shape[-1])
    return dormant_from_activity(a.sum(0), a.shape[0], tau)


def dormant_from_activity(abs_sum: torch.Tensor, rows, tau: float = 0.025) -> dict:
    """The readout shared by :func:`dormant_units` and the streaming probe.

    Score ``s_i = E|h_i| / ((1/H) sum_k E|h_k|)``, plus 1e-9 in the denominator as Dopamine's
    ``estimate_neuron_score``; unit ``i`` is dormant when ``s_i <= tau``.

    Args:
        abs_sum: ``(H,)`` ``sum |h_i|`` over ``rows`` samples.

    Returns:
        ``dormant_fraction``, ``mean_abs`` (raw ``E|h|``: a whole-layer shrink is invisible in
        the relative score), ``score`` ``(H,)`` and ``dormant`` ``(H,)`` bool.
    """
    per_unit = abs_sum.to(_F64) / float(rows)
    score = per_unit / (per_unit.mean() + 1e-9)
    dormant = score <= tau
    return {
        "dormant_fraction": dormant.to(_F64).mean().item(),
        "mean_abs": per_unit.mean().item(),
        "score": score,
        "dormant": dormant,
    }
