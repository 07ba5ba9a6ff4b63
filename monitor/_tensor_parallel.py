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

#: modules that act on each feature alone: a slice of features in, the same slice out
ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Identity,
)


class TensorParallel:
    """This rank's tensor-parallel group and what ``parallelize_module`` placed where.

    Attributes:
        mesh: the 1-D tensor-parallel ``DeviceMesh`` of this rank.
        ranks: its ranks (the default group's numbers), in mesh order.
        placed: module path -> ``{parameter name: placements}`` of its tensor-parallel
            parameters (modules ``distribute_module`` marked, or holding such a ``DTensor``).
        data_group: the ranks with this rank's tensor-parallel coordinate (one per group), over
            which replicated statistics reduce; groups: every rank's tensor-parallel group;
            both set by :func:`agree`.
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

    def sliced(self, module: nn.Module | None, path: str, where: str | None) -> int | None:
        """The whole size of the last dimension when a call's ``where`` (``"output"`` or
        ``"input"``) is the module's slice of it: a column-parallel ``nn.Linear``'s output
        (weight ``Shard(0)``), a row-parallel one's input (``Shard(1)``), a column-parallel
        ``nn.Embedding``'s output (``Shard(1)``); else None."""
        dim = self.sharded_dim(path)
        if dim is None or where is None:
            return None
        shape = module.weight.shape  # (the DTensor's global shape)
        if isinstance(module, nn.Embedding):
            return shape[1] if where == "output" and dim == 1 else None
        if isinstance(module, nn.Linear):
            if (where, dim) in (("output", 0), ("input", 1)):
                return shape[dim]
        return None

    def feeders(self, named: dict[str, nn.Module], path: str) -> list[tuple[nn.Module, int]]:
        """For an elementwise module (an activation: :data:`ELEMENTWISE`, or one of
        ``transformers.activations``), its column-parallel
        ``nn.Linear`` siblings and their whole output sizes: a call whose input is one of
        their outputs (the very tensor, as an MLP's ``act(gate(x))`` passes it) holds that
        slice of the features in its input and output alike."""
        module = named.get(path)
        # (transformers' activations, ACT2FN's classes, are all pointwise too)
        pointwise = type(module).__module__ == "transformers.activations"
        if not (pointwise or isinstance(module, ELEMENTWISE)):
            return []
        parent = path.rpartition(".")[0]
        return [
            (m, m.weight.shape[0])
            for p, m in named.items()
            if p.rpartition(".")[0] == parent
            and p
            and p != path
            and isinstance(m, nn.Linear)
            and self.sharded_dim(p) == 0
        ]

    @torch.no_grad()
    def whole(
        self,
        value: Any,
        module: nn.Module | None,
        path: str,
        where: str | None,
        owner,
        features: int | None = None,
    ):
        """The whole value of one call: a ``DTensor`` on the group's mesh gathered, a slice
        :meth:`sliced` names (or of ``features`` given: an activation fed by a column-parallel
        output, :meth:`feeders`) joined over its last dimension (evenly split or not, as
        ``torch.chunk`` splits); other values as they are (a collective where it gathers).

        Raises:
            ValueError: a ``DTensor`` on another mesh, or a local slice whose size is not this
                rank's share of the module's features.
        """
        if is_sharded(value):
            mesh = value.device_mesh
            if mesh.ndim != 1 or tuple(mesh.mesh.flatten().tolist()) != self.ranks:
                raise ValueError(
                    f"{owner!r} read a DTensor at '{path}' on mesh "
                    f"{mesh.mesh_dim_names or tuple(mesh.shape)} (placements "
                    f"{tuple(value.placements)}), not the tensor-parallel mesh of its "
                    "parameters: it cannot be gathered exactly"
                )
            return value.full_tensor()
        if features is None and module is not None:
            features = self.sliced(module, path, where)
        if features is None or not isinstance(value, torch.Tensor):
            return value
        chunk = -(-features // self.size)  # (torch.chunk's split, which Shard follows)
        if chunk == features and self.size > 1:  # (the first rank's slice would be all)
            raise ValueError(
                f"{owner!r}: '{path}' has {features} feature(s) over {self.size} "
                "tensor-parallel ranks: its slices cannot be told from the whole"
            )
        if not value.is_floating_point() or value.shape[-1] == features:
            return value  # (not features; or the style's own hook gathered them already)
        mine = max(0, min(chunk, features - self.coordinate * chunk))
        if value.shape[-1] != mine:
            raise ValueError(
                f"{owner!r}: the {where} of '{path}' ({tuple(value.shape)}) is not this rank's "
                f"share ({mine}) of its {features} tensor-parallel features (placements "
                f"{self.describe(path)})"
            )
        from torch.distributed.tensor import DTensor, Shard

        shape = (*value.shape[:-1], features)
        stride = torch.empty(shape, device="meta").stride()
        local = DTensor.from_local(
            value.contiguous(),
            self.mesh,
            [Shard(value.ndim - 1)],
            run_check=False,
            shape=shape,
            stride=stride,
        )
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
                if spec is None:
                    specs = None
                else:
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
    if group not in (None, torch.distributed.group.WORLD):
        raise ValueError(
            "CollapseMonitor: tensor parallelism needs the monitor on the default process "
            "group (process_group=None)"
        )
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


def fingerprint(state: dict) -> list[float]:
    """Three numbers per tensor (or number) of a window's state that differ when two windows'
    statistics do: the log of its magnitude, its cosine-weighted sum relative to that
    magnitude (scale-free), and its NaN count; compared tensor by tensor (:func:`differing`).
    A large tensor is sampled (a slice of other features differs everywhere)."""
    out = []
    for i, (_, t) in enumerate(sorted(_tensors(state), key=lambda kv: kv[0])):
        x = torch.as_tensor(t).detach().reshape(-1)
        x = x[:: x.numel() // 65536 + 1].to("cpu", torch.float64)
        nans = x.isnan().sum()
        x = x.nan_to_num(0.0, 1e300, -1e300)
        w = torch.cos(torch.arange(x.numel(), dtype=torch.float64) * 0.7 + i)
        size = x.abs().sum()
        out += [
            float(torch.log1p(size)),
            float((x * w).sum() / size.clamp_min(1e-300)),
            float(nans),
        ]
    return out


def _tensors(state, prefix: str = ""):
    if isinstance(state, (torch.Tensor, int, float)) and not isinstance(state, bool):
        yield prefix, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(state, (list, tuple)):
        for k, v in enumerate(state):
            yield from _tensors(v, f"{prefix}/{k}")


def differing(layout: TensorParallel, prints: list[list[float] | None], group=None) -> list[bool]:
    """For each probe, whether the ranks of some tensor-parallel group hold different
    statistics (``prints``: each probe's :func:`fingerprint` on this rank, None where its
    readout failed here: not compared, the failure disables it everywhere at the next log; a
    collective).

    Each number is compared alone, to ``1e-6 (1 + |value|)``: a replicated value may differ in
    its last digits (atomics in a GPU reduction); a slice of other features differs by far
    more."""
    every = _dist.all_gather_object(prints, group)
    out = [False] * len(prints)
    for g in layout.groups:
        for i in range(len(prints)):
            mine = [every[r][i] for r in g]
            if any(p is None for p in mine):
                continue
            base = mine[0]
            for other in mine[1:]:
                out[i] |= len(other) != len(base) or any(
                    abs(a - b) > 1e-6 * (1 + abs(a)) for a, b in zip(base, other)
                )
    return out


__all__ = ["TensorParallel", "agree", "differing", "find", "fingerprint"]
