"""The monitor's checkpoint: what :meth:`CollapseMonitor.state_dict` returns, and its checks.

The state holds only tensors and plain Python values, so it loads with
``torch.load(..., weights_only=True)``; each probe's part names the probe it came from
(``identity``), so that a state of another probe is refused before anything is loaded.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch

from . import _dist
from .stats.class_moments import whole_classes

VERSION = 4
PARTS = (
    "version",
    "reduced",
    "global_step",
    "should_stop",
    "probes",
    "rules",
    "mitigation_counts",
    "mitigations",
)


def pack(**parts) -> dict:
    """The state of a monitor's parts, with the format's version."""
    state = {"version": VERSION, **parts}
    assert tuple(state) == PARTS, tuple(state)
    return state


def checked(state: dict, probes: Sequence, mitigations: Sequence, group=None) -> dict:
    """The state for this rank (its part of a :func:`gathered` one), after refusing a state of
    another version, or whose parts are not this monitor's: a probe or mitigation without state,
    or state of one this monitor does not have.

    Raises:
        ValueError: another version; KeyError: parts missing or unknown.
    """
    state = for_rank(state, _dist.rank(group), _dist.world_size(group))
    if not isinstance(state, dict) or state.get("version") != VERSION:
        version = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"unsupported CollapseMonitor state version {version} (this version reads {VERSION})"
        )
    unknown = sorted(set(state) - set(PARTS))
    missing = [p for p in PARTS if p not in state]
    if unknown or missing:
        raise KeyError(f"not a CollapseMonitor state: parts {missing} missing, {unknown} unknown")
    for what, mine in (("probes", probes), ("mitigations", mitigations)):
        names = {c.name for c in mine}
        missing = [n for n in names if n not in state[what]]
        if missing:
            raise KeyError(
                f"checkpoint has no state for {what} {sorted(missing)}; it has "
                f"{sorted(state[what])}"
            )
        extra = sorted(set(state[what]) - names)
        if extra:
            raise KeyError(
                f"checkpoint has state for {what} {extra} that this monitor does not have (it "
                f"has {sorted(names)}); remove them from the state to resume without them"
            )
    return state


def gathered(state: dict, group=None) -> dict:
    """Every rank's ``state`` (a collective), in one checkpoint any rank can write:
    ``{"version": VERSION, "ranks": [state of rank 0, state of rank 1, ...]}``, on the CPU.

    For a monitor with rank-local state (class shards) whose trainer saves rank 0's copy only
    (Lightning) or one copy of each key (``torch.distributed.checkpoint``): each rank finds its
    own part on load (:func:`for_rank`). Every rank holds every rank's part (all classes'
    statistics, in host memory) until it is saved.

    Example:
        >>> state = gathered({"version": VERSION, "global_step": 3})  # one process
        >>> for_rank(state, 0)["global_step"]
        3
    """
    cpu = _to_cpu(state)  # (a CUDA tensor would unpickle onto its own device on every rank)
    ranks = _dist.all_gather_object(cpu, group)
    for part in ranks:  # each part holds its rank's own draws: not every rank's again (W^2)
        for probe in part.get("probes", {}).values():
            probe["extra"].pop("generators", None)
    return {"version": VERSION, "ranks": ranks}


def for_rank(state: dict, rank: int, world: int | None = None) -> dict:
    """``rank``'s part of a :func:`gathered` state; any other state as it is.

    Saved by a run of another ``world`` size, class-sharded statistics
    (:class:`~collapse_monitor.stats.ShardedClassMoments`) are re-sharded: every rank's classes
    are joined into one state of all classes (:func:`~collapse_monitor.stats.class_moments.
    whole_classes`), from which each statistic takes its own classes on load. The other parts
    are rank ``rank``'s (rank 0's for a rank the saved run did not have)."""
    if not (isinstance(state, dict) and set(state) == {"version", "ranks"}):
        return state
    ranks = state["ranks"]
    if rank < len(ranks):
        mine = ranks[rank]
        for probe in mine.get("probes", {}).values():  # this rank's own random draws
            probe["extra"]["generator_mine"] = True
    else:
        mine = ranks[0]
    if world is not None and world != len(ranks) and isinstance(mine.get("probes"), dict):
        parts = {n: [r.get("probes", {}).get(n) for r in ranks] for n in mine["probes"]}
        sharded = [n for n, ps in parts.items() if all(ps) and _has_shards(ps[0])]
        if sharded and not mine.get("reduced"):
            raise ValueError(
                f"the checkpoint's class shards ({sharded}) come from a state saved with "
                f"sync=False: each rank's window holds its own samples, which cannot be split "
                f"over {world} ranks; save with sync (the default) to resume at another world size"
            )
        probes = {
            n: _whole(mine["probes"][n], parts[n]) if n in sharded else p
            for n, p in mine["probes"].items()
        }
        mine = {**mine, "probes": probes}
    return mine


def _has_shards(node) -> bool:
    """Whether a probe's saved state holds class-sharded statistics (``"shard"`` in their
    state: :meth:`~collapse_monitor.stats.ShardedClassMoments.state_dict`)."""
    return isinstance(node, dict) and ("shard" in node or any(map(_has_shards, node.values())))


def _whole(node, parts: list):
    """``node`` with each class-sharded statistic's state replaced by all classes' (``parts``:
    the same node in every rank's state, in rank order)."""
    if not isinstance(node, dict):
        return node
    if "shard" in node:
        return whole_classes(parts)
    return {
        k: _whole(v, [p[k] for p in parts]) if all(k in p for p in parts) else v
        for k, v in node.items()
    }


def to_bytes(state: dict) -> bytes:
    """``state`` serialised by ``torch.save``: one value of any size under one key, as
    ``torch.distributed.checkpoint`` needs for statistics whose shapes a fresh monitor does
    not know yet."""
    buffer = io.BytesIO()
    torch.save(_to_cpu(state), buffer)
    return buffer.getvalue()


def from_bytes(blob: bytes) -> dict:
    """A :func:`to_bytes` state, loaded with ``weights_only=True`` (tensors and plain values
    only; anything else is refused, never run).

    Raises:
        TypeError: ``blob`` is not bytes.
    """
    if not isinstance(blob, (bytes, bytearray)):
        raise TypeError(f"not a saved CollapseMonitor state: {type(blob).__name__}")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class DistributedCheckpoint:
    """A monitor as a ``torch.distributed.checkpoint`` ``Stateful``
    (:meth:`CollapseMonitor.stateful`).

    The state is one ``bytes`` value under one key: DCP loads tensors in place into a template
    of the same shapes, which a fresh monitor's lazily sized statistics cannot give. Every rank
    hands over rank 0's state (window statistics reduced over the ranks; with class shards,
    every rank's classes gathered into it: :func:`gathered`), so that the one copy DCP keeps of
    a key is the same whichever rank's it takes, and a resume behaves as one from a trainer that
    saves rank 0's state. It loads exactly at any world size: class-sharded statistics are
    re-sharded on load (:func:`for_rank`; in one process, or with more ranks than classes, all
    classes on each rank). DCP itself unpickles non-tensor values unrestricted
    (as it does an optimizer's ``param_groups``); the monitor then reads its bytes with
    ``weights_only=True``. To resume without some of the saved probes, load the value yourself
    (``dcp.load({"monitor": {"collapse_monitor": b""}}, ...)``), read it with
    :func:`from_bytes`, remove them from its ``"probes"`` and call ``load_state_dict``.

    Args:
        monitor: the :class:`~collapse_monitor.CollapseMonitor`.
        optimizer: passed to its ``load_state_dict`` (mitigations that add parameters).

    Example:
        >>> import tempfile, torch
        >>> import torch.distributed.checkpoint as dcp
        >>> from collapse_monitor import CollapseMonitor, probes
        >>> def run():
        ...     model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        ...     return CollapseMonitor(model, [probes.RepresentationRank("0", name="r")], 10)
        >>> monitor, path = run(), tempfile.mkdtemp()
        >>> with monitor.observe():
        ...     _ = monitor.model(torch.randn(8, 4))
        >>> monitor.step()
        >>> _ = dcp.save({"monitor": monitor.stateful()}, checkpoint_id=path, no_dist=True)
        >>> fresh = run()
        >>> dcp.load({"monitor": fresh.stateful()}, checkpoint_id=path, no_dist=True)
        >>> fresh.global_step
        1
        >>> monitor.close(), fresh.close()
        (None, None)
    """

    KEY = "collapse_monitor"

    def __init__(self, monitor, optimizer=None) -> None:
        self.monitor, self.optimizer = monitor, optimizer

    def state_dict(self) -> dict:
        """``{"collapse_monitor": bytes}``, rank 0's state on every rank (a collective: every
        rank calls it, as DCP does for save and for load)."""
        saved = self.monitor.state_dict(gather=True)
        group = self.monitor.process_group
        blob = to_bytes(saved) if _dist.rank(group) == 0 else None
        return {self.KEY: _dist.broadcast_object(blob, 0, group)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`state_dict` saved (see :meth:`CollapseMonitor.load_state_dict`).

        Raises:
            TypeError: the value is not bytes; ValueError, KeyError: as
                :meth:`CollapseMonitor.load_state_dict` (nothing of the monitor changes).
        """
        self.monitor.load_state_dict(from_bytes(state_dict[self.KEY]), self.optimizer)
