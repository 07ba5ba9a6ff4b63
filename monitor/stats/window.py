"""A probe's statistics: named entries that move, reduce, save and reset together."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Callable

import torch

from .. import _dist
from .base import Statistic, agree_sizes


class Window:
    """The statistics a probe keeps between two logs.

    Entries are given at creation, or made on first use by ``factory(key)`` (one per layer, for
    layers found while the model runs). Entries named in ``persistent`` (usage EMAs) outlive the
    window: :meth:`reset` keeps them and a validation snapshot shares them.

    Under ``torch.distributed``, :meth:`all_reduce` first agrees on the set of entries and on their
    sizes (one ``all_gather_object``), creating on every rank what only some ranks made, then
    reduces every entry in the same order on every rank: a rank that recorded nothing in the window
    still takes part in exactly the same collectives.

    Example:
        >>> import torch
        >>> from collapse_monitor.stats import Counter, Window
        >>> w = Window({"events": Counter(("seen",))})
        >>> w["events"].add("seen", 3)
        >>> w.state_dict()["entries"]["events"]["states"]["counts"]
        tensor([3])
    """

    def __init__(
        self,
        entries: dict[str, Statistic] | None = None,
        factory: Callable[[str], Statistic] | None = None,
        persistent: tuple[str, ...] = (),
        transient: tuple[str, ...] = (),
    ) -> None:
        self._entries: dict[str, Statistic] = dict(entries or {})
        self.factory = factory
        self.persistent = tuple(persistent)
        self.transient = tuple(transient)  # one step's entries: a checkpoint may lack them
        self.device = torch.device("cpu")
        # the process group a reduced copy was combined over (a readout that splits its work
        # over the ranks runs its collectives there); None for a window of this rank alone
        self.group = None
        unknown = set(self.persistent) - set(self._entries)
        if unknown:
            raise KeyError(f"persistent entries {sorted(unknown)} are not in the window")

    # ------------------------------------------------------------------ access
    def __getitem__(self, key: str) -> Statistic:
        stat = self._entries.get(key)
        if stat is None:
            if self.factory is None:
                raise KeyError(f"no statistic '{key}' in this window: {sorted(self._entries)}")
            stat = self._entries[key] = self.factory(key).to(self.device)
        return stat

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def items(self) -> list[tuple[str, Statistic]]:
        return [(k, self._entries[k]) for k in self]

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ lifecycle
    def to(self, device: torch.device | str) -> Window:
        """Move every entry (and entries made later) to ``device``; a no-op when already there."""
        device = torch.device(device)
        if device != self.device:
            self.device = device
            for stat in self._entries.values():
                stat.to(device)
        return self

    def reset(self, persistent: bool = False) -> None:
        """Start an empty window; persistent entries are kept unless ``persistent=True``."""
        for key, stat in self._entries.items():
            if persistent or key not in self.persistent:
                stat.reset()

    def shift(self, *keys: str) -> None:
        """Each of ``keys`` (made first if need be) takes the next one's statistic, without a
        copy, and the last takes the first's, emptied: ``shift(before, last, step)`` makes this
        step's statistics the last step's, and the last's the step before's."""
        stats = [self[k] for k in keys]
        for key, stat in zip(keys, stats[1:] + stats[:1]):
            self._entries[key] = stat
        stats[0].reset()

    def add(self, key: str, stat: Statistic, persistent: bool = False) -> Window:
        """Add an entry (on this window's device)."""
        if key in self._entries:
            raise KeyError(f"the window already has an entry '{key}'")
        self._entries[key] = stat.to(self.device)
        if persistent:
            self.persistent += (key,)
        return self

    @classmethod
    def scoped(cls, windows: dict[str, Window]) -> Window:
        """One window holding several (one per module of a glob), entries named
        ``<scope>/<entry>``; see :class:`WindowView` for one scope's part."""
        out = cls()
        for scope, w in windows.items():
            if w.factory is not None:
                raise ValueError("a window made on first use cannot be scoped")
            for key, stat in w._entries.items():
                out.add(f"{scope}/{key}", stat, persistent=key in w.persistent)
                if key in w.transient:
                    out.transient += (f"{scope}/{key}",)
        return out

    def share_persistent(self, other: Window) -> Window:
        """Use ``other``'s persistent entries (same objects): a snapshot window beside training."""
        for key in self.persistent:
            self._entries[key] = other._entries[key]
        return self

    def clone(self) -> Window:
        new = Window({k: s.clone() for k, s in self._entries.items()}, self.factory)
        new.persistent, new.transient, new.device = self.persistent, self.transient, self.device
        return new

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self._entries.values())

    # ------------------------------------------------------------------ distributed
    def all_reduce(self, group=None) -> Window:
        """Reduce every entry over all ranks in place (see the class docstring)."""
        if not _dist.is_distributed(group):
            return self
        # a rank whose statistics stayed on the CPU (its module never ran) joins NCCL on the GPU
        self.to(_dist.collective_device(group, self.device))
        agreed = agree_sizes({k: s.sizes for k, s in self._entries.items()}, group)
        for key in sorted(agreed):
            stat = self[key]
            stat.fix_agreed(agreed[key])
            stat.reduce_states(group)
        return self

    def flush(self, group=None) -> None:
        """Settle every entry's pending collective work (:meth:`Statistic.flush`), in the same
        order on every rank."""
        for _, stat in self.items():
            stat.flush(group)

    def reduced(self, group=None) -> Window:
        """This window combined over all ranks: a reduced copy under ``torch.distributed``, the
        window itself otherwise (callers only read it). Either way its :attr:`group` is
        ``group``: a readout that splits its work splits it over ``group`` (one rank: none),
        never over the default group (a pipeline stage held by one rank)."""
        if not _dist.is_distributed(group):
            self.group = group
            return self
        self.flush(group)
        reduced = self.clone().all_reduce(group)
        reduced.group = group
        return reduced

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {"entries": {k: s.state_dict() for k, s in self.items()}}

    def load_state_dict(self, state: dict, keep: bool = True) -> None:
        """Restore :meth:`state_dict`. ``keep=False`` loads sizes (and each statistic's own
        carried state, such as shifts) but drops what the ranks' reduce made alike
        (:meth:`Statistic.forget_reduced`: every entry's window, but a class-sharded
        statistic's own classes): under DDP only rank 0 keeps the saved (reduced) counts, so
        the next all-reduce counts each sample once."""
        missing = set(self._entries) - set(state["entries"])
        for key in missing & set(self.transient):  # saved before the entry existed: empty
            self._entries[key].reset()
        missing -= set(self.transient)
        if missing:
            raise KeyError(f"saved window has no state for {sorted(missing)}")
        for key, sub in state["entries"].items():
            stat = self[key]
            stat.load_state_dict(sub)
            stat.to(self.device)
            if not keep:
                stat.forget_reduced()


