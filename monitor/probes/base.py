"""The probe template: a probe is its maths; reading, placement, sync and state are written here.

A subclass declares what it reads (:attr:`Probe.reads`), the ``observe()`` keywords it uses
(:attr:`Probe.keywords`), whether it is cheap enough to record every step
(:attr:`Probe.every_step`) and its default rules (:attr:`Probe.rules`), and implements three
functions of its statistics:

- :meth:`Probe.new_window`: the :class:`~collapse_monitor.stats.Window` of statistics it keeps;
- :meth:`Probe.update`: add one forward call's value to the window;
- :meth:`Probe.readout`: metrics, histograms, pictures and masks of a reduced window (pure).

The base class resolves module paths, hooks the modules, reads and validates each call's value,
moves the window to the value's device, reduces it across ranks before the readout, saves and
loads it, isolates failures, and swaps windows for validation snapshots. See ``docs/writing_a_probe.md``.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._modules import resolve_modules
from ..contracts import Component, Readout, Setup
from ..hooks import HookSet
from ..keys import MetricKey, check_name
from ..reading import Reading
from ..rules import Rule, RuleSpec
from ..stats import Window


@dataclass(frozen=True)
class Call:
    """One forward call a probe records: the module's path and the module, its inputs, output."""

    path: str
    module: nn.Module
    args: tuple = ()
    kwargs: dict | None = None
    output: Any = None


