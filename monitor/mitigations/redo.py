"""ReDo: recycle dormant units (Sokar et al. 2023; dopamine's NeuronRecycler), METRICS.md 8."""

from __future__ import annotations

import torch
from torch import nn

from ..probes.logits import DormantUnits
from .base import Mitigation

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _neighbours(model: nn.Module, path: str) -> tuple[str, str]:
    """The nearest Linear/Conv before and after ``path`` inside its parent ``nn.Sequential``."""
    parent_path, _, child = path.rpartition(".")
    parent = dict(model.named_modules())[parent_path]
    if not isinstance(parent, nn.Sequential):
        raise ValueError(
            f"ReDo: '{path}' is not inside an nn.Sequential; pass layers={{'{path}': (incoming, outgoing)}}"
        )
    names = [n for n, _ in parent.named_children()]
    k = names.index(child)
    weighted = [i for i, (_, m) in enumerate(parent.named_children()) if isinstance(m, _LAYERS)]
    before = [i for i in weighted if i <= k]
    after = [i for i in weighted if i > k]
    if not before or not after:
        raise ValueError(
            f"ReDo: no Linear/Conv before and after '{path}' in its nn.Sequential; pass layers="
        )
    prefix = parent_path + "." if parent_path else ""
    return prefix + names[before[-1]], prefix + names[after[0]]


class ReDo(Mitigation):
    """Re-initialise dormant units: incoming weights re-drawn (Xavier uniform, bias 0), outgoing
    weights zeroed (so the network's output is unchanged at the reset), and the optimizer state of
    the touched rows and columns zeroed (Adam moments; the step count is kept).

    Acts at logs where the ``DormantUnits`` probe reports dormant units (its all-reduced scores, so
    the same units on every rank); the new weights come from a generator seeded with ``seed`` and the
    step, so every rank draws the same values.

    Args:
        probe: name of the ``DormantUnits`` probe (default: the only one).
        layers: ``{probed module: (incoming layer, outgoing layer)}``; default for modules inside an
            ``nn.Sequential``: the nearest Linear/Conv before and after.
        every_n_steps: only act at logs whose step is a multiple of this (ReDo's reset period).
    """

    name = "redo"

    def __init__(
        self,
        probe: str | None = None,
        layers: dict | None = None,
        every_n_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        self.probe_name, self.layers, self.every_n_steps, self.seed = (
            probe,
            dict(layers or {}),
            every_n_steps,
            seed,
        )

    def attach(self, model: nn.Module, monitor) -> None:
        found = [
            p
            for p in monitor.probes
            if isinstance(p, DormantUnits)
            and (self.probe_name is None or p.name == self.probe_name)
        ]
        if len(found) != 1:
            raise ValueError(
                f"ReDo needs one DormantUnits probe{' named ' + repr(self.probe_name) if self.probe_name else ''}; "
                f"the monitor has {[p.name for p in monitor.probes]}"
            )
        self.probe = found[0]
        modules = dict(model.named_modules())
        self.pairs = {}
        for layer in self.probe.layers:
            incoming, outgoing = self.layers.get(layer) or _neighbours(model, layer)
            self.pairs[layer] = (modules[incoming], modules[outgoing])

    def after_log(self, monitor, metrics, alerts, optimizer):
        step = monitor.global_step
        if self.every_n_steps and step % self.every_n_steps:
            return []
        touched = {}
        for i, (layer, mask) in enumerate(sorted(self.probe.dormant_masks().items())):
            if not bool(mask.any()):
                continue
            incoming, outgoing = self.pairs[layer]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 101 + i)
            self._recycle(incoming, outgoing, mask, g, optimizer)
            touched[layer] = int(mask.sum())
        if not touched:
            return []
        return [(self.name, {"layers": touched, "count": sum(touched.values())})]

    @torch.no_grad()
    def _recycle(
        self, incoming: nn.Module, outgoing: nn.Module, mask: torch.Tensor, g, optimizer
    ) -> None:
        dead = mask.to(incoming.weight.device)
        if incoming.weight.shape[0] != dead.numel() or outgoing.weight.shape[1] != dead.numel():
            raise ValueError(
                f"ReDo: {dead.numel()} units do not match incoming {tuple(incoming.weight.shape)} "
                f"and outgoing {tuple(outgoing.weight.shape)} weights"
            )
        fresh = torch.empty(incoming.weight.shape, dtype=torch.float32)
        nn.init.xavier_uniform_(fresh, generator=g)
        incoming.weight[dead] = fresh.to(incoming.weight)[dead]
        if incoming.bias is not None:
            incoming.bias[dead] = 0
        outgoing.weight[:, dead] = 0
        if optimizer is None:
            return
        for param, index in (
            (incoming.weight, (dead,)),
            (incoming.bias, (dead,)),
            (outgoing.weight, (slice(None), dead)),
        ):
            if param is None:
                continue
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value[index] = 0
