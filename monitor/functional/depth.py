"""Token uniformity across depth: rank collapse (Dong et al. 2021; Noci et al. 2022),
docs/metrics.md#tokenuniformity. Whole-tensor references and the readout the probe shares."""

from __future__ import annotations

import torch

_F64 = torch.float64


def token_uniformity(
    x: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: mean token cosine ``rho`` and Frobenius residual ``r_F`` (docs/metrics.md#tokenuniformity).

    ``rho = (||sum_i u_i||^2 - T) / (T (T - 1))`` with ``u_i = x_i/||x_i||`` (1 when all tokens point
    the same way); ``r_F = ||X - 1 xbar'||_F / ||X||_F`` (0 when all tokens are equal), computed
    from the centred tokens: the equal ``sqrt(1 - T ||xbar||^2 / sum_i ||x_i||^2)`` cancels when
    tokens nearly agree (about 1e-8 absolute error: 26 times a value of 1e-10).

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
    centred = torch.where(m[..., None], x - mean[:, None], 0.0)
    r_f = ((centred * centred).sum((1, 2)) / total).sqrt()  # (all-zero tokens: 0/0, NaN)
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
