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
import inspect
import logging
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
from ..stats import Counter, Window, WindowView, to_device

log = logging.getLogger(__name__)


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
        pool: when ``module`` matches several modules (a glob), ``False`` (default) keeps
            statistics per module and reports each under its path,
            ``collapse/<name>/<module path>/<metric>``; ``True`` pools them into one set of
            statistics reported as ``collapse/<name>/<metric>``. Probes that report per layer
            by nature (attention, token uniformity, dormant units) always do.

    Raises:
        TypeError: ``module`` is not a string or ``extract`` is not callable.
        ValueError: ``read`` is neither ``"input"`` nor ``"output"``; ``name`` holds ``/`` or
            is reserved (``alerts``, ``mitigations``, ``errors``).

    Every probe also reports ``calls``: the forward calls it recorded in the window, summed over
    ranks (each rank makes its own calls). When it recorded steps but no call at all, the monitor says so once, with the likely
    causes (a model compiled before the monitor was attached, a path the forward never calls, a
    skipped module).
    """

    #: what each forward call of the module gives the probe (None: the probe hooks differently)
    reads: ClassVar[Reading | None] = None
    #: the ``observe()`` keywords the probe reads, each ``True`` when required
    keywords: ClassVar[dict[str, bool]] = {}
    #: cheap probes (O(B*D) per update) record every step under the default cadence; the others
    #: record a sample of the steps (see ``CollapseMonitor(observe_every_n_steps=)``)
    every_step: ClassVar[bool] = False
    #: probes whose metrics are per layer by nature (keyed by layer in their own readout)
    per_layer: ClassVar[bool] = False
    #: probes that read token padding (:meth:`token_mask`): ``observe(mask=)``, or the model's
    #: own ``attention_mask`` input
    uses_token_mask: ClassVar[bool] = False
    #: default rules, relative to the probe (see :class:`~collapse_monitor.rules.RuleSpec`)
    rules: ClassVar[tuple[RuleSpec, ...]] = ()
    #: True when this rank's window holds statistics no other rank has (class shards), so
    #: that every rank must save its own checkpoint
    sharded: bool = False
    #: classes of a class-conditional probe: the default cadence records enough steps for
    #: about 4 samples per class (from :attr:`rows_per_step`), and warns when a window still
    #: holds fewer than two samples per class
    classes: int | None = None

    def __init__(
        self,
        module: str,
        name: str | None = None,
        extract=None,
        read: str = "output",
        pool: bool = False,
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
        self.pool = bool(pool)
        self.paths: list[str] = []  # the module paths resolved at attach
        self.scopes: list[str | None] = [None]  # one window part per module of a glob
        self.device = torch.device("cpu")
        self.window: Window | None = None
        self.last: Readout | None = None  # the last compute(), identical on every rank
        # the group of the running compute(): a readout may split its work over the ranks, with
        # collectives that every rank reaches (its reduced window is the same on every rank)
        self.readout_group = None
        self.observed_steps = 0  # training steps in which this probe recorded
        # samples (rows) its calls brought in the last recorded training step: host-known
        # shapes, so the cadence learns it without a device sync
        self.rows_per_step: int | None = None
        self._step_rows = 0
        self.window_steps = 0  # ... in the current window
        self._modules: list[tuple[str, weakref.ref]] = []
        self._hooks = HookSet()
        self._reduced: Window | None = None
        self._saved_window: Window | None = None
        self._model_inputs: dict = {}  # the model's attention_mask (and cache) of this forward
        self._model_signature: inspect.Signature | None = None
        self._mask_warned: set[str] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(module={self.module!r}, name={self.name!r})"

    # ----------------------------------------------------------------- subclass API
    def new_window(self) -> Window:
        """Fresh statistics for one window (of one module, when a glob keeps them per module)."""
        return Window()

    def update(self, window: WindowView, value: Any, call: Call) -> None:
        """Add one forward call's ``value`` (already read and checked) to ``window``."""

    def readout(self, window: WindowView) -> Readout:
        """Metrics (keys from :meth:`key`) of a reduced window; must not change it. Tensors in
        the readout must not be views of the window's states (the window is reset in place)."""
        return Readout()

    def end_step(self, window: WindowView) -> None:
        """After a training step in which this probe recorded (advance per-step memories)."""

    def end_missed_step(self, window: WindowView) -> None:
        """After a training step this probe would have recorded in but saw no forward of on
        this rank (other ranks may have): what stands for "this step" must hold nothing."""

    def end_window(self, window: WindowView, reduced: WindowView) -> None:
        """After a log: start the next window (``reduced``: this window over all ranks)."""
        window.reset()

    def on_attach(self, setup: Setup, found: list[tuple[str, nn.Module]]) -> None:
        """Validate the resolved modules and read configuration from them (before hooking)."""

    def attach_hooks(self, found: list[tuple[str, nn.Module]]) -> None:
        """Hook the modules; by default a forward hook reading :attr:`reads` on each."""
        for path, mod in found:
            self._hooks.forward(mod, functools.partial(self._on_forward, path))

    def extra_state(self) -> dict:
        """Probe state that is not a statistic (identical on every rank), for checkpoints."""
        return {
            "observed_steps": self.observed_steps,
            "window_steps": self.window_steps,
            "rows_per_step": self.rows_per_step,  # a resumed cadence records the same steps
        }

    def load_extra_state(self, state: dict) -> None:
        self.observed_steps = int(state["observed_steps"])
        self.window_steps = int(state["window_steps"])
        self.rows_per_step = state.get("rows_per_step")

    def on_replaced(self, window: WindowView, mask: torch.Tensor) -> None:
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

    def aligned_targets(
        self, values: torch.Tensor, call: Call, keyword: str = "targets", shift: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows of ``values (..., D)`` and the ``observe(<keyword>=)`` labels that belong to them.

        ``shift = s > 0`` pairs ``values[..., :-s, :]`` with ``labels[..., s:]`` (the hidden state
        or logits at position t with the next token's label: pass unshifted ``labels``, as
        ``transformers`` models take them). Every probe that reads labels aligns them here.

        Returns:
            ``(values (N, D), labels (N,) int64)`` on the values' device; labels None when the
            keyword is optional and absent.

        Raises:
            ValueError: labels that are not integers, or whose shape does not match.
        """
        labels = self.keyword(keyword, call.path)
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise self.error(
                    call.path,
                    f"{keyword} must be integer class indices, got dtype {labels.dtype}",
                )
        if shift:
            if values.ndim < 3:
                raise self.error(
                    call.path, f"a target shift needs (B, T, D) values, got {tuple(values.shape)}"
                )
            values = values[..., :-shift, :]
            labels = None if labels is None else labels[..., shift:]
        rows = values.detach().reshape(-1, values.shape[-1])
        if labels is None:
            return rows, None
        if tuple(labels.shape) != tuple(values.shape[:-1]):
            raise self.error(
                call.path,
                f"{keyword} of shape {tuple(labels.shape)} do not match values of shape "
                f"{tuple(values.shape)} (expected {tuple(values.shape[:-1])})",
            )
        return rows, to_device(labels.reshape(-1), rows.device).to(torch.int64)

    def token_mask(
        self, path: str, batch: int, length: int, device: torch.device
    ) -> torch.Tensor | None:
        """``(batch, length)`` bool, true for real tokens of the sequences a layer sees.

        From ``observe(mask=...)`` ``(B, S)`` (true or 1 for real tokens), else from the model's
        own ``attention_mask`` input (``transformers`` convention; by keyword or by position),
        right-aligned: a layer that sees ``length <= S`` positions sees the last ones (decoding
        with a key-value cache). The model's mask is used only where it covers the layer: its
        length is the layer's, or the call used a cache; elsewhere (an encoder-decoder's decoder)
        the monitor says once that ``observe(mask=)`` is needed, and every token counts.

        Raises:
            ValueError: an ``observe(mask=)`` whose shape does not fit the layer's sequences.
        """
        mask, given = self._padding_source(path)
        if mask is None:
            return None
        fits = mask.shape[0] == batch and mask.shape[1] >= length
        if given and (mask.ndim != 2 or not fits):
            raise self.error(
                path,
                f"observe(mask=) of shape {tuple(mask.shape)} for {batch} sequences of "
                f"{length} tokens: expected ({batch}, >= {length}), true for real tokens",
            )
        cached = self._model_inputs.get("cached", False)
        if not given and not (fits and (mask.shape[1] == length or cached)):
            self._warn_mask(path, mask, f"{batch} sequences of {length} tokens")
            return None
        return to_device(mask[:, mask.shape[1] - length :], device).bool()

    def token_rows(self, path: str, entries: int, device: torch.device) -> torch.Tensor | None:
        """``(entries,)`` bool for values laid out token by token, ``(B, S, ...)`` or a router's
        ``(B*S, k)`` choices: true where the token is real (the padding of :meth:`token_mask`,
        every entry of a token sharing its flag). None without padding, and for a decoding step
        with a key-value cache (its new tokens are real).

        Raises:
            ValueError: an ``observe(mask=)`` ``(B, S)`` that does not divide the values into
                ``B*S`` tokens.
        """
        mask, given = self._padding_source(path)
        if mask is None:
            return None
        if entries % mask.numel() == 0:
            rows = to_device(mask.reshape(-1), device).bool()
            return rows.repeat_interleave(entries // mask.numel())
        if given:
            raise self.error(
                path,
                f"observe(mask=) of shape {tuple(mask.shape)} does not divide the {entries} "
                "values of this module into its tokens",
            )
        if not self._model_inputs.get("cached", False):
            self._warn_mask(path, mask, f"{entries} values")
        return None

    def _padding_source(self, path: str) -> tuple[torch.Tensor | None, bool]:
        """The padding mask ``(B, S)`` and whether the user gave it (``observe(mask=)``)."""
        mask = self.keyword("mask", path) if "mask" in self.keywords else None
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.ndim != 2:
                raise self.error(
                    path, f"observe(mask=) must be (batch, tokens), got {tuple(mask.shape)}"
                )
            return mask, True
        return self._model_inputs.get("attention_mask"), False

    def _warn_mask(self, path: str, mask: torch.Tensor, what: str) -> None:
        if path not in self._mask_warned:
            self._mask_warned.add(path)
            log.warning(
                "collapse monitor: %r: the model's attention_mask %s does not cover module "
                "'%s' (%s); its padding is not known there: pass observe(mask=...)",
                self,
                tuple(mask.shape),
                path,
                what,
            )

    def _capture_model_inputs(self, module, args, kwargs) -> None:
        if self._active:
            self.guarded(self._keep_model_inputs, args, kwargs)

    def _keep_model_inputs(self, args: tuple, kwargs: dict) -> None:
        bound = dict(kwargs)
        if args and self._model_signature is not None:  # model(ids, mask): by position too
            try:
                bound = dict(self._model_signature.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                pass
        mask = bound.get("attention_mask")
        cached = bound.get("past_key_values") is not None
        self._model_inputs = (
            {"attention_mask": mask.detach(), "cached": cached}
            if isinstance(mask, torch.Tensor) and mask.ndim == 2
            else {}
        )

    def default_rules(self) -> list[Rule]:
        return [spec.bind(self.name, per_module=self.scopes != [None]) for spec in self.rules]

    # ----------------------------------------------------------------- wiring (the monitor's)
    def attach(self, setup: Setup) -> None:
        self.strict = setup.strict
        found = resolve_modules(setup.model, self.module, owner=repr(self))
        self._modules = [(path, weakref.ref(mod)) for path, mod in found]
        self.paths = [path for path, _ in found]
        if len(found) > 1 and not (self.pool or self.per_layer):
            self.scopes = [layer_name(p) for p in self.paths]
        self.device = _device_of(mod for _, mod in found)
        self.on_attach(setup, found)
        self.window = self._fresh_window()
        self.attach_hooks(found)
        if self.uses_token_mask:
            try:
                self._model_signature = inspect.signature(setup.model.forward)
            except (TypeError, ValueError):  # a builtin or C forward: keywords only
                self._model_signature = None
            self._hooks.forward_pre(setup.model, self._capture_model_inputs)

    def _fresh_window(self) -> Window:
        if self.scopes == [None]:
            window = self.new_window()
        else:
            window = Window.scoped({s: self.new_window() for s in self.scopes})
        return window.add("_calls", Counter(("calls",))).to(self.device)

    def _scope(self, path: str) -> str | None:
        return None if self.scopes == [None] else layer_name(path)

    def detach(self) -> None:
        self._hooks.remove()
        self.end_recording()

    def end_recording(self) -> None:
        super().end_recording()
        self._model_inputs = {}

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
        """Place the window on ``device`` (where the value lives), count the call and
        :meth:`update` the window (the module's part of it, for a glob kept per module)."""
        if device is not None:
            self.device = device  # where the data lives now (the model may have moved)
            self.window.to(device)
        self.window["_calls"].add("calls", 1)
        self.update(WindowView(self.window, self._scope(call.path)), value, call)

    def compute(self, group=None) -> Readout:
        """The readout of this window over all ranks; keeps the window. A collective under
        ``torch.distributed``: every rank must call it."""
        self._reduced = reduced = self.window.reduced(group)
        self.readout_group = group
        out = Readout({self.key("calls"): float(reduced["_calls"]["calls"])})
        for scope in self.scopes:
            part = self.readout(WindowView(reduced, scope))
            for field in ("metrics", "histograms", "pictures", "masks"):
                mine = getattr(part, field)
                getattr(out, field).update(
                    mine if scope is None else {k.but(layer=scope): v for k, v in mine.items()}
                )
        self.last = out
        return out

    def finish_window(self, group=None) -> None:
        """Start the next window after a log."""
        reduced = self._reduced if self._reduced is not None else self.window.reduced(group)
        self._reduced = None
        for scope in self.scopes:
            self.end_window(WindowView(self.window, scope), WindowView(reduced, scope))
        self.window["_calls"].reset()
        self.window_steps = 0

    def missed_step(self) -> None:
        """After a training step in which this probe would have recorded but was not observed."""
        for scope in self.scopes:
            self.end_missed_step(WindowView(self.window, scope))

    def exchange(self, group=None) -> None:
        """After every step this probe records, on every rank, whether it recorded, missed the
        step or is disabled: the point for collectives of the hot path (class-sharded rows).
        Nothing by default."""

    def finish_step(self) -> None:
        """After a training step in which this probe recorded."""
        self.observed_steps += 1
        self.window_steps += 1
        if self._step_rows:
            self.rows_per_step, self._step_rows = self._step_rows, 0
        for scope in self.scopes:
            self.end_step(WindowView(self.window, scope))

    def replaced(self, scope: str | None, mask: torch.Tensor) -> None:
        """A mitigation replaced what ``mask`` marks in the module ``scope`` (None: the probe's
        only window part)."""
        self.on_replaced(WindowView(self.window, scope), mask)

    def begin_snapshot(self) -> None:
        """Record into a fresh window (sharing persistent memories) until :meth:`end_snapshot`."""
        self._saved_window = self.window
        self.window = self._fresh_window().share_persistent(self.window)

    def end_snapshot(self) -> None:
        self.window, self._saved_window = self._saved_window, None
        self._reduced = None

    def state_dict(self, group=None, sync: bool = True) -> dict:
        """Window statistics (all-reduced over ``group`` when ``sync``: a collective) and extra
        state. During a validation snapshot, the training window is saved."""
        window = self._saved_window if self._saved_window is not None else self.window
        window = window.reduced(group) if sync else window
        return {"window": window.state_dict(), "extra": self.extra_state()}

    def load_state_dict(self, state: dict, keep_window: bool = True) -> None:
        self.window.load_state_dict(state["window"], keep=keep_window)
        self.load_extra_state(state["extra"])


def layer_name(path: str) -> str:
    """A module path as a key's layer: ``"model"`` for the root module (path ``""``)."""
    return path or "model"


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
