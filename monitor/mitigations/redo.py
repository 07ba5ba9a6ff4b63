"""ReDo: recycle dormant units (Sokar et al. 2023; dopamine's NeuronRecycler), docs/metrics.md#dormantunits."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .._adapters import refuse_adapted
from .._modules import named_modules
from .._sharding import edited, whole
from ..contracts import Event
from ..keys import layer_name
from .base import Mitigation, find_probe, optimizer_states, unheld

log = logging.getLogger(__name__)

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# normalisations between a layer and its activation: a unit whose affine shifts it below zero
# stays dead however its incoming weights are drawn (conv -> BatchNorm -> ReLU); the last two
# normalise units together (and a GroupNorm whose groups hold several channels)
_POOLED_NORMS = (nn.LayerNorm, nn.RMSNorm)
_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    *_POOLED_NORMS,
)
# what may stand between the activation and the outgoing layer: each keeps a dormant unit's
# zeros zero, in its own channel (a BatchNorm there maps them to a constant the next layer
# reads, which zeroed outgoing weights would take away; alpha dropout maps them elsewhere). A
# Flatten is let through here: _check_units then asks for one input per unit (a 1 x 1 map)
_KEEPS_ZERO = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
    nn.Flatten,
    nn.Upsample,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
)


def _keeps_zero(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.padding._ConstantPadNd):
        return module.value == 0
    return isinstance(module, _KEEPS_ZERO)


def _mixes_units(norm: nn.Module) -> bool:
    """A normalisation whose statistics pool several units: re-drawing one moves the others."""
    if isinstance(norm, nn.GroupNorm):
        return norm.num_groups < norm.num_channels
    return isinstance(norm, _POOLED_NORMS)


def _neighbours(model: nn.Module, path: str) -> tuple[str, str, str | None]:
    """The nearest Linear/Conv before and after ``path`` inside its parent ``nn.Sequential``,
    and a per-channel normalisation between the first and ``path`` (None: none)."""
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
    children = list(parent.children())
    norms = [i for i in range(before[-1] + 1, k) if isinstance(children[i], _NORMS)]
    # before the activation: the norm and other activations; after it: what keeps zeros zero
    odd = [
        i
        for i in range(before[-1] + 1, after[0])
        if (i < k and i not in norms[-1:] and _not_per_unit(children[i]))
        or (i > k and not _keeps_zero(children[i]))
    ]
    if odd:
        i = odd[0]
        raise ValueError(
            f"ReDo: '{prefix + names[i]}' ({type(children[i]).__name__}) between "
            f"'{prefix + names[before[-1]]}' and '{prefix + names[after[0]]}': ReDo recycles "
            "Linear/Conv -> [a norm] -> activation -> [dropout, pooling] -> Linear/Conv, where "
            "zeroing a dormant unit's outgoing weights leaves the output as it was; pass "
            "layers= for another pairing"
        )
    norm = prefix + names[norms[-1]] if norms else None
    return prefix + names[before[-1]], prefix + names[after[0]], norm


def _not_per_unit(module: nn.Module) -> bool:
    """Not an activation or dropout (those act on each unit alone): a layer, a reshape, a
    second normalisation."""
    return isinstance(module, (*_LAYERS, *_NORMS, nn.Flatten, nn.Unflatten)) or any(
        "norm" in type(m).__name__.lower() for m in module.modules()
    )  # (by name too: a model's own RMSNorm class)


def _check_units(in_path: str, incoming: nn.Module, out_path: str, outgoing: nn.Module) -> None:
    """The incoming layer's output units are the outgoing layer's input units, one weight column
    (or input channel) each: not a flattened map's ``C * H * W`` columns, not a grouped conv."""
    units = getattr(incoming, "out_features", getattr(incoming, "out_channels", None))
    reads = getattr(outgoing, "in_features", getattr(outgoing, "in_channels", None))
    if units != reads or getattr(outgoing, "groups", 1) != 1:
        raise ValueError(
            f"ReDo: '{in_path}' gives {units} units, but '{out_path}' "
            f"({type(outgoing).__name__}) reads {reads} inputs"
            + (f" in {outgoing.groups} groups" if getattr(outgoing, "groups", 1) != 1 else "")
            + ": a unit's outgoing weights are not one column of it; pass layers="
        )


