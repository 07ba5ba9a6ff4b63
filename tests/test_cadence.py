"""The cadence: which steps each probe records and after which steps the monitor logs."""

import pytest

from collapse_monitor.cadence import (
    EVERY_STEP,
    SAMPLED,
    Cadence,
    class_sample_stride,
    per_class,
    sampled_steps_per_window,
)


@pytest.mark.parametrize(
    "classes, rows, L, stride",
    [(1000, 256, 50, 3), (10, 256, 50, 25), (10**5, 256, 50, 2), (40, 32, 10, 2), (4, 32, 1, 1)],
)
def test_class_sample_stride_aims_at_four_samples_per_class_within_half_the_steps(
    classes, rows, L, stride
):
    assert class_sample_stride(L, classes, rows) == stride


@pytest.mark.parametrize("L", [1, 2, 7, 10, 50, 500])
def test_every_window_ends_with_a_log_and_a_recorded_step(L):
    cadence = Cadence(L)
    steps = range(3 * L)
    assert [s for s in steps if cadence.logs_after(s)] == [L - 1, 2 * L - 1, 3 * L - 1]
    sampled = [s for s in steps if cadence.records(SAMPLED, s)]
    assert len(sampled) == 3 * sampled_steps_per_window(L)
    assert all(cadence.records(SAMPLED, s) for s in steps if cadence.logs_after(s))
    assert all(cadence.records(EVERY_STEP, s) for s in steps)


def test_a_class_conditional_probe_learns_its_stride_from_the_samples_of_a_step():
    cadence = Cadence(50, world=2)
    need = per_class(1000)
    assert cadence.records(need, 0, rows_per_step=None)  # the first step tells the batch size
    # 2 ranks of 128 rows: 256 samples a recorded step, as one rank of 256
    recorded = [s for s in range(50) if cadence.records(need, s, rows_per_step=128)]
    assert len(recorded) == 17 and recorded[-1] == 49
    assert recorded == [s for s in range(50) if Cadence(50).records(need, s, 256)]


def test_observe_every_n_steps_overrides_every_probes_sampling():
    cadence = Cadence(10, observe_every_n_steps=3)
    for sampling in (EVERY_STEP, SAMPLED, per_class(5)):
        assert [s for s in range(10) if cadence.records(sampling, s, 8)] == [0, 3, 6, 9]
    assert cadence.thin_window(per_class(5), samples=1, steps=4) is None  # the user's choice


def test_a_thin_class_window_is_explained_only_under_the_default_cadence():
    cadence = Cadence(10)
    why = cadence.thin_window(per_class(400), samples=192, steps=6)
    assert "192 samples for 400 classes" in why and "recorded 6 of its 10 steps" in why
    assert cadence.thin_window(per_class(400), samples=800, steps=6) is None
    assert cadence.thin_window(SAMPLED, samples=1, steps=1) is None


@pytest.mark.parametrize("L, n", [(0, None), (5, 0)])
def test_a_cadence_below_one_is_refused(L, n):
    with pytest.raises(ValueError, match="must be >= 1"):
        Cadence(L, n)
