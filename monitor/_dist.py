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
    """In-place ``"sum"`` or ``"max"`` all-reduce; a no-op outside distributed runs."""
    if is_distributed(group):
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(tensor, op=reduce_op, group=group)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    return all_reduce_(tensor, "sum", group)


def all_reduce_max_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    return all_reduce_(tensor, "max", group)


def broadcast_(tensor: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """In-place broadcast from ``src``; a no-op outside distributed runs."""
    if is_distributed(group):
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def all_gather_object(obj: Any, group=None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` outside distributed runs."""
    if not is_distributed(group):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
