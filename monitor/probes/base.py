"""Probe: where to read (a hook), what to keep (statistics), what to report (metrics)."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import _dist
from .._modules import resolve_modules
from ..pictures import Picture

if TYPE_CHECKING:
    from ..monitor import CollapseMonitor
    from ..rules import Rule


class Probe:
    """Base class of all probes.

    A probe registers forward hooks on the modules its ``module`` path (or glob) selects. The hooks
    return at once unless the monitor is inside ``observe()``. Everything a probe accumulates
    between two logs lives in its *window* (``new_window()``), so the monitor can swap in a fresh
    window for a validation snapshot and swap the training window back.

    Args:
        module: a ``model.named_modules()`` name or a glob (``""`` is the model itself).
        name: metric prefix, ``collapse/<name>/<metric>``; defaults to ``module``.
        extract: ``extract(module, args, output) -> Tensor`` for models whose outputs do not
            follow the probe's default convention.
    """

    needs_targets = False
    # cheap probes (O(B*D) per update) record every step under the monitor's default cadence;
    # the others record a sample of the steps (see ``CollapseMonitor(observe_every_n_steps=)``)
    every_step = False

    def __init__(self, module: str, name: str | None = None, extract=None) -> None:
        if not isinstance(module, str):
            raise TypeError(f"{type(self).__name__}: module must be a path string, got {module!r}")
        if extract is not None and not callable(extract):
            raise TypeError(
                f"{type(self).__name__}: extract must be callable, got {type(extract).__name__}"
            )
        self.module = module
        self.name = name or module or "model"  # "" is the root module itself
        self._profile_label = f"collapse_monitor.{self.name}"  # torch.profiler, per hook call
        self.extract = extract
        self.monitor: CollapseMonitor | None = None
        self.disabled = False  # set when the probe failed (non-strict monitor): its hooks idle
        self.window: Any = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(module={self.module!r}, name={self.name!r})"

    # ----------------------------------------------------------------- wiring
    def attach(self, model: nn.Module, monitor: CollapseMonitor) -> None:
        self.monitor = monitor
        self.window = self.new_window()
        for path, mod in self.resolve(model):
            self._handles.append(mod.register_forward_hook(self._make_hook(path), with_kwargs=True))

    def resolve(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        found = resolve_modules(model, self.module, owner=repr(self))
        self.hooked = [(path, weakref.ref(mod)) for path, mod in found]
        return found

    def check_modules(self, named: dict[str, nn.Module]) -> None:
        """Raise if a module this probe hooks is no longer the one at its path.

        Args:
            named: ``dict(model.named_modules())`` of the model now.
        """
        for path, ref in getattr(self, "hooked", []):
            if named.get(path) is not ref():
                raise ValueError(
                    f"{type(self).__name__} '{self.name}': module '{path}' is no longer part of the "
                    "model (it was replaced or removed after the monitor was built); its hooks see "
                    "nothing. Build the monitor again on the changed model"
                )

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        """True while the monitor records this step for this probe and the probe has not failed."""
        return self.monitor is not None and self.monitor.records(self) and not self.disabled

    @torch.compiler.disable
    def guarded(self, fn, *args) -> Any:
        """Run ``fn(*args)`` from a hook: an exception goes to ``monitor.failed`` (which raises
        under ``strict=True``, else logs it once, counts it and disables this probe). Never traced
        by ``torch.compile``: the monitor's bookkeeping stays out of the user's graph (a graph
        break while observing, nothing otherwise)."""
        try:
            with torch.no_grad(), torch.profiler.record_function(self._profile_label):
                return fn(*args)
        except Exception as exc:
            self.monitor.failed(self, exc)

    def _make_hook(self, path: str):
        def hook(module, args, kwargs, output):
            if self.active:
                self.guarded(self.observe, path, module, args, kwargs, output)

        return hook

    def error(self, path: str, what: str) -> ValueError:
        """A ValueError naming the probe and the module."""
        return ValueError(f"{type(self).__name__} '{self.name}' at module '{path}': {what}")

    # ----------------------------------------------------------------- subclass API
    def new_window(self) -> Any:
        """Fresh statistics for one window."""
        raise NotImplementedError

    def observe(self, path: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Read one forward call into ``self.window``; called only inside ``observe()``."""
        raise NotImplementedError

    def compute(self, group=None) -> dict[str, float]:
        """Metrics of the current window, all-reduced over ``group`` first when distributed.

        Must not change the window (a user may call it mid-window).
        """
        raise NotImplementedError

    def histograms(self) -> dict[str, torch.Tensor]:
        """Value distributions for the sinks at a log, from the last :meth:`compute`."""
        return {}

    def pictures(self) -> dict[str, Picture]:
        """What to draw at a log, from the last :meth:`compute` (opt-in, see
        ``CollapseMonitor(pictures=)``); ``{name: Picture}``."""
        return {}

    def end_step(self) -> None:
        """Called by ``monitor.step()`` after a step in which this probe was observing."""

    def end_window(self) -> None:
        """Called after a log: start the next window."""
        self.window = self.new_window()

    def default_rules(self) -> list[Rule]:
        return []

    def state_dict(self, group=None, sync: bool = True) -> dict:
        """Window statistics (all-reduced over ``group`` when ``sync`` and distributed)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict, keep_window: bool = True) -> None:
        raise NotImplementedError


class WindowedProbe(Probe):
    """A probe whose window is a dict of statistics that all-reduce and save together."""

    def _synced(self, group=None, sync: bool = True) -> dict:
        if not (sync and _dist.is_distributed(group)):
            return self.window
        return {k: v.clone().all_reduce(group) for k, v in self.window.items()}

    def _move(self, device: torch.device) -> None:
        for stat in self.window.values():
            if stat.device != device:
                stat.to(device)

    def state_dict(self, group=None, sync: bool = True) -> dict:
        return {k: v.state_dict() for k, v in self._synced(group, sync).items()}

    def load_state_dict(self, state: dict, keep_window: bool = True) -> None:
        win = self.new_window()
        for key, stat in win.items():
            stat.load_state_dict(state[key])
            if not keep_window:
                stat.reset()
        self.window = win


def first_tensor(args: tuple, kwargs: dict) -> Any:
    """The module's first positional argument, or its first keyword argument."""
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)
