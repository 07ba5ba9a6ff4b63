"""What a probe reads from a forward call, and the one wording of every reading error.

A probe declares a :class:`Reading`: where the value is by default (the module's input or
output, and how to find it inside a tuple, dict or distribution) and what it must be. A user
whose model does not follow the default convention passes ``extract(module, args, output)``;
either way the value is checked the same way, and a value that does not fit raises::

    <Probe> '<name>' at module '<path>': expected <what> as <where>, got <what it was>;
    pass extract=lambda module, args, output: <what>
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch


def describe(obj: Any) -> str:
    """A short description of what a module returned: types, dtypes and shapes."""
    if isinstance(obj, torch.Tensor):
        return f"Tensor {obj.dtype} {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        return "dict(" + ", ".join(f"{k}={describe(v)}" for k, v in obj.items()) + ")"
    if isinstance(obj, (tuple, list)):
        return type(obj).__name__ + "(" + ", ".join(describe(v) for v in obj) + ")"
    return type(obj).__name__


def first_input(args: tuple, kwargs: dict) -> Any:
    """The module's first positional argument, or its first keyword argument."""
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


def same(value: Any) -> Any:
    return value


def first_tensor(value: Any) -> Any:
    """The value itself, or the first element of a tuple/list (transformer blocks return
    ``(hidden, ...)``)."""
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return value


def is_index(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not (
        value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
    )


def single_index_tensor(value: Any) -> Any:
    """The one integer tensor of an output (itself, or in a tuple/list/dict), else the output."""
    if isinstance(value, Mapping):
        found = [v for v in value.values() if is_index(v)]
    elif isinstance(value, (tuple, list)):
        found = [v for v in value if is_index(v)]
    else:
        return value
    return found[0] if len(found) == 1 else value


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: the rows of ``x (N, ...)`` without NaN or Inf (the others are counted and
    left out, never folded into a statistic)."""
    return torch.isfinite(x).flatten(1).all(1) if x.ndim > 1 else torch.isfinite(x)


def floating(min_ndim: int) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        return (
            isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= min_ndim
        )

    return check


@dataclass(frozen=True)
class Reading:
    """What a probe reads from each forward call of its module.

    Attributes:
        expect: what the value is, for messages (``"floating-point features (N, D)"``).
        check: ``check(value) -> bool``, the value fits.
        find: where the value is inside the module's input or output by default.
        hint: what ``extract`` should return, for messages.

    Example:
        >>> import torch
        >>> indices = Reading("code indices", is_index, find=single_index_tensor, hint="indices")
        >>> indices.find((torch.zeros(2, 3), torch.tensor([4, 1]), torch.zeros(())))
        tensor([4, 1])
    """

    expect: str
    check: Callable[[Any], bool]
    find: Callable[[Any], Any] = same
    hint: str = "<tensor>"

    def read(self, probe, path: str, where: str, module, args, kwargs, output) -> Any:
        """The checked value of one call; ``ValueError`` naming probe, module and what it saw."""
        if probe.extract is not None:
            raw = value = probe.extract(module, args, output)
            source = "the value returned by extract"
        else:
            raw = first_input(args, kwargs) if where == "input" else output
            value = self.find(raw)
            source = f"the module's {where}"
        if not self.check(value):
            raise probe.error(
                path,
                f"expected {self.expect} as {source}, got {describe(raw)}; "
                f"pass extract=lambda module, args, output: {self.hint}",
            )
        return value
