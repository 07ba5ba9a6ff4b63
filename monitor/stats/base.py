"""Mergeable sufficient statistics, declared once (in the manner of torchmetrics' ``add_state``).

A statistic declares its states (name, shape, dtype, how two ranks' values combine) and the sizes
that its first update may fix (``"D"``, a feature dimension unknown until data arrives). From that
declaration the base derives ``reset``, ``clone``, device moves, ``state_dict`` / ``load_state_dict``,
``merge`` and ``all_reduce``. Under ``torch.distributed``, ``all_reduce`` first agrees the sizes
across ranks, so a rank that saw no data in a window (conditional computation, uneven shards)
takes them from the others and every collective has the same shape on every rank.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _dist

Dim = Union[int, str]
Sizes = dict[str, Optional[int]]

# how two ranks' values of a state combine: "sum", "max" and "min" by one collective each;
# "same": identical on every rank once :meth:`Statistic.align` has run (no collective);
# "local": this rank's own (class shards), never combined
_REDUCTIONS = ("sum", "max", "min", "same", "local")
_COLLECTIVE = ("sum", "max", "min")


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; a host tensor goes to a CUDA device through pinned memory with a
    queued copy, so the host does not wait for the GPU's queue (a pageable copy would)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def agree_sizes(layouts: dict[str, Sizes], group=None) -> dict[str, Sizes]:
    """The union over ranks of named entries and their sizes (one ``all_gather_object``).

    Args:
        layouts: ``{entry: {size name: value or None (not known yet)}}`` of this rank.

    Returns:
        The same structure with every entry any rank has, and each size known on any rank.

    Raises:
        ValueError: two ranks know different values for one size (on every rank alike).
    """
    merged: dict[str, Sizes] = {}
    for layout in _dist.all_gather_object(layouts, group):
        for key, sizes in layout.items():
            into = merged.setdefault(key, {})
            for dim, n in sizes.items():
                known = into.get(dim)
                if n is not None and known is not None and n != known:
                    raise ValueError(
                        f"ranks disagree on size {dim!r} of {key or 'a statistic'}: {known} and {n}"
                    )
                into[dim] = known if n is None else n
    return merged


class Statistic:
    """Base class: named tensor states declared with a shape, a dtype and a reduction.

    ``shape`` entries are ints or size names declared with :meth:`add_size`; a state whose size is
    still unknown has extent 0 along it. ``reduce`` says how ranks combine the state (as
    torchmetrics' ``dist_reduce_fx``): ``"sum"``, ``"max"`` (initialised to ``-inf``, 0 for
    integers), ``"min"`` (initialised to the dtype's largest value),
    ``"same"`` (made identical on every rank by :meth:`align`, e.g. agreed shifts) or
    ``"local"`` (this rank's own, never combined: class shards). A statistic with ``"same"`` or
    ``"local"`` states overrides :meth:`merge` (and :meth:`align` for ``"same"``).
    """

    #: states added after a release: a window saved before one existed loads with its default
    #: (a count that the old window did not keep starts at 0) instead of failing to resume
    LATER: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self._states: dict[str, tuple[tuple[Dim, ...], torch.dtype, str | None]] = {}
        self._size_names: dict[str, str] = {}
        self.sizes: Sizes = {}
        self.device = torch.device("cpu")

    # ------------------------------------------------------------------ declaration
    def add_size(self, dim: str, description: str, value: int | None = None) -> None:
        """Declare a size (``"D"``: ``"feature dimension"``), known now or fixed by data."""
        self._size_names[dim] = description
        self.sizes[dim] = None if value is None else int(value)

    def add_state(
        self, name: str, shape: tuple[Dim, ...], dtype: torch.dtype, reduce: str | None = "sum"
    ) -> None:
        if reduce not in _REDUCTIONS:
            raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
        unknown = [d for d in shape if isinstance(d, str) and d not in self.sizes]
        if unknown:
            raise ValueError(f"{type(self).__name__}: declare sizes {unknown} with add_size first")
        self._states[name] = (tuple(shape), dtype, reduce)
        setattr(self, name, self._default(name))

    def _extent(self, name: str) -> tuple[int, ...]:
        shape = self._states[name][0]
        return tuple((self.sizes[d] or 0) if isinstance(d, str) else d for d in shape)

    def _fill(self, name: str) -> float:
        _, dtype, reduce = self._states[name]
        # a floating maximum starts at -inf (an integer one holds non-negative flags or
        # counts: 0); a minimum starts at the largest value of its dtype
        if reduce == "min":
            return float("inf") if dtype.is_floating_point else torch.iinfo(dtype).max
        return -float("inf") if reduce == "max" and dtype.is_floating_point else 0

    def _default(self, name: str) -> torch.Tensor:
        dtype = self._states[name][1]
        return torch.full(self._extent(name), self._fill(name), dtype=dtype, device=self.device)

    def _reset_state(self, name: str) -> None:
        """The state back to its default, in place when its shape is right (no allocation)."""
        t = getattr(self, name)
        if tuple(t.shape) == self._extent(name) and t.device == self.device:
            t.fill_(self._fill(name))
        else:
            setattr(self, name, self._default(name))

    @property
    def state_names(self) -> list[str]:
        return list(self._states)

    # ------------------------------------------------------------------ sizes
    def fix_sizes(self, **sizes: int) -> None:
        """Fix sizes on first use; a later different value is an error naming the size.

        States that depend on a newly fixed size are allocated (they held nothing before)."""
        fixed = []
        for dim, n in sizes.items():
            known = self.sizes[dim]
            if known is None:
                self.sizes[dim] = int(n)
                fixed.append(dim)
            elif known != n:
                raise ValueError(f"{self._size_names[dim]} changed from {known} to {n}")
        for name, (shape, _, _) in self._states.items():
            if any(d in fixed for d in shape):
                setattr(self, name, self._default(name))

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        """Restore every state to its default (zeros; ``-inf`` for maxima), in place: the
        zero-filled ones already in shape in one operation (a per-step reset on a GPU is one
        launch)."""
        zeros, rest = [], []
        for name in self._states:
            t = getattr(self, name)
            fits = tuple(t.shape) == self._extent(name) and t.device == self.device
            (zeros if fits and self._fill(name) == 0 else rest).append(name)
        if zeros:
            torch._foreach_zero_([getattr(self, name) for name in zeros])
        for name in rest:
            self._reset_state(name)

    def forget_reduced(self) -> None:
        """Drop the part of a reduced (all-rank) copy that every rank holds alike, so that only
        one rank keeps it when a reduced state is loaded: the states combined by a collective
        (``"sum"``, ``"max"``, ``"min"``); ``"same"`` and ``"local"`` states stay."""
        for name, (_, _, reduce) in self._states.items():
            if reduce in _COLLECTIVE:
                self._reset_state(name)

    def flush(self, group=None) -> None:
        """Settle what waits for a collective (class-sharded rows); a no-op by default. Under
        ``torch.distributed`` every rank calls it at the same points."""

    def to(self, device: torch.device | str) -> Statistic:
        self.device = torch.device(device)
        for name in self._states:
            setattr(self, name, to_device(getattr(self, name), self.device))
        return self

    def clone(self) -> Statistic:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.sizes = dict(self.sizes)
        for name in self._states:
            setattr(new, name, getattr(self, name).clone())
        return new

    def nbytes(self) -> int:
        """Bytes held by the states (the O(1)-in-samples memory of the statistic)."""
        return sum(t.numel() * t.element_size() for t in (getattr(self, n) for n in self._states))

    # ------------------------------------------------------------------ combining
    def merge(self, other: Statistic) -> Statistic:
        """Add ``other`` (the same statistic over other samples) into this one."""
        self.fix_sizes(**{d: n for d, n in other.sizes.items() if n is not None})
        for name, (shape, _, reduce) in self._states.items():
            if any(isinstance(d, str) and other.sizes[d] is None for d in shape):
                continue  # sized by data ``other`` never saw: it holds nothing here
            mine, theirs = getattr(self, name), getattr(other, name).to(self.device)
            if reduce == "max":
                torch.maximum(mine, theirs, out=mine)
            elif reduce == "min":
                torch.minimum(mine, theirs, out=mine)
            elif reduce == "sum":
                mine.add_(theirs)
            else:
                raise NotImplementedError(f"{type(self).__name__} must merge state '{name}'")
        return self

    def all_reduce(self, group=None) -> Statistic:
        """Combine this statistic over all ranks in place; afterwards every rank holds the same
        (its ``"local"`` states aside).

        Sizes are agreed first (a rank that saw nothing takes them from the others)."""
        if _dist.is_distributed(group):
            self.to(_dist.collective_device(group, self.device))
            self.fix_agreed(agree_sizes({"": self.sizes}, group)[""])
            self.reduce_states(group)
        return self

    def fix_agreed(self, sizes: Sizes) -> None:
        self.fix_sizes(**{d: n for d, n in sizes.items() if n is not None})

    def align(self, group) -> None:
        """Make the ``"same"`` states identical on every rank before the others are reduced (a
        collective where a statistic needs one: agreeing on class means); nothing by default."""

    def reduce_states(self, group) -> None:
        """:meth:`align`, then one collective per ``"sum"``, ``"max"`` or ``"min"`` state, in
        declaration order (sizes must be agreed: every rank makes the same calls)."""
        self.align(group)
        for name, (_, _, reduce) in self._states.items():
            if reduce in _COLLECTIVE:
                _dist.all_reduce_(getattr(self, name), reduce, group)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {
            "sizes": dict(self.sizes),
            "states": {n: getattr(self, n).detach().cpu().clone() for n in self._states},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; a state of another shape or a missing one is an error."""
        for dim, n in state["sizes"].items():
            known = self.sizes[dim]
            if None not in (known, n) and known != n:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the saved {self._size_names[dim]} "
                    f"is {n}, this statistic's is {known}"
                )
            self.sizes[dim] = known if n is None else n
        for name in self._states:
            setattr(self, name, self._default(name))
        missing = set(self._states) - set(state["states"]) - self.LATER
        if missing:
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: missing states {sorted(missing)}"
            )
        for name in self._states:
            if name not in state["states"]:  # (a LATER state: its default)
                continue
            ref, value = getattr(self, name), state["states"][name]
            if tuple(value.shape) != tuple(ref.shape):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: state '{name}' has shape "
                    f"{tuple(value.shape)}, expected {tuple(ref.shape)}"
                )
            setattr(self, name, value.to(device=self.device, dtype=ref.dtype).clone())


class Counter(Statistic):
    """A vector of int64 event counters, e.g. ``(mismatches, total)``.

    Args:
        names: one name per counter; ``counter[name]`` reads a 0-d tensor (no host sync).
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = tuple(names)
        self.add_state("counts", (len(self.names),), torch.int64)

    def add(self, name: str, value: torch.Tensor | int) -> None:
        self.counts[self.names.index(name)] += value

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.counts[self.names.index(name)]

    def as_dict(self) -> dict[str, int]:
        """``{name: count}`` (a host sync: call at logging cadence)."""
        return dict(zip(self.names, self.counts.tolist()))
