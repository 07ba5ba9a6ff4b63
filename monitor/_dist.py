"""Thin wrappers over ``torch.distributed`` so single-process code never touches it."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place SUM all-reduce; a no-op outside distributed runs."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_max_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """In-place broadcast from ``src``; a no-op outside distributed runs."""
    if is_distributed(group):
        dist.broadcast(tensor, src=src, group=group)
    return tensor
