"""One battery for every mitigation, as ``tests/harness.py`` is for every probe.

A :class:`Case` gives a small model, the monitor's probes and the mitigation, a deterministic
batch per step and rank, the loss, and how to count what the mitigation changed (the slices of
the tensors it writes, read between the start and the end of ``monitor.step()``, where nothing
else writes them; or, for a reparametrisation, the weights it parametrized). The checks in
``test_harness.py`` run every case through the same battery: each change counted in
``collapse/mitigations/<name>`` is read back in the model; DDP replicas and FSDP2 shards stay
identical on two gloo ranks; a resume is exact; a copy of the model is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from collapse_monitor import CollapseMonitor, mitigations, probes
from tests.mitigations.test_reset_dead_codes import concentrated
from tests.mitigations.test_sigma_reparam import Block
from tests.mitigations.test_simvq import AutoEncoder

STEPS, LOG = 6, 2


@dataclass
class Case:
    """One mitigation in the battery (see the module docstring)."""

    id: str
    model: Callable[[], nn.Module]
    probes: Callable[[], list]
    mitigation: Callable[[], mitigations.Mitigation]
    batch: Callable[[int, int], torch.Tensor]  # (step, rank) -> input
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    #: ``{tensor path: dim}``: the slices along ``dim`` the mitigation rewrites
    writes: dict[str, int] = field(default_factory=dict)
    #: the submodules ``fully_shard`` wraps before the root
    shards: tuple[str, ...] = ()

    def monitor(self, model: nn.Module) -> CollapseMonitor:
        return CollapseMonitor(
            model,
            self.probes(),
            LOG,
            mitigations=[self.mitigation()],
            observe_every_n_steps=1,
            strict=True,
        )

    def new(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.model()


def _tensor(model: nn.Module, path: str) -> torch.Tensor:
    owner, _, name = path.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return getattr(module, name)


def changed(case: Case, model: nn.Module, before: dict[str, torch.Tensor]) -> int:
    """The slices of the written tensors that differ from ``before``, the most of any tensor
    (a reset writes a code's row of the codebook; ReDo a unit's row in, column out)."""
    counts = []
    for path, dim in case.writes.items():
        now = _tensor(model, path).detach()
        diff = (now != before[path]).movedim(dim, 0).flatten(1).any(1)
        counts.append(int(diff.sum()))
    return max(counts, default=0)


def parametrized(model: nn.Module) -> int:
    return sum(
        parametrize.is_parametrized(m, n)
        for m in model.modules()
        for n in getattr(getattr(m, "parametrizations", None), "keys", lambda: [])()
    )


def train(case: Case, model, mon, opt, steps, rank: int = 0, forward=None):
    """``steps`` training steps; returns what the mitigation was seen to change in them."""
    forward = forward or model
    seen = 0
    for step in range(mon.global_step, mon.global_step + steps):
        x = case.batch(step, rank)
        with mon.observe():
            loss = case.loss(forward, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        before = {p: _tensor(model, p).detach().clone() for p in case.writes}
        mon.step(optimizer=opt)
        seen += changed(case, model, before)
    return seen


# ------------------------------------------------------------------------------ the cases
def _ae_loss(model, x):
    recon, commit = model(x)
    return (recon - x).pow(2).mean() + commit


def _dormant_mlp():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].bias[:8] = -20.0  # half the units never fire: dormant
    return model


def _blocks():
    return nn.Sequential(Block(), Block())


def _random(shape, step, rank):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1000 * rank + step))


CASES = [
    Case(
        "reset_dead_codes",
        AutoEncoder,
        lambda: [probes.CodebookUsage("vq", 16, ema_decay=0.5, warmup_steps=2)],
        lambda: mitigations.ResetDeadCodes("vq", every_step=False),
        lambda step, rank: concentrated(48, 8, seed=100 * rank + step),
        _ae_loss,
        writes={"vq.codebook.weight": 0},
        shards=("enc", "vq", "dec"),
    ),
    Case(
        "reset_dead_codes_every_step",
        AutoEncoder,
        lambda: [probes.CodebookUsage("vq", 16)],
        lambda: mitigations.ResetDeadCodes("vq", every_step=True),
        lambda step, rank: concentrated(48, 8, seed=100 * rank + step),
        _ae_loss,
        writes={"vq.codebook.weight": 0},
        shards=("enc", "vq", "dec"),
    ),
    Case(
        "redo",
        _dormant_mlp,
        lambda: [probes.DormantUnits("1")],
        lambda: mitigations.ReDo(),
        lambda step, rank: _random((32, 8), step, rank),
        lambda model, x: model(x).pow(2).mean(),
        writes={"0.weight": 0, "2.weight": 1},
        shards=("0", "2"),
    ),
    Case(
        "sigma_reparam",
        _blocks,
        lambda: [probes.AttentionEntropy("*.attn", name="attn")],
        lambda: mitigations.SigmaReparam("*.attn"),
        lambda step, rank: _random((2, 6, 32), step, rank),
        lambda model, x: model(x).pow(2).mean(),
        shards=("0", "1"),
    ),
    Case(
        "simvq",
        AutoEncoder,
        lambda: [probes.CodebookUsage("vq", 16)],
        lambda: mitigations.SimVQ("vq"),
        lambda step, rank: _random((32, 8), step, rank),
        _ae_loss,
        shards=("enc", "dec"),
    ),
]
