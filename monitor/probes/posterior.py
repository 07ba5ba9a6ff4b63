"""Posterior collapse of a VAE encoder (docs/metrics.md#posteriorcollapse)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..cadence import EVERY_STEP
from ..contracts import Readout
from ..functional import representation as R
from ..pictures import Picture
from ..reading import Reading, finite_rows
from ..rules import RuleSpec
from ..stats import Moments, PosteriorSums, Window
from .base import Probe

_F64 = torch.float64
# rows the window's last step must hold for its own active fraction (the rule's latest value),
# else it is taken with the step before: Burda's variance of a unit's mean over 64 inputs is
# within about 18% of the population's (its relative standard error sqrt(2 / 63))
_LATEST_ROWS = 64


class Gaussian(tuple):
    """``(mu, logvar)`` of a diagonal Gaussian posterior, with ``latent_dims``: how many trailing
    dimensions hold the latent (a distribution's event dimensions; None when not stated)."""

    latent_dims: int | None = None


def mu_logvar(output):
    """``(mu, logvar)`` of a posterior: a ``Normal`` (its latent axes are the event dimensions of
    an ``Independent`` around it), a dict with ``mu`` and ``logvar`` (or ``log_var``), or a
    tuple/list of two tensors; else the output."""
    dist, event = output, 0
    while isinstance(dist, torch.distributions.Independent):
        event += dist.reinterpreted_batch_ndims
        dist = dist.base_dist
    if isinstance(dist, torch.distributions.Normal):
        found = Gaussian((dist.loc, 2 * dist.scale.log()))
        found.latent_dims = event or None
        return found
    if isinstance(output, Mapping):
        logvar = output.get("logvar", output.get("log_var"))
        return output if "mu" not in output or logvar is None else (output["mu"], logvar)
    return output


def _is_pair(value) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in value)
        and value[0].shape == value[1].shape
        and value[0].ndim >= 1
    )


