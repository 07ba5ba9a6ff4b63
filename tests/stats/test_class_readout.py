"""The readout of class statistics with its sums split over ranks (``stats.class_readout``)."""

import pytest
import torch

from collapse_monitor import functional as F
from collapse_monitor.stats import ClassMoments
from collapse_monitor.stats.class_readout import shared_class_metrics, shared_within_scatter
from tests.functional.test_neural_collapse import _pair_population, clustered
from tests.reference import assert_metrics_close


def test_a_failing_share_joins_the_combine_before_raising():
    m, v = _pair_population(8, 3)
    seen = []
    with pytest.raises(ValueError):
        shared_class_metrics(
            torch.full((8,), 3), m, torch.eye(3), v, tile_size=0, share=(1, 2),
            combine=seen.append,
        )  # fmt: skip
    # the between-class Gram part (8 classes > D = 3), then the failing part's NaN pair sums
    assert len(seen) == 2 and seen[0].shape == (3, 3) and torch.isnan(seen[1]).all()


@pytest.mark.parametrize("C,D", [(6, 10), (40, 5)])  # the Gram of the classes, of the features
def test_shares_summed_over_the_parts_give_the_one_process_metrics(C, D):
    x, y = clustered(C, D, 600, seed=4)
    st = ClassMoments(C)
    st.update(x, y)
    whole = F.metrics_from_class_statistics(
        st.count, st.means(), st.within_class_scatter(), st.class_variances()
    )
    world = 3
    # every part's contributions, in the order each part combines them, summed as an
    # all-reduce would: the scatter's class term, then the Gram matrix and the pair sums
    parts = [[] for _ in range(world)]
    for r in range(world):
        shared_within_scatter(st, (r, world), parts[r].append)
    scatter = st.scatter_from(sum(p[0] for p in parts))
    combines = 1 + (C > D)  # the Gram matrix (when the classes outnumber D), the pair sums

    class Collected(Exception):
        pass

    totals = []
    for r in range(world):
        calls = []

        def collect(t, calls=calls):
            calls.append(t.clone())
            if len(calls) == combines:  # this part's contributions, before it reads out
                raise Collected

        with pytest.raises(Collected):
            shared_class_metrics(
                st.count, st.means(), scatter, st.class_variances(), share=(r, world),
                combine=collect,
            )  # fmt: skip
        totals.append(calls)
    summed = [sum(t[i] for t in totals) for i in range(combines)]

    def replay(t):  # every part gets the sums of all parts
        t.copy_(summed.pop(0))

    got = shared_class_metrics(
        st.count, st.means(), scatter, st.class_variances(), share=(0, world), combine=replay
    )
    assert not summed
    assert_metrics_close(got, whole, rtol=1e-12)
