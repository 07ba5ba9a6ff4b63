"""Every probe through the same battery (see ``tests/harness.py``)."""

import os

import pytest
import torch

from tests.dist import process_group, run_two
from tests.harness import (
    CASES,
    NAME,
    assert_matches,
    batches,
    monitor,
    relative,
    stream,
    uneven_sizes,
)

IDS = [c.id for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_equals_the_functional_reference_on_random_uneven_splits(case, seed):
    model, data = case.model(), case.data()
    n = next(iter(data.values())).shape[0]
    mon = monitor(case, model)
    stream(case, mon, model, batches(data, uneven_sizes(n, seed)))
    assert_matches(relative(mon.compute()), case.reference(model, data), case.rel)
    mon.close()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_resume_round_trip_continues_exactly(case):
    model, data = case.model(), case.data()
    n = next(iter(data.values())).shape[0]
    parts = batches(data, uneven_sizes(n, 7, parts=7))
    whole = monitor(case, model, log_every=4)
    stream(case, whole, model, parts)
    want = relative(whole.compute())
    whole.close()
    first = monitor(case, model, log_every=4)
    stream(case, first, model, parts[:5])  # one log, then a window in progress
    state = first.state_dict()
    first.close()
    resumed = monitor(case, model, log_every=4)
    resumed.load_state_dict(state)
    stream(case, resumed, model, parts[5:])
    got = relative(resumed.compute())
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
    resumed.close()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input_under_strict_names_probe_module_and_what_was_wrong(case):
    model, data = case.model(), case.data()
    mon = monitor(case, model)
    probe = mon.probes[0]
    with pytest.raises(ValueError, match=case.bad_match) as err:
        with mon.observe(**case.keywords(data)):
            case.bad(model)
    assert f"{type(probe).__name__} '{NAME}' at module 'm'" in str(err.value)
    mon.close()


def harness_worker(rank, init, out_dir):
    """Per case: rank 1 records nothing in the window (rank 0 records everything); then both
    record uneven shards. Every rank computes (a collective) and saves what it got."""
    torch.set_num_threads(1)
    out = {}
    with process_group(rank, init):
        for case in CASES:
            model, data = case.model(), case.data()
            n = next(iter(data.values())).shape[0]
            lonely = monitor(case, model)
            mine = batches(data, [n // 3, 0, n - n // 3]) if rank == 0 else []
            stream(case, lonely, model, mine)
            for _ in range(3 - len(mine)):
                lonely.step()  # the same steps, nothing observed
            got_lonely = relative(lonely.compute())
            lonely.close()
            shards = monitor(case, model)
            cut = n // 3
            part = batches(data, [cut, n - cut])[rank]
            m = next(iter(part.values())).shape[0]
            stream(case, shards, model, batches(part, [m // 2, m - m // 2]))
            out[case.id] = (got_lonely, relative(shards.compute()))
            shards.close()
    torch.save(out, os.path.join(out_dir, f"harness{rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_two(harness_worker, tmp_path_factory.mktemp("harness"), "harness")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_two_ranks_one_recording_nothing_agree_and_equal_the_single_process_union(case, two_ranks):
    model, data = case.model(), case.data()
    want = case.reference(model, data)
    (lonely0, shards0), (lonely1, shards1) = two_ranks[0][case.id], two_ranks[1][case.id]
    assert lonely0 == lonely1 and shards0 == shards1
    assert_matches(lonely0, want, case.rel)
    assert_matches(shards0, want, case.rel)


def test_a_new_probe_takes_under_60_lines():
    import inspect

    from tests import harness

    lines = inspect.getsource(harness.FeatureSums) + inspect.getsource(harness.FeatureMean)
    assert len([line for line in lines.splitlines() if line.strip()]) < 60
