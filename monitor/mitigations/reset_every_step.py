"""The every-step form of dead-code replacement: vector-quantize-pytorch's
``threshold_ema_dead_code`` rule, decided and written on the device with no host sync."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _dist
from .._sharding import edited, shape_of, whole
from ..contracts import Event, Replaced, StepView
from .base import optimizer_states


class EveryStepResets:
    """What ``ResetDeadCodes(..., every_step=True)`` does at every training step: the codes
    that no assignment chose in the last ``ceil(10 K / T)`` recorded steps (``T`` assignments
    per step: a code of a uniform share expects 10 hits in that time) are replaced with vectors
    of this step's batch; with ``dead_hits``, those whose EMA of hits per step (decay 0.8 from
    one, their cluster size) is below it, as vector-quantize-pytorch's
    ``threshold_ema_dead_code`` does (a replaced code starts at ``dead_hits``). The step's hits
    are what the ``CodebookUsage`` probe publishes of the step (``StepView.values``), and the
    usage EMA of the replaced codes restarts through the ``Replaced`` record returned (the
    monitor routes it to the probe). Under ``torch.distributed`` each step all-reduces the
    ``(H, K)`` hits and broadcasts rank 0's ``(H, K, D)`` draws; every rank takes part in every
    step. A failure on any rank is raised at the next log on every rank at once.

    Args:
        mitigation: the ``ResetDeadCodes`` whose codebook, batch and settings these are.
    """

    def __init__(self, mitigation) -> None:
        self.m = mitigation
        # codes replaced since the last log, and whether every write read back
        self._since_log: torch.Tensor | None = None
        self._read_back: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        # (H, K): steps since each code's last hit, or (dead_hits) its hits per step, EMA 0.8
        self._memory: torch.Tensor | None = None
        self._resumed: tuple[str, torch.Tensor] | None = None  # (device type, generator state)
        self._failure: Exception | None = None  # a failure of the steps, raised at the log

    def failed(self, exc: Exception) -> None:
        """A failure while capturing a batch (raised at the next log, on every rank)."""
        self._failure = self._failure or exc

    @torch.no_grad()
    def on_step(self, view: StepView) -> list[Replaced]:
        """One step's replacements, decided and written on the device (no host sync)."""
        group = self.m.process_group
        codebook = self.m._tensor(self.m.codebook_path)
        H, K = self.m.heads, shape_of(codebook)[-2]
        hits = view.values.get(self.m.probe, {}).get(self.m.scope, {}).get("hits")
        distributed = _dist.is_distributed(group)
        if hits is None and not distributed:
            # the probe recorded nothing of this step (it records every n-th step, or is
            # off): the EMA waits, as it would for a step that never happened
            return []
        # (H, K) hits of this step and, last, whether this rank's probe recorded it
        seen = torch.zeros(H * K + 1, dtype=torch.float64, device=codebook.device)
        if hits is not None:
            seen[:-1] = hits.reshape(-1).to(seen.device)
            seen[-1] = 1
        if distributed:
            seen = seen.to(_dist.collective_device(group, seen.device))
            _dist.all_reduce_sum_(seen, group)
        hits, recorded = seen[:-1].view(H, K), seen[-1] > 0  # (a device tensor: no sync)
        memory = self._memory_for(hits)
        if self.m.dead_hits is None:
            # steps since the code's last hit, against the steps in which a code of a uniform
            # share expects 10 hits: a code in use is missed that long with probability e^-10,
            # whatever the batch size (a fixed 2 hits per step is below what a batch of 2 K
            # gives a used code a third of the time)
            memory.copy_(torch.where(recorded, torch.where(hits > 0, 0.0, memory + 1), memory))
            patience = torch.ceil(10 * K / hits.sum(-1, keepdim=True).clamp_min(1))
            probe_dead = (memory >= patience) & recorded  # (H, K), the same on every rank
        else:  # vector-quantize-pytorch's rule: an EMA of hits per step below dead_hits
            memory.copy_(torch.where(recorded, memory.mul(0.8).add_(hits, alpha=0.2), memory))
            probe_dead = (memory < self.m.dead_hits) & recorded
        with edited(codebook) as full:
            cb = full.view(-1, K, self.m.dim)  # (H', K, D)
            shared = cb.shape[0] == 1
            dead = (probe_dead.all(0, keepdim=True) if shared else probe_dead).to(cb.device)
            drawn, chosen = torch.zeros_like(cb), torch.zeros_like(dead)
            if _dist.rank(group) == 0 and self.m._batch is not None and self._failure is None:
                try:
                    drawn, chosen = self._draw_all(cb, dead)
                except Exception as exc:  # raised at the log (rank 0 still broadcasts)
                    self._failure = exc
            dead = chosen
            if _dist.is_distributed(group):  # rank 0's draws and validity, for every rank
                packed = torch.cat([drawn, dead[..., None].to(drawn.dtype)], -1)
                _dist.broadcast_(packed, 0, group)
                drawn, dead = packed[..., :-1], packed[..., -1] > 0
            cb.copy_(torch.where(dead[..., None], drawn, cb))
        now = whole(self.m._tensor(self.m.codebook_path)).detach().view(-1, K, self.m.dim)
        ok = torch.where(dead[..., None], now == drawn, True).all()
        if self.m.ema_paths is not None:
            ema_size, ema_sum = (self.m._tensor(p) for p in self.m.ema_paths)
            ema_size = ema_size.view(-1, K)
            ema_size.copy_(torch.where(dead, self.m.reset_cluster_size, ema_size))
            ema_sum = ema_sum.view(-1, K, self.m.dim)
            ema_sum.copy_(torch.where(dead[..., None], drawn * self.m.reset_cluster_size, ema_sum))
        if isinstance(codebook, nn.Parameter):
            for _, value in optimizer_states(view.optimizers, codebook):
                with edited(value) as full:
                    rows_ = full.view(-1, K, self.m.dim)
                    rows_.copy_(torch.where(dead[..., None], 0, rows_))
        replaced = dead.expand_as(probe_dead).to(memory.device)
        fresh = 0.0 if self.m.dead_hits is None else self.m.dead_hits  # a replaced code's start
        memory.copy_(torch.where(replaced, fresh, memory))
        count = dead.sum()
        if self._since_log is not None:  # (resumed: a host tensor, moved once)
            count = count + self._since_log.to(count.device)
            ok = ok & self._read_back.to(ok.device)
        self._since_log, self._read_back = count, ok
        return [Replaced(self.m.probe, replaced, self.m.scope)]

    @property
    def _state_key(self) -> str:
        """What the memory holds, the name it is saved under: a checkpoint of the other rule is
        refused rather than read as this one's."""
        return "steps_since_hit" if self.m.dead_hits is None else "cluster_size"

    def _memory_for(self, hits: torch.Tensor) -> torch.Tensor:
        """``(H, K)`` float64 on the hits' device: steps since each code's last hit (the default
        rule) or its EMA of hits per step (``dead_hits``), vector-quantize-pytorch's start 1."""
        if self._memory is None:
            start = 0.0 if self.m.dead_hits is None else 1.0
            self._memory = torch.full_like(hits, start)
        elif self._memory.device != hits.device:  # resumed from a checkpoint
            self._memory = self._memory.to(hits.device)
        return self._memory

    def _draw_all(self, cb: torch.Tensor, dead: torch.Tensor):
        """A candidate ``(H', K, D)`` for every code from this rank's batch, drawn on the
        device, and ``dead`` narrowed to the codes whose candidate is a real position."""
        batch = self.m._batch.to(device=cb.device, dtype=cb.dtype)  # (N, Hb, D)
        valid = self.m._valid.to(cb.device)
        if self._generator is None or self._generator.device != cb.device:
            self._generator = torch.Generator(device=cb.device).manual_seed(self.m.seed)
            if self._resumed and self._resumed[0] == cb.device.type:
                self._generator.set_state(self._resumed[1])  # a checkpoint's draws go on
            self._resumed = None
        H, K, N = dead.shape[0], cb.shape[1], batch.shape[0]
        g, dev = self._generator, cb.device
        if N >= K:  # without replacement (a random permutation per head), as SoundStream draws
            pick = torch.rand(H, N, generator=g, device=dev).argsort(1)[:, :K]
        else:
            pick = torch.randint(N, (H, K), generator=g, device=dev)
        heads = torch.arange(H, device=cb.device).clamp_max(batch.shape[1] - 1)
        drawn = batch[pick, heads[:, None]]  # (H, K, D)
        if self.m.cosine:
            drawn = F.normalize(drawn, dim=-1)
        return drawn, dead & valid[pick]

    def report(self) -> list[Event]:
        """The replacements since the last log, as one event (a host sync: at the log). A
        failure on any rank is raised on every rank (all leave the steps' collectives
        together)."""
        failed = torch.tensor([float(self._failure is not None)])
        if _dist.is_distributed(self.m.process_group):
            failed = failed.to(_dist.collective_device(self.m.process_group, failed.device))
            _dist.all_reduce_sum_(failed, self.m.process_group)
        if failed.item():
            exc, self._failure = self._failure, None
            raise exc or RuntimeError(f"{self.m!r}: the every-step reset failed on another rank")
        if self._since_log is None:
            return []
        n, ok = int(self._since_log), bool(self._read_back)
        self._since_log = self._read_back = None
        if not ok:
            raise RuntimeError(
                f"{self.m!r}: wrote codes into '{self.m.codebook_path}' but did not read them back; "
                "the codebook tensor is not the model's"
            )
        if n == 0:
            return []
        info = {
            "codebook": f"{self.m.path}.{self.m.codebook_path}",
            "strategy": "random, at every step",
        }
        return [Event(self.m.name, info, count=n)]

    def state_dict(self) -> dict:
        """The dead rule's memory and the draw generator (exact resume)."""
        if self._memory is None:
            return {}
        g = self._generator  # (only rank 0 draws)
        return {
            self._state_key: self._memory.detach().cpu().clone(),
            "generator": None if g is None else (g.device.type, g.get_state()),
            # the replacements not yet reported (a host sync: checkpoints are rare)
            "since_log": None if self._since_log is None else int(self._since_log),
        }

    def load_state_dict(self, state: dict) -> None:
        other = {"steps_since_hit", "cluster_size"} - {self._state_key}
        if other & set(state):
            raise ValueError(
                f"{self.m!r}: the checkpoint holds the memory of the other dead rule "
                f"({other.pop()}); this one is '{self._state_key}' (dead_hits={self.m.dead_hits})"
            )
        self._memory = self._generator = self._resumed = None
        self._since_log = self._read_back = None
        if self._state_key in state:
            self._memory = state[self._state_key].clone()
            self._resumed = state["generator"]
            if state["since_log"] is not None:
                self._since_log = torch.tensor(state["since_log"])
                self._read_back = torch.tensor(True)
