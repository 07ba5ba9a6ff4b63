"""Property tests: invariances of the functional metrics, and streaming == functional on arbitrary
batch splits."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collapse_monitor import functional as F
from collapse_monitor.stats import ClassMoments

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def labelled(draw, min_classes=3, max_classes=6):
    C = draw(st.integers(min_classes, max_classes))
    D = draw(st.integers(2, 7))
    per = draw(st.integers(3, 12))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, D, generator=g, dtype=torch.float64) * 3
    y = torch.arange(C).repeat_interleave(per)
    x = means[y] + torch.randn(len(y), D, generator=g, dtype=torch.float64)
    return x, y, C, seed


def rel_close(a, b, rel=1e-7):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


@SETTINGS
@given(labelled(), st.randoms())
def test_nc_metrics_are_invariant_to_order_relabelling_translation_and_scale(data, rnd):
    x, y, C, _ = data
    ref = F.neural_collapse(x, y, C)
    perm = torch.tensor(rnd.sample(range(len(y)), len(y)))
    relabel = torch.tensor(rnd.sample(range(C), C))
    shift = torch.randn(x.shape[1], dtype=torch.float64) * 10
    for variant in (
        F.neural_collapse(x[perm], y[perm], C),
        F.neural_collapse(x, relabel[y], C),
        F.neural_collapse(x + shift, y, C),
        F.neural_collapse(x * 7.5, y, C),
    ):
        for key in ("nc1", "nc1_quotient", "cdnv", "equiangular", "equinorm_features"):
            assert rel_close(variant[key], ref[key], 1e-6), key


@SETTINGS
@given(labelled(), st.lists(st.integers(1, 20), min_size=1, max_size=8))
def test_streaming_equals_functional_on_arbitrary_splits(data, cuts):
    x, y, C, _ = data
    st_ = ClassMoments(C)
    start = 0
    for size in cuts + [len(y)]:
        if start >= len(y):
            break
        st_.update(x[start : start + size], y[start : start + size])
        start += size
    got = F.metrics_from_class_statistics(
        st_.count, st_.means(), st_.within_class_scatter(), st_.class_variances()
    )
    ref = F.neural_collapse(x, y, C)
    for key in ("nc1", "nc1_quotient", "cdnv", "cos_std"):
        assert rel_close(got[key], ref[key], 1e-6), key


@SETTINGS
@given(st.integers(2, 50), st.integers(0, 1000))
def test_perplexity_is_order_and_scale_invariant(K, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, K, (200,), generator=g)
    ppl = F.codebook_usage(idx, K)["perplexity"].item()
    assert 1 - 1e-12 <= ppl <= K + 1e-9
    assert rel_close(F.codebook_usage(idx.flip(0), K)["perplexity"].item(), ppl, 1e-12)
    assert rel_close(
        F.codebook_usage(idx.repeat(3), K)["perplexity"].item(), ppl, 1e-12
    )  # count scale


@SETTINGS
@given(st.integers(0, 1000), st.floats(-50, 50))
def test_normalised_entropy_is_shift_invariant_and_bounded(seed, shift):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 5, 9, generator=g, dtype=torch.float64) * 4
    allowed = torch.ones(5, 9, dtype=torch.bool).tril(4)
    H, n = F.entropy_from_logits(logits, allowed)
    H2, _ = F.entropy_from_logits(logits + shift, allowed)
    assert torch.allclose(H, H2, atol=1e-9)
    assert (H >= -1e-12).all() and (H <= torch.log(n.double()) + 1e-9).all()


@SETTINGS
@given(st.integers(0, 1000), st.floats(0.01, 100))
def test_representation_metrics_scale_invariance(seed, scale):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(300, 6, generator=g, dtype=torch.float64) * torch.logspace(
        0, -1, 6, dtype=torch.float64
    )
    a, b = F.representation_rank(z), F.representation_rank(z * scale)
    for key in ("erank", "rankme", "norm_std"):
        assert rel_close(a[key], b[key], 1e-6), key
    assert math.isfinite(a["erank"])
