"""The monitor's side of its mitigations: every step, every log, the events, their state.

Each mitigation sees only its contract: a :class:`~collapse_monitor.contracts.StepView` after
every step and a :class:`~collapse_monitor.contracts.LogView` after every log. What it replaced
of a probe's elements comes back as :class:`~collapse_monitor.contracts.Replaced` (on an
:class:`~collapse_monitor.contracts.Event` at a log, or alone from a step) and is routed to that
probe through ``route``; the events are counted (``collapse/mitigations/<name>``) and logged by
the monitor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Union

import torch

from .. import _dist
from .._modules import NotFound
from .._sharding import whole_parameters
from ..contracts import Event, LogView, Replaced, Setup, StepView
from ..distributed import is_deepspeed_optimizer, refuse_deepspeed, uses_deepspeed
from ..keys import MetricKey, mitigations_key
from .base import Mitigation

log = logging.getLogger(__name__)

#: what ``monitor.step(optimizer=)`` takes: an optimizer, a sequence of them, or None
Optimizers = Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer], None]


def as_optimizers(optimizer: Optimizers) -> tuple[torch.optim.Optimizer, ...]:
    """``optimizer`` as a tuple of optimizers (DeepSpeed's too: mitigations refuse them).

    Raises:
        TypeError: something that is not an optimizer.
    """
    if optimizer is None:
        return ()
    if isinstance(optimizer, torch.optim.Optimizer) or is_deepspeed_optimizer(optimizer):
        return (optimizer,)
    optimizers = tuple(optimizer)
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer) and not is_deepspeed_optimizer(opt):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or a list of them, got {opt!r}"
            )
    return optimizers


class MitigationRunner:
    """The mitigations of one monitor.

    Args:
        mitigations: :class:`Mitigation` instances (names unique).
        route: ``route(replaced)`` hands a :class:`Replaced` to its probe.
    """

    def __init__(self, mitigations: Iterable[Mitigation], route: Callable[[Replaced], None]):
        self.mitigations = list(mitigations)
        self.route = route
        self.counts: dict[str, float] = {}
        self.process_group = None
        # mitigations whose modules live on some ranks only (a pipeline stage): their ranks
        self.owners: dict[str, tuple[int, ...]] = {}
        self.here = self.mitigations  # those whose modules this rank holds

    @staticmethod
    def _attach(m: Mitigation, setup: Setup) -> None:
        """Attach ``m``; refuse it on modules tensor parallelism shards unless it writes them
        exactly (``Mitigation.through_tensor_parallel``)."""
        m.attach(setup)
        layout = setup.tensor_parallel
        if layout is None or m.through_tensor_parallel:
            return
        for path, mine in layout.placed.items():
            inside = [p for p in m.paths if not p or path == p or path.startswith(f"{p}.")]
            if inside and any(x.is_shard() for ps in mine.values() for x in ps):
                raise ValueError(
                    f"{m!r}: '{path}' (in '{inside[0]}') is sharded by tensor parallelism "
                    f"({layout.describe(path)}); {type(m).__name__} does not write "
                    "tensor-parallel shards: leave it out"
                )

    def attach(self, setup: Setup) -> None:
        """Attach every mitigation. Under ``torch.distributed`` a collective: one whose modules
        live on some ranks only (its modules or probe found there: a pipeline stage) acts on
        those ranks, its collectives over a group of them, and its events reach every rank.

        Raises:
            the first error of a mitigation attached on no rank, or any error other than
            :class:`~collapse_monitor._modules.NotFound` (its module or probe not on this
            rank) on some rank; on every rank alike. ValueError: stage-local mitigations
            under a ``process_group`` other than WORLD; mitigations on modules tensor
            parallelism shards that do not write such shards; mitigations that cannot act under
            DeepSpeed (:func:`~collapse_monitor.distributed.refuse_deepspeed`).
        """
        self.process_group = group = setup.process_group
        if self.mitigations and uses_deepspeed(setup.model):  # (its engine's optimizer too)
            refuse_deepspeed(self.mitigations, [getattr(setup.model, "optimizer", None)])
        if not _dist.is_distributed(group):
            for m in self.mitigations:
                self._attach(m, setup)
            return
        failed = []
        for m in self.mitigations:
            try:
                self._attach(m, setup)
                failed.append(None)
            except Exception as exc:  # (raised below, on every rank alike)
                failed.append(exc)
        said = [None if e is None else (type(e).__name__, str(e)) for e in failed]
        paths = [m.paths if e is None else None for m, e in zip(self.mitigations, failed)]
        everyone, where = zip(*_dist.all_gather_object((said, paths), group))
        for i, m in enumerate(self.mitigations):
            owners = tuple(r for r, e in enumerate(everyone) if e[i] is None)
            errors = [r[i] for r in everyone if r[i] is not None]
            found = {r: where[r][i] for r in owners}
            if len(set(found.values())) > 1:  # (a glob over pipeline stages)
                raise ValueError(
                    f"{m!r} acts on different modules on different ranks (pipeline stages?): "
                    f"{found}; give each stage's modules a mitigation of their own"
                )
            if not errors:
                continue
            # absent on some ranks (its module or probe not found there) is a pipeline stage;
            # any other error, or absent everywhere, is raised on every rank
            if not owners or any(e[0] != "NotFound" for e in errors):
                worst = next((e for e in errors if e[0] != "NotFound"), errors[0])
                if failed[i] is not None and (type(failed[i]).__name__, str(failed[i])) == worst:
                    raise failed[i]
                kinds = {"KeyError": KeyError, "ValueError": ValueError, "NotFound": NotFound}
                kind = kinds.get(worst[0])
                raise (kind or RuntimeError)(f"on another rank: {worst[1]}")
            if group not in (None, torch.distributed.group.WORLD):
                raise ValueError(
                    f"{m!r}: mitigations whose modules live on some ranks only (pipeline "
                    "stages) need the monitor on the default process group (process_group=None)"
                )
            self.owners[m.name] = owners
            log.info("collapse monitor: %r acts on ranks %s (its pipeline stage)", m, owners)
        for m in self.mitigations:  # (every rank makes the same groups, in the same order)
            if m.name in self.owners:
                m.process_group = _dist.subgroup(self.owners[m.name])
        self.here = [m for m, e in zip(self.mitigations, failed) if e is None]

    def detach(self) -> None:
        for m in self.here:
            m.detach()

    @property
    def reads_parameters(self) -> bool:
        return any(m.reads_parameters and not m.disabled for m in self.here)

    def after_step(self, view: StepView) -> None:
        """Every enabled mitigation's every-step action; what it replaced goes to its probe.

        Raises:
            ValueError: mitigations that cannot act beside this DeepSpeed optimizer
                (:func:`~collapse_monitor.distributed.refuse_deepspeed`).
        """
        if self.here and any(map(is_deepspeed_optimizer, view.optimizers)):
            refuse_deepspeed(self.here, view.optimizers)
        for m in self.here:
            if not m.disabled:
                for replaced in m.run(m.on_step, view) or []:
                    self.route(replaced)

    def after_log(self, view: LogView, holder: torch.nn.Module) -> list[Event]:
        """Every enabled mitigation acts on this log (the same view on every rank); the events
        it returns are counted and what they replaced is routed to the probes. A stage's
        mitigations' events reach the other ranks (one collective per log)."""
        events, raised = [], None
        # FSDP (first generation): whole parameters, written back after
        with whole_parameters(holder) if self.reads_parameters else nullcontext():
            for m in self.here:
                if not m.disabled:
                    try:
                        events += m.run(m.after_log, view) or []
                    except Exception as exc:  # (strict: raised after the ranks' exchange;
                        raised = raised or exc  # the others still run, as on the other ranks)
        if self.owners:  # every rank reaches it, and a strict error is raised on every rank
            events = self._shared(events, raised)
        if raised is not None:
            raise raised
        for event in events:
            self.counts[event.name] = self.counts.get(event.name, 0.0) + event.count
            if event.replaced is not None:
                self.route(event.replaced)
        return events

    def _shared(self, events: list[Event], raised: Exception | None) -> list[Event]:
        """This rank's events, and the events of each stage's mitigations from the first rank
        of their stage (what they replaced stays with their probe, on their stage).

        Raises:
            RuntimeError: another rank's mitigation raised (``strict``), on this rank too.
        """
        theirs = [(e.name, e.info, e.count) for e in events if e.name in self.owners]
        failure = None if raised is None else f"{type(raised).__name__}: {raised}"
        everyone, failures = zip(*_dist.all_gather_object((theirs, failure), self.process_group))
        failed = next((f for f in failures if f is not None), None)
        if failed is not None and raised is None:
            raise RuntimeError(f"a mitigation failed on another rank: {failed}")
        here = {m.name for m in self.here}
        for name, owners in self.owners.items():
            if name not in here:
                events += [Event(*e) for e in everyone[owners[0]] if e[0] == name]
        return events

    def metrics(self) -> dict[MetricKey, float]:
        """The running totals, ``collapse/mitigations/<name>``."""
        return {mitigations_key(name): total for name, total in self.counts.items()}

    # ----------------------------------------------------------------- resume
    def restore_structure(self, states: dict) -> None:
        for m in self.here:
            m.restore_structure(states[m.name])

    def adopt_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for m in self.here:
            m.adopt_optimizer(optimizer)

    def state_dict(self) -> dict:
        """Each mitigation's state, by name (``{}`` for a stage's on the other ranks)."""
        here = set(map(id, self.here))
        return {m.name: m.state_dict() if id(m) in here else {} for m in self.mitigations}

    def load_state_dict(self, states: dict, counts: dict, optimizers: tuple) -> None:
        self.counts = dict(counts)
        for m in self.here:
            m.load_state_dict(states[m.name], optimizers=optimizers)
