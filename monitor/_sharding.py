"""Sharded parameters (FSDP, FSDP2) read and written whole, the way PyTorch's own APIs do it.

FSDP2 (``fully_shard``) keeps each parameter as a ``DTensor`` shard between forwards:
:func:`whole` gathers it with ``full_tensor()`` and :func:`assign` writes a whole value back
into the local shard (``distribute_tensor`` of a value every rank holds, no communication).
FSDP (first generation) frees or flattens its parameters between forwards: the monitor reads
and writes them inside :func:`whole_parameters`, i.e. ``FullyShardedDataParallel.
summon_full_params(writeback=True)``, as transformers' ``Trainer`` and Accelerate do when they
need whole weights. Each of these is a collective: every rank calls it at the same point (the
monitor does so only at logging steps, where every rank logs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:
    try:  # torch < 2.5 (FSDP2 was torch.distributed._composable.fsdp then)
        from torch.distributed._tensor import DTensor, distribute_tensor
    except ImportError:  # a torch built without distributed support: nothing is sharded
        DTensor = distribute_tensor = None


def is_sharded(tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor``: an FSDP2 shard, or a tensor-parallel placement."""
    return DTensor is not None and isinstance(tensor, DTensor)


def is_partitioned(tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the parameter ``tensor`` (outside its module's
    forward its data is empty; ``ds_shape`` is its shape)."""
    return hasattr(tensor, "ds_id")


def shape_of(tensor: torch.Tensor) -> tuple[int, ...]:
    """The whole shape of a parameter (a ZeRO-3 partition's ``ds_shape``; a ``DTensor``'s own)."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter, optimizer state or buffer (a collective for an FSDP2 shard
    or a ZeRO-3 partition: every rank calls it)."""
    if is_sharded(tensor):
        return tensor.full_tensor()
    if is_partitioned(tensor):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):  # (read only)
            return tensor.detach().clone()
    return tensor


@torch.no_grad()
def assign(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Write the whole ``value`` into ``tensor`` (its local shard for a ``DTensor``); every
    rank passes the same ``value``."""
    if is_sharded(tensor):
        mesh, placements = tensor.device_mesh, tensor.placements
        try:  # every rank slices its own copy (no communication)
            local = distribute_tensor(value, mesh, placements, src_data_rank=None)
        except TypeError:  # torch < 2.7: scattered from rank 0, which holds the same value
            local = distribute_tensor(value, mesh, placements)
        tensor.to_local().copy_(local.to_local())
    else:
        tensor.copy_(value)


def has_master(param) -> bool:
    """Whether DeepSpeed's optimizer keeps an fp32 master copy of ``param`` that its public API
    reads and writes (``safe_get_full_fp32_param``: a trained parameter at ZeRO 1-3, and its
    bf16 optimizer's)."""
    return (hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")) and param.requires_grad


class MasterState:
    """An optimizer state of a parameter DeepSpeed's optimizer holds (``key``: Adam's
    ``exp_avg`` ...), read and written whole through DeepSpeed's public API by :func:`edited`."""

    def __init__(self, param: torch.Tensor, key: str) -> None:
        self.param, self.key = param, key


def master_states(param: torch.Tensor, optimizer) -> list[tuple[str, MasterState]]:
    """``(key, MasterState)`` of each parameter-shaped state (``exp_avg`` ...) of the torch
    optimizer inside DeepSpeed's ``optimizer`` (none before its first step). The keys come from
    its partitions' states, the same on every rank: asking DeepSpeed for a key it lacks raises
    on the ranks holding a fragment and leaves the others in a collective."""
    states = getattr(getattr(optimizer, "optimizer", None), "state", {})
    keys = {k for st in states.values() for k, v in st.items() if torch.is_tensor(v) and v.dim()}
    return [(key, MasterState(param, key)) for key in sorted(keys)]


def _write_deepspeed(param: torch.Tensor, before: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``value`` (the whole parameter, read as ``before``) into a parameter DeepSpeed
    holds: into its fp32 master copy only where the value changed (elsewhere the master keeps
    the digits the module's bf16/fp16 copy rounds away; the next step would otherwise write
    an unchanged master back over the change), read back; and into the module's copy (a ZeRO-3
    partition through ``GatheredParameters``). Collectives: every rank writes the same."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    if has_master(param):
        master = safe_get_full_fp32_param(param)
        changed = (value != before).to(master.device)
        merged = torch.where(changed, value.to(master), master)
        safe_set_full_fp32_param(param, merged)
        if not torch.equal(safe_get_full_fp32_param(param), merged):
            raise RuntimeError(
                f"DeepSpeed's fp32 master copy of a parameter {shape_of(param)} did not take "
                "the change (read back)"
            )
    if is_partitioned(param):  # every rank writes the same: rank 0's is partitioned again
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(value)
    else:
        param.data.copy_(value)


@contextlib.contextmanager
def edited(tensor) -> Iterator[torch.Tensor]:
    """Yield the whole value of ``tensor`` to change in place (no autograd); a shard gets the
    result written back, a DeepSpeed-held parameter or :class:`MasterState` through
    DeepSpeed's API (collectives: every rank makes the same change)."""
    with torch.no_grad():
        if isinstance(tensor, MasterState):
            from deepspeed.utils import (
                safe_get_full_optimizer_state,
                safe_set_full_optimizer_state,
            )

            full = safe_get_full_optimizer_state(tensor.param, tensor.key).clone()
            yield full
            safe_set_full_optimizer_state(tensor.param, full, tensor.key)
            return
        if has_master(tensor) or is_partitioned(tensor):
            before = whole(tensor).detach().clone()
            full = before.clone()
            yield full
            _write_deepspeed(tensor, before, full)
            return
        if not is_sharded(tensor):
            yield tensor.detach()
            return
        full = tensor.full_tensor().detach().clone()
        yield full
        assign(tensor, full)


def is_fsdp_flattened(tensor) -> bool:
    """Whether FSDP (first generation) manages ``tensor`` as (a view of) a flat shard; torch
    marks such parameters with ``_fsdp_flattened``."""
    return bool(getattr(tensor, "_fsdp_flattened", False))


def fsdp_roots(model: nn.Module) -> list[nn.Module]:
    """The outermost ``FullyShardedDataParallel`` (first generation) modules in ``model``."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:
        return []
    return FSDP.fsdp_modules(model, root_only=True)


@contextlib.contextmanager
def whole_parameters(model: nn.Module, writeback: bool = True) -> Iterator[None]:
    """Inside the block, FSDP (first generation) modules of ``model`` hold whole parameters,
    written back to their shards at exit (``writeback``). No-op for other models (FSDP2 shards
    are read and written per tensor with :func:`whole` and :func:`assign`).

    Raises:
        RuntimeError: ``model`` is wrapped by an FSDP module outside it (its parameters are
            flattened shards that only that wrapper can gather).
    """
    roots = fsdp_roots(model)
    covered = {id(p) for root in roots for p in root.parameters()}
    outside = [
        n for n, p in model.named_parameters() if id(p) not in covered and is_fsdp_flattened(p)
    ]
    if outside:
        raise RuntimeError(
            f"{type(model).__name__} is wrapped by a FullyShardedDataParallel module outside "
            f"it (its parameters {outside[:3]} are flattened shards the monitor cannot gather); "
            "build the CollapseMonitor on the FSDP-wrapped model (module paths stay those of "
            "the unwrapped model), or call monitor.sharded_by(fsdp_model) after wrapping"
        )
    if not roots:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with contextlib.ExitStack() as stack:
        for root in roots:
            stack.enter_context(FSDP.summon_full_params(root, writeback=writeback))
        yield
