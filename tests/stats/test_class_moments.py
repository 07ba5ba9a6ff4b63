import pytest
import torch

from collapse_monitor import functional as F
from collapse_monitor.stats import ClassMoments, Counter
from tests.functional.test_neural_collapse import clustered
from tests.reference import assert_metrics_close

KEYS = ["nc1", "nc1_quotient", "equinorm_features", "equiangular", "cos_std", "cdnv"]


def readout(st: ClassMoments, weight=None):
    return F.metrics_from_class_statistics(
        st.count, st.means(), st.within_class_scatter(), st.class_variances(), weight
    )


def random_split(n, parts, seed):
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(n - 1, generator=g)[: parts - 1].add(1).sort().values.tolist()
    return [b - a for a, b in zip([0] + cuts, cuts + [n])]


def stream(x, y, sizes, C, valid=None):
    st = ClassMoments(C)
    for idx in torch.split(torch.arange(len(y)), sizes):
        st.update(x[idx], y[idx], None if valid is None else valid[idx])
    return st


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("C,D", [(7, 16), (30, 6)])  # C < D and C > D
def test_streaming_equals_functional_on_random_uneven_splits(seed, C, D):
    x, y = clustered(C, D, 900, weights=torch.linspace(0.2, 3, C), seed=seed)
    st = stream(x.float(), y, random_split(900, 11, seed), C)
    ref = F.neural_collapse(x.float(), y, C)
    assert_metrics_close(readout(st), ref, keys=KEYS)
    assert int(st.count.sum()) == 900


def test_classes_missing_from_batches_and_from_the_window():
    C, D = 12, 8
    x, y = clustered(C, D, 600)
    y[y == 5] = 6  # never seen
    order = torch.argsort(y, stable=True)  # sorted: each batch holds one or two classes
    x, y = x[order], y[order]
    st = stream(x, y, [50] * 12, C)
    ref = F.neural_collapse(x, y, C)
    assert ref["classes_used"] == C - 1
    assert_metrics_close(readout(st), ref, keys=KEYS + ["classes_used"])


def test_batch_order_does_not_change_the_result():
    x, y = clustered(9, 5, 500)
    a = readout(stream(x, y, [100] * 5, 9))
    perm = torch.randperm(500)
    b = readout(stream(x[perm], y[perm], [37, 263, 1, 199], 9))
    assert_metrics_close(b, a, rtol=1e-9, keys=KEYS)


def test_large_offset_small_noise_keeps_precision():
    # offset 1e3, within-class noise 1e-3: naive float64 power sums lose ~3 digits here
    C, D = 5, 16
    x, y = clustered(C, D, 2000, noise=1e-3, offset=1e3)
    ref = F.neural_collapse(x, y, C)
    st = stream(x, y, random_split(2000, 9, 1), C)
    assert_metrics_close(readout(st), ref, rtol=1e-6, keys=["nc1", "nc1_quotient", "cdnv"])

    # the same readout from unshifted sums (what the shift guards against) is visibly wrong
    counts = torch.bincount(y, minlength=C)
    sums = torch.zeros(C, D, dtype=torch.float64).index_add_(0, y, x)
    naive_scatter = x.T @ x - (sums / counts[:, None].sqrt()).T @ (sums / counts[:, None].sqrt())
    naive = F.metrics_from_class_statistics(
        counts, sums / counts[:, None], naive_scatter, st.class_variances()
    )
    assert abs(naive["nc1"] - ref["nc1"]) > 1e-6 * ref["nc1"]


def test_invalid_rows_are_ignored_even_when_nan():
    C, D = 4, 3
    x, y = clustered(C, D, 200)
    valid = torch.rand(200) > 0.3
    xb, yb = x.clone(), y.clone()
    xb[~valid] = float("nan")
    yb[~valid] = -100
    st = stream(xb, yb, [64, 64, 72], C, valid)
    ref = F.neural_collapse(x[valid], y[valid], C)
    assert_metrics_close(readout(st), ref, keys=KEYS)


def test_merge_equals_one_stream():
    C, D = 6, 5
    x, y = clustered(C, D, 400)
    whole = stream(x, y, [400], C)
    a = stream(x[:150], y[:150], [150], C)
    b = stream(x[150:], y[150:], [100, 150], C)
    merged = a.merge(b)
    assert_metrics_close(readout(merged), readout(whole), rtol=1e-9, keys=KEYS)
    assert torch.equal(merged.count, whole.count)
    empty = ClassMoments(C)
    assert_metrics_close(readout(empty.merge(whole)), readout(whole), rtol=1e-12, keys=KEYS)


def test_state_dict_roundtrip_and_reset_keeps_shift():
    C, D = 5, 4
    x, y = clustered(C, D, 300)
    st = stream(x, y, [100, 200], C)
    clone = ClassMoments(C)
    clone.load_state_dict(st.state_dict())
    for name in st.state_names:
        assert torch.equal(getattr(clone, name), getattr(st, name))
    st.end_window()
    assert int(st.count.sum()) == 0 and float(st.second_moment.abs().sum()) == 0.0
    assert torch.allclose(st.shift, clone.means())  # shifts = the window means
    with pytest.raises(ValueError, match="saved feature dimension is 4, this statistic's is 7"):
        ClassMoments(C, dim=7).load_state_dict(st.state_dict())