class WindowView:
    """The part of a window that belongs to one scope (one module of a glob; ``None``: the whole
    window), seen with the entry names the probe gave them. Entries whose name starts with ``_``
    belong to the probe base class and are not shown."""

    def __init__(self, window: Window, scope: str | None = None) -> None:
        self.window = window
        self.prefix = "" if scope is None else f"{scope}/"

    def __getitem__(self, key: str) -> Statistic:
        return self.window[self.prefix + key]

    def __contains__(self, key: str) -> bool:
        return self.prefix + key in self.window

    def shift(self, *keys: str) -> None:
        """:meth:`Window.shift` of this scope's entries."""
        self.window.shift(*(self.prefix + k for k in keys))

    def items(self) -> list[tuple[str, Statistic]]:
        n = len(self.prefix)
        return [
            (k[n:], s)
            for k, s in self.window.items()
            if k.startswith(self.prefix) and not k[n:].startswith("_") and "/" not in k[n:]
        ]

    def __len__(self) -> int:
        return len(self.items())

    @property
    def device(self) -> torch.device:
        return self.window.device

    @property
    def group(self):
        """The process group a reduced window was combined over (see :attr:`Window.group`)."""
        return self.window.group

    def reset(self, keep: tuple[str, ...] = ()) -> None:
        """Start this scope's part of the window empty (persistent entries and ``keep``, entries
        that outlive a log but not shared with snapshots, kept)."""
        for key, stat in self.items():
            if self.prefix + key not in self.window.persistent and key not in keep:
                stat.reset()
