"""Which training steps each probe records, and after which steps the monitor logs.

One :class:`Cadence` decides for every probe. A probe declares what it needs from it, a
:class:`Sampling` (``Probe.sampling``): every step (cheap probes), a sample of the steps (probes
whose update costs a GEMM or recomputed attention), or enough steps for a few samples of each of
its classes (class-conditional probes). The cadence knows nothing else of probes.

Steps are counted from 0; the monitor logs after the step whose index ``s`` has
``(s + 1) % log_every_n_steps == 0``, and a sampled probe records the steps an even stride back
from the logging step, so that every window ends with a recorded step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

SAMPLE_STRIDE = 25  # the default cadence records one step in 25 at most (4 % of the steps)
# ... but a class-conditional probe records enough steps for this many expected samples per
# class in each window (with 4, ~91% of balanced classes reach the 2 samples that NC needs) ...
SAMPLES_PER_CLASS = 4
# ... within a budget: at most this fraction of the steps
MAX_RECORDED_FRACTION = 0.5


@dataclass(frozen=True)
class Sampling:
    """What a probe needs from the cadence.

    Attributes:
        every_step: record every training step (an ``O(B D)`` update).
        classes: a class-conditional probe of this many classes: record enough steps for
            ``samples_per_class`` expected samples of each class per window, learned from the
            samples a recorded step brings (at most :data:`MAX_RECORDED_FRACTION` of the steps,
            never fewer than a sampled probe).
        samples_per_class: see ``classes``.

    Neither: a sampled probe (:func:`sampled_steps_per_window` steps per window).
    """

    every_step: bool = False
    classes: int | None = None
    samples_per_class: int = SAMPLES_PER_CLASS


EVERY_STEP = Sampling(every_step=True)
SAMPLED = Sampling()


def per_class(classes: int, samples_per_class: int = SAMPLES_PER_CLASS) -> Sampling:
    """The sampling of a class-conditional probe of ``classes`` classes."""
    return Sampling(classes=int(classes), samples_per_class=samples_per_class)


def sample_stride(log_every_n_steps: int) -> int:
    """One step in this many is recorded by a sampled probe: ``min(25, ceil(L / 2))``."""
    return max(1, min(SAMPLE_STRIDE, -(-log_every_n_steps // 2)))


def sampled_steps_per_window(log_every_n_steps: int) -> int:
    """Steps per window that the GEMM-cost probes record under the default cadence: one step in
    ``min(25, ceil(L / 2))`` (``L = log_every_n_steps``): two at the default ``L = 50``, twenty
    at ``L = 500``, every step for ``L <= 2``."""
    return -(-log_every_n_steps // sample_stride(log_every_n_steps))


@functools.lru_cache(maxsize=256)  # asked twice a step with the same few arguments
def class_sample_stride(
    log_every_n_steps: int,
    classes: int,
    rows_per_step: int,
    samples_per_class: int = SAMPLES_PER_CLASS,
) -> int:
    """The default cadence's stride for a class-conditional probe whose window gains
    ``rows_per_step`` samples per recorded step (over all ranks): one step in ``stride`` is
    recorded, enough for ``samples_per_class`` expected samples per class in a window, within
    the budget of ``MAX_RECORDED_FRACTION`` of the steps, and never fewer steps than
    :func:`sampled_steps_per_window`. E.g. 1,000 classes at batch 256, ``L = 50``: one step in
    3 (17 per window); 10 classes: one in 25 (2)."""
    L = log_every_n_steps
    stride = sample_stride(L)
    need = -(-samples_per_class * classes // max(rows_per_step, 1))
    steps = min(need, max(1, int(L * MAX_RECORDED_FRACTION)))
    return max(1, min(stride, L // steps))


class Cadence:
    """The steps each probe records and the steps after which the monitor logs.

    Args:
        log_every_n_steps: window length ``L``.
        observe_every_n_steps: ``None``: each probe as its :class:`Sampling` says; ``n``: every
            probe records every n-th step only (``1``: every step).
        world: ranks that record (a class-conditional probe's window gains ``world`` times a
            rank's samples per recorded step).

    Raises:
        ValueError: ``L`` or ``n`` below 1.

    Example:
        >>> cadence = Cadence(50)
        >>> [s for s in range(100) if cadence.records(SAMPLED, s)]
        [24, 49, 74, 99]
        >>> cadence.logs_after(49), cadence.logs_after(50)
        (True, False)
    """

    def __init__(
        self, log_every_n_steps: int, observe_every_n_steps: int | None = None, world: int = 1
    ) -> None:
        if log_every_n_steps < 1 or (
            observe_every_n_steps is not None and observe_every_n_steps < 1
        ):
            raise ValueError(
                "log_every_n_steps and observe_every_n_steps must be >= 1, got "
                f"{log_every_n_steps} and {observe_every_n_steps}"
            )
        self.log_every_n_steps = int(log_every_n_steps)
        self.observe_every_n_steps = (
            None if observe_every_n_steps is None else int(observe_every_n_steps)
        )
        self.world = int(world)

    def _steps_to_log(self, step: int) -> int:
        """Steps from ``step`` to the next logging step (0: ``step`` logs)."""
        L = self.log_every_n_steps
        return L - 1 - step % L

    def next_log(self, step: int) -> int:
        """The first training step from ``step`` on after which the monitor logs."""
        return step + self._steps_to_log(step)

    def logs_after(self, step: int) -> bool:
        """Whether the monitor logs after training step ``step`` (0-based)."""
        return self._steps_to_log(step) == 0

    def records(
        self, sampling: Sampling, step: int, rows_per_step: int | None = None, slower: int = 1
    ) -> bool:
        """Whether a probe of ``sampling`` records training step ``step``; ``rows_per_step``:
        the samples its recorded steps brought on this rank (a class-conditional probe records
        every step until it knows them); ``slower``: its stride times this, at most one step
        per window (an overhead budget's, :mod:`collapse_monitor.budget`; not for every-step
        probes)."""
        return self.next_record(sampling, step, rows_per_step, slower) == step

    def next_record(
        self, sampling: Sampling, step: int, rows_per_step: int | None = None, slower: int = 1
    ) -> int:
        """The first training step from ``step`` on that a probe of ``sampling`` records while
        ``rows_per_step`` and ``slower`` stay (see :meth:`records`)."""
        n = self.observe_every_n_steps
        if n is not None:
            return step + -step % n
        if sampling.every_step:
            return step
        L = self.log_every_n_steps
        if sampling.classes is None:
            stride = sample_stride(L)
        elif rows_per_step is None:
            return step  # its first step tells how many samples a step brings
        else:
            rows = rows_per_step * self.world
            stride = class_sample_stride(L, sampling.classes, rows, sampling.samples_per_class)
        # the recorded steps lie an even stride back from each logging step, within its window
        return step + self._steps_to_log(step) % min(stride * slower, L)

    def thin_window(self, sampling: Sampling, samples: float, steps: int) -> str | None:
        """Why a class-conditional probe's window of ``samples`` over ``steps`` recorded steps
        is thin (fewer than two samples per class under the default cadence), else None."""
        if self.observe_every_n_steps is not None or sampling.every_step:
            return None
        if sampling.classes is None or samples >= 2 * sampling.classes:
            return None
        return (
            f"recorded {samples:.0f} samples for {sampling.classes} classes in this window (the "
            f"default cadence recorded {steps} of its {self.log_every_n_steps} steps, at most "
            "half of them); its class statistics are thin: pass observe_every_n_steps=1 or log "
            "less often"
        )
