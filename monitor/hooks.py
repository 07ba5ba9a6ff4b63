"""Hooks the monitor puts on a user's modules and tensors.

Each hook is a :class:`Hook` object rather than a closure, for two reasons. A closure cannot be
pickled, so ``torch.save(model)`` of a monitored model would fail. And a copy of the model
(``copy.deepcopy`` for an EMA teacher, a pickled snapshot) must never record into the original's
probes: a :class:`Hook` copies as an inert stand-in made of the standard library only
(``functools.partial(sys.audit, ...)``: it returns ``None``, changes nothing, and loads wherever
the model loads, with or without this package).
"""

from __future__ import annotations

import functools
import sys
import weakref
from typing import Any, Callable

import torch
from torch import nn

_INERT = "collapse_monitor.hook_of_a_copy"


class Hook:
    """Calls ``fn(*args)``; copies (pickle, ``torch.save``, ``copy.deepcopy``) are inert.

    Example:
        >>> import copy
        >>> seen = []
        >>> hook = Hook(seen.append)
        >>> hook(1)
        >>> copy.deepcopy(hook)(2)  # the copy records nothing
        >>> seen
        [1]
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __reduce__(self):
        return functools.partial, (sys.audit, _INERT)


class HookSet:
    """The handles one owner (probe, mitigation) registered; :meth:`remove` takes them all away."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._cleanups: list[Callable[[], None]] = []
        # while suspended: (the hooks dict, key, hook, the dict's keys then) of each handle
        self._taken: list[tuple[weakref.ref, int, Any, list[int]]] | None = None

    def forward(self, module: nn.Module, fn: Callable, always_call: bool = False) -> None:
        """``fn(module, args, kwargs, output)`` after ``module``'s forward."""
        self._handles.append(
            module.register_forward_hook(Hook(fn), with_kwargs=True, always_call=always_call)
        )

    def forward_pre(self, module: nn.Module, fn: Callable) -> None:
        """``fn(module, args, kwargs)`` before ``module``'s forward."""
        self._handles.append(module.register_forward_pre_hook(Hook(fn), with_kwargs=True))

    def tensor(self, tensor: torch.Tensor, fn: Callable) -> None:
        """``fn(grad)`` when the gradient of ``tensor`` is computed."""
        self._handles.append(tensor.register_hook(Hook(fn)))

    def on_remove(self, fn: Callable[[], None]) -> None:
        """``fn()`` when the hooks are removed (undo state the hooks keep, e.g. a mode they
        entered)."""
        self._cleanups.append(fn)

    @property
    def suspended(self) -> bool:
        return self._taken is not None

    def suspend(self) -> None:
        """Take the module hooks out of their modules' hook dicts until :meth:`resume`: the
        modules' forwards then skip them (with no hook left, PyTorch's fast path), so that a
        step nothing records costs nothing. Not done (and never again in this process) once
        ``torch.compile`` has run: its graphs do not guard on a module's hooks being absent
        (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a graph traced while they are
        out would never call them again; a compilation that starts while some are out first
        puts them back (:func:`_compiling`). ``torch._dynamo.reset()`` drops that watch until
        the next suspension: a reset and a first compilation inside one stretch of steps that
        nothing records would trace without them."""
        if self._taken is not None or not self._handles or not _may_suspend():
            return
        taken = []
        for handle in self._handles:
            ref = handle.hooks_dict_ref
            hooks = ref()
            if hooks is not None and handle.id in hooks:
                order = list(hooks)
                taken.append((ref, handle.id, hooks.pop(handle.id), order))
        self._taken = taken
        _SUSPENDED.add(self)

    def resume(self) -> None:
        """Put suspended hooks back where they were among their modules' other hooks."""
        taken, self._taken = self._taken, None
        _SUSPENDED.discard(self)
        for ref, key, hook, order in reversed(taken or ()):  # (the last taken first)
            hooks = ref()
            if hooks is not None:
                _put_back(hooks, key, hook, order)

    def remove(self) -> None:
        self._taken = None
        _SUSPENDED.discard(self)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        cleanups, self._cleanups = self._cleanups, []
        for fn in cleanups:
            fn()

    def __len__(self) -> int:
        return len(self._handles)


# the hook sets whose hooks are out now, and whether torch.compile has run in this process
_SUSPENDED: weakref.WeakSet[HookSet] = weakref.WeakSet()
_COMPILE = {"watched": False, "seen": False}


def _may_suspend() -> bool:
    """Whether hooks may leave their modules: not once torch.compile has run (see
    :meth:`HookSet.suspend`), nor where torch cannot say when it starts (torch < 2.3). Checks
    each time that it still watches for compilations (``torch._dynamo.reset()`` drops the
    watch)."""
    if _COMPILE["seen"]:
        return False
    import torch._dynamo

    handler = getattr(torch._dynamo, "callback_handler", None)
    if handler is None:
        return False
    if not _COMPILE["watched"]:
        _COMPILE["watched"] = True
        _COMPILE["seen"] = any(torch._dynamo.utils.counters["frames"].values())
    if _compiling not in handler.start_callbacks:
        handler.register_start_callback(_compiling)
    return not _COMPILE["seen"]


def _compiling(_args: Any = None) -> None:
    """Before torch.compile traces anything: every suspended hook goes back, for good."""
    _COMPILE["seen"] = True
    for hook_set in list(_SUSPENDED):
        hook_set.resume()


def _put_back(hooks: dict, key: int, hook: Any, order: list[int]) -> None:
    """``hooks[key] = hook`` just before the first hook that followed it in ``order`` (hooks
    registered since go after it, as they would have)."""
    hooks[key] = hook
    later = set(order[order.index(key) + 1 :])
    keys = list(hooks)
    first = next((i for i, k in enumerate(keys) if k in later), None)
    if first is not None and hasattr(hooks, "move_to_end"):  # (an OrderedDict, as nn.Module's)
        for k in keys[first:-1]:  # (the last is key itself)
            hooks.move_to_end(k)