def _check_default_init(path: str, layer: nn.Module) -> None:
    """``init="layer"`` needs PyTorch's default initialisation: refuse a class with its own, and
    warn when the weights' spread is not that of ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (a model
    that re-initialised its layers; checked when the monitor is attached, before training)."""
    if type(layer).reset_parameters not in _DEFAULT_RESETS:
        raise ValueError(
            f"ReDo: '{path}' ({type(layer).__name__}) has its own reset_parameters; pass init= "
            "with its initial distribution"
        )
    w = whole(layer.weight).detach()
    if w.numel() < 256:  # too few weights to tell
        return
    want = 1.0 / math.sqrt(3 * _fan_in(w.shape))  # the std of U(-b, b), b = 1/sqrt(fan_in)
    got = w.float().std().item()
    if not 0.8 <= got / want <= 1.25:
        log.warning(
            "ReDo: the weights of '%s' have std %.3g where PyTorch's default initialisation gives "
            "%.3g: the model initialises them otherwise, and recycled units will be drawn from "
            "the default; pass init= with the model's initialiser",
            path,
            got,
            want,
        )


def _default_init(weight: torch.Tensor, bias: torch.Tensor | None, generator) -> None:
    """PyTorch's own ``reset_parameters`` of ``nn.Linear`` and ``nn.ConvNd``: weight
    ``kaiming_uniform_(a=sqrt(5))``, i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, and the bias
    from the same uniform distribution."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    if bias is not None:
        bound = 1.0 / math.sqrt(_fan_in(weight.shape))
        nn.init.uniform_(bias, -bound, bound, generator=generator)


def _xavier_init(weight: torch.Tensor, bias: torch.Tensor | None, generator) -> None:
    """dopamine's ``NeuronRecycler``: Xavier uniform weights, zero bias."""
    nn.init.xavier_uniform_(weight, generator=generator)
    if bias is not None:
        bias.zero_()


def _fan_in(shape) -> int:
    return int(shape[1]) * math.prod(int(k) for k in shape[2:])


_INITS = {"layer": _default_init, "xavier": _xavier_init}
_DEFAULT_RESETS = (nn.Linear.reset_parameters, nn.modules.conv._ConvNd.reset_parameters)


