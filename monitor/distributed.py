"""The small public face of ``torch.distributed`` and sharded engines that integrations use.

Every function works in a single process too (rank 0 of a world of 1), so a sink or a trainer
callback needs no branch of its own for it.
"""

from __future__ import annotations

from torch import nn

from . import _dist, _sharding

DEEPSPEED_MITIGATIONS = (
    "collapse monitor: under DeepSpeed only ReDo and ResetDeadCodes act, at ZeRO 1-3 (and "
    "ZeRO-0 in fp32): they write the fp32 master copy and the optimizer state through "
    "DeepSpeed's safe_set_full_fp32_param / safe_set_full_optimizer_state, which the next step "
    "would otherwise write back over the change. Refused here: {what}"
)
#: DeepSpeed's optimizers whose fp32 master copies its public API reads and writes
DEEPSPEED_MASTERS = ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3", "BF16_Optimizer")


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 outside a distributed run)."""
    return _dist.rank(group)


def is_fsdp_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` holds ``FullyShardedDataParallel`` (first generation) modules, whose
    parameters the monitor must gather through them (``CollapseMonitor.sharded_by``)."""
    return bool(_sharding.fsdp_roots(model))


def refuse_deepspeed(mitigations, optimizers=()) -> None:
    """Raise the monitor's refusal (:data:`DEEPSPEED_MITIGATIONS`) of mitigations that cannot
    act under DeepSpeed: those that add parameters (σReparam, SimVQ), and every one beside a
    DeepSpeed optimizer without a public master copy (ZeRO-0 in fp16/bf16).

    Raises:
        ValueError: such a mitigation.
    """
    if not mitigations:
        return
    for opt in map(deepspeed_optimizer, optimizers):
        if opt is not None and type(opt).__name__ not in DEEPSPEED_MASTERS:
            what = f"{type(opt).__name__} keeps fp32 copies its API does not write"
            raise ValueError(DEEPSPEED_MITIGATIONS.format(what=what))
    others = [m for m in mitigations if not getattr(m, "through_deepspeed", False)]
    if others:
        what = f"{others} (they add parameters the engine's optimizer does not hold)"
        raise ValueError(DEEPSPEED_MITIGATIONS.format(what=what))


def deepspeed_optimizer(optimizer):
    """DeepSpeed's optimizer in ``optimizer``: itself (its engine's ``optimizer``: ZeRO's, or
    the fp16/bf16 ones), or the one Accelerate's ``DeepSpeedOptimizerWrapper`` (the Hugging
    Face ``Trainer``'s) holds; None for any other, DeepSpeed's ``FusedAdam`` too (a torch
    optimizer, with no master copy)."""
    for opt in (optimizer, getattr(optimizer, "optimizer", None)):
        if type(opt).__module__.startswith("deepspeed.runtime."):
            return opt
    return None


def is_deepspeed_optimizer(optimizer) -> bool:
    """Whether ``optimizer`` is (or wraps) DeepSpeed's engine optimizer."""
    return deepspeed_optimizer(optimizer) is not None


def uses_deepspeed(model: nn.Module) -> bool:
    """Whether DeepSpeed trains ``model``: it is (or holds) a ``DeepSpeedEngine``, or its
    optimizer keeps master copies of the parameters (ZeRO 1-3)."""
    return any(_sharding.has_master(p) for p in model.parameters()) or any(
        type(m).__module__.startswith("deepspeed.") for m in model.modules()
    )
