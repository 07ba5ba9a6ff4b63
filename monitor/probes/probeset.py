"""The probes of one monitor, run together: recording, the end of every step, readouts, state.

:class:`ProbeSet` holds one :class:`~collapse_monitor.probes.driver.ProbeDriver` per probe and
does what concerns them all: which of them record a forward pass (asking the cadence), the end of
each training step (per-step memories, the hot path's collectives), the readouts at a log over
all ranks (after the ranks agree which probes are still enabled, so that every rank reaches the
same collectives), the start of the next window, snapshots, and their state.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from .. import _dist, _tensor_parallel
from .._modules import named_modules, resolve_modules
from .._sharding import whole_parameters
from ..budget import Budget, Meter
from ..cadence import Cadence
from ..contracts import ProbeInfo, Readout, Recording, Replaced, Setup
from ..keys import MetricKey
from .base import Probe
from .driver import ProbeDriver

if TYPE_CHECKING:
    from ..hooks import HookSet
    from ..mitigations.base import Mitigation

log = logging.getLogger(__name__)


class ProbeSet:
    """The probes of one monitor (see the module docstring).

    Args:
        probes: :class:`Probe` instances (names unique).
        process_group: the group the readouts reduce over (None: WORLD).
        overhead_budget: see :mod:`collapse_monitor.budget` (None: none).
        pictures: names of the probes whose pictures are drawn: a stage-local probe's travel to
            every rank with its metrics.
    """

    def __init__(
        self,
        probes: Iterable[Probe],
        process_group=None,
        overhead_budget: float | None = None,
        pictures: Iterable[str] = (),
    ) -> None:
        self.drivers = [ProbeDriver(p) for p in probes]
        self.pictures = set(pictures)  # probes whose pictures the sinks draw (every rank's)
        self.budget = None if overhead_budget is None else Budget(overhead_budget)
        if self.budget is not None:
            for d in self.drivers:
                d.meter = Meter()
        self.by_name = {d.name: d for d in self.drivers}
        self.process_group = process_group
        # every probe, also those whose modules live on other ranks only (pipeline stages):
        # the disabled flags and the shared metrics are agreed over this list
        self.everywhere = list(self.drivers)
        self.stage_local = False  # some probe's module lives on some ranks only
        self._recorded: set[ProbeDriver] = set()  # recorded in this training step
        self._plan: tuple[int, list[ProbeDriver]] | None = None  # (step, the drivers due then)
        # steps no probe records and after which none logs, from the step after the last one
        # that ended (new strides or a load forget them); kept only where no mitigation has
        # work on such steps (quiet)
        self.quiet, self.quiet_steps = True, range(0)
        self._quiet_hooks: list[HookSet] = []  # the mitigations' (out on quiet steps too)
        self._stopped: set[ProbeDriver] = set()  # disabled on every rank (agreed at a log)
        self._unlabelled: set[str] = set()  # probes that said they skip unlabelled evaluations
        self.tp: _tensor_parallel.TensorParallel | None = None  # the model's tensor parallelism

    def attach(self, setup: Setup) -> Mapping[str, ProbeInfo]:
        """Attach every probe; their descriptions, for the mitigations. Under
        ``torch.distributed`` a collective (:meth:`_place`), after which an error of any rank
        is raised on every rank.

        Under tensor parallelism (:mod:`~collapse_monitor._tensor_parallel`) a probe whose
        statistics are replicated over a tensor-parallel group reduces over the data-parallel
        ranks of its coordinate; one that reads its slice (``Probe.tp_sharded``) over all.

        Raises:
            ValueError: a tensor-parallel layout that cannot be read exactly, a glob matching
                different modules on different ranks, probes' other checks; KeyError: a path
                that matches nothing (on no rank).
        """
        distributed = _dist.is_distributed(self.process_group)

        def local() -> list:
            self.tp = _tensor_parallel.find(named_modules(setup.model))
            placed = dataclasses.replace(setup, tensor_parallel=self.tp)
            return [d.attach(placed, elsewhere_ok=distributed) for d in self.drivers]

        here = self.agreed(local) if distributed else local()
        if distributed or self.tp is not None:
            _tensor_parallel.agree(self.tp, self.process_group)
        if distributed:
            self._place(here, setup)
        self.agreed(self._check_label_alignment)
        return MappingProxyType({d.name: _info(d) for d in self.drivers})

    def agreed(self, fn: Callable, *args) -> Any:
        """``fn(*args)`` on every rank, then the first rank's error (if any rank failed) raised
        on every rank alike, so that no rank goes on to a collective the others left (a
        collective under ``torch.distributed``)."""
        try:
            result, error = fn(*args), None
        except Exception as exc:  # (any: re-raised here, after the other ranks heard of it)
            result, error = None, exc
        if not _dist.is_distributed(self.process_group):
            if error is not None:
                raise error
            return result
        errors = _dist.all_gather_object(
            None if error is None else (type(error).__name__, str(error)), self.process_group
        )
        if error is not None:
            raise error
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            kinds = {e.__name__: e for e in (KeyError, TypeError, ValueError)}
            kind = kinds.get(failed[0], RuntimeError)
            raise kind(f"on another rank: {failed[1]}")
        return result

    def _place(self, here: list, setup: Setup) -> None:
        """Agree over the ranks which hold each probe's modules (a collective; ``here``: the
        paths each probe found on this rank, or None). A probe whose modules live on some ranks
        only (a pipeline stage) reduces over a group of those ranks, and its metrics reach the
        other ranks at each log; a rank without them knows its paths (its keys and rules are
        the owners'). The same on every rank: an error for a module on no rank, or for a glob
        that matches different modules on different ranks.

        Raises:
            KeyError: a probe's modules are on no rank; ValueError: a glob matching different
                modules on different ranks, or stage-local probes under a ``process_group``
                other than WORLD (a group of its ranks could not be made).
        """
        group = self.process_group
        world = _dist.world_size(group)
        found = _dist.all_gather_object(here, group)
        owners = []
        for i, d in enumerate(self.drivers):
            paths = {r: found[r][i] for r in range(world) if found[r][i] is not None}
            if not paths:  # on no rank: this rank's message (its closest names)
                resolve_modules(setup.model, d.probe.module, owner=repr(d.probe))
            if len(set(paths.values())) > 1:
                raise ValueError(
                    f"{d.probe!r} matches different modules on different ranks (pipeline "
                    f"stages?): {paths}; give each stage's modules a probe of their own"
                )
            owners.append(tuple(paths))
            d.probe.paths = list(next(iter(paths.values())))  # (a rank without them too)
        if all(len(ranks) == world for ranks in owners):
            return
        if self.tp is not None:
            raise ValueError(
                "probes whose modules live on some ranks only (pipeline stages) under tensor "
                "parallelism are not supported"
            )
        if group not in (None, torch.distributed.group.WORLD):
            raise ValueError(
                "probes whose modules live on some ranks only (pipeline stages) need the monitor "
                "on the default process group (process_group=None)"
            )
        for d, ranks in zip(self.drivers, owners):
            if len(ranks) < world:  # every rank makes the same groups in the same order
                d.group = _dist.subgroup(ranks)
        self.stage_local = True
        self.drivers = [d for d, h in zip(self.drivers, here) if h is not None]
        self.by_name = {d.name: d for d in self.drivers}

    def _check_label_alignment(self) -> None:
        """Probes on one module that read the same labels must pair them alike (one shift)."""
        shifts: dict[tuple[str, str], dict[str, int]] = {}
        for d in self.drivers:
            if d.probe.label_shift is not None:
                for path in d.probe.paths:
                    where = (path, d.probe.target_key)
                    shifts.setdefault(where, {})[d.name] = d.probe.label_shift
        for (path, key), by_probe in shifts.items():
            if len(set(by_probe.values())) > 1:
                raise ValueError(
                    f"probes on '{path}' would align their '{key}' labels differently (target "
                    f"shift per probe: {by_probe}); give them the same target_shift"
                )

    def detach(self) -> None:
        for d in self.drivers:
            d.detach()

    # ----------------------------------------------------------------- recording
    def begin_recording(
        self, cadence: Cadence, step: int, snapshot: bool, inputs: dict, rollout: bool = False
    ) -> list[ProbeDriver]:
        """Hand a :class:`Recording` to the probes that record this forward pass (every probe
        in a snapshot, else as the cadence says; of a generation forward, ``rollout``, only the
        rollout probes, else only the others); those of a training step are remembered until
        :meth:`end_step`."""
        logging = not snapshot and cadence.logs_after(step)  # (the same for every probe)
        due = self.drivers if snapshot else self.due(cadence, step)
        recorders = [d for d in due if d.probe.rollout == rollout]
        self.resume(recorders)  # (where end_step did not: a step counter set by hand)
        for d in list(recorders):
            mine = {k: v for k, v in inputs.items() if k in d.probe.keywords and v is not None}
            missing = [k for k, required in d.probe.keywords.items() if required and k not in mine]
            if snapshot and missing:  # an evaluation without labels (predict()): not a sample
                recorders.remove(d)
                if d.name not in self._unlabelled:
                    self._unlabelled.add(d.name)
                    log.warning(
                        "collapse monitor: %r skips evaluation forwards without %s",
                        d.probe,
                        " and ".join(missing),
                    )
                continue
            d.begin_recording(Recording(step, logging, snapshot, mine))
        if not snapshot:  # snapshots do not advance per-step state such as usage EMAs
            self._recorded.update(recorders)
        return recorders

    def step_values(self) -> dict[str, dict]:
        """What the probes that recorded this step publish of it (``Probe.step_values``)."""
        return {d.name: d.step_values() for d in self._recorded if not d.disabled}

    def quiet_with(self, mitigations: Iterable[Mitigation]) -> None:
        """Quiet steps are skipped whole unless one of ``mitigations`` has work on them (then
        never); else their hooks, like the probes', leave their modules on such steps."""
        mitigations = list(mitigations)
        self.quiet = not any(m.on_quiet_steps for m in mitigations)
        self._quiet_hooks = [m.hooks for m in mitigations] if self.quiet else []

    def due(self, cadence: Cadence, step: int) -> list[ProbeDriver]:
        """The drivers whose cadence records training step ``step`` (kept for the step: what
        it depends on changes at the end of a step, where the next step's is made, and at a
        log or a load, which drop it)."""
        if self._plan is None or self._plan[0] != step:
            self._plan = (
                step,
                [
                    d
                    for d in self.drivers
                    if d not in self._stopped  # (disabled on every rank: nothing to record)
                    and cadence.records(d.probe.sampling, step, d.rows_per_step, d.slower)
                ],
            )
        return self._plan[1]

    def end_step(self, cadence: Cadence, step: int) -> None:
        """After training step ``step``: per-step memories of the probes that recorded it (or
        would have, and saw nothing on this rank), then their collectives of the step, on
        every rank until the ranks agree at a log that a probe stopped. The hooks of probes
        that will not record the next step leave their modules until they do."""
        if self.budget is not None:
            self.budget.tick()
        due = {*self.due(cadence, step), *self._recorded}
        for d in self.drivers:  # (in the same order on every rank)
            if d not in due:
                continue
            token = None if d.meter is None else d.meter.start()  # (the step's work: its cost)
            if d in self._recorded and not d.disabled:
                d.run(d.finish_step)
            elif not d.disabled:  # e.g. this rank had no batch this step
                d.run(d.missed_step)
            if d not in self._stopped:
                d.run(d.exchange, self._group(d))
            if token is not None:
                d.meter.stop(token)
        self._recorded.clear()
        self._plan = None  # (finish_step and exchange may have learnt a step's rows)
        later = self.due(cadence, step + 1)
        self.quiet_steps = range(0)
        if not later and self.quiet:
            until = min(
                [
                    cadence.next_log(step + 1),
                    *(
                        cadence.next_record(d.probe.sampling, step + 1, d.rows_per_step, d.slower)
                        for d in self.drivers
                        if d not in self._stopped  # (every probe may have stopped)
                    ),
                ]
            )
            # (its last step ends in full, which brings the hooks of the step after back)
            self.quiet_steps = range(step + 1, until - 1)
        self._leave(step + 1, later)
        # the next step's hooks come back now, before its forward: a trainer that enters
        # observe() from a pre-hook of the model itself (transformers' callback) is already
        # inside that forward, whose pre-hooks were read before theirs returned
        self.resume(later, mitigations=not self.quiet_steps)

    def _leave(self, step: int, due: list[ProbeDriver]) -> None:
        """The hooks of the drivers that do not record ``step`` leave their modules, and the
        mitigations' when ``step`` is quiet."""
        for d in self.drivers:
            if d not in due:
                d.hooks.suspend()
        for hooks in self._quiet_hooks if step in self.quiet_steps else ():
            hooks.suspend()

    def resume(
        self, drivers: Iterable[ProbeDriver] | None = None, mitigations: bool = True
    ) -> None:
        """Put the hooks of ``drivers`` (None: every driver's), and the mitigations', back on
        their modules: before a step they record, a snapshot, or after the strides changed."""
        sets = [d.hooks for d in (self.drivers if drivers is None else drivers)]
        for hooks in [*sets, *(self._quiet_hooks if mitigations else ())]:
            if hooks.suspended:
                hooks.resume()

    def route(self, replaced: Replaced) -> None:
        """A mitigation replaced elements of a probe: it forgets them."""
        d = self.by_name.get(replaced.probe)
        if d is not None and not d.disabled:
            d.run(d.replaced, replaced.scope, replaced.mask)

    # ----------------------------------------------------------------- logs
    def agree_on_disabled(self, model: torch.nn.Module, others: Iterable = ()) -> None:
        """Check that the probes' modules are still those of ``model`` and that no tensor
        parallelism came since (a failed check disables the part), then disable on every rank
        what failed on any rank (before any collective); ``others``: further parts with a
        ``disabled`` flag and a ``fail`` (the mitigations)."""
        owners = [*self.everywhere, *others]
        named = named_modules(model)
        for d in self.drivers:
            if not d.disabled:
                d.run(d.check_modules, named)
        try:  # (agreed below: a part disabled on one rank is disabled on all)
            self._same_tensor_parallel(named)
        except ValueError as exc:
            for c in owners:
                if not c.disabled:
                    c.fail(exc)
        group = self.process_group
        if _dist.is_distributed(group) and owners:
            flags = torch.tensor(
                [float(c.disabled) for c in owners], device=_dist.collective_device(group)
            )
            _dist.all_reduce_max_(flags, group)
            for c, flag in zip(owners, flags.tolist()):
                c.disabled = c.disabled or bool(flag)
        self._stopped = {d for d in self.drivers if d.disabled}  # (one process: every rank)
        for d in self._stopped:
            d.stopped = True

    def _same_tensor_parallel(self, named: dict) -> None:
        """Raise when the model's tensor parallelism is not the one the probes were built on
        (``parallelize_module`` after the monitor was built)."""
        now = _tensor_parallel.find(named)
        if (now is None) != (self.tp is None) or (now is not None and now.placed != self.tp.placed):
            where = "none" if now is None else now.summary()
            raise ValueError(
                "CollapseMonitor: the model's tensor parallelism changed after the monitor was "
                f"built (now: {where}); the probes read it as it was: build the monitor on the "
                "parallelised model"
            )

    def readouts(self, holder: torch.nn.Module) -> dict[str, Readout]:
        """Each enabled probe's readout of its window over all ranks (a collective: call it on
        every rank, after :meth:`agree_on_disabled`); the windows are kept."""
        if self.budget is not None:
            self.budget.log_began()
        readouts = {}
        # FSDP (first generation): gathered only for a readout that reads weights (NC's
        # classifier); every rank of a probe's group takes the same decision (disabled flags
        # were agreed)
        gather = any(d.probe.reads_parameters and not d.disabled for d in self.drivers)
        with whole_parameters(holder, writeback=False) if gather else nullcontext():
            for d in self.drivers:
                if not d.disabled:
                    r = d.run(d.compute, self._group(d))
                    if r is not None:
                        readouts[d.name] = r
        if self.tp is not None:
            self._check_replicated(readouts)
        return self._shared(readouts) if self.stage_local else readouts

    def _check_replicated(self, readouts: dict[str, Readout]) -> None:
        """Under tensor parallelism: a probe whose statistics should be replicated over a
        tensor-parallel group but differ between its ranks read a slice it could not place
        (hidden features between a column- and a row-parallel layer, ...): it is disabled on
        every rank, its readout dropped (a collective)."""
        checked = [d for d in self.drivers if not d.probe.tp_sharded]
        prints = [d.fingerprint() if d.name in readouts else None for d in checked]
        differ = _tensor_parallel.differing(self.tp, prints, self.process_group)
        for d, bad in zip(checked, differ):
            if bad and not d.disabled:
                readouts.pop(d.name, None)
                d.stopped = True  # (the same on every rank: no gathers for it from now)
                d.fail(
                    ValueError(
                        f"{d.probe!r} read different values on the ranks of a tensor-parallel "
                        f"group at {d.probe.paths}: a slice of the heads, hidden features, "
                        "vocabulary or sequence it cannot place (tensor-parallel modules: "
                        f"{self.tp.summary()}). Watch a replicated activation (the residual "
                        "stream), a DTensor one (a SequenceParallel module's output) or a "
                        "ColwiseParallel module's own output"
                    )
                )

    def _shared(self, readouts: dict[str, Readout]) -> dict[str, Readout]:
        """Add the metrics, histograms and (of the probes whose pictures are drawn) pictures'
        data of the probes whose modules live on other ranks (a collective), sent by the first
        of their ranks; in the order of the probes. Pictures travel as their numbers (64 x 64
        class-mean cosines, one value per code, unit, eigenvalue or layer and head), to be
        rendered where a sink receives them."""
        mine = {
            n: (
                {k: float(v) for k, v in r.metrics.items()},
                {k: v.detach().cpu() for k, v in r.histograms.items()},
                {
                    k: dataclasses.replace(p, values=p.values.detach().cpu())
                    for k, p in (r.pictures.items() if n in self.pictures else ())
                },
            )
            for n, r in readouts.items()
            if (d := self.by_name[n]).group is not None and _dist.rank(d.group) == 0
        }
        received: dict[str, Readout] = {}
        for part in _dist.all_gather_object(mine, self.process_group):
            for name, (metrics, histograms, pictures) in part.items():
                received.setdefault(
                    name, Readout(metrics, histograms=histograms, pictures=pictures)
                )
        received.update(readouts)  # (this rank's own: with their masks and pictures)
        return {d.name: received[d.name] for d in self.everywhere if d.name in received}

    @property
    def replicas(self) -> int:
        """The ranks that see different data: the world, over the tensor-parallel group size."""
        return _dist.world_size(self.process_group) // (1 if self.tp is None else self.tp.size)

    def _group(self, d: ProbeDriver):
        """The group ``d`` reduces over: the ranks that hold its module; under tensor
        parallelism, for statistics replicated over a tensor-parallel group, the ranks of this
        rank's tensor-parallel coordinate."""
        if d.group is not None:
            return d.group
        if self.tp is not None and not d.probe.tp_sharded:
            return self.tp.data_group
        return self.process_group

    def finish_windows(self) -> dict[MetricKey, float]:
        """After a log: the next windows; with an overhead budget, the cost the monitor measured
        (its metrics) and the strides of the next window (a collective)."""
        if self.budget is not None:  # (while the windows still count their steps)
            self.budget.settle(self.drivers, self.everywhere, self.process_group, self.replicas)
            self._plan, self.quiet_steps = None, range(0)  # (new strides)
            self.resume()
        for d in self.drivers:
            if not d.disabled:
                d.run(d.finish_window, self._group(d))
        return {} if self.budget is None else self.budget.metrics()

    def log_done(self) -> None:
        """The log has reached the outlets: its time (an overhead budget's) ends here."""
        if self.budget is not None:
            self.budget.log_ended()

    def begin_snapshot(self) -> None:
        self.resume()  # (before its first forward: every probe records a snapshot)
        if self.budget is not None:
            self.budget.pause()
        # ordinary tensors, not inference tensors (Lightning's validate() opens it inside
        # inference_mode), which the recording, run outside inference mode, updates in place
        with torch.inference_mode(False):
            for d in self.drivers:
                d.begin_snapshot()

    def end_snapshot(self) -> None:
        for d in self.drivers:
            d.end_snapshot()
        if self.budget is not None:
            self.budget.resume()
        if self._plan is not None:  # (begin_snapshot put every hook back: as end_step left them)
            self._leave(*self._plan)

    # ----------------------------------------------------------------- state
    @property
    def rank_local(self) -> bool:
        return self.stage_local or any(d.probe.rank_local for d in self.drivers)

    @property
    def errors(self) -> int:
        return sum(d.errors for d in self.drivers)

    def state_dict(self, sync: bool) -> dict:
        if self._recorded:  # (a checkpoint taken after the optimizer step, before step())
            log.warning(
                "collapse monitor: state_dict() between a recorded training step and "
                "monitor.step(): the step is saved unfinished (its samples in the window, the "
                "step count one behind), so a run resumed from it logs one step late; save "
                "after monitor.step()"
            )
        return {d.name: d.state_dict(self._group(d), sync=sync) for d in self.drivers}

    def stage(self, states: dict, reduced: bool) -> Callable[..., None]:
        """Every probe's state checked and loaded into fresh windows; nothing of the probes
        changes until the returned function applies them all. A ``reduced`` state holds every
        rank's samples: only the first rank of each probe's group keeps its window (the others
        keep its shifts and lagged centres and start empty), so that each sample counts once.

        Raises:
            ValueError, KeyError: as :meth:`ProbeDriver.stage`, naming the probe.
        """
        staged = [
            (d, d.stage(states[d.name], not reduced or _dist.rank(self._group(d)) == 0))
            for d in self.drivers
        ]

        def apply(then: Callable[[], None] = lambda: None) -> None:
            """Apply them all, then ``then()`` (the mitigations' state), or none: a part that
            fails restores what was applied before it."""
            before = [(d, d.loaded_state()) for d, _ in staged]
            plan, quiet = self._plan, self.quiet_steps
            self._plan, self.quiet_steps = None, range(0)
            self.resume()
            try:
                for d, window in staged:
                    d.apply(states[d.name], window, _dist.rank(self._group(d)), reduced)
                then()
            except Exception:
                for d, kept in before:
                    d.restore(kept)
                self._plan, self.quiet_steps = plan, quiet
                raise

        return apply


def metrics_of(
    readouts: Mapping[str, Readout], prefix: str | None = None, loader: int | None = None
) -> dict[MetricKey, float]:
    """The defined metrics of ``readouts`` (NaN: undefined, not logged), under ``prefix`` and
    ``loader`` for an evaluation snapshot."""
    return {
        key.with_prefix(prefix, loader): float(value)
        for r in readouts.values()
        for key, value in r.metrics.items()
        if value == value
    }


def _info(d: ProbeDriver) -> ProbeInfo:
    probe = d.probe
    kinds = tuple(
        c.__name__ for c in type(probe).__mro__ if issubclass(c, Probe) and c is not Probe
    )
    return ProbeInfo(
        probe.name,
        kinds,
        probe.module,
        tuple(probe.paths),
        d.scopes != [None],
        MappingProxyType(probe.describe()),
    )
