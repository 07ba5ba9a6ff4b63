"""CollapseMonitor: attaches probes, keeps cadence, dispatches metrics to rules, sinks and mitigations."""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import _dist
from . import pictures as pictures_
from .mitigations.base import Mitigation
from .probes.base import Probe
from .rules import Alert, Rule, RuleEngine
from .sinks import Sink

log = logging.getLogger("collapse_monitor")

_STATE_VERSION = 1


SAMPLE_STRIDE = 25  # the default cadence records one step in 25 at most (4 % of the steps)


def _sample_stride(log_every_n_steps: int) -> int:
    return max(1, min(SAMPLE_STRIDE, -(-log_every_n_steps // 2)))


def sampled_steps_per_window(log_every_n_steps: int) -> int:
    """Steps per window that the GEMM-cost probes record under the default cadence: one step in
    ``min(25, ceil(L / 2))`` (``L = log_every_n_steps``): two at the default ``L = 50``, twenty
    at ``L = 500``, every step for ``L <= 2``."""
    return -(-log_every_n_steps // _sample_stride(log_every_n_steps))


class CollapseMonitor:
    """Watches a model for collapse while it trains.

    Args:
        model: the ``nn.Module`` whose ``named_modules()`` the probes' paths refer to.
        probes: probe instances (``monitor.probes``); names must be unique.
        log_every_n_steps: window length; metrics are computed, logged and checked every this
            many calls of :meth:`step`, and the window statistics are then reset.
        sinks: :class:`~monitor.sinks.Sink` objects (e.g. ``TensorBoardSink``).
        mitigations: :class:`~monitor.mitigations.Mitigation` objects.
        rules: extra :class:`~monitor.rules.Rule` objects.
        default_rules: also use each probe's default rules (METRICS.md thresholds).
        on_alert: callables ``f(alert)`` called for every alert.
        observe_every_n_steps: which training steps are recorded. ``None`` (default): the
            cheap probes (``Probe.every_step``: codebook and latent usage, posterior collapse,
            dormant units) record every step, the others (whose update costs a GEMM or a
            recomputed attention) record :func:`sampled_steps_per_window` steps per window,
            evenly spaced and ending with the logging step. An integer ``n``: every probe records
            every n-th step only (``1``: every step, the exact whole-window statistics).
            Metrics are exact for the samples recorded; validation snapshots record every batch.
        pictures: ``True`` (every probe that draws), or names of probes: at each log, these
            probes' pictures (class-mean cosine heatmap, code usage, attention entropy per layer
            and head, KL per latent dimension, eigen-spectrum) go to the sinks as images. Needs
            matplotlib; without it the monitor says so once and logs no pictures.
        process_group: ``torch.distributed`` group for the all-reductions (default: WORLD).
        strict: raise every error of a probe, sink or mitigation (for tests). By default such an
            error never reaches the training loop: it is logged once with the probe's name,
            counted in ``collapse/errors`` and the probe (sink, mitigation) is disabled. Under DDP a
            probe disabled on any rank is disabled on all at the next log, before any collective.

    Use ``with monitor.observe(targets=y): out = model(x)`` around the forward pass and
    ``monitor.step()`` once per training step. Call ``close()`` to remove every hook.
    """

    def __init__(
        self,
        model: nn.Module,
        probes: Sequence[Probe],
        log_every_n_steps: int = 50,
        sinks: Iterable[Sink] = (),
        mitigations: Iterable[Mitigation] = (),
        rules: Iterable[Rule] = (),
        default_rules: bool = True,
        on_alert: Callable[[Alert], None] | Iterable[Callable[[Alert], None]] | None = None,
        observe_every_n_steps: int | None = None,
        pictures: bool | Iterable[str] = False,
        process_group=None,
        strict: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if log_every_n_steps < 1 or (observe_every_n_steps or 1) < 1:
            raise ValueError(
                "log_every_n_steps and observe_every_n_steps must be >= 1, got "
                f"{log_every_n_steps} and {observe_every_n_steps}"
            )
        probes = list(probes)
        for p in probes:
            if not isinstance(p, Probe):
                raise TypeError(f"probes must be Probe instances, got {type(p).__name__}")
        names = [p.name for p in probes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"probe names must be unique, repeated: {dupes}; pass name=...")
        self.model = model
        self.probes = probes
        self.log_every_n_steps = int(log_every_n_steps)
        self.observe_every_n_steps = (
            None if observe_every_n_steps is None else int(observe_every_n_steps)
        )
        self.sinks = list(sinks)
        self.mitigations = list(mitigations)
        all_rules = [r for p in probes for r in p.default_rules()] if default_rules else []
        self.rules = RuleEngine(all_rules + list(rules))
        if on_alert is None:
            self.on_alert = []
        elif callable(on_alert):
            self.on_alert = [on_alert]
        else:
            self.on_alert = list(on_alert)
        if isinstance(pictures, str):
            raise TypeError("pictures must be True/False or a list of probe names")
        wanted = names if pictures is True else list(pictures or [])
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise ValueError(f"pictures names probes that do not exist: {unknown}; probes: {names}")
        self._picture_probes = [p for p in probes if p.name in wanted]
        self.process_group = process_group
        self.strict = strict
        self.errors = 0
        self.global_step = 0
        self.should_stop = False
        self.observing = False  # inside observe() on a recorded step: every_step probes record
        self.sampling = False  # ... and the other probes record too
        self._recorded: set[Probe] = set()  # probes that recorded in this training step
        self._thin_warned: set[Probe] = set()
        self.context: dict = {}
        self.mitigation_counts: dict[str, float] = {}
        self._snapshot_prefix: str | None = None
        self._saved_windows: list | None = None
        self._closed = False
        other = getattr(model, "_collapse_monitor", lambda: None)()
        if other is not None and not other._closed:
            raise RuntimeError(
                f"{type(model).__name__} already has a CollapseMonitor; two monitors would hook the "
                "same modules twice. Pass all probes to one monitor, or close() the other first"
            )
        model._collapse_monitor = weakref.ref(self)
        try:
            for p in probes:
                p.attach(model, self)
            for m in self.mitigations:
                m.attach(model, self)
        except Exception:
            self.close()
            raise

    # ----------------------------------------------------------------- recording
    @contextmanager
    def observe(self, targets: torch.Tensor | None = None, **context) -> Iterator[CollapseMonitor]:
        """Record the forward passes run inside this block.

        Args:
            targets: class labels for class-conditional probes, shaped like the probed
                features without their last dimension (``(N,)`` or ``(B, T)``).
            **context: extra per-batch inputs that probes document (e.g. ``groups=``).
        """
        if self._closed:
            raise RuntimeError("CollapseMonitor is closed")
        if self.observing:
            raise RuntimeError("observe() blocks cannot be nested")
        n = self.observe_every_n_steps
        if self._snapshot_prefix is not None:
            self.observing = self.sampling = True
        elif n is None:
            L = self.log_every_n_steps
            k = _sample_stride(L)
            self.observing = True
            self.sampling = (L - 1 - self.global_step % L) % k == 0
        else:
            self.observing = self.sampling = self.global_step % n == 0
        # snapshots (validation) do not advance per-step state such as usage EMAs
        if self._snapshot_prefix is None:
            self._recorded.update(p for p in self.probes if self.records(p))
        self.context = {"targets": targets, **context}
        try:
            yield self
        finally:
            self.observing = self.sampling = False
            self.context = {}

    def records(self, probe: Probe) -> bool:
        """True while ``probe`` should record what the model computes (inside ``observe()``)."""
        return self.observing and (self.sampling or probe.every_step)

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float] | None:
        """Advance one training step; at cadence compute, log, check rules and mitigate.

        Returns:
            the logged metrics (``{"collapse/<probe>/<metric>": float}``) at a logging step,
            else ``None``. Only logging steps synchronise with the device.
        """
        for m in self.mitigations:
            m.on_step(self, optimizer)
        if self._recorded:
            for p in self.probes:
                if p in self._recorded:
                    p.end_step()
            self._recorded.clear()
        self.global_step += 1
        if self.global_step % self.log_every_n_steps:
            return None
        with torch.profiler.record_function("collapse_monitor.log"):
            return self._log(optimizer)

    @property
    def logging_this_step(self) -> bool:
        """True while the current step (the next :meth:`step` call) will log."""
        return (self.global_step + 1) % self.log_every_n_steps == 0

    # ----------------------------------------------------------------- readout
    # ----------------------------------------------------------------- failures
    def failed(self, owner, exc: Exception) -> None:
        """An error inside ``owner`` (a probe, sink or mitigation): raise it under ``strict``,
        else log it once, count it and disable the owner so training goes on."""
        if self.strict:
            raise exc
        self.errors += 1
        if not getattr(owner, "disabled", False):
            owner.disabled = True
            log.error(
                "collapse monitor: %r failed and is disabled (strict=False): %s: %s",
                owner,
                type(exc).__name__,
                exc,
            )

    def _agree_on_disabled(self) -> None:
        """Disable on every rank the probes that failed on any rank (before any collective)."""
        if not _dist.is_distributed(self.process_group) or not self.probes:
            return
        flags = torch.tensor([float(p.disabled) for p in self.probes])
        _dist.all_reduce_max_(flags, self.process_group)
        for p, flag in zip(self.probes, flags.tolist()):
            p.disabled = p.disabled or bool(flag)

    def compute(self) -> dict[str, float]:
        """Metrics of the current window (all-reduced across ranks); the window is kept."""
        named = dict(self.model.named_modules())
        for p in self.probes:
            if not p.disabled:
                try:
                    p.check_modules(named)
                except Exception as exc:
                    self.failed(p, exc)
        self._agree_on_disabled()
        metrics = {}
        for p in self.probes:
            if p.disabled:
                continue
            try:
                values = p.compute(self.process_group)
            except Exception as exc:
                self.failed(p, exc)
                continue
            for key, value in values.items():
                metrics[f"collapse/{p.name}/{key}"] = float(value)
        metrics["collapse/errors"] = float(self.errors)
        return metrics

    def _each_sink(self, method: str, *args) -> None:
        for sink in self.sinks:
            if getattr(sink, "disabled", False):
                continue
            try:
                getattr(sink, method)(*args)
            except Exception as exc:
                self.failed(sink, exc)

    def _histograms(self) -> dict[str, torch.Tensor]:
        return {
            f"collapse/{p.name}/{key}": values
            for p in self.probes
            if not p.disabled
            for key, values in p.histograms().items()
        }

    def _pictures(self) -> dict[str, np.ndarray]:
        """Rendered pictures of the opted-in probes (only where a sink will receive them)."""
        if not (self._picture_probes and self.sinks):
            return {}
        if not pictures_.available():
            log.warning(
                "collapse monitor: pictures are off, matplotlib is not installed "
                "(pip install matplotlib, or collapse-monitor[pictures])"
            )
            self._picture_probes = []
            return {}
        out = {}
        for p in self._picture_probes:
            if p.disabled:
                continue
            try:
                for key, pic in p.pictures().items():
                    out[f"collapse/{p.name}/{key}"] = pictures_.render(pic)
            except Exception as exc:  # a picture never costs the probe its metrics
                if self.strict:
                    raise
                self.errors += 1
                self._picture_probes.remove(p)
                log.error(
                    "collapse monitor: pictures of %r are off: %s: %s", p, type(exc).__name__, exc
                )
        return out

    def _warn_thin_windows(self, metrics: dict[str, float]) -> None:
        """Say once per probe when the sampled default cadence left a class-conditional probe
        fewer than 2 samples per class in a window (classes below ``min_class_count`` drop out)."""
        if self.observe_every_n_steps is not None:
            return
        L = self.log_every_n_steps
        for p in self.probes:
            classes = getattr(p, "num_classes", None)
            samples = metrics.get(f"collapse/{p.name}/samples")
            if p.every_step or p in self._thin_warned or classes is None or samples is None:
                continue
            if samples < 2 * classes:
                self._thin_warned.add(p)
                log.warning(
                    "collapse monitor: %r recorded %d samples for %d classes in this window (the "
                    "default cadence records %d of every %d steps for it); its class statistics "
                    "are thin: pass observe_every_n_steps=1 or log less often",
                    p,
                    samples,
                    classes,
                    sampled_steps_per_window(L),
                    L,
                )

    def _log(self, optimizer) -> dict[str, float]:
        metrics = self.compute()
        self._warn_thin_windows(metrics)
        histograms = self._histograms()
        pictures = self._pictures()
        step = self.global_step
        alerts = self.rules.check(metrics, step)
        for name, count in self.rules.counts.items():
            metrics[f"collapse/alerts/{name}"] = float(count)
        # mitigations act on this window's (reduced, rank-identical) statistics, so they run
        # before the probes move on to the next window
        events = []
        for m in self.mitigations:
            if getattr(m, "disabled", False):
                continue
            try:
                applied = m.after_log(self, metrics, alerts, optimizer)
            except Exception as exc:
                self.failed(m, exc)
                continue
            for name, info in applied:
                events.append((name, info))
                count = float(info.get("count", 1))
                self.mitigation_counts[name] = self.mitigation_counts.get(name, 0.0) + count
        for name, total in self.mitigation_counts.items():
            metrics[f"collapse/mitigations/{name}"] = total
        for p in self.probes:
            p.end_window()
        metrics["collapse/errors"] = float(self.errors)
        self._each_sink("log_metrics", metrics, step)
        self._each_sink("log_thresholds", self.rules.thresholds(metrics), step)
        for tag, values in histograms.items():
            self._each_sink("log_histogram", tag, values, step)
        for tag, image in pictures.items():
            self._each_sink("log_image", tag, image, step)
        for alert in alerts:
            self._dispatch_alert(alert)
        for name, info in events:
            log.info("step %d: mitigation %s applied: %s", step, name, info)
            self._each_sink("log_event", name, info, step)
        self._each_sink("flush")
        return metrics

    def _dispatch_alert(self, alert: Alert) -> None:
        prefix = f"[rank {_dist.rank(self.process_group)}] " if _dist.is_distributed() else ""
        log.warning("%scollapse alert: %s", prefix, alert.message)
        if alert.action == "stop":
            self.should_stop = True
        self._each_sink("log_alert", alert)
        for fn in self.on_alert:
            fn(alert)

    # ----------------------------------------------------------------- snapshots
    def begin_snapshot(self, prefix: str = "val") -> None:
        """Start an evaluation snapshot: probes record into fresh windows until :meth:`end_snapshot`."""
        if self._snapshot_prefix is not None:
            raise RuntimeError(f"snapshot '{self._snapshot_prefix}' is already open")
        self._snapshot_prefix = prefix
        self._saved_windows = [p.window for p in self.probes]
        for p in self.probes:
            p.window = p.new_window()

    def end_snapshot(self) -> dict[str, float]:
        """Compute and log the snapshot under ``<prefix>/collapse/...``; restore the training windows."""
        if self._snapshot_prefix is None:
            raise RuntimeError("end_snapshot() without begin_snapshot()")
        prefix, self._snapshot_prefix = self._snapshot_prefix, None
        try:
            metrics = {
                f"{prefix}/{k}": v for k, v in self.compute().items() if k != "collapse/errors"
            }
        finally:
            for p, w in zip(self.probes, self._saved_windows):
                p.window = w
            self._saved_windows = None
        self._each_sink("log_metrics", metrics, self.global_step)
        self._each_sink("flush")
        return metrics

    @contextmanager
    def snapshot(self, prefix: str = "val") -> Iterator[dict[str, float]]:
        """``with monitor.snapshot("val") as metrics:`` observe batches inside; ``metrics`` is
        filled (and logged) when the block ends."""
        self.begin_snapshot(prefix)
        result: dict[str, float] = {}
        try:
            yield result
        except BaseException:
            self._snapshot_prefix = None
            for p, w in zip(self.probes, self._saved_windows):
                p.window = w
            raise
        result.update(self.end_snapshot())

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Remove every hook and close the sinks; the model is left as it was (mitigations aside)."""
        for p in self.probes:
            p.detach()
        for m in self.mitigations:
            m.detach()
        if not self._closed:
            for sink in self.sinks:
                sink.close()
            if getattr(self.model, "_collapse_monitor", lambda: None)() is self:
                del self.model._collapse_monitor
        self._closed = True
        self.observing = self.sampling = False

    def __enter__(self) -> CollapseMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def state_dict(self, sync: bool | None = None) -> dict:
        """Everything a resumed run needs: step, window statistics, rule and mitigation state.

        Under ``torch.distributed`` (``sync=None`` means: when a group is initialised) the
        window statistics are all-reduced first, so this is a collective: call it on every rank
        (Lightning does), and save rank 0's result.
        """
        sync = sync is not False
        probes = {p.name: p.state_dict(self.process_group, sync=sync) for p in self.probes}
        return {
            "version": _STATE_VERSION,
            "global_step": self.global_step,
            "should_stop": self.should_stop,
            "probes": probes,
            "rules": self.rules.state_dict(),
            "mitigation_counts": dict(self.mitigation_counts),
            "mitigations": [m.state_dict() for m in self.mitigations],
        }

    def restore_structure(self, state: dict) -> None:
        """Re-apply what mitigations changed in the model's structure (σReparam) from a saved
        state, before the model's own weights are loaded."""
        for m, s in zip(self.mitigations, state.get("mitigations", [])):
            m.load_state_dict(s)

    def adopt_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Let mitigations that add parameters arrange a new optimizer's groups as before."""
        for m in self.mitigations:
            if hasattr(m, "adopt_optimizer"):
                m.adopt_optimizer(optimizer)

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restore :meth:`state_dict`. Under distributed runs every rank loads the same (reduced)
        state; ranks other than 0 keep its shifts and lagged centres but start their window
        empty, so the next all-reduce counts each sample once.

        Mitigations that changed the model's structure (``SigmaReparam``) re-apply it here, and add
        their parameters to ``optimizer``: load the monitor before the model and the optimizer."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported CollapseMonitor state version {state.get('version')}")
        missing = [p.name for p in self.probes if p.name not in state["probes"]]
        if missing:
            raise KeyError(
                f"checkpoint has no state for probes {missing}; it has {sorted(state['probes'])}"
            )
        keep = _dist.rank(self.process_group) == 0
        self.global_step = int(state["global_step"])
        self.should_stop = bool(state["should_stop"])
        for p in self.probes:
            p.load_state_dict(state["probes"][p.name], keep_window=keep)
        self.rules.load_state_dict(state["rules"])
        self.mitigation_counts = dict(state.get("mitigation_counts", {}))
        for m, s in zip(self.mitigations, state.get("mitigations", [])):
            m.load_state_dict(s, optimizer=optimizer)
