"""Dimensional collapse (RankMe, effective rank, SimSiam std), posterior collapse and Fréchet
distance (docs/metrics.md#representationrank, #posteriorcollapse). Whole-tensor references in
float64, plus the readouts shared with the streaming probes (functions of counts, means and
scatter matrices)."""

from __future__ import annotations

import math

import torch

_F64 = torch.float64
RANKME_EPS = 1e-7


def _exp_entropy(weights: torch.Tensor, eps: float = 0.0) -> float:
    p = weights / weights.sum() + eps
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def effective_rank(eigenvalues: torch.Tensor) -> float:
    """Roy & Vetterli (2007) on the eigenvalues of a covariance: ``exp(H(p))``, ``p ∝ λ``.

    Note: applied to covariance eigenvalues (``λ = σ²/(n-1)`` of the centred data), as is common
    for "the effective rank of the representation"; it is not ``erank`` of the data matrix.
    """
    lam = eigenvalues.to(_F64).clamp_min(0)
    return _exp_entropy(lam) if lam.sum() > 0 else 0.0


def rankme(singular_values: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe (Garrido et al. 2023): ``exp(H(p))`` with ``p_k = σ_k/||σ||_1 + eps`` of the raw,
    uncentred embeddings, over the ``min(N, D)`` singular values given."""
    sigma = singular_values.to(_F64).clamp_min(0)
    return _exp_entropy(sigma, eps) if sigma.sum() > 0 else 0.0


def spectrum_metrics(count: int, mean: torch.Tensor, scatter: torch.Tensor) -> dict:
    """``erank``, ``rankme`` and the covariance eigenvalues from streamed moments.

    Args:
        count: ``N``.
        mean: ``(D,)`` mean embedding.
        scatter: ``(D, D)`` centred scatter ``sum (z - mean)(z - mean)'``.

    Returns:
        ``erank`` (covariance ``scatter/(N-1)``), ``rankme`` (singular values of the uncentred
        ``Z`` from the eigenvalues of ``Z'Z = scatter + N mean mean'``), ``singular_values``
        (descending, the ones RankMe used) and ``eigenvalues`` (descending, of the covariance).
        Eigenvalues below ``D * eps * λ_max`` count as zero.

    Resolution: the float64 ``Z'Z`` determines each singular value of ``Z`` to within
    ``sqrt(2 * D * eps64) * σ_max`` (its eigenvalues to within ``D * eps64 * λ_max``). Where every
    nonzero singular value lies above that floor, RankMe agrees with the SVD of ``Z`` to 1e-6
    relative or better. Below it (exactly rank-deficient float32 embeddings: their small
    singular values are float32 rounding of the input) RankMe is that of a spectrum within that
    floor of the true one, i.e. of embeddings within relative spectral distance
    ``sqrt(2 * D * eps64)`` of ``Z`` (8e-8 at D = 16, 3.4e-7 at D = 256: about the float32 rounding
    of the embeddings themselves); the 1e-6 agreement then does not hold (5e-6 seen at D = 256).
    """
    mean = mean.to(_F64)
    cov = scatter.to(_F64) / max(count - 1, 1)
    eig = _above_noise(torch.linalg.eigvalsh(cov).flip(0))
    raw = scatter.to(_F64) + count * torch.outer(mean, mean)
    # eigenvalues of Z'Z below D*eps*max are rounding noise; RankMe weights by their square roots
    # (sqrt(D*eps) of the largest), which would inflate it (docs/metrics.md#representationrank)
    sigma = _above_noise(torch.linalg.eigvalsh((raw + raw.T) / 2).flip(0)).sqrt()
    sigma = sigma[: min(count, sigma.numel())]
    return {
        "erank": effective_rank(eig),
        "rankme": rankme(sigma),
        "singular_values": sigma,
        "eigenvalues": eig,
    }


def _above_noise(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Descending eigenvalues with those below ``D * eps * max`` set to zero."""
    tol = eigenvalues.numel() * torch.finfo(_F64).eps * eigenvalues[0].clamp_min(0)
    return torch.where(eigenvalues > tol, eigenvalues, 0.0)


def norm_std_from_moments(count: int, unit_scatter_diag: torch.Tensor) -> float:
    """SimSiam's std of L2-normalised embeddings: mean over dims of the population std of
    ``u = z/||z||``, times ``sqrt(D)`` (≈1 for isotropic embeddings, 0 when collapsed)."""
    D = unit_scatter_diag.numel()
    std = (unit_scatter_diag.to(_F64).clamp_min(0) / count).sqrt()
    return std.mean().item() * math.sqrt(D)


def frechet_distance(mean1, cov1, mean2, cov2) -> float:
    """``||μ1-μ2||² + tr Σ1 + tr Σ2 - 2 tr (Σ1^½ Σ2 Σ1^½)^½`` (Heusel et al.), by eigh in float64."""
    m1, m2 = mean1.to(_F64), mean2.to(_F64)
    c1, c2 = cov1.to(_F64), cov2.to(_F64)
    lam, vec = torch.linalg.eigh((c1 + c1.T) / 2)
    root1 = (vec * lam.clamp_min(0).sqrt()) @ vec.T
    middle = root1 @ c2 @ root1
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return ((m1 - m2).pow(2).sum() + c1.trace() + c2.trace() - 2 * cross).item()


def variance_ratio(cov: torch.Tensor, reference_cov: torch.Tensor) -> float:
    """``tr Σ / tr Σ_ref``: total variance against a reference's (docs/metrics.md#representationrank; < 1 shrinking)."""
    return (cov.trace() / reference_cov.trace()).item()


def _flatten(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim < 2:
        raise ValueError(f"{what} must be (N, D) or (..., D), got shape {tuple(x.shape)}")
    x = x.detach().reshape(-1, x.shape[-1]).to(_F64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or Inf")
    return x


def mean_and_covariance(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``(N, D)`` embeddings, two-pass."""
    z = _flatten(embeddings, "embeddings")
    centred = z - z.mean(0)
    return z.mean(0), centred.T @ centred / max(z.shape[0] - 1, 1)


def representation_rank(embeddings: torch.Tensor, reference: torch.Tensor | None = None) -> dict:
    """Dimensional-collapse metrics of a whole set of embeddings ``(N, D)`` (or ``(..., D)``).

    Returns ``erank``, ``rankme``, ``norm_std`` and ``eigenvalues``; ``negative_mass``, the
    mean share of ``||z||^2`` in negative coordinates (0 for non-negative features such as
    ReLU outputs, ~0.5 for centred ones: where SimSiam's ``norm_std`` criterion, defined for
    projector outputs, applies); with ``reference`` embeddings also ``variance_ratio``
    (``tr Σ / tr Σ_ref``) and ``frechet_distance``.
    """
    z = _flatten(embeddings, "embeddings")
    n = z.shape[0]
    centred = z - z.mean(0)
    cov = centred.T @ centred / max(n - 1, 1)
    eig = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)
    sigma = torch.linalg.svdvals(z)
    u = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = {
        "erank": effective_rank(eig),
        "rankme": rankme(sigma),
        "norm_std": u.std(0, unbiased=False).mean().item() * math.sqrt(z.shape[1]),
        "negative_mass": u.clamp_max(0).pow(2).sum(1).mean().item(),
        "eigenvalues": eig,
    }
    if reference is not None:
        ref_mean, ref_cov = mean_and_covariance(reference)
        out["variance_ratio"] = variance_ratio(cov, ref_cov)
        out["frechet_distance"] = frechet_distance(z.mean(0), cov, ref_mean, ref_cov)
    return out


def posterior_polarity(
    logvar: torch.Tensor, passive_delta: float = 0.1, active_delta: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per entry of ``logvar (N, d)``: whether the posterior variance looks passive
    (``sigma^2 > 1 - passive_delta``, close to the prior) and whether it looks active
    (``sigma^2 < active_delta``); two ``(N, d)`` bool tensors (the polarised regime)."""
    var = logvar.to(_F64).exp()
    return var > 1 - passive_delta, var < active_delta


def gaussian_kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, 1))`` per element, in nats (float64)."""
    mu, logvar = mu.to(_F64), logvar.to(_F64)
    return 0.5 * (mu * mu + logvar.exp() - logvar - 1)


def posterior_collapse(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    active_threshold: float = 0.01,
    passive_delta: float = 0.1,
    active_delta: float = 0.5,
    polarised_fraction: float = 0.95,
) -> dict:
    """Posterior-collapse metrics of a diagonal-Gaussian encoder over a whole data set.

    Args:
        mu, logvar: ``(N, d)`` (or ``(..., d)``) posterior means and log-variances.
        active_threshold: unit ``j`` is active when ``A_j = Var_x(mu_j) > threshold`` (Burda et
            al.; unbiased variance, as in He et al.'s ``calc_au``).
        passive_delta, active_delta, polarised_fraction: a unit is *passive* when more than
            ``polarised_fraction`` of inputs have ``sigma_j^2 > 1 - passive_delta``, *active*
            when more than that fraction have ``sigma_j^2 < active_delta``, else *mixed*.

    Returns:
        ``kl_per_dim`` ``(d,)`` (``E_x KL_j``, nats), ``kl_total``, ``activity`` ``(d,)``
        (``A_j``), ``active_units``, ``active_fraction``, ``units_passive``, ``units_active``,
        ``units_mixed``, ``collapsed_units`` (``KL_j < 0.01`` nat).
    """
    m = _flatten(mu, "mu")
    lv = _flatten(logvar, "logvar")
    if m.shape != lv.shape:
        raise ValueError(f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} differ in shape")
    n = m.shape[0]
    kl = gaussian_kl_per_dim(m, lv).mean(0)
    activity = (m - m.mean(0)).pow(2).sum(0) / max(n - 1, 1)
    passive, active = posterior_polarity(lv, passive_delta, active_delta)
    passive_like, active_like = passive.to(_F64).mean(0), active.to(_F64).mean(0)
    return summarise_posterior(
        n, kl, activity, passive_like, active_like, active_threshold, polarised_fraction
    )


def summarise_posterior(
    n, kl, activity, passive_like, active_like, active_threshold, polarised_fraction
) -> dict:
    """The readout shared by :func:`posterior_collapse` and the streaming probe."""
    d = kl.numel()
    active = activity > active_threshold
    passive_units = passive_like > polarised_fraction
    active_units = (active_like > polarised_fraction) & ~passive_units
    return {
        "kl_per_dim": kl,
        "kl_total": kl.sum().item(),
        "activity": activity,
        "active_units": int(active.sum()),
        "active_fraction": active.to(_F64).mean().item() if d else 0.0,
        "units_passive": int(passive_units.sum()),
        "units_active": int(active_units.sum()),
        "units_mixed": int(d - passive_units.sum() - active_units.sum()),
        "collapsed_units": int((kl < 0.01).sum()),
        "samples": n,
    }