class Probe(Component):
    """Base class of all probes (see the module docstring for the template).

    Args:
        module: a ``model.named_modules()`` name or a glob (``""`` is the model itself).
        name: metric prefix, ``collapse/<name>/<metric>``; defaults to ``module``. No ``/``.
        extract: ``extract(module, args, output) -> value`` for models whose outputs do not
            follow the probe's default convention (:attr:`reads`).
        read: where :attr:`reads` looks: the module's ``"output"`` or its ``"input"`` (the first
            positional argument).

    Raises:
        TypeError: ``module`` is not a string or ``extract`` is not callable.
        ValueError: ``read`` is neither ``"input"`` nor ``"output"``.
        ValueError: ``name`` is empty, holds ``/`` or is reserved (``alerts``, ...).
    """

    #: what each forward call of the module gives the probe (None: the probe hooks differently)
    reads: ClassVar[Reading | None] = None
    #: the ``observe()`` keywords the probe reads, each ``True`` when required
    keywords: ClassVar[dict[str, bool]] = {}
    #: cheap probes (O(B*D) per update) record every step under the default cadence; the others
    #: record a sample of the steps (see ``CollapseMonitor(observe_every_n_steps=)``)
    every_step: ClassVar[bool] = False
    #: default rules, relative to the probe (see :class:`~collapse_monitor.rules.RuleSpec`)
    rules: ClassVar[tuple[RuleSpec, ...]] = ()
    #: classes of a class-conditional probe: the default cadence warns when a window holds
    #: fewer than two samples per class
    classes: int | None = None

    def __init__(
        self, module: str, name: str | None = None, extract=None, read: str = "output"
    ) -> None:
        if not isinstance(module, str):
            raise TypeError(f"{type(self).__name__}: module must be a path string, got {module!r}")
        if extract is not None and not callable(extract):
            raise TypeError(
                f"{type(self).__name__}: extract must be callable, got {type(extract).__name__}"
            )
        if read not in ("input", "output"):
            raise ValueError(f"read must be 'input' or 'output', got {read!r}")
        super().__init__(check_name(name or module or "model"))  # "" is the root module itself
        self.module = module
        self.extract = extract
        self.read = read  # where ``reads`` looks: the module's "input" or its "output"
        self.paths: list[str] = []  # the module paths resolved at attach
        self.device = torch.device("cpu")
        self.window: Window | None = None
        self.last: Readout | None = None  # the last compute(), identical on every rank
        self.observed_steps = 0  # training steps in which this probe recorded
        self._modules: list[tuple[str, weakref.ref]] = []
        self._hooks = HookSet()
        self._reduced: Window | None = None
        self._saved_window: Window | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(module={self.module!r}, name={self.name!r})"

    # ----------------------------------------------------------------- subclass API
    def new_window(self) -> Window:
        """Fresh statistics for one window."""
        return Window()

    def update(self, window: Window, value: Any, call: Call) -> None:
        """Add one forward call's ``value`` (already read and checked) to ``window``."""

    def readout(self, window: Window) -> Readout:
        """Metrics (keys from :meth:`key`) of a reduced window; must not change it."""
        return Readout()

    def end_step(self) -> None:
        """After a training step in which this probe recorded (advance per-step memories)."""
        self.observed_steps += 1

    def end_window(self, reduced: Window) -> None:
        """After a log: start the next window (``reduced``: this window over all ranks)."""
        self.window.reset()

    def on_attach(self, setup: Setup, found: list[tuple[str, nn.Module]]) -> None:
        """Validate the resolved modules and read configuration from them (before hooking)."""

    def attach_hooks(self, found: list[tuple[str, nn.Module]]) -> None:
        """Hook the modules; by default a forward hook reading :attr:`reads` on each."""
        for path, mod in found:
            self._hooks.forward(mod, functools.partial(self._on_forward, path))

    def extra_state(self) -> dict:
        """Probe state that is not a statistic (identical on every rank), for checkpoints."""
        return {"observed_steps": self.observed_steps}

    def load_extra_state(self, state: dict) -> None:
        self.observed_steps = int(state["observed_steps"])

    def on_replaced(self, mask: torch.Tensor) -> None:
        """A mitigation replaced the elements in ``mask`` (codes): forget what was known of them."""

    # ----------------------------------------------------------------- helpers for subclasses
    def key(self, metric: str, layer: str | None = None, index: str | None = None) -> MetricKey:
        return MetricKey(self.name, metric, layer, index)

    def error(self, path: str, what: str) -> ValueError:
        """A ValueError naming the probe and the module."""
        return ValueError(f"{type(self).__name__} '{self.name}' at module '{path}': {what}")

    def keyword(self, name: str, path: str) -> Any:
        """The ``observe(<name>=...)`` value of this forward pass (None when optional and absent)."""
        value = self._recording.inputs.get(name)
        if value is None and self.keywords[name]:
            raise self.error(path, f"needs {name}: call monitor.observe({name}=...)")
        return value

    def default_rules(self) -> list[Rule]:
        return [spec.bind(self.name) for spec in self.rules]

    # ----------------------------------------------------------------- wiring (the monitor's)
    def attach(self, setup: Setup) -> None:
        self.strict = setup.strict
        found = resolve_modules(setup.model, self.module, owner=repr(self))
        self._modules = [(path, weakref.ref(mod)) for path, mod in found]
        self.paths = [path for path, _ in found]
        self.device = _device_of(mod for _, mod in found)
        self.on_attach(setup, found)
        self.window = self.new_window().to(self.device)
        self.attach_hooks(found)

    def detach(self) -> None:
        self._hooks.remove()
        self.end_recording()

    def check_modules(self, named: dict[str, nn.Module]) -> None:
        """Raise if a module this probe hooks is no longer the one at its path.

        Args:
            named: ``dict(model.named_modules())`` of the model now.
        """
        for path, ref in self._modules:
            if named.get(path) is not ref():
                raise ValueError(
                    f"{type(self).__name__} '{self.name}': module '{path}' is no longer part of the "
                    "model (it was replaced or removed after the monitor was built); its hooks see "
                    "nothing. Build the monitor again on the changed model"
                )

    def _on_forward(self, path, module, args, kwargs, output) -> None:
        if self._active:
            self.guarded(self._record, Call(path, module, args, kwargs, output))

    def _record(self, call: Call) -> None:
        value = self.reads.read(
            self, call.path, self.read, call.module, call.args, call.kwargs, call.output
        )
        self.record(value, call, _device_of_value(value))

    def record(self, value: Any, call: Call, device: torch.device | None) -> None:
        """Place the window on ``device`` (where the value lives) and :meth:`update` it."""
        if device is not None:
            self.window.to(device)
        self.update(self.window, value, call)

    def compute(self, group=None) -> Readout:
        """The readout of this window over all ranks (a collective under DDP); keeps the window."""
        self._reduced = self.window.reduced(group)
        self.last = self.readout(self._reduced)
        return self.last

    def finish_window(self, group=None) -> None:
        """Start the next window after a log."""
        reduced = self._reduced if self._reduced is not None else self.window.reduced(group)
        self._reduced = None
        self.end_window(reduced)

    def begin_snapshot(self) -> None:
        """Record into a fresh window (sharing persistent memories) until :meth:`end_snapshot`."""
        self._saved_window = self.window
        self.window = self.new_window().to(self.device).share_persistent(self.window)

    def end_snapshot(self) -> None:
        self.window, self._saved_window = self._saved_window, None
        self._reduced = None

    def state_dict(self, group=None, sync: bool = True) -> dict:
        """Window statistics (all-reduced over ``group`` when ``sync``) and extra state."""
        window = self.window.reduced(group) if sync else self.window
        return {"window": window.state_dict(), "extra": self.extra_state()}

    def load_state_dict(self, state: dict, keep_window: bool = True) -> None:
        self.window.load_state_dict(state["window"], keep=keep_window)
        self.load_extra_state(state["extra"])


def _device_of(modules) -> torch.device:
    """Where a module's statistics should live: its first parameter's (or buffer's) device."""
    for mod in modules:
        for t in (*mod.parameters(), *mod.buffers()):
            return t.device
    return torch.device("cpu")


def _device_of_value(value: Any) -> torch.device | None:
    if isinstance(value, torch.Tensor):
        return value.device
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0].device
    return None
