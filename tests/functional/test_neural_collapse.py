import math

import numpy as np
import pytest
import torch

from collapse_monitor import functional as F
from tests.reference import assert_metrics_close, nc_reference


def clustered(C, D, N, noise=0.5, offset=0.0, weights=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, D, generator=g, dtype=torch.float64) * 2
    p = torch.ones(C) if weights is None else torch.as_tensor(weights, dtype=torch.float)
    y = torch.multinomial(p, N, replacement=True, generator=g)
    x = offset + means[y] + noise * torch.randn(N, D, generator=g, dtype=torch.float64)
    return x, y


def simplex_etf(C, D, scale=3.0):
    """C unit-norm-times-scale vectors in R^D with pairwise cosine -1/(C-1)."""
    q, _ = torch.linalg.qr(torch.randn(D, C, dtype=torch.float64))
    eye = torch.eye(C, dtype=torch.float64)
    return scale * math.sqrt(C / (C - 1)) * (q @ (eye - 1.0 / C)).T  # (C, D)


@pytest.mark.parametrize("C,D", [(6, 10), (12, 5)])  # C < D and C > D
def test_matches_independent_numpy_reference(C, D):
    x, y = clustered(C, D, 500, weights=np.linspace(1, 5, C))  # imbalanced
    W, b = torch.randn(C, D), torch.randn(C)
    got = F.neural_collapse(x, y, C, W, b)
    want = nc_reference(x.numpy(), y.numpy(), C, W.numpy(), b.numpy())
    assert_metrics_close(got, want, rtol=1e-9)
    assert got["nc1_rank"] == min(C - 1, D)


def test_simplex_etf_known_answer():
    C, D = 8, 12
    M = simplex_etf(C, D)
    y = torch.arange(C).repeat(20)
    x = M[y]  # zero within-class variability
    got = F.neural_collapse(x, y, C, weight=M, bias=torch.zeros(C))
    assert got["nc1"] < 1e-9
    assert got["nc1_quotient"] < 1e-9
    assert got["equiangular"] < 1e-9
    assert got["cos_std"] < 1e-9
    assert got["equinorm_features"] < 1e-9
    assert got["equinorm_weights"] < 1e-9
    assert got["self_duality"] < 1e-9
    assert got["ncc_mismatch"] == 0.0
    assert got["cdnv"] < 1e-20


def test_random_geometry_is_far_from_collapse():
    x, y = clustered(5, 5, 400, noise=3.0)
    got = F.neural_collapse(x, y, 5, torch.randn(5, 5))
    assert got["nc1"] > 0.5 and got["self_duality"] > 0.1 and got["cdnv"] > 0.1


def test_missing_and_rare_classes_are_dropped_and_counted():
    C, D = 10, 4
    x, y = clustered(C, D, 300)
    y[y == 3] = 4  # class 3 missing
    single = torch.nonzero(y == 7).flatten()
    y[single[1:]] = 8  # class 7 keeps one sample: dropped with its sample
    got = F.neural_collapse(x, y, C, min_class_count=2)
    assert got["classes_used"] == C - 2
    want = nc_reference(x.numpy(), y.numpy(), C)
    assert_metrics_close(got, want, rtol=1e-9)


def test_cdnv_tiles_give_the_untiled_value():
    x, y = clustered(40, 6, 2000)
    full = F.neural_collapse(x, y, 40, tile_size=4096)
    for tile in (1, 7, 16):
        tiled = F.neural_collapse(x, y, 40, tile_size=tile)
        assert_metrics_close(tiled, full, rtol=1e-12, keys=["cdnv", "equiangular", "cos_std"])


def test_coinciding_class_means_are_skipped_in_cdnv():
    M = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.arange(4).repeat(10)
    x = M[y].double() + 0.01 * torch.randn(40, 3, dtype=torch.float64)
    x[y == 1] = x[y == 0]
    got = F.neural_collapse(x, y, 4)
    assert got["cdnv_pairs_skipped"] == 1
    assert math.isfinite(got["cdnv"])


def test_too_few_classes_reports_only_the_count():
    x = torch.randn(10, 3)
    y = torch.zeros(10, dtype=torch.long)
    assert F.neural_collapse(x, y, 4) == {"classes_used": 1.0}


def test_bad_input_raises_clear_errors():
    x, y = torch.randn(10, 3), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="must lie in"):
        F.neural_collapse(x, y + 5, 3)
    with pytest.raises(ValueError, match="do not match"):
        F.neural_collapse(x, y[:5], 3)
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.neural_collapse(torch.full((10, 3), float("nan")), y, 3)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        F.neural_collapse(torch.randn(10), y, 3)


def test_sequence_features_are_flattened():
    x, y = clustered(5, 4, 60)
    flat = F.neural_collapse(x, y, 5)
    seq = F.neural_collapse(x.reshape(6, 10, 4), y.reshape(6, 10), 5)
    assert_metrics_close(seq, flat, rtol=1e-12)


