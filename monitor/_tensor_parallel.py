"""Tensor parallelism (DTensor ``parallelize_module``, a ``tp_plan``, TP under FSDP2) read exactly.

Under tensor parallelism the ranks of one tensor-parallel group run the same batch, each holding
a slice of the heads, the vocabulary or the hidden features. The monitor reads it so:

- an activation that is a ``DTensor`` is gathered whole (``full_tensor()``: ``Shard`` placements
  joined, ``Partial`` sums reduced) in the forward, as every rank of the group runs it;
- a plain tensor that is a column-parallel module's output (its weight ``Shard(0)``, the default
  ``use_local_output=True``) or a row-parallel module's input (``Shard(1)``) holds the module's
  slice of the last dimension: it is gathered so too (:meth:`TensorParallel.whole`);
- every other plain activation is taken as replicated over the group; a probe's statistics then
  reduce over the data-parallel ranks only (one per tensor-parallel coordinate), and at each log
  the ranks of a group check that they hold the same statistics (:func:`differing`): a probe
  that read a slice it could not know of is disabled with its module named, never logged;
- a probe that knows its own slice (:class:`~collapse_monitor.probes.AttentionEntropy`: heads
  of column-parallel q/k/v, keyed by their global index) sets ``tp_sharded`` and reduces over
  every rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import _dist
from ._sharding import is_sharded


class TensorParallel:
    """This rank's tensor-parallel group and what ``parallelize_module`` placed where.

    Attributes:
        mesh: the 1-D tensor-parallel ``DeviceMesh`` of this rank.
        ranks: its ranks (the default group's numbers), in mesh order.
        placed: module path -> ``{parameter name: placements}`` of its tensor-parallel
            parameters (modules ``distribute_module`` marked, or holding such a ``DTensor``).
        data_group: the ranks with this rank's tensor-parallel coordinate (one per group), over
            which replicated statistics reduce; set by :meth:`agree`.
    """

    def __init__(self, mesh, placed: dict[str, dict[str, tuple]]) -> None:
        self.mesh = mesh
        self.ranks = tuple(int(r) for r in mesh.mesh.flatten().tolist())
        self.placed = placed
        self.data_group = None
        self.groups: list[tuple[int, ...]] = []

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def coordinate(self) -> int:
        return self.mesh.get_local_rank()

    def sharded_dim(self, module_path: str, name: str = "weight") -> int | None:
        """The dimension of the module's parameter ``name`` sharded over the group, if any."""
        for p in self.placed.get(module_path, {}).get(name, ()):
            if p.is_shard():
                return p.dim
        return None

    def summary(self) -> str:
        """The tensor-parallel modules, for a message (the first five named)."""
        names = [f"'{p}'" for p in self.placed]
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        return ", ".join(names[:5]) + more

    def describe(self, path: str) -> str:
        """The placements of a module's tensor-parallel parameters, for a message."""
        mine = self.placed.get(path, {})
        return "; ".join(f"{n} {p}" for n, p in mine.items()) or "no parameters of its own"

    @torch.no_grad()
    def whole(self, value: Any, module: nn.Module | None, path: str, where: str, owner) -> Any:
        """The whole value of one call: a ``DTensor`` on the group's mesh gathered, a column-
        parallel module's output or a row-parallel module's input joined over its last
        dimension; other values as they are (a collective where it gathers).

        Raises:
            ValueError: a ``DTensor`` on another mesh, or a local slice whose size does not
                give the module's whole features.
        """
        if is_sharded(value):
            mesh = value.device_mesh
            if mesh.ndim != 1 or tuple(mesh.mesh.flatten().tolist()) != self.ranks:
                raise ValueError(
                    f"{owner!r} read a DTensor at '{path}' on mesh "
                    f"{value.device_mesh.mesh_dim_names or tuple(value.device_mesh.shape)} "
                    f"(placements {tuple(value.placements)}), not the tensor-parallel mesh of "
                    "its parameters: it cannot be gathered exactly"
                )
            return value.full_tensor()
        split = {"output": 0, "input": 1}.get(where)
        if (
            module is None
            or split is None
            or self.sharded_dim(path) != split
            or not isinstance(value, torch.Tensor)
            or not value.is_floating_point()
        ):
            return value
        from torch.distributed.tensor import DTensor, Shard

        features = module.weight.shape[split]  # (the DTensor's global shape)
        if value.shape[-1] == features:  # (the style's own hook gathered it: output_layouts)
            return value
        if value.shape[-1] * self.size != features:
            raise ValueError(
                f"{owner!r}: the {where} of '{path}' ({tuple(value.shape)}) is not a slice of "
                f"its {features} tensor-parallel features (placements {self.describe(path)})"
            )
        local = DTensor.from_local(value.contiguous(), self.mesh, [Shard(value.ndim - 1)])
        return local.full_tensor()


def find(named: dict[str, nn.Module]) -> TensorParallel | None:
    """The model's tensor-parallel layout, or None without one.

    Raises:
        ValueError: layouts that cannot be read exactly: a tensor-parallel mesh of more than one
            dimension, several meshes, FSDP2 over a ``DTensor`` whose spec is unreadable.
    """
    managed, spmd, specs = _fsdp2_params(named)
    if specs is None:
        raise ValueError(
            "CollapseMonitor: FSDP2 (fully_shard) sharded parameters that were DTensors "
            "(tensor parallelism), and their tensor-parallel placements could not be read in "
            "this torch: monitor the model under FSDP2 alone"
        )
    placed: dict[str, dict[str, tuple]] = {}
    meshes = {}
    for path, module in named.items():
        mine = {}
        flagged = bool(getattr(module, "_distribute_module_applied", False))
        for name, p in module.named_parameters(recurse=False):
            if not is_sharded(p) or id(p) in spmd:  # (SPMD: FSDP2 over data parallelism)
                continue
            got = specs.get(id(p)) if id(p) in managed else (p.device_mesh, tuple(p.placements))
            if got is None:  # FSDP2's own data-parallel shard
                continue
            mesh, placements = got
            if not flagged and all(x.is_replicate() for x in placements):
                continue
            mine[name] = placements
            meshes[tuple(mesh.mesh.flatten().tolist()), mesh.ndim] = mesh
        if mine or flagged:
            placed[path] = mine
    if not meshes:  # (none, or styles without parameters: PrepareModuleInput, ...)
        return None
    if len(meshes) > 1 or next(iter(meshes))[1] != 1:
        shapes = [m.mesh_dim_names or tuple(m.shape) for m in meshes.values()]
        raise ValueError(
            f"CollapseMonitor: tensor parallelism over {len(meshes)} meshes {shapes}: only one "
            "1-D tensor-parallel mesh is read exactly"
        )
    return TensorParallel(next(iter(meshes.values())), placed)


def _fsdp2_params(named: dict[str, nn.Module]) -> tuple[set[int], set[int], dict | None]:
    """What FSDP2 (``fully_shard``) does with the parameters, from its parameter groups
    (``FSDPParam``, private): the ids of those it manages, of those it shards over a whole SPMD
    mesh (``dp_mesh_dims``: replicated ``DTensor`` s, data parallelism), and the tensor-parallel
    ``(mesh, placements)`` of those that were ``DTensor`` s when it sharded them (by id; None
    when that spec cannot be read). Without readable groups every parameter under an
    ``FSDPModule`` counts as managed."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return set(), set(), {}
    managed, spmd, specs = set(), set(), {}
    for module in named.values():
        if not isinstance(module, FSDPModule):
            continue
        try:
            groups = module._get_fsdp_state()._fsdp_param_groups
            params = [fp for g in groups for fp in g.fsdp_params]
        except Exception:  # (private: another torch)
            managed.update(id(p) for p in module.parameters())
            continue
        for fp in params:
            managed.add(id(fp.sharded_param))
            if getattr(fp.mesh_info, "is_spmd_mesh", False):
                spmd.add(id(fp.sharded_param))
            elif getattr(fp, "is_dtensor", False) and specs is not None:
                spec = getattr(fp, "_unsharded_dtensor_spec", None)
                specs = None if spec is None else specs
                if spec is not None:
                    specs[id(fp.sharded_param)] = (spec.mesh, tuple(spec.placements))
    return managed, spmd, specs


def agree(layout: TensorParallel | None, group=None) -> None:
    """Check that the tensor-parallel groups of all ranks tile the world, and make the
    data-parallel groups (``layout.data_group``; a collective of every rank, also of one
    without tensor parallelism).

    Raises:
        ValueError: groups that overlap or differ in size, some ranks without one.
    """
    groups = _dist.all_gather_object(None if layout is None else layout.ranks, group)
    if all(g is None for g in groups):
        return
    world = _dist.world_size(group)
    unique = sorted({g for g in groups if g is not None})
    flat = sorted(r for g in unique for r in g)
    if None in groups or flat != list(range(world)) or len({len(g) for g in unique}) > 1:
        raise ValueError(
            f"CollapseMonitor: the tensor-parallel groups {unique} do not tile the {world} "
            "ranks of the monitor's process group in groups of one size (pipeline stages, "
            "expert parallelism or a process_group beside tensor parallelism are not supported)"
        )
    layout.groups = unique
    for c in range(layout.size):  # every rank makes every group, in one order
        made = _dist.subgroup(tuple(g[c] for g in unique))
        if c == layout.coordinate:
            layout.data_group = made


def fingerprint(state: dict) -> torch.Tensor:
    """Two float64 numbers that differ when two windows' statistics do: per tensor, the log of
    its total magnitude and its cosine-weighted sum relative to that magnitude (scale-free, so
    that a sentinel such as a step counter's maximum does not swamp the others)."""
    total = torch.zeros(2, dtype=torch.float64)
    for i, (_, t) in enumerate(sorted(_tensors(state), key=lambda kv: kv[0])):
        x = t.detach().reshape(-1)
        x = x[:: x.numel() // 65536 + 1]  # (a slice differs everywhere: a sample tells it)
        x = x.to("cpu", torch.float64).nan_to_num(0.0, 1e300, -1e300)
        w = torch.cos(torch.arange(x.numel(), dtype=torch.float64) * 0.7 + i)
        size = x.abs().sum()
        total += torch.stack([torch.log1p(size), (x * w).sum() / size.clamp_min(1e-300)])
    return total


def _tensors(state, prefix: str = ""):
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(state, (list, tuple)):
        for k, v in enumerate(state):
            yield from _tensors(v, f"{prefix}/{k}")


def differing(layout: TensorParallel, prints: list[torch.Tensor], group=None) -> list[bool]:
    """For each probe, whether the ranks of some tensor-parallel group hold different
    statistics (``prints``: each probe's :func:`fingerprint` on this rank; a collective)."""
    if not prints:
        return []
    mine = torch.stack(prints).to(_dist.collective_device(group))
    every = _dist.all_gather_rows(mine, [mine.shape[0]] * _dist.world_size(group), group)
    out = [False] * len(prints)
    for g in layout.groups:
        base = every[g[0]].cpu()
        for r in g[1:]:
            other = every[r].cpu()
            # (a replicated value can differ in its last digits: atomics in a GPU reduction)
            bad = ((base - other).abs() > 1e-6 * (1 + base.abs())).any(1)
            out = [o or bool(b) for o, b in zip(out, bad)]
    return out


__all__ = ["TensorParallel", "agree", "differing", "find", "fingerprint"]
