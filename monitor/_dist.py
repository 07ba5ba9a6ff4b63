"""Thin wrappers over ``torch.distributed`` so single-process code never touches it."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def collective_device(group=None, default: torch.device | str = "cpu") -> torch.device:
    """Where this group's collectives need their tensors: the current CUDA device for NCCL
    (which reduces nothing else), ``default`` otherwise (gloo reduces CPU tensors)."""
    if is_distributed(group) and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(default)


def all_reduce_(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place ``"sum"``, ``"max"`` or ``"min"`` all-reduce; a no-op outside distributed runs."""
    if is_distributed(group):
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        reduce_op = ops[op]
        dist.all_reduce(tensor, op=reduce_op, group=group)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    return all_reduce_(tensor, "sum", group)


def all_reduce_max_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    return all_reduce_(tensor, "max", group)


def broadcast_(tensor: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """In-place broadcast from ``group``'s rank ``src``; a no-op outside distributed runs."""
    if is_distributed(group):  # (``src``: the group's rank, as ``rank(group)`` numbers it)
        dist.broadcast(tensor, src=global_rank(group, src), group=group)
    return tensor


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``src``'s ``obj`` (picklable) on every rank; ``obj`` outside distributed runs."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=global_rank(group, src), group=group)
    return box[0]


def all_gather_object(obj: Any, group=None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` outside distributed runs."""
    if not is_distributed(group):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def global_rank(group, rank: int) -> int:
    """The default group's rank of ``group``'s rank ``rank`` (point-to-point calls take it)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def all_gather_rows(tensor: torch.Tensor, sizes: list[int], group=None) -> list[torch.Tensor]:
    """Every rank's ``tensor (sizes[r], ...)`` in rank order, the first dimension differing by
    rank (``sizes``: every rank's, known on every rank): one ``all_gather`` of copies padded to
    the largest; ``[tensor]`` outside distributed runs."""
    if not is_distributed(group):
        return [tensor]
    most = max(sizes)
    padded = tensor.new_zeros((most, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded, group=group)
    return [t[:n] for t, n in zip(out, sizes)]


def shift_exchange(tensor: torch.Tensor, hop: int, rows: int, group=None) -> torch.Tensor:
    """Send ``tensor`` to rank ``rank + hop`` and receive ``(rows, ...)`` from ``rank - hop``
    (modulo the world), in one batch of point-to-point calls; every rank calls it with the same
    ``hop``. A side with nothing to move (``numel() == 0``) skips its call, as its peer knows
    from the sizes given."""
    me, world = rank(group), world_size(group)
    out = tensor.new_empty((rows, *tensor.shape[1:]))
    ops = []
    if tensor.numel():
        ops.append(
            dist.P2POp(
                dist.isend, tensor.contiguous(), global_rank(group, (me + hop) % world), group
            )
        )
    if out.numel():
        ops.append(dist.P2POp(dist.irecv, out, global_rank(group, (me - hop) % world), group))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return out


_GROUPS: dict[tuple, object] = {}


def subgroup(ranks: tuple[int, ...]):
    """A process group of the default group's ``ranks`` (a collective of every rank, in the
    same order on all), made once per default group: a monitor built again (a trainer's
    ``validate``) takes the same one, leaking none."""
    key = (id(dist.group.WORLD), ranks)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(ranks))
    return _GROUPS[key]