def test_memory_is_independent_of_samples():
    C, D = 10, 8
    st = ClassMoments(C)
    x, y = clustered(C, D, 5000)
    st.update(x[:10], y[:10])
    before = st.nbytes()
    for idx in torch.split(torch.arange(5000), 500):
        st.update(x[idx], y[idx])
    assert (
        st.nbytes() == before == 16 * C * D + 8 * D * D + 8 * C + 8 * C + 2 * C
    )  # + shift_set, shift_agreed


def test_counter_adds_and_merges():
    a, b = Counter(("x", "y")), Counter(("x", "y"))
    a.add("x", 3)
    b.add("y", torch.tensor(2))
    a.merge(b)
    assert a["x"].item() == 3 and a["y"].item() == 2


def test_diagonal_mode_gives_per_coordinate_scatter_with_offset():
    C, D = 3, 5
    x, y = clustered(C, D, 600, noise=1e-3, offset=1e3)
    full = stream(x, y, random_split(600, 7, 0), C)
    diag = ClassMoments(C, diagonal=True)
    for idx in torch.split(torch.arange(600), random_split(600, 5, 1)):
        diag.update(x[idx], y[idx])
    ref = sum(((x[y == c] - x[y == c].mean(0)) ** 2).sum(0) for c in range(C))
    assert torch.allclose(diag.within_class_scatter(), ref, rtol=1e-6, atol=0)
    assert torch.allclose(
        diag.within_class_scatter(), full.within_class_scatter().diagonal(), rtol=1e-6
    )
    assert diag.second_moment.shape == (D,)
    merged = ClassMoments(C, diagonal=True).merge(diag)
    assert torch.allclose(merged.within_class_scatter(), ref, rtol=1e-6, atol=0)


def shards_of(x, y, world, C, pending_from=None):
    """Every rank's ShardedClassMoments state for rows ``x, y``: each class's rows added on
    its owner (what ``flush`` does after routing them), the rows from ``pending_from`` on left
    buffered on the last rank, not routed yet."""
    from collapse_monitor.stats import ShardedClassMoments

    routed = slice(None, pending_from)
    states = []
    for r in range(world):
        st = ShardedClassMoments(C, r, world)
        mine = (y[routed] >= st.first) & (y[routed] < st.first + st.num_classes)
        ClassMoments.update(st, x[routed][mine], y[routed][mine] - st.first)  # (routed here)
        if pending_from is not None and r == world - 1:
            st.update(x[pending_from:], y[pending_from:])
        states.append(st.state_dict())
    return states


@pytest.mark.parametrize("world,into", [(2, 3), (3, 2), (4, 1)])
def test_class_shards_joined_and_split_again_equal_one_stream(world, into):
    """A class-sharded checkpoint of ``world`` ranks, re-sharded to ``into``: the owners'
    classes (and in one process all of them) equal one stream of the same rows, the rows not
    routed yet included (known answer: the functional metrics of all rows)."""
    from collapse_monitor.stats import ShardedClassMoments
    from collapse_monitor.stats.class_moments import whole_classes

    C = 11
    x, y = clustered(C, 5, 300, seed=3)
    whole = whole_classes(shards_of(x, y, world, C, pending_from=250))
    if into == 1:
        st = ClassMoments(C)
        st.load_state_dict(whole)
        assert_metrics_close(readout(st), F.neural_collapse(x, y, C), rtol=1e-9, keys=KEYS)
        return
    want = stream(x, y, [300], C)
    parts = [ShardedClassMoments(C, r, into) for r in range(into)]
    for st in parts:
        st.load_state_dict(whole)
    assert len(parts[0]._pending) == 1 and not any(p._pending for p in parts[1:])
    px, py, _ = parts[0]._pending[0]  # rank 0's flush would route them: by hand here
    for st in parts:
        mine = (py >= st.first) & (py < st.first + st.num_classes)
        ClassMoments.update(st, px[mine], py[mine] - st.first)
        rows = slice(st.first, st.first + st.num_classes)
        torch.testing.assert_close(st.count, want.count[rows])
        torch.testing.assert_close(st.means(), want.means()[rows], rtol=1e-12, atol=1e-12)
    total = sum(st.within_class_scatter() for st in parts)  # (a readout sums the parts)
    torch.testing.assert_close(total, want.within_class_scatter(), rtol=1e-9, atol=1e-9)


def test_a_joined_window_that_lost_samples_starts_empty_in_one_process(caplog):
    from collapse_monitor.stats.class_moments import whole_classes

    C = 6
    x, y = clustered(C, 4, 60, seed=1)
    states = shards_of(x, y, 2, C, pending_from=50)
    states[1]["states"]["lost"] = torch.ones(1, dtype=torch.int64)
    st = ClassMoments(C)
    st.load_state_dict(whole_classes(states))
    assert int(st.count.sum()) == 0 and bool(st.shift_set.any())  # (the shifts stay)
    assert "lacks samples" in caplog.text
