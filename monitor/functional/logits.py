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


def logit_health(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    ignore_index: int = -100,
) -> dict:
    """Softmax collapse and logit statistics of a whole set of logits ``(N, C)`` (or ``(..., C)``).

    Args:
        logits: ``(..., C)``; targets: ``(...)`` int (``ignore_index`` skipped);
        dtype: the training softmax's dtype (default: the logits').

    Returns:
        See :func:`logit_health_from_sums`.
    """
    z = logits.reshape(-1, logits.shape[-1])
    z64 = z.double()
    log_z = torch.logsumexp(z64, -1)
    target_rows = zero = None
    if targets is not None:
        y = targets.reshape(-1)
        keep = y != ignore_index
        target_rows = keep.sum()
        zero = (zero_loss(z[keep], y[keep], dtype)).sum()
    return logit_health_from_sums(
        rows=z.shape[0],
        collapsed=softmax_collapsed(z, dtype).sum(),
        log_z=log_z.sum(),
        log_z_max=log_z.max(),
        logit_max=z64.max(),
        logit_norm=z64.norm(dim=-1).sum(),
        target_rows=target_rows,
        zero_loss=zero,
    )


def logit_health_from_sums(
    rows, collapsed, log_z, log_z_max, logit_max, logit_norm, target_rows=None, zero_loss=None
) -> dict:
    """The readout shared by :func:`logit_health` and the streaming probe.

    Args: sums over the rows (``collapsed``: softmax-collapsed rows, ``log_z``: of ``logsumexp``,
        ``logit_norm``: of L2 norms), maxima of ``log Z`` and of the logits, and the rows with a
        target and those among them with zero loss.

    Returns:
        ``samples`` (rows), and when there are rows ``softmax_collapse`` (fraction collapsed),
        ``log_z_mean``, ``log_z_max``, ``logit_max``, ``logit_norm`` (mean L2 norm); with targets
        ``zero_loss_fraction``.
    """
    n = float(rows)
    out = {"samples": n}
    if n:
        out.update(
            softmax_collapse=float(collapsed) / n,
            log_z_mean=float(log_z) / n,
            log_z_max=float(log_z_max),
            logit_max=float(logit_max),
            logit_norm=float(logit_norm) / n,
        )
    if target_rows is not None and float(target_rows):
        out["zero_loss_fraction"] = float(zero_loss) / float(target_rows)
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


def mean_token_uniformity(x: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """``rho`` and ``r_f`` of :func:`token_uniformity` averaged over the sequences with at least two
    tokens (the reference of the streaming probe): see :func:`token_uniformity_from_sums`."""
    rho, r_f = token_uniformity(x, mask)
    ok = torch.isfinite(rho)
    return token_uniformity_from_sums(ok.sum(), rho[ok].sum(), r_f[ok].sum())


def token_uniformity_from_sums(sequences, rho, r_f) -> dict:
    """Means of ``rho`` and ``r_f`` from their sums over ``sequences``; empty without any."""
    n = float(sequences)
    return {"rho": float(rho) / n, "r_f": float(r_f) / n} if n else {}


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
