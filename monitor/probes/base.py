"""The probe template: what a probe author writes. A probe is its maths.

A subclass declares what it reads (:attr:`Probe.reads`), the ``observe()`` keywords it uses
(:attr:`Probe.keywords`), what it needs from the cadence (:attr:`Probe.sampling`) and its default
rules (:attr:`Probe.rules`), and implements three functions of its statistics:

- :meth:`Probe.new_window`: the :class:`~collapse_monitor.stats.Window` of statistics it keeps;
- :meth:`Probe.update`: add one forward call's value to the window;
- :meth:`Probe.readout`: metrics, histograms, pictures and masks of a reduced window (pure).

Everything else (resolving module paths, hooks, reading and checking each call's value, device
placement, the reduce across ranks, checkpoints, validation snapshots, failure isolation) is the
probe's driver, :class:`~collapse_monitor.probes.driver.ProbeDriver`, which the monitor owns; a
probe never sees it. The overridable methods are listed in ``docs/writing_a_probe.md``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..cadence import SAMPLED, Sampling
from ..contracts import Readout, Setup
from ..keys import MetricKey, check_name, layer_name
from ..reading import Call, Reading, Recorder
from ..rules import Rule, RuleSpec
from ..stats import Window, WindowView

__all__ = ["HEALTH_RULES", "Probe", "kept_apart", "layer_name"]

#: the rules of every probe, on what its driver reports of each window
HEALTH_RULES = (
    RuleSpec(
        "nonfinite",
        0.5,
        "above",
        name="diverged",
        patience=1,
        detail="first_nonfinite_step",
        message="NaN or Inf reached the probe in most of its calls: the run diverged (look at "
        "the loss, the learning rate and the data at that step)",
    ),
    RuleSpec(
        "silent",
        0.5,
        "above",
        name="silent",
        patience=1,
        message="the probe ran but reported none of its metrics, as it did before: its inputs "
        "are no longer usable (NaN or Inf rows, labels out of range, every row left out: see "
        "its counts of skipped rows); its last values are stale",
    ),
)


class Probe:
    """Base class of all probes (see the module docstring for the template).

    Args:
        module: a ``model.named_modules()`` name or a glob (``""`` is the model itself).
        name: metric prefix, ``collapse/<name>/<metric>``; defaults to ``module``. No ``/``.
        extract: ``extract(module, args, output) -> value`` for models whose outputs do not
            follow the probe's default convention (:attr:`reads`).
        read: where :attr:`reads` looks: the module's ``"output"`` or its ``"input"`` (the first
            positional argument).
        pool: when ``module`` matches several modules (a glob), ``False`` (default) keeps
            statistics per module and reports each under its path,
            ``collapse/<name>/<module path>/<metric>``; ``True`` pools them into one set of
            statistics reported as ``collapse/<name>/<metric>``. Probes that report per layer
            by nature (attention, token uniformity, dormant units) always do.

    Raises:
        TypeError: ``module`` is not a string or ``extract`` is not callable.
        ValueError: ``read`` is neither ``"input"`` nor ``"output"``; ``name`` holds ``/`` or
            is reserved (``alerts``, ``mitigations``, ``errors``).

    Every probe also reports ``calls``: the forward calls it recorded in the window, summed over
    ranks (each rank makes its own calls). When it recorded steps but no call at all, the
    monitor says so once, with the likely causes (a model compiled before the monitor was
    attached, a path the forward never calls, a skipped module).
    """

    #: what each forward call of the module gives the probe (None: it hooks otherwise, see
    #: :meth:`attach_hooks`)
    reads: ClassVar[Reading | None] = None
    #: the ``observe()`` keywords the probe reads, each ``True`` when required
    keywords: ClassVar[dict[str, bool]] = {}
    #: what the probe needs from the cadence: ``SAMPLED`` (default) for updates that cost a
    #: GEMM or a recomputed attention, ``EVERY_STEP`` for ``O(B*D)`` ones, ``per_class(C)``
    #: for class-conditional statistics (see :mod:`collapse_monitor.cadence`)
    sampling: Sampling = SAMPLED
    #: probes whose metrics are per layer by nature (keyed by layer in their own readout)
    per_layer: ClassVar[bool] = False
    #: probes that read token padding (:func:`~collapse_monitor.reading.token_mask`):
    #: ``observe(mask=)``, or the model's own ``attention_mask`` input
    uses_token_mask: ClassVar[bool] = False
    #: True: the probe records only generation forwards (``monitor.observe(rollout=True)``,
    #: a sampler's steps); False: only the others (training and evaluation forwards)
    rollout: bool = False
    #: probes of a model's training tokens that leave out generation forwards met inside a
    #: training ``observe()`` (a key-value cache and no gradients: ``generate()``), with a
    #: warning; needs :attr:`uses_token_mask` (the model's inputs are read)
    skips_generation: ClassVar[bool] = False
    #: default rules, relative to the probe (see :class:`~collapse_monitor.rules.RuleSpec`)
    rules: ClassVar[tuple[RuleSpec, ...]] = ()
    #: probes that pair values with ``observe(<target_key>=)`` labels: the shift they pair them
    #: with, set at attach (:func:`~collapse_monitor.reading.label_shift`); None: no labels
    label_shift: int | None = None
    target_key: ClassVar[str] = "targets"
    #: True when this rank's window holds statistics no other rank has (class shards), so
    #: that every rank must save its own checkpoint
    rank_local: bool = False
    #: True when, under tensor parallelism, each rank of a tensor-parallel group keeps its own
    #: slice of the statistics, keyed globally (attention heads): they reduce over every rank;
    #: else they are replicated over the group and reduce over the data-parallel ranks
    tp_sharded: bool = False
    #: True when, under tensor parallelism, the probe also needs its module's whole output
    #: beside the input it reads (NeuralCollapse's logits on a vocabulary-parallel head): the
    #: monitor gathers it with the value, as ``call.output``
    whole_output: bool = False
    #: whether its readout reads the model's parameters (the monitor then gathers FSDP shards)
    reads_parameters: bool = False
    #: what a mitigation may read of the probe at attach (see :meth:`describe`)
    described: ClassVar[tuple[str, ...]] = ()
    #: the metrics that say the probe's inputs were usable: a probe that reported one at an
    #: earlier log and none in a window where it ran is ``silent`` (an alert)
    headline: ClassVar[tuple[str, ...]] = ()
    #: metrics counting rows skipped for bad input (labels out of range): said once in the log;
    #: under ``strict`` the call that held them raises (``Call.bad_rows``)
    bad_input: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        module: str,
        name: str | None = None,
        extract=None,
        read: str = "output",
        pool: bool = False,
    ) -> None:
        if not isinstance(module, str):
            raise TypeError(f"{type(self).__name__}: module must be a path string, got {module!r}")
        if extract is not None and not callable(extract):
            raise TypeError(
                f"{type(self).__name__}: extract must be callable, got {type(extract).__name__}"
            )
        if read not in ("input", "output"):
            raise ValueError(f"read must be 'input' or 'output', got {read!r}")
        self.name = check_name(name or module or "model")  # "" is the root module itself
        self.module = module
        self.extract = extract
        self.read = read  # where ``reads`` looks: the module's "input" or its "output"
        self.pool = bool(pool)
        #: the module paths resolved at attach (before :meth:`new_window`)
        self.paths: list[str] = []
        self._driver = None  # its ProbeDriver, set by the monitor at attach

    def __repr__(self) -> str:
        return f"{type(self).__name__}(module={self.module!r}, name={self.name!r})"

    @property
    def disabled(self) -> bool:
        """Whether the probe failed and was switched off (it then records nothing)."""
        return self._driver is not None and self._driver.disabled

    @property
    def errors(self) -> int:
        """Errors of this probe so far (each is counted in ``collapse/errors``)."""
        return 0 if self._driver is None else self._driver.errors

    # ----------------------------------------------------------------- what a probe says
    def on_attach(self, setup: Setup, found: list[tuple[str, nn.Module]]) -> None:
        """Validate the resolved modules and read configuration from them (before hooking)."""

    def new_window(self) -> Window:
        """Fresh statistics for one window (of one module, when a glob keeps them per module)."""
        return Window()

    def update(self, window: WindowView, value: Any, call: Call) -> None:
        """Add one forward call's ``value`` (already read and checked) to ``window``. ``call``
        is the call (path, module, inputs, output, the ``observe()`` keywords); set
        ``call.rows`` to the samples it added when :attr:`sampling` is per class."""

    def readout(self, window: WindowView) -> Readout:
        """Metrics (keys from :meth:`key`) of a reduced window; must not change it. Tensors in
        the readout must not be views of the window's states (the window is reset in place).
        ``window.group`` is the process group it was reduced over: a readout may split its
        work over the ranks with collectives that every rank reaches."""
        return Readout()

    def tp_gather(self, call: Call) -> None:
        """Under tensor parallelism, before :meth:`update`: the collectives of the group this
        call needs beyond its value's gather (a vocabulary-parallel head's weight), made on
        every rank of the group, also where this probe failed until the ranks agree it
        stopped. Nothing by default."""

    def end_step(self, window: WindowView) -> None:
        """After a training step in which this probe recorded (advance per-step memories)."""

    def end_missed_step(self, window: WindowView) -> None:
        """After a training step this probe would have recorded in but saw no forward of on
        this rank (other ranks may have): what stands for "this step" must hold nothing."""

    def end_window(self, window: WindowView, reduced: WindowView) -> None:
        """After a log: start the next window (``reduced``: this window over all ranks)."""
        window.reset()

    def exchange(self, window: Window, group) -> int | None:
        """After every training step this probe would record, on every rank (recorded, missed
        or disabled): the point for collectives of the hot path (class-sharded rows). Returns
        the samples per step, agreed across ranks, when it knows them (the cadence of a
        class-conditional probe); nothing by default."""
        return None

    def step_values(self, window: WindowView) -> dict[str, torch.Tensor]:
        """What a mitigation that acts at every step may read of this step (on the device,
        before :meth:`end_step`): e.g. the code hits of the step. Nothing by default."""
        return {}

    def on_replaced(self, window: WindowView, mask: torch.Tensor) -> None:
        """A mitigation replaced the elements in ``mask`` (codes): forget what was known of them."""

    def attach_hooks(self, found: list[tuple[str, nn.Module]], recorder: Recorder) -> None:
        """Hook the modules; by default one forward hook per module that reads :attr:`reads`.
        A probe that reads otherwise (attention calls inside a module) hooks through
        ``recorder`` (see :class:`~collapse_monitor.probes.driver.Recorder`)."""
        for path, mod in found:
            recorder.read_forward(path, mod)

    def extra_state(self) -> dict:
        """Probe state that is not a statistic (identical on every rank), for checkpoints."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state`."""

    def default_rules(self) -> list[Rule]:
        """The probe's :attr:`rules`, bound to its keys (per module for a glob kept apart),
        and the rules every probe has (:data:`HEALTH_RULES`: divergence, silence)."""
        own = [spec.bind(self.name, per_module=kept_apart(self)) for spec in self.rules]
        return own + [spec.bind(self.name) for spec in HEALTH_RULES]

    def describe(self) -> dict[str, Any]:
        """What a mitigation may know of this probe: the attributes in :attr:`described`."""
        return {a: getattr(self, a) for a in self.described}

    # ----------------------------------------------------------------- helpers
    def key(self, metric: str, layer: str | None = None, index: str | None = None) -> MetricKey:
        """The key ``collapse/<name>/[<layer>/]<metric>[/<index>]`` of one value."""
        return MetricKey(self.name, metric, layer, index)

    def error(self, path: str, what: str) -> ValueError:
        """A ValueError naming the probe and the module."""
        return ValueError(f"{type(self).__name__} '{self.name}' at module '{path}': {what}")


def kept_apart(probe: Probe) -> bool:
    """Whether ``probe`` reports each module its glob matched apart (several modules, neither
    pooled nor one per-layer statistic)."""
    return len(probe.paths) > 1 and not (probe.pool or probe.per_layer)
