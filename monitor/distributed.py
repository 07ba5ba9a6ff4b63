"""The small public face of ``torch.distributed`` and sharded engines that integrations use.

Every function works in a single process too (rank 0 of a world of 1), so a sink or a trainer
callback needs no branch of its own for it.
"""

from __future__ import annotations

from torch import nn

from . import _dist, _sharding

DEEPSPEED_UNSUPPORTED = (
    "collapse monitor: DeepSpeed is not supported: ZeRO-3 partitions the parameters the probes "
    "read, and under every ZeRO stage the optimizer's fp32 master weights would undo a "
    "mitigation's change at the next step; use DDP, FSDP2 (ModelParallelStrategy / "
    "fully_shard) or FSDP"
)


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 outside a distributed run)."""
    return _dist.rank(group)


def is_fsdp_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` holds ``FullyShardedDataParallel`` (first generation) modules, whose
    parameters the monitor must gather through them (``CollapseMonitor.sharded_by``)."""
    return bool(_sharding.fsdp_roots(model))


def refuse_deepspeed() -> None:
    """Raise the monitor's refusal of DeepSpeed (see :data:`DEEPSPEED_UNSUPPORTED`).

    Raises:
        ValueError: always.
    """
    raise ValueError(DEEPSPEED_UNSUPPORTED)
