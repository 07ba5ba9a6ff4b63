"""Softmax collapse and output-logit health (Prieto et al. 2025; Wortsman et al. 2023),
token uniformity across depth (Dong et al. 2021; Noci et al. 2022), dormant units (Sokar et al.
2023): METRICS.md sections 3.2, 6, 7, 8. Whole-tensor references."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_F64 = torch.float64


def softmax_collapsed(logits: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per row: true when ``sum_j exp(z_j - max z) == 1`` exactly in ``dtype`` (default: the
    logits' own), i.e. every non-maximal term underflowed and the softmax gradient is exactly 0.

    Args:
        logits: ``(..., C)``. Returns ``(...)`` bool.
    """
    z = logits.to(dtype or logits.dtype)
    shifted = z - z.amax(-1, keepdim=True)
    return torch.exp(shifted).sum(-1) == 1


def stablemax_collapsed(logits: torch.Tensor) -> torch.Tensor:
    """Per row: true when the StableMax probability of the top class is exactly 1 in float64 (the
    dtype StableMax cross-entropy is computed in): its gradient then vanishes as softmax's does."""
    from ..losses import stablemax

    return stablemax(logits).amax(-1) == 1


def zero_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    dtype: torch.dtype | None = None,
    loss: str = "softmax",
) -> torch.Tensor:
    """Per row: true when the cross-entropy (``loss="softmax"``, computed in ``dtype``) or the
    StableMax cross-entropy (float64) is exactly 0. ``(N, C)``, ``(N,)``."""
    if loss == "stablemax":
        from ..losses import stablemax

        return stablemax(logits).gather(1, targets[:, None])[:, 0] == 1
    z = logits.to(dtype or logits.dtype)
    return F.cross_entropy(z, targets, reduction="none") == 0


def logit_health(logits: torch.Tensor, targets: torch.Tensor | None = None, dtype=None) -> dict:
    """Softmax collapse and logit statistics of a whole set of logits ``(N, C)`` (or ``(..., C)``).

    Returns ``softmax_collapse`` (fraction collapsed), ``zero_loss_fraction`` (with targets),
    ``log_z_mean`` / ``log_z_max`` (``logsumexp`` over classes), ``logit_max`` (largest logit),
    ``logit_norm`` (mean L2 norm of the logit vectors).
    """
    z = logits.reshape(-1, logits.shape[-1])
    out = {"softmax_collapse": softmax_collapsed(z, dtype).double().mean().item()}
    if targets is not None:
        out["zero_loss_fraction"] = zero_loss(z, targets.reshape(-1), dtype).double().mean().item()
    log_z = torch.logsumexp(z.double(), -1)
    out.update(
        log_z_mean=log_z.mean().item(),
        log_z_max=log_z.max().item(),
        logit_max=z.double().max().item(),
        logit_norm=z.double().norm(dim=-1).mean().item(),
    )
    return out


def token_uniformity(
    x: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: mean token cosine ``rho`` and Frobenius residual ``r_F`` (METRICS.md 7).

    ``rho = (||sum_i u_i||^2 - T) / (T (T - 1))`` with ``u_i = x_i/||x_i||`` (1 when all tokens point
    the same way); ``r_F = sqrt(1 - T ||xbar||^2 / sum_i ||x_i||^2)`` (0 when all tokens are equal).

    Args:
        x: ``(B, T, D)``; mask: ``(B, T)``, true for real tokens.

    Returns:
        ``(rho, r_f)``, each ``(B,)`` float64; sequences with fewer than 2 tokens give NaN.
    """
    x = x.to(_F64)
    m = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.bool()
    x = torch.where(m[..., None], x, 0.0)
    T = m.sum(1).to(_F64)
    u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    su = u.sum(1)
    rho = ((su * su).sum(-1) - T) / (T * (T - 1))
    total = (x * x).sum((1, 2))
    mean = x.sum(1) / T[:, None]
    r2 = 1 - T * (mean * mean).sum(-1) / total
    r_f = r2.clamp_min(0).sqrt()
    short = T < 2
    return torch.where(short, torch.nan, rho), torch.where(short, torch.nan, r_f)


def dormant_units(activations: torch.Tensor, tau: float = 0.025, channel_dim: int = -1) -> dict:
    """τ-dormant units (Sokar et al. 2023) of a layer's post-activation outputs.

    Score ``s_i = E|h_i| / ((1/H) sum_k E|h_k|)`` (mean over every axis but ``channel_dim``, plus
    1e-9 in the denominator as Dopamine's ``estimate_neuron_score``); unit ``i`` is dormant when
    ``s_i <= tau``. Returns ``dormant_fraction``, ``mean_abs`` (raw ``E|h|``) and ``score`` ``(H,)``.
    """
    a = activations.detach().to(_F64).abs().movedim(channel_dim, -1)
    per_unit = a.reshape(-1, a.shape[-1]).mean(0)
    score = per_unit / (per_unit.mean() + 1e-9)
    return {
        "dormant_fraction": (score <= tau).to(_F64).mean().item(),
        "mean_abs": per_unit.mean().item(),
        "score": score,
    }
