"""Posterior collapse of a VAE encoder (METRICS.md section 4)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..contracts import Readout
from ..functional import representation as R
from ..pictures import Picture
from ..reading import Reading
from ..rules import RuleSpec
from ..stats import Moments, PosteriorSums, Window
from .base import Probe

_F64 = torch.float64


def mu_logvar(output):
    """``(mu, logvar)`` of a posterior: a ``Normal`` (also inside ``Independent``), a dict with
    ``mu`` and ``logvar`` (or ``log_var``), or a tuple/list of two tensors; else the output."""
    dist = output
    if isinstance(dist, torch.distributions.Independent):
        dist = dist.base_dist
    if isinstance(dist, torch.distributions.Normal):
        return dist.loc, 2 * dist.scale.log()
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

    Reports ``kl_total`` (nats, ``E_x sum_j KL_j``), ``kl/dim_<j>`` for the ``num_smallest`` lowest,
    ``active_units``, ``active_fraction``, ``units_passive`` / ``units_active`` / ``units_mixed``
    (polarised regime), ``collapsed_units`` (``KL_j < 0.01``), ``samples``, ``skipped_nonfinite``;
    histograms ``kl`` (per dimension) and ``log10_activity`` (Burda's bimodal plot).
    """

    reads = Reading(
        "(mu, logvar): two floating tensors of one shape, a dict with 'mu' and 'logvar', or a "
        "torch.distributions.Normal",
        _is_pair,
        find=mu_logvar,
        hint="(mu, logvar)",
    )
    every_step = True  # O(B*D) per update
    rules = (
        RuleSpec(
            "active_fraction",
            0.5,
            "below",
            name="active_below",
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
        name: str | None = None,
        extract=None,
    ) -> None:
        super().__init__(module, name, extract)
        self.active_threshold = float(active_threshold)
        self.num_smallest = int(num_smallest)
        self.passive_delta = float(passive_delta)
        self.active_delta = float(active_delta)
        self.polarised_fraction = float(polarised_fraction)

    def new_window(self) -> Window:
        return Window({"mu": Moments(diagonal=True), "sums": PosteriorSums()})

    def update(self, window, pair, call) -> None:
        d = pair[0].shape[-1]
        mu, logvar = (t.detach().reshape(-1, d) for t in pair)
        finite = torch.isfinite(mu).all(1) & torch.isfinite(logvar).all(1)
        mu = torch.where(finite[:, None], mu, 0.0)
        logvar = torch.where(finite[:, None], logvar, 0.0)
        window["mu"].update(mu, finite)
        window["sums"].update(mu, logvar, finite, self.passive_delta, self.active_delta)

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
