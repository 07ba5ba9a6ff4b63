"""Dead-code replacement for vector quantisers (SoundStream; vector-quantize-pytorch), at logs
or at every step (see ``docs/metrics.md#codebookusage``)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .. import _dist
from .._modules import resolve_modules
from .._sharding import edited, shape_of, whole
from ..contracts import Event, Replaced
from ..keys import MetricKey
from ..reading import describe, finite_rows, first_input, is_index, single_index_tensor
from .base import Mitigation, find_probe, optimizer_states, unheld
from .codebooks import find_codebook, holders_outside
from .reset_every_step import EveryStepResets

log = logging.getLogger(__name__)


class ResetDeadCodes(Mitigation):
    """Replace dead codes with encoder outputs of the current batch, identically on every rank.

    By default at every training step, as vector-quantize-pytorch's ``threshold_ema_dead_code``
    does, with a dead rule that adapts to the batch (``every_step``, ``dead_hits`` below): on a
    VQ autoencoder it matches that anchor (training usage over steps 26-50, reconstruction MSE
    over steps 76-100: benchmarks/RESULTS.md section 7), which the form acting at logs does not
    (its usage EMA, decay 0.99, takes hundreds of steps to call a code dead), and it leaves a
    healthy codebook alone. Giving ``every_n_steps``, ``when_rule`` or ``strategy="farthest"`` (or
    ``every_step=False``) selects the form acting at logs:

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
      replaced rows zeroed, in every optimizer that holds the codebook; the step count is kept.
      Pass the optimizers to ``monitor.step``; optimizers that keep state in another shape are
      left untouched (logged in the event);
    - the probe's usage EMA of the replaced codes restarts at a uniform share.

    Under DeepSpeed (ZeRO 0-3) a learned codebook is written into the module, into DeepSpeed's
    fp32 master copy (read back) and its moments into DeepSpeed's optimizer state, through its
    public API (pass ``engine.optimizer`` to ``monitor.step``), so its next step keeps them.

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
        every_step: act at every training step (default, unless ``every_n_steps``,
            ``when_rule`` or ``strategy="farthest"`` is given) instead of at logs, as
            vector-quantize-pytorch's ``threshold_ema_dead_code`` does: a code is dead when no
            assignment chose it in the last ``ceil(10 K / T)`` steps (see ``dead_hits``); a step
            the probe does not record (``observe_every_n_steps > 1``, or the probe switched
            off) leaves the count as it was. Decided on the device, no host
            sync; under ``torch.distributed`` each step all-reduces the ``(H, K)`` hit counts
            and broadcasts rank 0's ``(H, K, D)`` draws (from its own batch; the cost per step
            is in benchmarks/RESULTS.md). The replacements since the last log are one event at
            the log (every write is read back on the device, checked at the log).
            (:class:`~collapse_monitor.mitigations.reset_every_step.EveryStepResets`).
        dead_hits: use vector-quantize-pytorch's rule at every step, with this threshold in hits
            per step (its usual value is 2); default the module's ``threshold_ema_dead_code``
            when positive. Otherwise a code is dead when no assignment chose it in the last
            ``ceil(10 K / T)`` recorded steps (``T`` assignments per step): a code in use is
            missed that long with probability ``e^-10`` whatever the batch size, where a fixed 2
            hits per step replaced 252 of the 256 codes of a healthy, fully used codebook fed
            ``2 K`` assignments per step, in its first step.
        when_rule: only act at logs where this rule fired.
        vectors: ``vectors(module, args, output) -> (N, D)`` (or ``(N, H, D)``) when the module's
            input is not in codebook space. A 3-D or 4-D input has the codes along axis 1 or -1,
            as the quantiser's ``accept_image_fmap``/``channel_last`` say, else the one axis of
            length ``D``; when both have length ``D`` and the quantiser does not say,
            ``vectors=`` is required (an error at the first capture). Not needed for vector-quantize-pytorch's
            ``VectorQuantize``: the input of its codebook module is read, already projected
            (``codebook_dim``), split into heads and l2-normalised for cosine codebooks.
        reset_cluster_size: EMA cluster size given to a replaced code; default the module's
            ``threshold_ema_dead_code`` when positive, else 1.
        normalize: l2-normalise the replacement vectors (a cosine-similarity codebook holds unit
            vectors); default: the codebook module's ``use_cosine_sim``, else False.
        seed: seed of rank 0's draws (combined with the step).
        name: see :class:`~collapse_monitor.mitigations.Mitigation` (default
            ``"reset_dead_codes"``).

    Raises:
        ValueError: (when the monitor is built) the codebook is shared with modules outside
            ``module`` (``ResidualVQ(shared_codebook=True)``: point it at the residual module).
    """

    on_quiet_steps = False  # (it acts on steps its probe records, and at logs)

    kind = "reset_dead_codes"
    through_deepspeed = True

    def __init__(
        self,
        module: str,
        probe: str | None = None,
        codebook: str | None = None,
        strategy: str = "random",
        every_n_steps: int | None = None,
        every_step: bool | None = None,
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
        at_logs = bool(every_n_steps or when_rule or strategy != "random")
        if every_step is None:
            every_step = not at_logs
        if every_step and at_logs:
            raise ValueError(
                "every_step=True acts at every step with random draws: no every_n_steps, "
                "when_rule or strategy='farthest'"
            )
        self.module = module
        self.probe_name = probe
        self.codebook_name = codebook
        self.strategy = strategy
        self.every_n_steps = every_n_steps
        self.every_step = every_step
        self.dead_hits = dead_hits
        self.when_rule = when_rule
        self.vectors = vectors
        self.ema_names = (ema_cluster_size, ema_embed_sum)
        self.reset_cluster_size = reset_cluster_size
        self.normalize = normalize
        self.seed = seed
        self._batch: torch.Tensor | None = None  # (N, H, D) of a step a reset may draw from
        self._valid: torch.Tensor | None = None  # (N,) rows that hold a real position
        # the every-step form's decisions, counts and draws (None: resets at logs)
        self._steps = EveryStepResets(self) if every_step else None

    def __repr__(self) -> str:
        return f"ResetDeadCodes(module={self.module!r}, name={self.name!r})"

    # ----------------------------------------------------------------- wiring
    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,) if getattr(self, "path", None) else ()

    def attach(self, setup) -> None:
        super().attach(setup)
        found = resolve_modules(setup.model, self.module, owner=repr(self))
        if len(found) != 1:
            raise ValueError(f"{self!r}: needs one module, matched {[n for n, _ in found]}")
        self.path, mod = found[0]
        self._quantizer = mod
        self.process_group = setup.process_group
        info = find_probe(setup, "CodebookUsage", repr(self), self.probe_name, self.module)
        self.probe, self.scope = info.name, info.scope(self.path)
        self.num_codes, self.heads = info.params["num_codes"], info.params["heads"]
        self.codebook_path, codebook = find_codebook(
            mod, self.codebook_name, self.num_codes, f"{self!r}", self.path
        )
        shared = holders_outside(setup.model, mod, codebook)
        if shared:
            raise ValueError(
                f"{self!r}: codebook '{self.codebook_path}' of '{self.path}' is also used by "
                f"{shared} (a shared codebook: ResidualVQ(shared_codebook=True)); a reset judged "
                "on this module's codes alone would replace codes the others use. Point one "
                "CodebookUsage (heads=1: their codes pooled) and one ResetDeadCodes at the module "
                "that holds every user"
            )
        K, heads = self.num_codes, self.heads
        shape = shape_of(codebook)  # (a ZeRO-3 partition's whole shape)
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
        if self.dead_hits is None and threshold > 0:  # the module's own rule
            self.dead_hits = float(threshold)
        if self.reset_cluster_size is None:  # as vector-quantize-pytorch: its dead threshold
            fallback = self.dead_hits if self.every_step and self.dead_hits else 1.0
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
        if self._steps is None:
            self.guarded(keep, *args)
            return
        # every step: a failure must not take this rank out of the steps' collectives; it is
        # raised at the log, on every rank at once
        try:
            keep(*args)
        except Exception as exc:
            self._steps.failed(exc)

    def _capturing(self) -> bool:
        """Whether this forward's batch may be drawn from: a training step's that resets (a
        logging step's, or every step's), not a snapshot's."""
        if self._recording.snapshot:
            return False
        return self._steps is not None or self._recording.logging

    def _keep_input(self, args, kwargs, output) -> None:
        """Keep the quantiser's input on a step a reset may use (the pool of replacements), with the rows
        that hold a real position: where its ``mask=`` (``(B, N)``, true for real positions) is
        true and, for one codebook, where the indices it returned are not ``-1``."""
        if not self._capturing():
            return
        if self.vectors:
            vecs = self.vectors(self._quantizer, args, output)
        else:
            vecs = self._channels_last(first_input(args, kwargs))
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
        self._batch, self._valid = batch, valid & finite_rows(batch)

    def _channels_last(self, vecs):
        """The quantiser's input with the code-space axis last. A 3-D or 4-D input is a sequence
        or feature map whose code axis is 1 (channels first, as ``taming``'s quantisers,
        SoundStream-style codecs and ``VectorQuantize(accept_image_fmap=True)`` take it) or -1;
        the quantiser's own ``accept_image_fmap`` / ``channel_last`` say which, else the one
        axis of length ``D``.

        Raises:
            ValueError: both axes have length ``D`` and the quantiser does not say (pass
                ``vectors=``): rows along the wrong axis would not be code-space vectors.
        """
        if not isinstance(vecs, torch.Tensor) or vecs.ndim not in (3, 4):
            return vecs
        mod, D = self._quantizer, self.dim
        if getattr(mod, "accept_image_fmap", None) is not None:
            first = bool(mod.accept_image_fmap)
        elif isinstance(getattr(mod, "channel_last", None), bool):
            first = not mod.channel_last
        elif vecs.shape[1] == D and vecs.shape[-1] == D:
            raise ValueError(
                f"{self!r}: the input of '{self.path}' is {tuple(vecs.shape)}: both axis 1 and "
                f"axis -1 have the code dimension {D}, and the quantiser does not say which holds "
                "the codes; pass vectors=lambda module, args, output: (N, D) code-space vectors"
            )
        else:
            first = vecs.shape[1] == D and vecs.shape[-1] != D
        return vecs.movedim(1, -1) if first else vecs

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
        self._batch, self._valid = flat, valid.to(flat.device) & finite_rows(flat)

    def _codebooks(self) -> int:
        shape = shape_of(self._tensor(self.codebook_path))
        return shape[0] if len(shape) == 3 else 1

    # ----------------------------------------------------------------- action
    def on_step(self, view) -> list[Replaced] | None:
        if self._steps is None:
            return None
        if self._batch is None and not _dist.is_distributed(self.process_group):
            return None  # (under DDP every rank takes part in every step's collectives)
        try:
            return self._steps.on_step(view)
        finally:
            self._batch = self._valid = None

    def after_log(self, view) -> list[Event]:
        try:
            return self._steps.report() if self._steps is not None else self._reset(view)
        finally:
            self._batch = self._valid = None

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
        shape = shape_of(codebook)
        K = shape[-2]
        # a codebook shared by all heads: a code is dead when no head uses it
        shared = len(shape) == 2 or shape[0] == 1
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
        self._write_ema(heads, codes, drawn)
        # read back from the module's own tensor: a codebook that is not the model's any more
        # (replaced, resharded) must not be reported as reset
        now = whole(self._tensor(self.codebook_path)).detach()
        changed = (now.view(-1, K, self.dim)[heads, codes] == drawn).all(1)
        if not bool(changed.all()):
            raise RuntimeError(
                f"{self!r}: wrote {n} codes into '{self.codebook_path}' but read back "
                f"{int(changed.sum())} of them changed; the codebook tensor is not the model's"
            )
        zeroed = self._zero_optimizer_rows(view.optimizers, codebook, heads, codes)
        info = {
            "codebook": f"{self.path}.{self.codebook_path}",
            "per_head": torch.bincount(heads, minlength=cb.shape[0]).tolist(),
            "strategy": self.strategy,
            "optimizer_state": zeroed,
        }
        replaced = Replaced(
            self.probe, dead.expand_as(probe_dead).to(probe_dead.device), self.scope
        )
        return [Event(self.name, info, count=n, replaced=replaced)]

    def _drawn_on_rank_zero(self, cb, heads, codes, step: int) -> torch.Tensor | None:
        """The ``(n, D)`` new codes, drawn by rank 0 from the valid rows of every rank's
        batch (in rank order: the batch one process would have seen) and broadcast; ``None``
        when no rank captured a row. Every rank reaches every collective, even when rank 0's
        draw fails."""
        pool = self._pooled_rows(cb)
        drawn = torch.full(
            (heads.numel(), self.dim), float("nan"), dtype=cb.dtype, device=cb.device
        )
        failure = None
        if _dist.rank(self.process_group) == 0 and pool.shape[0]:
            try:
                drawn.copy_(self._draw(cb, pool, heads, codes, step))
            except Exception as exc:
                failure = exc
        _dist.broadcast_(drawn, 0, self.process_group)
        if failure is not None:
            raise failure
        if not bool(torch.isfinite(drawn).all()):
            log.warning("%r: no batch vectors were captured at step %d; nothing reset", self, step)
            return None
        return drawn

    def _pooled_rows(self, cb) -> torch.Tensor:
        """``(N, H, D)``: the valid rows of the captured batch, of every rank in rank order
        under ``torch.distributed`` (one all-gather of the counts, one of the rows)."""
        heads = self.heads if cb.shape[0] > 1 else 1
        rows = cb.new_zeros((0, heads, self.dim))
        if self._batch is not None:  # only rows holding a real position
            rows = self._batch[self._valid].to(device=cb.device, dtype=cb.dtype)
        group = self.process_group
        if not _dist.is_distributed(group):
            return rows
        wire = _dist.collective_device(group, rows.device)
        width = torch.tensor([rows.shape[0], rows.shape[1]], device=wire)
        sizes = _dist.all_gather_rows(width, [2] * _dist.world_size(group), group)
        counts = [int(s[0]) for s in sizes]
        width = max(int(s[1]) for s in sizes)
        if rows.shape[1] != width:  # a rank that captured nothing: its empty rows' width
            rows = rows.new_zeros((rows.shape[0], width, self.dim))
        return torch.cat(_dist.all_gather_rows(rows.to(wire), counts, group)).to(cb.device)

    def _draw(self, cb, batch, heads, codes, step: int) -> torch.Tensor:
        """The replacement vectors ``(n, D)`` from the pooled rows ``batch (N, H, D)``."""
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

    def _write_ema(self, heads, codes, drawn) -> None:
        """EMA codebooks: the replaced codes' cluster size becomes ``reset_cluster_size`` and
        their embedding sum ``vector * reset_cluster_size`` (the next EMA update keeps them)."""
        if self.ema_paths is None:
            return
        K = self.num_codes
        size, total = (self._tensor(p) for p in self.ema_paths)
        with torch.no_grad():
            size.view(-1, K)[heads, codes] = self.reset_cluster_size
            total.view(-1, K, self.dim)[heads, codes] = (
                drawn.to(total.dtype) * self.reset_cluster_size
            )

    def _zero_optimizer_rows(self, optimizers, codebook, heads, codes) -> str:
        """Zero the replaced rows of every optimizer state shaped like the codebook, in each
        optimizer that holds it; what was done, for the event."""
        if not isinstance(codebook, nn.Parameter):
            return "buffer (no optimizer state)"
        if not optimizers:
            return "not given: pass optimizer= to monitor.step() to zero its moments"
        if unheld(self, optimizers, codebook):
            return f"in none of the {len(optimizers)} optimizers given"
        states = optimizer_states(optimizers, codebook)
        for _, value in states:
            with edited(value) as full:
                full.view(-1, shape_of(codebook)[-2], self.dim)[heads, codes] = 0
        if not states:
            return "no state shaped like the codebook"
        return "zeroed " + ", ".join(sorted({k for k, _ in states}))

    def state_dict(self) -> dict:
        """The every-step form's cluster sizes and draws (exact resume); nothing at logs."""
        return {} if self._steps is None else self._steps.state_dict()

    def load_state_dict(self, state: dict, optimizers=()) -> None:
        if self._steps is not None:
            self._steps.load_state_dict(state)
