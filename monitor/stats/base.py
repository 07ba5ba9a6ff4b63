"""Mergeable sufficient statistics.

A statistic declares its states once (name, shape factory, dtype); ``reset``, ``clone``,
``state_dict`` and ``load_state_dict`` are derived from that declaration, in the manner of
torchmetrics' ``add_state``. Subclasses implement ``update``, ``merge`` and ``all_reduce``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import _dist


class Statistic:
    """Base class: a set of named tensor states with declared defaults."""

    def __init__(self) -> None:
        self._defaults: dict[str, Callable[[torch.device], torch.Tensor]] = {}
        self.device = torch.device("cpu")

    def add_state(self, name: str, default: Callable[[torch.device], torch.Tensor]) -> None:
        self._defaults[name] = default
        setattr(self, name, default(self.device))

    @property
    def state_names(self) -> list[str]:
        return list(self._defaults)

    def reset(self) -> None:
        """Restore every state to its default (zeros)."""
        for name, default in self._defaults.items():
            setattr(self, name, default(self.device))

    def to(self, device: torch.device | str) -> Statistic:
        self.device = torch.device(device)
        for name in self._defaults:
            setattr(self, name, getattr(self, name).to(self.device))
        return self

    def clone(self) -> Statistic:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._defaults = dict(self._defaults)
        for name in self._defaults:
            setattr(new, name, getattr(self, name).clone())
        return new

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().cpu().clone() for name in self._defaults}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self._defaults) - set(state)
        if missing:
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: missing states {sorted(missing)}"
            )
        for name in self._defaults:
            ref = getattr(self, name)
            value = state[name]
            if ref.numel() and tuple(value.shape) != tuple(ref.shape):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: state '{name}' has shape "
                    f"{tuple(value.shape)}, expected {tuple(ref.shape)}"
                )
            setattr(self, name, value.to(device=self.device, dtype=ref.dtype).clone())

    def nbytes(self) -> int:
        """Bytes held by the states (the O(1)-in-samples memory of the statistic)."""
        return sum(t.numel() * t.element_size() for t in (getattr(self, n) for n in self._defaults))


class SumStatistic(Statistic):
    """States that merge by plain addition (counters, histograms of counts)."""

    def merge(self, other: SumStatistic) -> SumStatistic:
        for name in self._defaults:
            getattr(self, name).add_(getattr(other, name).to(self.device))
        return self

    def all_reduce(self, group=None) -> SumStatistic:
        """SUM-reduce every state across ranks, one collective per state."""
        for name in self._defaults:
            _dist.all_reduce_sum_(getattr(self, name), group)
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
        self.add_state("counts", lambda d: torch.zeros(n, dtype=torch.int64, device=d))

    def add(self, name: str, value: torch.Tensor | int) -> None:
        self.counts[self.names.index(name)] += value

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.counts[self.names.index(name)]