class ReDo(Mitigation):
    """Recycle dormant units (ReDo, Sokar et al. 2023, Algorithm 1: "Reinitialize input weights
    of neuron i; Set outgoing weights of neuron i to 0"): the incoming weights and bias of each
    dormant unit are re-drawn from the layer's initial distribution, its outgoing weights are
    zeroed, and the optimizer state of the touched rows and columns is zeroed (Adam moments; the
    step count is kept).

    **The initial distribution.** ``init="layer"`` (default) draws from the distribution PyTorch
    initialises the layer with (``nn.Linear``/``nn.ConvNd.reset_parameters``: weight and bias
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, ``fan_in`` the incoming layer's inputs times its
    kernel size). A layer whose class initialises otherwise needs ``init=``, and at attach the
    monitor warns when a layer's weights do not look drawn from it (a model initialised by its own
    ``_init_weights``, e.g. ``normal(0, 0.02)``): pass that initialiser,
    ``init=lambda weight, bias, generator: ...`` (fill both in place from ``generator``).
    ``init="xavier"`` is dopamine's ``NeuronRecycler`` (Xavier uniform, zero bias: the
    initialiser of its DQN networks).

    **A normalisation in between** (conv -> BatchNorm -> ReLU): a unit whose normalisation
    shifts it below zero stays dormant whatever its incoming weights, so the BatchNorm
    (InstanceNorm, GroupNorm, LayerNorm, RMSNorm) of the recycled units gets its initial state
    back too:
    affine weight 1, bias 0, running mean 0 and variance 1, its optimizer moments zeroed.
    Found in an ``nn.Sequential`` only as Linear/Conv -> [norm] -> activation -> [dropout,
    pooling, zero or mirror padding, upsampling, a Flatten of 1 x 1 maps] -> Linear/Conv;
    anything else there is refused at attach (a BatchNorm after the activation maps a dormant
    unit's zeros to a constant the next layer reads; a Flatten of larger maps or a grouped conv
    gives a unit several outgoing columns), as is a pair whose units do not match.

    **What changes at a reset.** The network's output loses the recycled units' contribution
    through their outgoing weights: nothing for units that never fired (``tau = 0``), a small
    change for units whose score was positive but ``<= tau`` (their activations are not zero).
    Behind a normalisation that pools units (LayerNorm, RMSNorm, a GroupNorm whose groups hold
    several channels) the re-drawn units also move the statistics of the others, so the output
    changes (a warning at attach). The re-drawn units then receive gradients again; their own
    outputs start from the new draw.

    Acts at logs where the ``DormantUnits`` probe reports dormant units (its all-reduced masks, so
    the same units on every rank); the new weights come from a generator seeded with ``seed`` and the
    step, so every rank draws the same values. An event is reported only for units whose weights
    were read back changed. Under DeepSpeed (ZeRO 0-3) the weights are written into the module,
    into DeepSpeed's fp32 master copy (read back) and the moments into its optimizer state, through
    its public API (``safe_set_full_fp32_param``, ``safe_set_full_optimizer_state``; pass
    ``engine.optimizer`` to ``monitor.step``), so its next step keeps them.

    Args:
        probe: name of the ``DormantUnits`` probe (default: the only one).
        layers: ``{probed module: (incoming layer, outgoing layer)}``, or ``(incoming,
            outgoing, norm)`` with a normalisation between the incoming layer and the
            activation; default for modules inside an ``nn.Sequential``: the nearest
            Linear/Conv before and after, and a normalisation between them and the module.
        init: ``"layer"``, ``"xavier"`` or ``init(weight, bias, generator)`` filling the re-drawn
            ``(out, in, *kernel)`` weight and ``(out,)`` bias (or None) in place, in float32.
        every_n_steps: only act at logs whose step is a multiple of this (ReDo's reset period).
        seed: seed of the re-drawn weights (combined with the step).
        name: see :class:`Mitigation`.

    Raises:
        ValueError: an unknown ``init``; at attach, ``init="layer"`` on a layer whose class has
            its own ``reset_parameters``, a ``layers=`` norm that is not a BatchNorm,
            GroupNorm, LayerNorm or RMSNorm, incoming units that are not the outgoing layer's
            inputs one to one, or an ``nn.Sequential`` layout other than the one above.
    """

    on_quiet_steps = False  # (it acts on steps its probe records, and at logs)

    kind = "redo"
    through_tensor_parallel = True  # (tests/test_tensor_parallel.py: one process's change)
    through_deepspeed = True

    def __init__(
        self,
        probe: str | None = None,
        layers: dict | None = None,
        init="layer",
        every_n_steps: int | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if not callable(init) and init not in _INITS:
            raise ValueError(f"ReDo init must be 'layer', 'xavier' or a callable, got {init!r}")
        self.probe_name = probe
        self.layers = dict(layers or {})
        self.init = _INITS[init] if isinstance(init, str) else init
        self.every_n_steps = every_n_steps
        self.seed = seed

    def __repr__(self) -> str:
        return f"ReDo(name={self.name!r})"

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(getattr(self, "pairs", ()))

    def attach(self, setup) -> None:
        super().attach(setup)
        info = find_probe(setup, "DormantUnits", "ReDo", self.probe_name)
        self.probe = info.name
        modules = named_modules(setup.model)
        self.pairs = {}
        for path in info.paths:
            incoming, outgoing, *norm = self.layers.get(path) or _neighbours(setup.model, path)
            norm = norm[0] if norm else None
            refuse_adapted(modules, (incoming, outgoing), repr(self))
            if norm is not None and not isinstance(modules[norm], _NORMS):
                raise ValueError(
                    f"ReDo: '{norm}' ({type(modules[norm]).__name__}) is not a BatchNorm, "
                    "GroupNorm, LayerNorm or RMSNorm"
                )
            _check_units(incoming, modules[incoming], outgoing, modules[outgoing])
            if norm is not None and _mixes_units(modules[norm]):
                log.warning(
                    "ReDo: '%s' (%s) normalises units together: a reset moves the other units "
                    "of its groups, so the output changes at a reset",
                    norm,
                    type(modules[norm]).__name__,
                )
            self.pairs[layer_name(path)] = (
                modules[incoming],
                modules[outgoing],
                None if norm is None else modules[norm],
            )
            if self.init is _default_init:
                _check_default_init(incoming, modules[incoming])

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
            incoming, outgoing, norm = self.pairs[layer]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + view.step * 101 + i)
            changed = self._recycle(incoming, outgoing, norm, mask, g, view.optimizers)
            if changed:
                touched[layer] = changed
        if not touched:
            return []
        return [Event(self.name, {"layers": touched}, count=sum(touched.values()))]

    @torch.no_grad()
    def _recycle(
        self, incoming: nn.Module, outgoing: nn.Module, norm, mask: torch.Tensor, g, optimizers
    ) -> int:
        """Recycle the units in ``mask``; returns how many were read back changed.

        Every rank computes the same new values (same seed, same reduced mask) and writes
        them whole (into its shards under FSDP2). A normalisation between the incoming layer
        and the activation (``norm``) gets its initial per-channel state back for those units
        (affine weight 1 and bias 0, running mean 0 and variance 1)."""
        w_in, w_out = whole(incoming.weight), whole(outgoing.weight)
        dead = mask.to(w_in.device)
        if w_in.shape[0] != dead.numel() or w_out.shape[1] != dead.numel():
            raise ValueError(
                f"ReDo: {dead.numel()} units do not match incoming {tuple(w_in.shape)} "
                f"and outgoing {tuple(w_out.shape)} weights"
            )
        fresh = torch.empty(w_in.shape, dtype=torch.float32)
        fresh_bias = (
            None if incoming.bias is None else torch.empty(w_in.shape[0], dtype=torch.float32)
        )
        self.init(fresh, fresh_bias, g)
        fresh = fresh.to(w_in)[dead]
        rows, cols = (dead,), (slice(None), dead)
        writes = [(incoming.weight, rows, fresh), (outgoing.weight, cols, 0)]
        if fresh_bias is not None:
            writes.append((incoming.bias, rows, fresh_bias.to(w_in)[dead]))
        if norm is not None and norm.weight is not None:  # (affine)
            writes.append((norm.weight, rows, 1.0))
        if norm is not None and getattr(norm, "bias", None) is not None:
            writes.append((norm.bias, rows, 0.0))
        if norm is not None and getattr(norm, "running_mean", None) is not None:
            norm.running_mean[dead.to(norm.running_mean.device)] = 0.0  # (buffers: no optimizer)
            norm.running_var[dead.to(norm.running_var.device)] = 1.0
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
        if fresh_bias is not None:
            done &= whole(incoming.bias)[dead] == fresh_bias.to(w_in)[dead]
        for param, value in ((getattr(norm, "weight", None), 1), (getattr(norm, "bias", None), 0)):
            if param is not None:  # (a LayerNorm over (C, H, W): each unit's slice)
                rows = whole(param)[dead]
                done &= (rows == value).reshape(rows.shape[0], -1).all(1)
        return int(done.sum())
