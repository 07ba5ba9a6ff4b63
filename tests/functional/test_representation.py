import math

import numpy as np
import pytest
import scipy.linalg
import torch

from collapse_monitor import functional as F


def np_erank(Z):
    Zc = Z - Z.mean(0)
    lam = np.clip(np.linalg.eigvalsh(Zc.T @ Zc / (len(Z) - 1)), 0, None)
    p = lam / lam.sum()
    p = p[p > 0]
    return math.exp(-(p * np.log(p)).sum())


def np_rankme(Z, eps=1e-7):
    s = np.linalg.svd(Z, compute_uv=False)
    p = s / s.sum() + eps
    return math.exp(-(p * np.log(p)).sum())


def np_norm_std(Z):
    U = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    return U.std(0).mean() * math.sqrt(Z.shape[1])


def np_frechet(m1, c1, m2, c2):  # pytorch-fid's formula, scipy sqrtm
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    return ((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)


def anisotropic(n, d, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, d, dtype=torch.float64)
    return offset + torch.randn(n, d, generator=g, dtype=torch.float64) * scales


def test_matches_numpy_reference():
    Z = anisotropic(800, 12)
    R = anisotropic(500, 12, seed=1) * 1.5 + 0.3
    got = F.representation_rank(Z, reference=R)
    z, r = Z.numpy(), R.numpy()
    assert got["erank"] == pytest.approx(np_erank(z), rel=1e-10)
    assert got["rankme"] == pytest.approx(np_rankme(z), rel=1e-10)
    assert got["norm_std"] == pytest.approx(np_norm_std(z), rel=1e-10)
    c1, c2 = np.cov(z, rowvar=False), np.cov(r, rowvar=False)
    assert got["variance_ratio"] == pytest.approx(np.trace(c1) / np.trace(c2), rel=1e-10)
    assert got["frechet_distance"] == pytest.approx(
        np_frechet(z.mean(0), c1, r.mean(0), c2), rel=1e-6
    )


def test_known_answers_collapsed_and_isotropic():
    g = torch.Generator().manual_seed(0)
    ray = torch.rand(1000, 1, generator=g) * torch.randn(1, 32, generator=g)  # one direction
    r = F.representation_rank(ray)
    assert r["erank"] == pytest.approx(1.0, abs=1e-6)
    assert r["norm_std"] < 1e-6
    assert r["rankme"] < 1.01
    iso = torch.randn(20000, 32, generator=g)
    r = F.representation_rank(iso)
    assert r["erank"] > 31.5 and r["norm_std"] == pytest.approx(1.0, abs=0.01)
    assert F.frechet_distance(
        torch.zeros(3), torch.eye(3), torch.zeros(3), torch.eye(3)
    ) == pytest.approx(0, abs=1e-12)


def test_posterior_half_inactive_known_answer():
    n = 400
    mu = torch.cat([torch.randn(n, 4) * 2, torch.zeros(n, 4)], 1)
    logvar = torch.cat([torch.full((n, 4), -4.0), torch.zeros(n, 4)], 1)
    r = F.posterior_collapse(mu, logvar)
    assert r["active_units"] == 4 and r["active_fraction"] == 0.5
    assert torch.equal(r["kl_per_dim"][4:], torch.zeros(4, dtype=torch.float64))
    assert r["units_passive"] == 4 and r["units_active"] == 4 and r["units_mixed"] == 0
    assert r["collapsed_units"] == 4


def test_posterior_matches_formula_and_unbiased_variance():
    g = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(50, 5, generator=g), torch.randn(50, 5, generator=g)
    r = F.posterior_collapse(mu, logvar)
    m, lv = mu.double().numpy(), logvar.double().numpy()
    kl = (0.5 * (m**2 + np.exp(lv) - lv - 1)).mean(0)
    assert np.allclose(r["kl_per_dim"].numpy(), kl, rtol=1e-12)
    assert np.allclose(r["activity"].numpy(), m.var(0, ddof=1), rtol=1e-12)
    mixed = torch.cat([torch.zeros(60, 1), torch.full((40, 1), -5.0)])  # sigma^2 = 1 then tiny
    r = F.posterior_collapse(torch.zeros(100, 1), mixed)
    assert r["units_mixed"] == 1


def test_bad_input():
    with pytest.raises(ValueError, match="differ in shape"):
        F.posterior_collapse(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.representation_rank(torch.full((4, 3), float("inf")))


@pytest.mark.parametrize("n, d, rank", [(64, 16, 1), (600, 256, 5)])
def test_streamed_rankme_of_rank_deficient_float32_embeddings_keeps_the_stated_bound(n, d, rank):
    """Exactly rank-deficient float32 embeddings: their small singular values are rounding of
    the input, below what Z'Z resolves. The streamed singular values stay within the documented
    floor sqrt(2 D eps64) sigma_max of the SVD's, and RankMe is exactly RankMe of those."""
    from collapse_monitor.functional.representation import spectrum_metrics
    from collapse_monitor.stats import Moments

    g = torch.Generator().manual_seed(rank)
    z = (torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)).float() + 3.0
    m = Moments()
    for part in torch.split(z, [n // 3, 0, n - n // 3]):
        m.update(part)
    out = spectrum_metrics(m.n, m.mean(), m.scatter())
    exact = torch.linalg.svdvals(z.double())
    floor = math.sqrt(2 * d * torch.finfo(torch.float64).eps) * exact[0]
    assert (out["singular_values"] - exact).abs().max() <= floor
    assert out["rankme"] == F.rankme(out["singular_values"])
    assert out["rankme"] == pytest.approx(F.rankme(exact), rel=1e-4)  # not 1e-6: see the floor
