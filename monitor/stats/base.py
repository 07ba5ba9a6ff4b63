"""Mergeable sufficient statistics.

A statistic declares its states once (name, shape, dtype); ``reset``, ``clone``,
``state_dict`` and ``load_state_dict`` are derived from that declaration, in the manner of
torchmetrics' ``add_state``. Subclasses implement ``update``, ``merge`` and ``all_reduce``.
"""

from __future__ import annotations

from typing import Callable, Union

import torch

from .. import _dist

Shape = Union[tuple, Callable[["Statistic"], tuple]]


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; a host tensor goes to a CUDA device through pinned memory with a
    queued copy, so the host does not wait for the GPU's queue (a pageable copy would)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Statistic:
    """Base class: named tensor states, each declared with a shape and dtype; defaults are zeros.

    ``shape`` may be a callable of the statistic (for sizes fixed only by the first update).
    """

    def __init__(self) -> None:
        self._states: dict[str, tuple[Shape, torch.dtype]] = {}
        self.device = torch.device("cpu")

    def add_state(self, name: str, shape: Shape, dtype: torch.dtype) -> None:
        self._states[name] = (shape, dtype)
        setattr(self, name, self._zeros(name))

    def _zeros(self, name: str) -> torch.Tensor:
        shape, dtype = self._states[name]
        return torch.zeros(
            shape(self) if callable(shape) else shape, dtype=dtype, device=self.device
        )

    @property
    def state_names(self) -> list[str]:
        return list(self._states)

    def reset(self) -> None:
        """Restore every state to zeros."""
        for name in self._states:
            setattr(self, name, self._zeros(name))

    def to(self, device: torch.device | str) -> Statistic:
        self.device = torch.device(device)
        for name in self._states:
            setattr(self, name, to_device(getattr(self, name), self.device))
        return self

    def clone(self) -> Statistic:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        for name in self._states:
            setattr(new, name, getattr(self, name).clone())
        return new

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().cpu().clone() for name in self._states}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self._states) - set(state)
        if missing:
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: missing states {sorted(missing)}"
            )
        for name in self._states:
            ref = getattr(self, name)
            value = state[name]
            if tuple(value.shape) != tuple(ref.shape):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: state '{name}' has shape "
                    f"{tuple(value.shape)}, expected {tuple(ref.shape)}"
                )
            setattr(self, name, value.to(device=self.device, dtype=ref.dtype).clone())

    def nbytes(self) -> int:
        """Bytes held by the states (the O(1)-in-samples memory of the statistic)."""
        return sum(t.numel() * t.element_size() for t in (getattr(self, n) for n in self._states))


class SumStatistic(Statistic):
    """States that merge by addition (counters, sums), or by maximum where declared with
    ``maxima=`` (running maxima; their default is ``-inf``)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxima: set[str] = set()

    def add_max_state(self, name: str, shape: Shape, dtype: torch.dtype = torch.float64) -> None:
        self.maxima.add(name)
        self.add_state(name, shape, dtype)

    def _zeros(self, name: str) -> torch.Tensor:
        out = super()._zeros(name)
        return out.fill_(-float("inf")) if name in getattr(self, "maxima", ()) else out

    def merge(self, other: SumStatistic) -> SumStatistic:
        for name in self._states:
            mine, theirs = getattr(self, name), getattr(other, name).to(self.device)
            if name in self.maxima:
                torch.maximum(mine, theirs, out=mine)
            else:
                mine.add_(theirs)
        return self

    def all_reduce(self, group=None) -> SumStatistic:
        """Reduce every state across ranks (SUM, or MAX for maxima), one collective per state."""
        for name in self._states:
            reduce = _dist.all_reduce_max_ if name in self.maxima else _dist.all_reduce_sum_
            reduce(getattr(self, name), group)
        return self


class Counter(SumStatistic):
    """A vector of int64 event counters, e.g. ``(mismatches, total)``.

    Args:
        names: one name per counter; ``counter[name]`` reads a 0-d tensor (no host sync).
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = tuple(names)
        n = len(self.names)
        self.add_state("counts", (n,), torch.int64)

    def add(self, name: str, value: torch.Tensor | int) -> None:
        self.counts[self.names.index(name)] += value

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.counts[self.names.index(name)]
