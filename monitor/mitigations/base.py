"""Base class of mitigations."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import ClassVar

import torch

from .._modules import NotFound
from .._sharding import has_master, master_states
from ..contracts import Component, Event, LogView, ProbeInfo, Replaced, Setup, StepView
from ..distributed import deepspeed_optimizer, is_deepspeed_optimizer
from ..hooks import HookSet
from ..keys import check_name

log = logging.getLogger(__name__)


class Mitigation(Component):
    """An action the monitor may take on the model after a step or a log.

    :meth:`attach` is called once with the monitor's :class:`~collapse_monitor.contracts.Setup`
    (the probes described, never the probes themselves); :meth:`after_log` at every log on every
    rank with the same (all-reduced) view of the log, so a mitigation that decides from it
    decides identically everywhere. It returns the :class:`~collapse_monitor.contracts.Event`
    objects of the changes it made and read back; the monitor logs each to Python ``logging``
    and to every sink, and routes what it replaced (:class:`~collapse_monitor.contracts.Replaced`)
    to the probe it names. :meth:`on_step` runs after every training step (keep it cheap: no
    host sync) and may return :class:`~collapse_monitor.contracts.Replaced` records too. A
    mitigation whose :meth:`on_step` and hooks have nothing to do on a step that no probe records
    and no log follows sets :attr:`on_quiet_steps` to False: when all do, the monitor skips such
    steps whole (their hooks off the modules). Mitigations are saved and restored by name.

    Args:
        name: unique among the monitor's mitigations; default :attr:`kind`. No ``/``.
    """

    #: the default name, also the event name (``collapse/mitigations/<name>``)
    kind: ClassVar[str] = "mitigation"
    reads_parameters = True
    #: whether it acts under DeepSpeed: it writes parameters and optimizer states only through
    #: :func:`~collapse_monitor._sharding.edited` (DeepSpeed's master copies) and adds none
    through_deepspeed: ClassVar[bool] = False
    #: whether it writes the modules of its :attr:`paths` exactly when tensor parallelism
    #: shards them (through :func:`~collapse_monitor._sharding.whole` and ``assign``)
    through_tensor_parallel: ClassVar[bool] = False
    #: the group of its collectives: the monitor's, or its pipeline stage's (set at attach)
    process_group = None
    #: whether it has work on a step that no probe records and no log follows (in
    #: :meth:`on_step` or its hooks); if none has, the monitor skips such steps whole. Under
    #: ``torch.distributed`` ranks may differ in which steps are quiet (a class-conditional
    #: probe's stride follows its rank's rows): False only where :meth:`on_step` makes no
    #: collective on a step its probe does not record
    on_quiet_steps: ClassVar[bool] = True

    @property
    def paths(self) -> tuple[str, ...]:
        """The module paths that say what it acts on (after :meth:`attach`; ReDo: its probe's
        layers): under pipeline parallelism the same on every rank that holds them."""
        return ()

    def __init__(self, name: str | None = None) -> None:
        super().__init__(check_name(name or self.kind, "mitigation name"))
        self._hooks = HookSet()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    @property
    def hooks(self) -> HookSet:
        """The hooks it put on the model (taken off on steps nothing records: ``on_quiet_steps``)."""
        return self._hooks

    def attach(self, setup: Setup) -> None:
        self.strict = setup.strict

    def after_log(self, view: LogView) -> list[Event]:
        return []

    def on_step(self, view: StepView) -> list[Replaced] | None:
        """After every training step (every rank, the same step)."""

    def adopt_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """A freshly built optimizer (a resumed run's): give it the parameters this mitigation
        added, in the groups the original run had."""

    def restore_structure(self, state: dict) -> None:
        """Re-apply, from a checkpoint's :meth:`state_dict`, what this mitigation changed in the
        model's structure (before the model's own weights are loaded)."""

    def detach(self) -> None:
        self._hooks.remove()
        self.end_recording()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(
        self, state: dict, optimizers: Sequence[torch.optim.Optimizer] = ()
    ) -> None:
        """Restore :meth:`state_dict`; ``optimizers`` for mitigations that add parameters."""


def find_probe(
    setup: Setup, kind: str, owner: str, name: str | None = None, module: str | None = None
) -> ProbeInfo:
    """The one probe of ``kind`` a mitigation works with: named ``name``, else the one on
    ``module`` (its path or one of its resolved paths), else the only one.

    Raises:
        NotFound: (a ``ValueError``) none matches (on this rank); ValueError: several match
            (the message lists the probes of that kind).
    """
    of_kind = [p for p in setup.probes.values() if p.is_a(kind)]
    if name is not None:
        hits = [p for p in of_kind if p.name == name]
    elif module is not None:
        hits = [p for p in of_kind if module in (p.module, *p.paths)]
    else:
        hits = of_kind
    if len(hits) != 1:
        which = f" named {name!r}" if name else (f" on {module!r}" if module else "")
        raise (NotFound if not hits else ValueError)(
            f"{owner} needs one {kind} probe{which}; the monitor has {kind} probes "
            f"{[p.name for p in of_kind]} (all probes: {sorted(setup.probes)})"
        )
    return hits[0]


def held(optimizers: Sequence[torch.optim.Optimizer], param: torch.Tensor) -> bool:
    """Whether one of ``optimizers`` updates ``param`` (DeepSpeed's: one it keeps a master
    copy of)."""
    if has_master(param) and any(map(is_deepspeed_optimizer, optimizers)):
        return True
    return any(
        p is param
        for opt in optimizers
        if not is_deepspeed_optimizer(opt)
        for g in opt.param_groups
        for p in g["params"]
    )


_SAID_UNHELD: weakref.WeakSet = weakref.WeakSet()  # parameters already said to be in none


def unheld(who, optimizers: Sequence[torch.optim.Optimizer], param: torch.Tensor) -> bool:
    """Whether optimizers were given and ``param`` is in none of them (its moments, if
    another optimizer keeps them, cannot be reset); said once per parameter in the log."""
    if not optimizers or held(optimizers, param):
        return False
    if param not in _SAID_UNHELD:
        _SAID_UNHELD.add(param)
        log.warning(
            "%r: a parameter %s it changed is in none of the %d optimizers given to "
            "monitor.step(); its moments (if another optimizer keeps them) were not reset",
            who,
            tuple(param.shape),
            len(optimizers),
        )
    return True


def optimizer_states(
    optimizers: Sequence[torch.optim.Optimizer], param: torch.Tensor
) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every optimizer state tensor shaped like ``param`` (Adam's
    ``exp_avg``, ``exp_avg_sq``, SGD's ``momentum_buffer``, ...) in each optimizer holding it
    (DeepSpeed's: :class:`~collapse_monitor._sharding.MasterState` s, for
    :func:`~collapse_monitor._sharding.edited`)."""
    deepspeed = [o for o in map(deepspeed_optimizer, optimizers) if o is not None]
    if has_master(param) and deepspeed:
        return master_states(param, deepspeed[0])
    return [
        (key, value)
        for opt in optimizers
        if not is_deepspeed_optimizer(opt)
        for key, value in opt.state.get(param, {}).items()
        if isinstance(value, torch.Tensor) and value.shape == param.shape
    ]
