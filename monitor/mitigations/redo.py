"""ReDo: recycle dormant units (Sokar et al. 2023; dopamine's NeuronRecycler), docs/metrics.md#dormantunits."""

from __future__ import annotations

import torch
from torch import nn

from .._modules import named_modules
from .._sharding import edited, whole
from ..contracts import Event
from ..keys import layer_name
from .base import Mitigation, find_probe, optimizer_states, unheld

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _neighbours(model: nn.Module, path: str) -> tuple[str, str]:
    """The nearest Linear/Conv before and after ``path`` inside its parent ``nn.Sequential``."""
    parent_path, _, child = path.rpartition(".")
    parent = named_modules(model)[parent_path]
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

    Acts at logs where the ``DormantUnits`` probe reports dormant units (its all-reduced masks, so
    the same units on every rank); the new weights come from a generator seeded with ``seed`` and the
    step, so every rank draws the same values. An event is reported only for units whose weights
    were read back changed.

    Args:
        probe: name of the ``DormantUnits`` probe (default: the only one).
        layers: ``{probed module: (incoming layer, outgoing layer)}``; default for modules inside an
            ``nn.Sequential``: the nearest Linear/Conv before and after.
        every_n_steps: only act at logs whose step is a multiple of this (ReDo's reset period).
        seed: seed of the re-drawn weights (combined with the step).
        name: see :class:`Mitigation`.
    """

    kind = "redo"

    def __init__(
        self,
        probe: str | None = None,
        layers: dict | None = None,
        every_n_steps: int | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.probe_name = probe
        self.layers = dict(layers or {})
        self.every_n_steps = every_n_steps
        self.seed = seed

    def __repr__(self) -> str:
        return f"ReDo(name={self.name!r})"

    def attach(self, setup) -> None:
        super().attach(setup)
        info = find_probe(setup, "DormantUnits", "ReDo", self.probe_name)
        self.probe = info.name
        modules = named_modules(setup.model)
        self.pairs = {}
        for path in info.paths:
            incoming, outgoing = self.layers.get(path) or _neighbours(setup.model, path)
            self.pairs[layer_name(path)] = (modules[incoming], modules[outgoing])

    def after_log(self, view) -> list[Event]:
        if self.every_n_steps and view.step % self.every_n_steps:
            return []
        readout = view.readouts.get(self.probe)
        if readout is None:  # the probe is disabled
            return []
        touched = {}
        masks = sorted((key.layer, mask) for key, mask in readout.masks.items())
        for i, (layer, mask) in enumerate(masks):
            if not bool(mask.any()):
                continue
            incoming, outgoing = self.pairs[layer]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + view.step * 101 + i)
            changed = self._recycle(incoming, outgoing, mask, g, view.optimizers)
            if changed:
                touched[layer] = changed
        if not touched:
            return []
        return [Event(self.name, {"layers": touched}, count=sum(touched.values()))]

    @torch.no_grad()
    def _recycle(
        self, incoming: nn.Module, outgoing: nn.Module, mask: torch.Tensor, g, optimizers
    ) -> int:
        """Recycle the units in ``mask``; returns how many were read back changed.

        Every rank computes the same new values (same seed, same reduced mask) and writes
        them whole (into its shards under FSDP2)."""
        w_in, w_out = whole(incoming.weight), whole(outgoing.weight)
        dead = mask.to(w_in.device)
        if w_in.shape[0] != dead.numel() or w_out.shape[1] != dead.numel():
            raise ValueError(
                f"ReDo: {dead.numel()} units do not match incoming {tuple(w_in.shape)} "
                f"and outgoing {tuple(w_out.shape)} weights"
            )
        fresh = torch.empty(w_in.shape, dtype=torch.float32)
        nn.init.xavier_uniform_(fresh, generator=g)
        fresh = fresh.to(w_in)[dead]
        rows, cols = (dead,), (slice(None), dead)
        writes = [(incoming.weight, rows, fresh), (outgoing.weight, cols, 0)]
        if incoming.bias is not None:
            writes.append((incoming.bias, rows, 0))
        for param, index, value in writes:
            with edited(param) as full:
                full[index] = value
            unheld(self, optimizers, param)
            for _, state in optimizer_states(optimizers, param):
                with edited(state) as full:
                    full[index] = 0
        # read back from the model's own parameters
        w_in, w_out = whole(incoming.weight), whole(outgoing.weight)
        done = (w_in[dead] == fresh).flatten(1).all(1) & (w_out[:, dead] == 0).transpose(
            0, 1
        ).flatten(1).all(1)
        return int(done.sum())
