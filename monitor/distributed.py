"""The small public face of ``torch.distributed`` and sharded engines that integrations use.

Every function works in a single process too (rank 0 of a world of 1), so a sink or a trainer
callback needs no branch of its own for it.
"""

from __future__ import annotations

from torch import nn

from . import _dist, _sharding

DEEPSPEED_MITIGATIONS = (
    "collapse monitor: mitigations are not supported under DeepSpeed: its optimizer keeps the "
    "fp32 master weights (partitioned under ZeRO 1-3) that the next step writes back over a "
    "changed parameter, and a write through GatheredParameters reaches the module only. The "
    "probes work at every ZeRO stage (ZeRO-3 weights gathered at the readout): drop the "
    "mitigations, or train with DDP, FSDP2 (fully_shard) or FSDP"
)


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 outside a distributed run)."""
    return _dist.rank(group)


def is_fsdp_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` holds ``FullyShardedDataParallel`` (first generation) modules, whose
    parameters the monitor must gather through them (``CollapseMonitor.sharded_by``)."""
    return bool(_sharding.fsdp_roots(model))


def refuse_deepspeed(mitigations) -> None:
    """Raise the monitor's refusal of mitigations under DeepSpeed
    (:data:`DEEPSPEED_MITIGATIONS`) when there are any.

    Raises:
        ValueError: ``mitigations`` is not empty.
    """
    if mitigations:
        raise ValueError(DEEPSPEED_MITIGATIONS)


def is_deepspeed_optimizer(optimizer) -> bool:
    """Whether ``optimizer`` is one of DeepSpeed's (its engine's ``optimizer``)."""
    return type(optimizer).__module__.startswith("deepspeed.")


def uses_deepspeed(model: nn.Module) -> bool:
    """Whether DeepSpeed trains ``model``: it is (or holds) a ``DeepSpeedEngine``, or ZeRO-3
    partitions its parameters."""
    return any(_sharding.is_partitioned(p) for p in model.parameters()) or any(
        type(m).__module__.startswith("deepspeed.") for m in model.modules()
    )
