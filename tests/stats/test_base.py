"""The Statistic base: declared states, sizes fixed by data, errors that name what is wrong, and
a reduce across ranks that is the declared reduction of each state."""

import os

import pytest
import torch

from collapse_monitor.stats import (
    ClassMoments,
    CodeCounts,
    Counter,
    HeadEntropy,
    LogitSums,
    Statistic,
    UnitActivity,
    agree_sizes,
)
from tests.dist import process_group, run_two
from tests.stats.battery import assert_states_equal


class Feature(Statistic):
    def __init__(self):
        super().__init__()
        self.add_size("D", "feature dimension")
        self.add_state("total", ("D",), torch.float64)
        self.add_state("peak", (), torch.float64, reduce="max")

    def update(self, x):
        self.fix_sizes(D=x.shape[1])
        self.total += x.double().sum(0)
        torch.maximum(self.peak, x.double().max(), out=self.peak)


def test_a_state_declares_a_known_reduction_and_declared_sizes():
    st = Statistic()
    with pytest.raises(ValueError, match="reduce must be one of"):
        st.add_state("x", (), torch.float64, reduce="mean")
    with pytest.raises(ValueError, match=r"declare sizes \['D'\] with add_size first"):
        st.add_state("x", ("D",), torch.float64)


def test_sizes_are_fixed_by_the_first_data_and_a_change_is_named():
    st = Feature()
    assert st.total.shape == (0,) and st.peak == -float("inf")
    st.update(torch.ones(2, 3))
    with pytest.raises(ValueError, match="feature dimension changed from 3 to 4"):
        st.update(torch.ones(2, 4))


def test_a_checkpoint_of_another_shape_or_missing_a_state_is_refused():
    st = Feature()
    st.update(torch.ones(2, 3))
    other = Feature()
    other.update(torch.ones(1, 5))
    with pytest.raises(ValueError, match="saved feature dimension is 5, this statistic's is 3"):
        st.load_state_dict(other.state_dict())
    state = st.state_dict()
    del state["states"]["peak"]
    with pytest.raises(KeyError, match=r"missing states \['peak'\]"):
        Feature().load_state_dict(state)


def test_a_state_added_later_loads_from_a_window_saved_before_it():
    """LogitSums and TokenEntropySums gained out_of_range: a window saved before resumes with
    that count at 0 and every other state as saved."""
    from collapse_monitor.stats import LogitSums, TokenEntropySums

    for make, fill in ((LogitSums, "rows"), (TokenEntropySums, "tokens")):
        old = make()
        setattr(old, fill, torch.tensor(7.0, dtype=torch.float64))
        state = old.state_dict()
        del state["states"]["out_of_range"]
        new = make()
        new.load_state_dict(state)
        assert float(getattr(new, fill)) == 7.0 and int(new.out_of_range) == 0
        del state["states"][fill]  # (a state that was always there is still required)
        with pytest.raises(KeyError, match=f"missing states \\['{fill}'\\]"):
            make().load_state_dict(state)


def test_merging_a_statistic_that_saw_nothing_changes_nothing():
    st = Feature()
    st.update(torch.arange(6.0).reshape(2, 3))
    before = st.clone()
    assert_states_equal(st.merge(Feature()), before, rtol=0)
    assert_states_equal(Feature().merge(before), before, rtol=0)


def test_counter_reads_and_adds_by_name():
    c = Counter(("seen", "bad"))
    c.add("seen", 3)
    c.add("bad", torch.tensor(2))
    assert c.as_dict() == {"seen": 3, "bad": 2} and int(c["bad"]) == 2


def test_agree_sizes_in_one_process_is_the_identity_and_refuses_a_conflict():
    layouts = {"a": {"D": 4, "H": None}}
    assert agree_sizes(layouts) == layouts


def _statistics(rank: int):
    """Every statistic fed with this rank's part of some data (rank 1 sees nothing of some)."""
    g = torch.Generator().manual_seed(rank)
    feature, units, heads, logits = Feature(), UnitActivity(), HeadEntropy(), LogitSums()
    codes, classes = CodeCounts(2, 5), ClassMoments(4)
    if rank == 0:  # rank 1 never fixes D or H: it takes them from rank 0
        feature.update(torch.randn(6, 3, generator=g))
        units.update(torch.randn(5, 4, generator=g))
        heads.update(torch.rand(2, 3, 4, generator=g), torch.full((2, 3, 4), 3), torch.tensor(2.0))
    codes.update(torch.randint(0, 5, (9, 2), generator=g))
    logits.update(torch.randn(4, 6, generator=g), torch.float32)
    x, y = torch.randn(20, 3, generator=g) + 5 * rank, torch.randint(0, 4, (20,), generator=g)
    classes.update(x, y)
    return [feature, units, heads, logits, codes, classes]


def worker(rank, init, out_dir):
    with process_group(rank, init):
        reduced = [st.all_reduce() for st in _statistics(rank)]
        torch.save([st.state_dict() for st in reduced], os.path.join(out_dir, f"stats{rank}.pt"))


def test_every_statistic_reduces_across_ranks_as_one_process_merges(tmp_path):
    runs = run_two(worker, tmp_path, "stats")
    merged = [a.merge(b) for a, b in zip(_statistics(0), _statistics(1))]
    for st, saved0, saved1 in zip(merged, *runs):
        for saved in (saved0, saved1):  # every rank holds the same, equal to the merge
            again = type(st).__new__(type(st))
            again.__dict__.update(st.clone().__dict__)
            again.load_state_dict(saved)
            if isinstance(st, ClassMoments):  # shifts differ; the moments around them agree
                torch.testing.assert_close(again.means(), st.means(), rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(
                    again.within_class_scatter(), st.within_class_scatter(), rtol=1e-9, atol=1e-9
                )
                assert torch.equal(again.count, st.count)
            else:
                assert_states_equal(again, st)
