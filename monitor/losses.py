"""Losses that the collapse literature recommends (Wortsman et al. 2023; Prieto et al. 2025)."""

from __future__ import annotations

import torch


def z_loss(logits: torch.Tensor, coefficient: float = 1e-4) -> torch.Tensor:
    """``coefficient * mean((log Z)^2)`` with ``log Z = logsumexp(logits, -1)`` (PaLM; Wortsman et
    al.'s default coefficient 1e-4). Keeps the output logits' log-partition near 0.

    Args:
        logits: ``(..., C)``.
    """
    return coefficient * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def stablemax(logits: torch.Tensor) -> torch.Tensor:
    """StableMax probabilities ``s(z_i) / sum_j s(z_j)`` with ``s(x) = x + 1`` for ``x >= 0`` and
    ``1 / (1 - x)`` below (Prieto et al. 2025), computed in float64."""
    z = logits.double()
    s = torch.where(z >= 0, z + 1, 1 / (1 - torch.where(z < 0, z, 0.0)))
    return s / s.sum(-1, keepdim=True)


def stablemax_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean ``-log StableMax(z)_y`` over targets != ``ignore_index``, in float64 (as the
    reference code); returns a float64 scalar.

    Args:
        logits: ``(N, C)`` (or ``(..., C)``), targets: ``(N,)`` (or ``(...)``) int.
    """
    z = logits.reshape(-1, logits.shape[-1])
    y = targets.reshape(-1)
    keep = y != ignore_index
    p = stablemax(z[keep])
    return -torch.log(p.gather(1, y[keep, None])).mean()
