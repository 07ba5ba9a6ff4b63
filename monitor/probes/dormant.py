"""τ-dormant units per layer (Sokar et al. 2023), docs/metrics.md#dormantunits."""

from __future__ import annotations

import functools

import torch
from torch import nn

from .._adapters import tuner_layer
from .._modules import named_modules
from ..cadence import EVERY_STEP
from ..contracts import Readout
from ..functional.units import dormant_from_activity
from ..pictures import Picture
from ..reading import Reading, finite_rows, first_tensor, floating
from ..rules import RuleSpec
from ..stats import UnitActivity, Window
from .base import Probe, layer_name

# where the units (channels) are in the outputs of module types with a known layout
_CHANNELS_FIRST = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.GroupNorm,
)  # fmt: skip
# rows the window's last step must hold for its own dormant fraction (the rule's latest value): a
# unit firing on 10% of independent inputs is silent on all of 64 with probability 0.1% (rows
# of a convolution's output are positions, not independent inputs: the bound is optimistic there)
_LATEST_ROWS = 64
_F64 = torch.float64

_CHANNELS_LAST = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.RMSNorm, nn.Embedding)


def known_layout(module: nn.Module) -> int | None:
    """The unit axis of ``module``'s output by its type: 1 (channels first: convolutions, batch
    and group norms), -1 (channels last: linear layers, ``transformers``' ``Conv1D``, layer norms),
    None when the type does not say. A PEFT adapter layer maps as its base layer does."""
    if tuner_layer(module):
        module = module.get_base_layer()
    if isinstance(module, _CHANNELS_FIRST):
        return 1
    if _normalises_a_map(module):
        return None  # (LayerNorm([C, H, W]) after a conv: it keeps its input's layout)
    if isinstance(module, _CHANNELS_LAST) or type(module).__name__ == "Conv1D":
        return -1
    return None


def _normalises_a_map(module: nn.Module) -> bool:
    """A layer norm over more than its last dimension (a conv's ``(C, H, W)``)."""
    shape = getattr(module, "normalized_shape", ())
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and len(shape) > 1


# modules that keep the layout of their input (elementwise, dropout, pooling, padding)
_KEEPS_LAYOUT = (
    "torch.nn.modules.activation",
    "torch.nn.modules.dropout",
    "torch.nn.modules.pooling",
    "torch.nn.modules.padding",
    "transformers.activations",
)


def keeps_layout(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Identity)
        or type(module).__module__ in _KEEPS_LAYOUT
        or _normalises_a_map(module)
    )


def _layout_of_block(block: nn.Module) -> int | None:
    """The one layout of a block's layers, or None when they disagree or a module inside
    changes the layout (``nn.Flatten``, ``nn.Unflatten``, a reshape of the block's own)."""
    layouts = set()
    adapters = [m for m in block.modules() if tuner_layer(m)]
    inside = {id(c) for a in adapters for c in a.modules() if c is not a}
    for m in block.modules():
        # an adapter's parts and containers are skipped (their leaves decide); a PEFT adapter
        # layer maps as its base layer does (known_layout)
        if not tuner_layer(m) and (id(m) in inside or next(m.children(), None) is not None):
            continue
        axis = known_layout(m)
        if axis is None and not keeps_layout(m):
            return None
        layouts.add(axis)
    layouts.discard(None)
    return layouts.pop() if len(layouts) == 1 else None


def unit_axis(model: nn.Module, path: str, module: nn.Module) -> int | None:
    """The unit axis of a module's output: from its type; for a module that keeps its input's
    layout (an activation), from the nearest layer before it in an ``nn.Sequential`` (the search
    stops, None, at a module that changes the layout: ``nn.Unflatten`` after a linear layer
    makes channels first), or from its parent's layers when they all share one layout; None
    when nothing tells."""
    axis = known_layout(module)
    if axis is not None or not path or not keeps_layout(module):
        return axis
    parent_path, _, child = path.rpartition(".")
    parent = named_modules(model)[parent_path]  # paths are wrapper-free names
    if not isinstance(parent, nn.Sequential):
        return _layout_of_block(parent)
    names = [n for n, _ in parent.named_children()]
    for name in reversed(names[: names.index(child)]):
        sibling = parent.get_submodule(name)
        if next(sibling.children(), None) is None and keeps_layout(sibling):
            continue
        return (
            known_layout(sibling)
            if known_layout(sibling) is not None
            else _layout_of_block(sibling)
        )
    return None


def _reused(how: str) -> str:
    return (
        f"this activation module {how}: if several layers share it, their units would be "
        "pooled (a layer whose units died reads alive through the others'). Give each layer "
        "its own activation module, or pass reused=True when every call holds the same units "
        "(an RNN cell unrolled in a loop)"
    )


def _enter(calls: list[int], module, args, kwargs) -> None:
    """A call of a probed activation's parent begins: ``calls`` = [calls so far, running]."""
    calls[0] += 1
    calls[1] += 1


