"""Dead-code replacement for vector quantisers (SoundStream; vector-quantize-pytorch), METRICS.md 2."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .. import _dist
from .._modules import resolve_modules
from .._sharding import edited, whole
from ..contracts import Event
from ..keys import MetricKey
from ..probes.base import layer_name
from ..probes.codebook import CodebookUsage
from ..reading import describe, first_input, is_index, single_index_tensor
from ..stats import WindowView
from .base import Mitigation

log = logging.getLogger(__name__)

_CODEBOOK_NAMES = ("embed", "codebook", "embedding", "embeddings", "weight")


def find_codebook(
    mod: nn.Module, name: str | None, num_codes: int | None, owner: str, path: str
) -> tuple[str, torch.Tensor]:
    """The codebook of the quantiser ``mod`` (at ``path``), as ``(name relative to mod,
    tensor)``: ``name`` (an ``nn.Embedding`` submodule, a parameter or a buffer); by default the
    only ``nn.Embedding`` inside, else the one parameter or buffer named
    ``embed``/``codebook``/``embedding``/``embeddings`` (or ``weight``, when ``num_codes``
    is given) shaped ``(K, D)`` or ``(H, K, D)`` with ``K = num_codes``."""
    tensors = {}
    for n, t in [*mod.named_parameters(), *mod.named_buffers()]:
        head, sep, tail = n.partition("parametrizations.")
        if not sep:
            tensors[n] = t
        elif tail.endswith(".original"):  # a parametrized tensor, under its own name
            tensors[head + tail.removesuffix(".original")] = t
    if name is not None:
        subs = dict(mod.named_modules())
        if name in subs and isinstance(subs[name], nn.Embedding):
            return name + ".weight", tensors[name + ".weight"]
        if name in tensors:
            return name, tensors[name]
        raise KeyError(
            f"{owner}: no nn.Embedding, parameter or buffer '{name}' in '{path}'; it has "
            f"{sorted(tensors)}"
        )
    embeddings = [(n, m) for n, m in mod.named_modules() if isinstance(m, nn.Embedding)]
    if len(embeddings) == 1:
        path_ = (embeddings[0][0] + "." if embeddings[0][0] else "") + "weight"
        return path_, tensors[path_]  # a parametrized weight: its original parameter
    shaped = [
        n
        for n, t in tensors.items()
        if t.ndim in (2, 3) and (num_codes is None or t.shape[-2] == num_codes)
    ]
    # a plain "weight" only when the code count tells it from a projection's
    for wanted in _CODEBOOK_NAMES if num_codes is not None else _CODEBOOK_NAMES[:-1]:
        named = [n for n in shaped if n.rsplit(".", 1)[-1] == wanted]
        if len(named) == 1:
            return named[0], tensors[named[0]]
    K = "K" if num_codes is None else num_codes
    raise ValueError(
        f"{owner}: cannot tell which tensor of '{path}' is the codebook (candidates shaped "
        f"(..., {K}, D): {shaped}); pass codebook='<name>'"
    )


class ResetDeadCodes(Mitigation):
    """Replace dead codes with encoder outputs of the current batch, identically on every rank.

    At a log where the :class:`~collapse_monitor.probes.CodebookUsage` probe of ``module`` reports
    dead codes (its EMA usage below threshold, all-reduced, so the same on every rank), each dead
    code is overwritten with a vector of the current batch's input to ``module``, drawn only from
    rows that hold a real position (not masked, not marked ``-1``) and in the codebook's space
    (projected, l2-normalised for cosine codebooks); rank 0 draws, then broadcasts; and:

    - EMA codebooks: the cluster-size buffer of the replaced codes is set to
      ``reset_cluster_size`` and the embedding-sum buffer to ``vector * reset_cluster_size``, so
      the next EMA update keeps the new vector (buffers named ``cluster_size`` / ``embed_avg``
      beside the codebook are found; ``ema_cluster_size=`` / ``ema_embed_sum=`` name others);
    - learned codebooks: every optimizer state tensor shaped like the codebook (Adam
      ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, SGD ``momentum_buffer``, ...) has the
      replaced rows zeroed; the step count is kept. Pass the optimizer to ``monitor.step``;
      optimizers that keep state in another shape are left untouched (logged in the event);
    - the probe's usage EMA of the replaced codes restarts at a uniform share.

    Each reset is an event ``reset_dead_codes`` in every sink with the codebook and the number of
    codes (after reading the replaced rows back from the module's codebook), and the running
    total is logged as ``collapse/mitigations/<name>``.

    Args:
        module: path of the quantiser (the probed module).
        probe: name of its ``CodebookUsage`` probe (default: the one on ``module``).
        codebook: the codebook, relative to ``module``: an ``nn.Embedding`` submodule, or a
            parameter/buffer name; default: the only ``nn.Embedding`` inside, else a parameter or
            buffer named ``embed``/``codebook``/``embedding`` shaped ``(K, D)`` or ``(H, K, D)``.
        strategy: ``"random"`` (default: batch vectors drawn uniformly, without replacement when
            the batch is large enough) or ``"farthest"`` (the batch vectors farthest from every
            code).
        every_n_steps: only act at logs whose step is a multiple of this.
        every_step: act at every training step instead of at logs, as vector-quantize-pytorch's
            ``threshold_ema_dead_code`` does: a code is dead when its EMA of hits per step
            (decay 0.8 from one, its cluster size) is below ``dead_hits``; a replaced code
            starts at ``dead_hits``, so one that the next batch does not choose is replaced
            again. Decided and written on the device with no host sync; under
            ``torch.distributed`` each step all-reduces the ``(H, K)`` hit counts and
            broadcasts rank 0's ``(H, K, D)`` draws. The replacements since the last log are one
            event at the log (every write is read back on the device, checked at the log).
        dead_hits: the ``every_step`` threshold in hits per step; default the module's
            ``threshold_ema_dead_code`` when positive, else 2 (vector-quantize-pytorch's usual
            value).
        when_rule: only act at logs where this rule fired.
        vectors: ``vectors(module, args, output) -> (N, D)`` (or ``(N, H, D)``) when the module's
            input is not in codebook space. Not needed for vector-quantize-pytorch's
            ``VectorQuantize``: the input of its codebook module is read, already projected
            (``codebook_dim``), split into heads and l2-normalised for cosine codebooks.
        reset_cluster_size: EMA cluster size given to a replaced code; default the module's
            ``threshold_ema_dead_code`` when positive, else 1.
        normalize: l2-normalise the replacement vectors (a cosine-similarity codebook holds unit
            vectors); default: the codebook module's ``use_cosine_sim``, else False.
        seed: seed of rank 0's draws (combined with the step).
        name: see :class:`~collapse_monitor.mitigations.Mitigation` (default
            ``"reset_dead_codes"``).
    """

    kind = "reset_dead_codes"

    def __init__(
        self,
        module: str,
        probe: str | None = None,
        codebook: str | None = None,
        strategy: str = "random",
        every_n_steps: int | None = None,
        every_step: bool = False,
        dead_hits: float | None = None,
        when_rule: str | None = None,
        vectors=None,
        ema_cluster_size: str | None = None,
        ema_embed_sum: str | None = None,
        reset_cluster_size: float | None = None,
        normalize: bool | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if strategy not in ("random", "farthest"):
            raise ValueError(f"strategy must be 'random' or 'farthest', got {strategy!r}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.module = module
        self.probe_name = probe
        self.codebook_name = codebook
        self.strategy = strategy
        self.every_n_steps = every_n_steps
        self.every_step = every_step
        self.dead_hits = dead_hits
        if every_step and (every_n_steps or when_rule or strategy != "random"):
            raise ValueError(
                "every_step=True acts at every step with random draws: no every_n_steps, "
                "when_rule or strategy='farthest'"
            )
        self.when_rule = when_rule
        self.vectors = vectors
        self.ema_names = (ema_cluster_size, ema_embed_sum)
        self.reset_cluster_size = reset_cluster_size
        self.normalize = normalize
        self.seed = seed
        self._batch: torch.Tensor | None = None  # (N, H, D) of the logging step
        self._valid: torch.Tensor | None = None  # (N,) rows that hold a real position
        # every_step: codes replaced since the last log, and whether every write read back
        self._since_log: torch.Tensor | None = None
        self._read_back: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        self._cluster_size: torch.Tensor | None = None  # (H, K) hits per step, EMA 0.8
        self._resumed: tuple[str, torch.Tensor] | None = None  # (device type, generator state)
        self._failure: Exception | None = None  # an every-step failure, raised at the log

    def __repr__(self) -> str:
        return f"ResetDeadCodes(module={self.module!r}, name={self.name!r})"

    # ----------------------------------------------------------------- wiring
    def attach(self, setup) -> None:
        super().attach(setup)
        found = resolve_modules(setup.model, self.module, owner=repr(self))
        if len(found) != 1:
            raise ValueError(f"{self!r}: needs one module, matched {[n for n, _ in found]}")
        self.path, mod = found[0]
        self._quantizer = mod
        self.process_group = setup.process_group
        probe = self._probe = self._find_probe(setup.probes)
        self.probe, self.num_codes, self.heads = probe.name, probe.num_codes, probe.heads
        self.scope = None if probe.scopes == [None] else layer_name(self.path)
        self.codebook_path, codebook = find_codebook(
            mod, self.codebook_name, self.num_codes, f"{self!r}", self.path
        )
        K, heads = self.num_codes, self.heads
        shape = tuple(codebook.shape)
        if not (len(shape) == 2 and shape[0] == K and heads == 1) and not (
            len(shape) == 3 and shape[1] == K and shape[0] in (1, heads)
        ):
            raise ValueError(
                f"{self!r}: codebook '{self.codebook_path}' has shape {shape}; expected "
                f"({K}, D) or ({heads}, {K}, D) for num_codes={K}, heads={heads}"
            )
        self.dim = shape[-1]
        self.ema_paths = self._find_ema_buffers(mod)
        threshold = getattr(mod, "threshold_ema_dead_code", 0) or 0
        if self.dead_hits is None:
            self.dead_hits = float(threshold) if threshold > 0 else 2.0
        if self.reset_cluster_size is None:  # as vector-quantize-pytorch: its dead threshold
            fallback = self.dead_hits if self.every_step else 1.0
            self.reset_cluster_size = float(threshold) if threshold > 0 else fallback
        if self.every_n_steps and self.every_n_steps % setup.log_every_n_steps:
            raise ValueError(
                f"{self!r}: every_n_steps={self.every_n_steps} must be a multiple of "
                f"log_every_n_steps={setup.log_every_n_steps} (decisions are taken at logs)"
            )
        # vector-quantize-pytorch: the codebook module's input is already in codebook space
        # (projected, split into heads, l2-normalised for cosine codebooks) and gets the mask
        inner = mod.get_submodule(self.codebook_path.rpartition(".")[0])
        self._vq_codebook = inner is not mod and hasattr(inner, "transform_input")
        self.cosine = (
            bool(getattr(inner, "use_cosine_sim", False))
            if self.normalize is None
            else self.normalize
        )
        if self._vq_codebook:
            self._hooks.forward_pre(inner, self._capture_codebook_input)
        else:
            self._hooks.forward(mod, self._capture_call)

    def _find_probe(self, probes) -> CodebookUsage:
        usage = [p for p in probes.values() if isinstance(p, CodebookUsage)]
        if self.probe_name is not None:
            hits = [p for p in usage if p.name == self.probe_name]
        else:
            hits = [p for p in usage if self.module in (p.module, *p.paths)]
        if len(hits) != 1:
            which = f"named {self.probe_name!r}" if self.probe_name else f"on {self.module!r}"
            raise ValueError(
                f"{self!r}: needs one CodebookUsage probe ({which}); the monitor has "
                f"{[p.name for p in usage]}"
            )
        return hits[0]

    def _tensor(self, path: str) -> torch.Tensor:
        """The quantiser's tensor at ``path``, by attribute (FSDP's flattened modules keep
        their tensors as attributes, not as parameters)."""
        owner, _, leaf = path.rpartition(".")
        return getattr(self._quantizer.get_submodule(owner) if owner else self._quantizer, leaf)

    def _find_ema_buffers(self, mod: nn.Module) -> tuple[str, str] | None:
        buffers = dict(mod.named_buffers())
        prefix = self.codebook_path.rsplit(".", 1)[0] + "." if "." in self.codebook_path else ""
        size_name = self.ema_names[0] or prefix + "cluster_size"
        sum_name = self.ema_names[1] or prefix + "embed_avg"
        found = size_name in buffers and sum_name in buffers
        if any(n is not None for n in self.ema_names) and not found:
            raise KeyError(
                f"{self!r}: EMA buffers {self.ema_names} not found; buffers: {sorted(buffers)}"
            )
        return (size_name, sum_name) if found else None

    def _capture_call(self, module, args, kwargs, output) -> None:
        if self._active:
            self._capture(self._keep_input, args, kwargs, output)

    def _capture_codebook_input(self, module, args, kwargs) -> None:
        if self._active:
            self._capture(self._keep_codebook_input, args, kwargs)

    def _capture(self, keep, *args) -> None:
        if not self.every_step:
            self.guarded(keep, *args)
            return
        # every step: a failure must not take this rank out of the steps' collectives; it is
        # raised at the log, on every rank at once
        try:
            keep(*args)
        except Exception as exc:
            self._failure = self._failure or exc

    def _capturing(self) -> bool:
        if self._recording.snapshot:
            return False
        return self.every_step or self._recording.logging

    def _keep_input(self, args, kwargs, output) -> None:
        """Keep the quantiser's input on a step a reset may use (the pool of replacements), with the rows
        that hold a real position: where its ``mask=`` (``(B, N)``, true for real positions) is
        true and, for one codebook, where the indices it returned are not ``-1``."""
        if not self._capturing():
            return
        vecs = (
            self.vectors(self._quantizer, args, output)
            if self.vectors
            else first_input(args, kwargs)
        )
        if not isinstance(vecs, torch.Tensor) or vecs.shape[-1] != self.dim:
            raise ValueError(
                f"{self!r}: expected the input of '{self.path}' to be (..., {self.dim}) vectors "
                f"in codebook space, got {describe(vecs)}; pass vectors=lambda module, args, "
                "output: (N, D) tensor"
            )
        heads = self.heads if self._codebooks() > 1 else 1
        batch = vecs.detach().reshape(-1, heads, self.dim)
        valid = torch.ones(batch.shape[0], dtype=torch.bool, device=batch.device)
        mask = kwargs.get("mask")
        if isinstance(mask, torch.Tensor) and mask.numel() == batch.shape[0]:
            valid &= mask.bool().reshape(-1).to(batch.device)
        idx = single_index_tensor(output)
        if heads == 1 and is_index(idx) and idx.numel() == batch.shape[0]:
            valid &= idx.reshape(-1).to(batch.device) != -1
        self._batch, self._valid = batch, valid

    def _keep_codebook_input(self, args, kwargs) -> None:
        """vector-quantize-pytorch's codebook input: ``(h, b, n, d)`` (``(b, n, d)`` for one
        head), rows ordered as its own masking orders them."""
        if not self._capturing():
            return
        x = first_input(args, kwargs).detach()
        x = x if x.ndim == 4 else x[None]
        h = x.shape[0]
        rows = x.shape[1] * x.shape[2]
        flat = x.reshape(h, rows, x.shape[-1]).transpose(0, 1)  # (rows, h, d)
        mask = kwargs.get("mask")
        valid = torch.ones(rows, dtype=torch.bool, device=flat.device)
        if isinstance(mask, torch.Tensor):
            b, n = mask.shape
            valid = mask.bool()[:, None, :].expand(b, rows // (b * n), n).reshape(-1)
        self._batch, self._valid = flat, valid.to(flat.device)

    def _codebooks(self) -> int:
        cb = self._tensor(self.codebook_path)
        return cb.shape[0] if cb.ndim == 3 else 1

    # ----------------------------------------------------------------- action
    def after_log(self, view) -> list[Event]:
        try:
            return self._report_steps() if self.every_step else self._reset(view)
        finally:
            self._batch = self._valid = None

    def on_step(self, optimizer) -> None:
        if not self.every_step:
            return
        if self._batch is None and not _dist.is_distributed(self.process_group):
            return  # (under DDP every rank takes part in every step's collectives)
        try:
            self._reset_now(optimizer)
        finally:
            self._batch = self._valid = None

    @torch.no_grad()
    def _reset_now(self, optimizer) -> None:
        """One step's replacements, decided and written on the device (no host sync)."""
        group = self.process_group
        window = WindowView(self._probe.window, self.scope)
        hits = window["step"].counts.to(torch.float64)  # (H, K), this step's
        if _dist.is_distributed(group):
            _dist.all_reduce_sum_(hits, group)
        if self._cluster_size is None:
            self._cluster_size = torch.ones_like(hits)  # vector-quantize-pytorch's start
        elif self._cluster_size.device != hits.device:  # resumed from a checkpoint
            self._cluster_size = self._cluster_size.to(hits.device)
        size = self._cluster_size.mul_(0.8).add_(hits, alpha=0.2)
        probe_dead = size < self.dead_hits  # (H, K), the same on every rank
        codebook = self._tensor(self.codebook_path)
        K = codebook.shape[-2]
        with edited(codebook) as full:
            cb = full.view(-1, K, self.dim)  # (H', K, D)
            shared = cb.shape[0] == 1
            dead = (probe_dead.all(0, keepdim=True) if shared else probe_dead).to(cb.device)
            drawn, chosen = torch.zeros_like(cb), torch.zeros_like(dead)
            if _dist.rank(group) == 0 and self._batch is not None and self._failure is None:
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
        now = whole(self._tensor(self.codebook_path)).detach().view(-1, K, self.dim)
        ok = torch.where(dead[..., None], now == drawn, True).all()
        if self.ema_paths is not None:
            ema_size, ema_sum = (self._tensor(p) for p in self.ema_paths)
            ema_size = ema_size.view(-1, K)
            ema_size.copy_(torch.where(dead, self.reset_cluster_size, ema_size))
            ema_sum = ema_sum.view(-1, K, self.dim)
            ema_sum.copy_(torch.where(dead[..., None], drawn * self.reset_cluster_size, ema_sum))
        if isinstance(codebook, nn.Parameter) and optimizer is not None:
            for value in optimizer.state.get(codebook, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == codebook.shape:
                    with edited(value) as full:
                        rows_ = full.view(-1, K, self.dim)
                        rows_.copy_(torch.where(dead[..., None], 0, rows_))
        replaced = dead.expand_as(probe_dead).to(size.device)
        size.copy_(torch.where(replaced, self.dead_hits, size))
        window["ema"].restart(replaced)
        count = dead.sum()
        if self._since_log is not None:  # (resumed: a host tensor, moved once)
            count = count + self._since_log.to(count.device)
            ok = ok & self._read_back.to(ok.device)
        self._since_log, self._read_back = count, ok

    def _draw_all(self, cb: torch.Tensor, dead: torch.Tensor):
        """A candidate ``(H', K, D)`` for every code from this rank's batch, drawn on the
        device, and ``dead`` narrowed to the codes whose candidate is a real position."""
        batch = self._batch.to(device=cb.device, dtype=cb.dtype)  # (N, Hb, D)
        valid = self._valid.to(cb.device)
        if self._generator is None or self._generator.device != cb.device:
            self._generator = torch.Generator(device=cb.device).manual_seed(self.seed)
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
        if self.cosine:
            drawn = F.normalize(drawn, dim=-1)
        return drawn, dead & valid[pick]

    def state_dict(self) -> dict:
        """The every-step cluster sizes and draw generator (exact resume)."""
        if self._cluster_size is None:
            return {}
        g = self._generator  # (only rank 0 draws)
        return {
            "cluster_size": self._cluster_size.detach().cpu().clone(),
            "generator": None if g is None else (g.device.type, g.get_state()),
            # the replacements not yet reported (a host sync: checkpoints are rare)
            "since_log": None if self._since_log is None else int(self._since_log),
        }

    def load_state_dict(self, state: dict, optimizer=None) -> None:
        self._cluster_size = self._generator = self._resumed = None
        self._since_log = self._read_back = None
        if "cluster_size" in state:
            self._cluster_size = state["cluster_size"].clone()
            self._resumed = state["generator"]
            if state["since_log"] is not None:
                self._since_log = torch.tensor(state["since_log"])
                self._read_back = torch.tensor(True)

    def _report_steps(self) -> list[Event]:
        """The every-step replacements since the last log, as one event (a host sync: at the
        log). A failure on any rank is raised on every rank (all leave the steps' collectives
        together)."""
        failed = torch.tensor([float(self._failure is not None)])
        if _dist.is_distributed(self.process_group):
            failed = failed.to(_dist.collective_device(self.process_group, failed.device))
            _dist.all_reduce_sum_(failed, self.process_group)
        if failed.item():
            exc, self._failure = self._failure, None
            raise exc or RuntimeError(f"{self!r}: the every-step reset failed on another rank")
        if self._since_log is None:
            return []
        n, ok = int(self._since_log), bool(self._read_back)
        self._since_log = self._read_back = None
        if not ok:
            raise RuntimeError(
                f"{self!r}: wrote codes into '{self.codebook_path}' but did not read them back; "
                "the codebook tensor is not the model's"
            )
        if n == 0:
            return []
        info = {
            "codebook": f"{self.path}.{self.codebook_path}",
            "strategy": "random, at every step",
        }
        return [Event(self.name, info, count=n)]

    def _reset(self, view) -> list[Event]:
        if self.every_n_steps and view.step % self.every_n_steps:
            return []
        if self.when_rule is not None and not any(a.rule == self.when_rule for a in view.alerts):
            return []
        readout = view.readouts.get(self.probe)
        if readout is None:  # the probe is disabled
            return []
        probe_dead = readout.masks[MetricKey(self.probe, "dead", self.scope)]  # (H, K), every rank
        codebook = self._tensor(self.codebook_path)
        K = codebook.shape[-2]
        # a codebook shared by all heads: a code is dead when no head uses it
        shared = codebook.ndim == 2 or codebook.shape[0] == 1
        dead = probe_dead.all(0, keepdim=True) if shared else probe_dead
        heads, codes = torch.nonzero(dead, as_tuple=True)
        n = heads.numel()
        if n == 0:
            return []
        with edited(codebook) as full:  # the whole codebook (under FSDP2 gathered, written back)
            cb = full.view(-1, K, self.dim)  # (H', K, D)
            heads, codes = heads.to(cb.device), codes.to(cb.device)
            drawn = self._drawn_on_rank_zero(cb, heads, codes, view.step)
            if drawn is None:
                return []
            cb[heads, codes] = drawn
        if self.ema_paths is not None:
            size, total = (self._tensor(p) for p in self.ema_paths)
            with torch.no_grad():
                size.view(-1, K)[heads, codes] = self.reset_cluster_size
                total.view(-1, K, self.dim)[heads, codes] = (
                    drawn.to(total.dtype) * self.reset_cluster_size
                )
        # read back from the module's own tensor: a codebook that is not the model's any more
        # (replaced, resharded) must not be reported as reset
        now = whole(self._tensor(self.codebook_path)).detach()
        changed = (now.view(-1, K, self.dim)[heads, codes] == drawn).all(1)
        if not bool(changed.all()):
            raise RuntimeError(
                f"{self!r}: wrote {n} codes into '{self.codebook_path}' but read back "
                f"{int(changed.sum())} of them changed; the codebook tensor is not the model's"
            )
        zeroed = self._zero_optimizer_rows(view.optimizer, codebook, heads, codes)
        info = {
            "codebook": f"{self.path}.{self.codebook_path}",
            "per_head": torch.bincount(heads, minlength=cb.shape[0]).tolist(),
            "strategy": self.strategy,
            "optimizer_state": zeroed,
        }
        replaced = dead.expand_as(probe_dead).to(probe_dead.device)
        return [
            Event(self.name, info, count=n, probe=self.probe, replaced=replaced, scope=self.scope)
        ]

    def _drawn_on_rank_zero(self, cb, heads, codes, step: int) -> torch.Tensor | None:
        """Rank 0 draws the ``(n, D)`` new codes and broadcasts them; ``None`` when it had no
        batch vectors. Every rank reaches the broadcast, even when rank 0's draw fails."""
        drawn = torch.full(
            (heads.numel(), self.dim), float("nan"), dtype=cb.dtype, device=cb.device
        )
        failure = None
        if _dist.rank(self.process_group) == 0 and self._batch is not None:
            try:
                drawn.copy_(self._draw(cb, heads, codes, step))
            except Exception as exc:
                failure = exc
        _dist.broadcast_(drawn, 0, self.process_group)
        if failure is not None:
            raise failure
        if not bool(torch.isfinite(drawn).all()):
            log.warning("%r: no batch vectors were captured at step %d; nothing reset", self, step)
            return None
        return drawn

    def _draw(self, cb, heads, codes, step: int) -> torch.Tensor:
        """Rank 0's replacement vectors ``(n, D)`` from its captured batch ``(N, H, D)``."""
        # only rows that hold a real position (selected here, at the log, not in the hook)
        batch = self._batch[self._valid].to(device=cb.device, dtype=cb.dtype)
        if not batch.shape[0]:
            raise ValueError(f"{self!r}: the captured batch holds no valid (unmasked) row")
        g = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + step)
        out = torch.empty(heads.numel(), self.dim, dtype=cb.dtype, device=cb.device)
        for h in heads.unique().tolist():  # a loop over heads (few), never over codes
            rows = (heads == h).nonzero().flatten()
            pool = batch[:, min(h, batch.shape[1] - 1)]
            m, N = rows.numel(), pool.shape[0]
            if self.strategy == "farthest":
                dist2 = torch.cdist(pool, cb[h]).min(1).values
                pick = dist2.argsort(descending=True)[torch.arange(m) % N]
            elif N >= m:
                pick = torch.randperm(N, generator=g)[:m]
            else:
                pick = torch.randint(N, (m,), generator=g)
            out[rows] = pool[pick.to(pool.device)]
        # a cosine-similarity codebook holds unit vectors: so must its new codes
        return F.normalize(out, dim=-1) if self.cosine else out

    def _zero_optimizer_rows(self, optimizer, codebook, heads, codes) -> str:
        if not isinstance(codebook, nn.Parameter):
            return "buffer (no optimizer state)"
        if optimizer is None:
            return "not given: pass optimizer= to monitor.step() to zero its moments"
        zeroed = []
        for key, value in optimizer.state.get(codebook, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == codebook.shape:
                with edited(value) as full:
                    full.view(-1, codebook.shape[-2], self.dim)[heads, codes] = 0
                zeroed.append(key)
        return (
            "zeroed " + ", ".join(sorted(zeroed)) if zeroed else "no state shaped like the codebook"
        )
