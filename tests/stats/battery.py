"""One battery for every statistic (in the manner of torchmetrics' tester): however the samples
are split into batches and statistics, merging gives the statistic of all of them; a checkpoint
round trip and a clone keep it exactly; a reset restores the declared defaults, and forgetting a
reduced copy clears exactly the states a collective combined."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from collapse_monitor.stats import Statistic

Update = Callable[[Statistic, tuple], None]


def fed(make: Callable[[], Statistic], batches: Sequence[tuple], update: Update) -> Statistic:
    st = make()
    for batch in batches:
        update(st, batch)
    return st


def states(st: Statistic) -> dict[str, torch.Tensor]:
    return {n: getattr(st, n).clone() for n in st.state_names}


def assert_states_equal(a: Statistic, b: Statistic, rtol: float = 1e-12) -> None:
    for name, value in states(a).items():
        other = getattr(b, name)
        assert value.shape == other.shape, name
        if value.is_floating_point():
            torch.testing.assert_close(value, other, rtol=rtol, atol=1e-12, msg=name)
        else:
            assert torch.equal(value, other), name


def run_battery(make: Callable[[], Statistic], batches: Sequence[tuple], update: Update) -> None:
    whole = fed(make, batches, update)
    # any split into two statistics, merged, is the statistic of every batch
    for cut in (0, 1, len(batches) // 2, len(batches)):
        left, right = fed(make, batches[:cut], update), fed(make, batches[cut:], update)
        assert_states_equal(left.merge(right), whole)
    # checkpoint round trip, into a fresh statistic
    again = make()
    again.load_state_dict(whole.state_dict())
    assert_states_equal(again, whole, rtol=0)
    # a clone is independent
    copy = whole.clone()
    update(copy, batches[0])
    assert_states_equal(fed(make, batches, update), whole, rtol=0)
    # reset: the declared defaults (0; -inf for a floating maximum, the largest value for a
    # minimum), sizes kept
    sizes = dict(whole.sizes)
    whole.reset()
    assert whole.sizes == sizes
    for name, (_, dtype, reduce) in whole._states.items():
        value = getattr(whole, name)
        fill = -float("inf") if reduce == "max" and dtype.is_floating_point else 0
        if reduce == "min":
            fill = float("inf") if dtype.is_floating_point else torch.iinfo(dtype).max
        assert (value == fill).all(), name
    # forgetting a reduced copy clears what the collectives combined, and nothing else
    reduced = fed(make, batches, update)
    kept = states(reduced)
    reduced.forget_reduced()
    for name, (_, _, reduce) in reduced._states.items():
        if reduce in ("same", "local"):
            assert torch.equal(getattr(reduced, name), kept[name]), name