def _leave(calls: list[int], module, args, kwargs, output) -> None:
    calls[1] = max(calls[1] - 1, 0)


class DormantUnits(Probe):
    """τ-dormant units per layer, from post-activation outputs.

    Select the modules whose output is the activation (``"net.*.act"``, or Linear/Conv layers
    followed by nothing). Units are the channel axis: dimension 1 of convolution outputs,
    the last one of linear outputs, ``channel_dim`` when given; for an activation module the
    layout comes from the layer before it in an ``nn.Sequential`` or from its parent's layers.
    An output of 3 or more dimensions whose unit axis nothing tells is an error that says to
    pass ``channel_dim``. Reports per layer ``<layer>/dormant_fraction`` (score
    ``E|h_i| / mean_k E|h_k| <= tau``), ``<layer>/mean_abs`` (the raw ``E|h|``: a whole-layer
    shrink is invisible in the relative score), ``<layer>/skipped`` (rows with NaN or Inf,
    left out) and ``<layer>/dormant_fraction_last_step`` (the last training step the probe
    recorded in the window, alone when it holds >= 64 rows, else with the step before when the
    two do: after a task switch units die within one window, whose score still averages their
    active steps), plus
    ``dormant_fraction`` over all units (and ``dormant_fraction_last_step`` when every layer's
    last step was measured)
    (:func:`~collapse_monitor.functional.dormant_units`); the mask ``<layer>/dormant`` for ReDo.

    Args:
        module: a path or glob of the activation modules.
        tau: the dormancy threshold on the score.
        channel_dim: the unit axis of every selected module's output (``1``: channels first,
            NCHW; ``-1``: channels last, NHWC or ``(B, T, H)``); default: from the layout.
        reused: a selected module without parameters (an activation) that runs several times
            in one call of its parent, or sits at several places in the model, holds the same
            units at every call (an RNN cell unrolled in a loop): its calls are pooled. Without
            it such a module is refused (at attach, or at its second call): one activation
            reused by several layers would pool their units, and a layer whose units died would
            read alive through the others'.

    Raises:
        ValueError: a reused activation without ``reused=True``; an output whose unit axis is
            not known (pass ``channel_dim``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from collapse_monitor import CollapseMonitor, probes
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = model[0].bias.copy_(torch.tensor([-9.0, 1.0, 1.0, 1.0]))
        ...     _ = model[0].weight.zero_()
        >>> mon = CollapseMonitor(model, [probes.DormantUnits("1", name="units")], 1)
        >>> with mon.observe():
        ...     _ = model(torch.randn(2, 3, 5, 5))
        >>> mon.step()["collapse/units/1/dormant_fraction"]  # channel 0 never fires
        0.25
        >>> mon.close()
    """

    headline = ("dormant_fraction",)

    reads = Reading(
        "floating-point activations (N, ..., H) or (N, C, ...)",
        floating(2),
        find=first_tensor,
        hint="activations",
    )
    sampling = EVERY_STEP  # O(B*D) per update
    per_layer = True
    rules = (
        RuleSpec(
            "*/dormant_fraction",
            0.5,
            "above",
            name="dormant",
            patience=1,
            # a layer mostly dormant: over half its units, on one log. 0.4 (at once past 0.5)
            # fired on 11 healthy twins of three independent rounds whose units held 41-47%
            # dormant on held-out data (shifting regression targets, weight decay, an Adagrad
            # CNN), 0.45 on 6; at 0.5 none did, and two of 36 collapses (held-out 0.5 crossed
            # between logs) alert one log late. The last step's units alone (>= 64 rows) fire
            # too: units that die after a task switch are seen on the log of the switch
            latest="dormant_fraction_last_step",
            latest_alone=True,
            message="over half of the layer's units are dormant: consider ReDo",
        ),
    )

    def __init__(
        self,
        module: str,
        tau: float = 0.025,
        channel_dim: int | None = None,
        name: str | None = None,
        extract=None,
        reused: bool = False,
    ) -> None:
        super().__init__(module, name, extract)
        self.tau = float(tau)
        self.channel_dim = channel_dim
        self.reused = bool(reused)
        self.axes: dict[str, int | None] = {}
        # an activation module's parent: (the parent, its calls so far, calls running now) and
        # the parent call in which the activation last ran (a second run in it: reused)
        self._parents: dict[str, tuple[nn.Module, list[int]]] = {}
        self._ran_in: dict[str, int] = {}

    def on_attach(self, setup, found) -> None:
        self._parents, self._ran_in = {}, {}
        named, places_of = named_modules(setup.model), {}
        for p, m in setup.model.named_modules(remove_duplicate=False):
            places_of.setdefault(id(m), []).append(p)
        for path, mod in found:
            if self.reused or next(mod.parameters(), None) is not None:
                continue  # (a module with weights holds its own units at every call)
            places = places_of[id(mod)]
            if len(places) > 1:
                raise self.error(path, _reused(f"sits at {len(places)} places ({places})"))
            self._parents[path] = (named[path.rpartition(".")[0]], [0, 0])
        self.axes = {
            path: self.channel_dim if self.channel_dim is not None
            else unit_axis(setup.model, path, mod)
            for path, mod in found
        }  # fmt: skip

    def new_window(self) -> Window:
        # per layer: the window's activity, this step's, and the window's last two steps'
        # (for the rule's latest value: units can die within one window, after a task switch)
        layers = [layer_name(p) for p in self.paths]
        latest = ("/step", "/last", "/before")
        return Window(
            {f"{layer}{part}": UnitActivity() for layer in layers for part in ("", *latest)},
            transient=tuple(f"{layer}{part}" for layer in layers for part in latest),
        )

    def attach_hooks(self, found, recorder) -> None:
        super().attach_hooks(found, recorder)
        for parent, calls in self._parents.values():
            recorder.hooks.forward_pre(parent, functools.partial(_enter, calls))
            recorder.hooks.forward(parent, functools.partial(_leave, calls), always_call=True)

    def update(self, window, a, call) -> None:
        parent = self._parents.get(call.path)
        if parent is not None and parent[1][1]:  # inside a call of its parent
            if self._ran_in.get(call.path) == parent[1][0]:
                raise self.error(
                    call.path,
                    _reused(f"ran twice in one call of its parent {type(parent[0]).__name__}"),
                )
            self._ran_in[call.path] = parent[1][0]
        axis = -1 if a.ndim == 2 else self.axes[call.path]
        if axis is None:
            raise self.error(
                call.path,
                f"{type(call.module).__name__} output of shape {tuple(a.shape)}: its unit "
                "(channel) axis is not known from the model; pass channel_dim=1 (channels "
                "first, NCHW) or channel_dim=-1 (channels last: NHWC, (B, T, H))",
            )
        a = a.detach().movedim(axis, -1)
        a = a.reshape(-1, a.shape[-1])
        layer = layer_name(call.path)
        finite = finite_rows(a)
        call.nonfinite_rows(~finite)  # (one NaN unit spoils every row: the run diverged)
        sums = UnitActivity.sums(a, finite)
        try:
            window[layer].add(*sums)
            window[f"{layer}/step"].add(*sums)
        except ValueError as exc:  # a unit count that changed: say which layer
            raise self.error(call.path, str(exc)) from None

    def end_missed_step(self, window) -> None:
        # under DDP the other ranks' last step is this step: this rank's is empty, its step
        # before stays what it was
        self.end_step(window)

    def end_step(self, window) -> None:
        for layer, _ in window.items():
            # this step's sums are the last step's, the last's the step before's
            window.shift(f"{layer}/before", f"{layer}/last", f"{layer}/step")

    @staticmethod
    def _latest(window, layer: str) -> tuple[torch.Tensor, float] | None:
        """``(abs_sum, rows)`` of the layer's last recorded step, with the step before when the
        last holds fewer than 64 rows (an MLP at batch 32); None when they hold fewer."""
        last, before = window[f"{layer}/last"], window[f"{layer}/before"]
        rows = last.rows.item()
        if rows >= _LATEST_ROWS:
            return last.abs_sum, rows
        if not rows or before.sizes["H"] is None or rows + before.rows.item() < _LATEST_ROWS:
            return None  # (a last step without rows: the layer not called, or every row bad)
        return last.abs_sum + before.abs_sum, rows + before.rows.item()

    def readout(self, window) -> Readout:
        metrics, masks, pictures = {}, {}, {}
        total = dormant = last_total = last_dormant = 0
        complete = True  # every layer with rows in the window has its last step measured
        for layer, st in window.items():
            metrics[self.key("skipped", layer)] = float(st.skipped)
            if not st.rows.item():
                continue
            r = dormant_from_activity(st.abs_sum, st.rows.item(), self.tau)
            masks[self.key("dormant", layer)] = r["dormant"]
            metrics[self.key("dormant_fraction", layer)] = r["dormant_fraction"]
            metrics[self.key("mean_abs", layer)] = r["mean_abs"]
            total += r["dormant"].numel()
            dormant += int(r["dormant"].sum())
            latest = self._latest(window, layer)
            complete &= latest is not None
            if latest is not None:
                now = dormant_from_activity(*latest, self.tau)["dormant"]
                metrics[self.key("dormant_fraction_last_step", layer)] = now.to(_F64).mean().item()
                last_total += now.numel()
                last_dormant += int(now.sum())
            pictures[self.key("unit_scores", layer)] = Picture(
                "bars",
                r["score"].sort().values,
                f"{layer}: unit score |a| / layer mean, sorted (dormant: <= tau = {self.tau:g})",
                "unit (sorted)",
                "score",
                reference=self.tau,
            )
        if total:
            metrics[self.key("dormant_fraction")] = dormant / total
        if last_total and complete:
            metrics[self.key("dormant_fraction_last_step")] = last_dormant / last_total
        return Readout(metrics, pictures=pictures, masks=masks)