class PosteriorCollapse(Probe):
    """Posterior collapse of a VAE encoder with a diagonal Gaussian posterior and N(0, I) prior.

    Reads ``(mu, logvar)`` from the module's output: a tuple/list of two tensors, a dict with
    ``mu`` and ``logvar`` (or ``log_var``), or a ``torch.distributions.Normal`` (also inside
    ``Independent``); ``extract(module, args, output) -> (mu, logvar)`` otherwise.

    Args:
        module: path of the encoder (or of its posterior head).
        active_threshold: Burda's activity cut-off on ``Var_x(mu_j)`` (unbiased), for a unit prior.
        num_smallest: how many of the lowest per-dimension KLs to log as ``kl/dim_<j>`` scalars.
        passive_delta, active_delta, polarised_fraction: see
            :func:`collapse_monitor.functional.posterior_collapse`.
        latent_dims: how many trailing dimensions of ``mu`` hold the latent (``3`` for a
            convolutional latent ``(B, C, H, W)``); default: the event dimensions of an
            ``Independent`` posterior, else ``1`` for ``mu`` of 1 or 2 dimensions. A ``mu`` of
            more dimensions without either is an error (its latent axes are not known).
        pool: see :class:`~collapse_monitor.probes.Probe`.

    Reports ``kl_total`` (nats, ``E_x sum_j KL_j``), ``kl/dim_<j>`` for the ``num_smallest`` lowest,
    ``active_units``, ``active_fraction``, ``active_fraction_last_step`` (the same over the
    window's last recorded step alone when it holds >= 64 rows, else with the step before; not
    reported when they hold fewer), ``active_fraction_peak`` (the highest share of units active
    within one call of the window: one encoder, where the window's share also counts the
    encoder's drift between steps as activity; under DDP each rank's calls, their highest),
    ``units_passive`` / ``units_active`` / ``units_mixed``
    (polarised regime), ``collapsed_units`` (``KL_j < 0.01``), ``samples``, ``skipped_nonfinite``;
    histograms ``kl`` (per dimension) and ``log10_activity`` (Burda's bimodal plot).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.distributions import Independent, Normal
        >>> from collapse_monitor import CollapseMonitor, probes
        >>> class Encoder(nn.Module):  # a (B, 2, 4, 4) latent; channel 1 is the prior
        ...     def forward(self, x):
        ...         loc = torch.stack([x, torch.zeros_like(x)], 1)
        ...         return Independent(Normal(loc, torch.ones_like(loc)), 3)
        >>> model = nn.Sequential(Encoder())
        >>> mon = CollapseMonitor(model, [probes.PosteriorCollapse("0", name="vae")], 1)
        >>> with mon.observe():
        ...     _ = model(torch.randn(64, 4, 4))
        >>> mon.step()["collapse/vae/active_fraction"]  # 16 of the 32 latent dimensions
        0.5
        >>> mon.close()
    """

    headline = ("kl_total", "active_fraction")

    reads = Reading(
        "(mu, logvar): two floating tensors of one shape, a dict with 'mu' and 'logvar', or a "
        "torch.distributions.Normal",
        _is_pair,
        find=mu_logvar,
        hint="(mu, logvar)",
    )
    sampling = EVERY_STEP  # O(B*D) per update
    rules = (
        RuleSpec(
            "active_fraction",
            0.6,
            "below",
            name="active_below",
            # a fresh encoder's means barely vary: units start inactive (and come and go in the
            # first steps); armed once 60% of the units were active on a log, in the window and
            # within one call (one encoder: a window pools the encoder's drift between steps,
            # which 6 of 8 healthy KL-annealed VAEs of an independent sweep read as 0.6-1.0
            # active while each step held 0-0.33). One log arms it (two in a row missed an
            # encoder active at initialisation that collapsed in its second window, 4 of 6 runs
            # of an independent round). The last step alone (64 inputs) fires under 0.5: an
            # encoder collapsing inside its first window (a KL weight fixed high) alerts at that
            # log (6 of 6 such runs of an independent round were one log late, 1 now)
            arm=True,
            arm_logs=1,
            arm_by="active_fraction_peak",
            patience=1,
            latest="active_fraction_last_step",
            severe=0.5,
            message="most latent units are inactive: try KL annealing or free bits",
        ),
    )

    def __init__(
        self,
        module: str,
        active_threshold: float = 0.01,
        num_smallest: int = 4,
        passive_delta: float = 0.1,
        active_delta: float = 0.5,
        polarised_fraction: float = 0.95,
        latent_dims: int | None = None,
        name: str | None = None,
        extract=None,
        pool: bool = False,
    ) -> None:
        super().__init__(module, name, extract, pool=pool)
        if latent_dims is not None and latent_dims < 1:
            raise ValueError(f"latent_dims must be >= 1, got {latent_dims}")
        self.latent_dims = latent_dims
        self.active_threshold = float(active_threshold)
        self.num_smallest = int(num_smallest)
        self.passive_delta = float(passive_delta)
        self.active_delta = float(active_delta)
        self.polarised_fraction = float(polarised_fraction)

    def new_window(self) -> Window:
        # the window's means, this step's, and the window's last two steps' (the latest value)
        latest = ("mu/step", "mu/last", "mu/before")
        return Window(
            {"mu": Moments(diagonal=True), "sums": PosteriorSums()}
            | {k: Moments(diagonal=True) for k in latest},
            transient=latest,
        )

    def _latent_dims(self, pair, call) -> int:
        stated = pair.latent_dims if isinstance(pair, Gaussian) else None
        if self.latent_dims is not None:
            if stated is not None and stated != self.latent_dims:
                raise self.error(
                    call.path,
                    f"latent_dims={self.latent_dims} but the posterior's event dimensions are "
                    f"{stated} (mu of shape {tuple(pair[0].shape)})",
                )
            return self.latent_dims
        if stated is not None:
            return stated
        if pair[0].ndim <= 2:
            return 1
        raise self.error(
            call.path,
            f"mu of shape {tuple(pair[0].shape)}: which trailing dimensions hold the latent is "
            "not known; pass latent_dims= (3 for a (B, C, H, W) latent) or return "
            "torch.distributions.Independent(Normal(loc, scale), <event dims>)",
        )

    def update(self, window, pair, call) -> None:
        k = self._latent_dims(pair, call)
        if k > pair[0].ndim:
            raise self.error(call.path, f"latent_dims={k} for mu of shape {tuple(pair[0].shape)}")
        d = math.prod(pair[0].shape[pair[0].ndim - k :])
        mu, logvar = (t.detach().reshape(-1, d) for t in pair)
        finite = finite_rows(mu) & finite_rows(logvar)
        call.nonfinite_rows(~finite)  # (one NaN latent spoils every row: the run diverged)
        mu = torch.where(finite[:, None], mu, 0.0)
        logvar = torch.where(finite[:, None], logvar, 0.0)
        window["mu"].update(mu, finite)
        window["mu/step"].update(mu, finite)
        window["sums"].update(
            mu, logvar, finite, self.passive_delta, self.active_delta, self.active_threshold
        )

    def end_missed_step(self, window) -> None:
        # under DDP the other ranks' last step is this step: this rank's is empty
        self.end_step(window)

    def end_step(self, window) -> None:
        # this step's moments are the last step's, the last's the step before's
        window.shift("mu/before", "mu/last", "mu/step")

    def _latest(self, window) -> Moments | None:
        """The moments of the window's last recorded step, with the step before when the last
        holds fewer than 64 rows; None when they hold fewer."""
        last, before = window["mu/last"], window["mu/before"]
        if last.n >= _LATEST_ROWS:
            return last
        if not last.n or last.n + before.n < _LATEST_ROWS:
            return None
        return last.clone().merge(before)

    def readout(self, window) -> Readout:
        m, sums = window["mu"], window["sums"]
        n = m.n
        if n < 2:
            out = {"samples": float(n), "skipped_nonfinite": float(sums.skipped)}
            return Readout({self.key(k): v for k, v in out.items()})
        summary = R.summarise_posterior(
            n,
            sums.kl / n,
            m.scatter() / (n - 1),
            sums.passive_like.to(_F64) / n,
            sums.active_like.to(_F64) / n,
            self.active_threshold,
            self.polarised_fraction,
        )
        kl = summary["kl_per_dim"]
        out = {self.key(k): float(v) for k, v in summary.items() if not isinstance(v, torch.Tensor)}
        out[self.key("skipped_nonfinite")] = float(sums.skipped)
        out[self.key("active_fraction_peak")] = sums.peak_active.item()
        latest = self._latest(window)
        if latest is not None:
            activity = latest.scatter() / (latest.n - 1)
            out[self.key("active_fraction_last_step")] = (
                (activity > self.active_threshold).to(_F64).mean().item()
            )
        for j in kl.argsort()[: self.num_smallest].tolist():
            out[self.key("kl", index=f"dim_{j}")] = kl[j].item()
        histograms = {
            self.key("kl"): kl,
            self.key("log10_activity"): summary["activity"].clamp_min(1e-30).log10(),
        }
        pictures = {
            self.key("kl_per_dim"): Picture(
                "bars",
                kl,
                "KL(q(z_j|x) || p(z_j)) per latent dimension (0: unused)",
                "latent dimension",
                "nats",
            )
        }
        return Readout(out, histograms, pictures)