def _pair_population(C, D, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(C, D, generator=g, dtype=torch.float64)
    m = m * torch.exp(0.3 * torch.randn(C, 1, generator=g, dtype=torch.float64))  # uneven norms
    v = torch.exp(torch.randn(C, generator=g, dtype=torch.float64))  # uneven variances
    return m - m.mean(0), v


@pytest.mark.parametrize("world", [2, 3, 4])
def test_rank_shares_of_the_pairs_add_up_to_all_pairs_once(world):
    C = 61
    x, y = clustered(C, 5, 1500, noise=1.0, seed=3)
    counts = torch.bincount(y, minlength=C)
    assert counts.min() >= 2
    means = torch.zeros(C, 5, dtype=torch.float64).index_add_(0, y, x) / counts[:, None]
    var = torch.zeros(C, dtype=torch.float64).index_add_(0, y, (x - means[y]).pow(2).sum(1))
    m, v = means - means.mean(0), var / counts
    whole = F.pairwise_sums(m, v, tile=7)
    parts = [F.pairwise_sums(m, v, tile=7, share=(r, world)) for r in range(world)]
    assert whole[3] == C * (C - 1) / 2
    torch.testing.assert_close(sum(parts), whole, rtol=1e-12, atol=0)
    # the work splits: no share holds much more than its part of the pairs (+ one tile)
    assert max(p[3] for p in parts) <= whole[3] / world + 49
    # class shards: the pairs within each of two sets of classes and across them
    etf = -1.0 / (C - 1)
    a, b = slice(0, 25), slice(25, C)
    split = (
        F.pairwise_sums(m[a], v[a], tile=7, etf_cos=etf)
        + F.pairwise_sums(m[b], v[b], tile=7, etf_cos=etf)
        + F.cross_pairwise_sums((m[a], v[a]), (m[b], v[b]), etf, tile=7)
    )
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=0)
    # the combined shares against the pair-by-pair numpy reference
    want = nc_reference(x.numpy(), y.numpy(), C)
    assert_metrics_close(
        F.pairwise_metrics(sum(parts)), want, rtol=1e-9, keys=["equiangular", "cos_std", "cdnv"]
    )


def test_sampled_pairs_of_a_simplex_etf_are_exactly_equiangular():
    M = simplex_etf(30, 40)
    got = F.sampled_pairwise_metrics(M, torch.ones(30, dtype=torch.float64), 500)
    assert got["pairs_sampled"] == 500
    for key in ("equiangular", "cos_std"):
        assert got[f"{key}_sampled"] < 1e-9 and got[f"{key}_sampled_ci95"] < 1e-9
    # every pair of an ETF is at the same distance: CDNV is the same for all pairs
    d2 = (M[0] - M[1]).pow(2).sum().item()
    assert got["cdnv_sampled"] == pytest.approx(1 / d2, rel=1e-12)
    assert got["cdnv_sampled_ci95"] < 1e-12


def test_sampled_pairs_interval_covers_the_exact_value():
    m, v = _pair_population(1500, 24)
    exact = F.pairwise_metrics(F.pairwise_sums(m, v))
    covered = dict.fromkeys(("equiangular", "cos_std", "cdnv"), 0)
    for seed in range(40):
        got = F.sampled_pairwise_metrics(m, v, 3000, torch.Generator().manual_seed(seed))
        for key in covered:
            covered[key] += abs(got[f"{key}_sampled"] - exact[key]) <= got[f"{key}_sampled_ci95"]
    # a 95% interval misses about 2 in 40; 36 is met with probability > 0.95 by a correct one
    assert all(c >= 36 for c in covered.values()), covered


def test_sampled_cdnv_draws_pairs_by_class_spread():
    # log-variances of standard deviation 2: a few classes carry most of CDNV's terms
    m, v = _pair_population(1500, 24)
    v = v.log().mul(2).exp()
    exact = F.pairwise_metrics(F.pairwise_sums(m, v))["cdnv"]
    i, j = torch.triu_indices(1500, 1500, 1)
    terms = (v[i] + v[j]) / (2 * (m[i] - m[j]).pow(2).sum(1))
    assert terms.mean().item() == pytest.approx(exact, rel=1e-12)
    uniform_half_width = 1.96 * terms.std().item() / math.sqrt(3000)
    got = [
        F.sampled_pairwise_metrics(m, v, 3000, torch.Generator().manual_seed(seed))
        for seed in range(40)
    ]
    est = torch.tensor([g["cdnv_sampled"] for g in got])
    half = torch.tensor([g["cdnv_sampled_ci95"] for g in got])
    assert ((est - exact).abs() <= half).sum() >= 36
    # unbiased (the mean of 40 draws within 3 of its standard errors) and much narrower than
    # uniform pairs' interval
    assert abs(est.mean().item() - exact) < 3 * half.mean().item() / 1.96 / math.sqrt(40)
    assert half.median().item() < uniform_half_width / 4


def test_sampled_readout_rejects_too_few_pairs():
    m, v = _pair_population(5, 2)
    with pytest.raises(ValueError, match="pairs"):
        F.sampled_pairwise_metrics(m, v, 1)
