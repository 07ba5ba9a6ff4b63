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

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        cleanups, self._cleanups = self._cleanups, []
        for fn in cleanups:
            fn()

    def __len__(self) -> int:
        return len(self._handles)
