"""Representation probes: dimensional collapse (SSL) and posterior collapse (VAE)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import _dist
from ..functional import representation as R
from ..pictures import Picture
from ..rules import Rule
from ..stats import ClassMoments, Counter, SumStatistic, to_device
from .base import WindowedProbe, first_tensor

_F64 = torch.float64


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1])


class RepresentationRank(WindowedProbe):
    """Dimensional collapse of embeddings: effective rank, RankMe and SimSiam's normalised std.

    Embeddings are the module's output (``read="input"`` for its input), ``(N, D)`` or
    ``(B, T, D)`` (flattened). Per window the probe keeps the count, mean and centred second moment
    (shifted float64, exact under DDP) and the per-coordinate moments of ``z/||z||``.

    Args:
        module: path of the module (e.g. the SSL projector).
        read: ``"output"`` (default) or ``"input"``.
        sketch_dim: above this ``D`` the second moment is kept for ``z P`` with a fixed Gaussian
            ``P (D x k)/sqrt(k)``, ``k = sketch_dim`` (seeded, identical on every rank), so memory
            is ``8 k^2`` bytes. ``E[P P'] = I`` keeps ``tr Σ`` unbiased; by the subspace-embedding
            property, for a spectrum of (effective) rank ``r`` the top singular values are kept within
            a factor ``1 ± ε`` once ``k ≳ r/ε²``. ``norm_std`` is always exact (O(D) state).
        reference: ``(N_ref, D)`` reference embeddings, or a ``(mean, covariance)`` pair from
            :meth:`frozen`: adds ``variance_ratio`` (``tr Σ / tr Σ_ref``) and
            ``frechet_distance`` (METRICS.md section 9). Sketched along with the embeddings.

    Reports ``erank`` (Roy & Vetterli, centred covariance), ``rankme`` (uncentred singular values,
    exact from the streamed ``Z'Z``), ``norm_std`` (≈1 healthy, →0 collapsed), ``samples``,
    ``skipped_nonfinite``, and the covariance ``spectrum`` as a histogram.
    """

    def __init__(
        self,
        module: str,
        read: str = "output",
        sketch_dim: int = 4096,
        reference=None,
        seed: int = 0,
        name: str | None = None,
        extract=None,
    ) -> None:
        super().__init__(module, name, extract)
        if read not in ("input", "output"):
            raise ValueError(f"read must be 'input' or 'output', got {read!r}")
        if sketch_dim < 1:
            raise ValueError(f"sketch_dim must be >= 1, got {sketch_dim}")
        self.read = read
        self.sketch_dim = int(sketch_dim)
        self.seed = seed
        self._reference_input = reference
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sketch: torch.Tensor | None = None
        self._spectrum: torch.Tensor | None = None

    def new_window(self) -> dict:
        return {
            "moments": ClassMoments(1),
            "unit": ClassMoments(1, diagonal=True),
            "counts": Counter(("skipped_nonfinite",)),
        }

    def default_rules(self) -> list[Rule]:
        return [
            Rule(
                f"collapse/{self.name}/norm_std",
                0.5,
                "below",
                patience=2,
                name=f"{self.name}/norm_std_below",
                message="embeddings are collapsing to a point (SimSiam criterion)",
            ),
        ]

    def _project(self, z: torch.Tensor) -> torch.Tensor:
        D = z.shape[1]
        if D <= self.sketch_dim:
            return z
        if self._sketch is None or self._sketch.shape[0] != D:
            g = torch.Generator().manual_seed(self.seed)
            self._sketch = torch.randn(D, self.sketch_dim, generator=g, dtype=_F64)
            self._sketch /= self.sketch_dim**0.5
        self._sketch = to_device(self._sketch, z.device)
        return z.to(_F64) @ self._sketch

    def frozen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, covariance)`` of the current window (all-reduced): a reference for later runs."""
        m = self._synced()["moments"]
        n = int(m.count.sum())
        return m.means()[0], m.within_class_scatter() / max(n - 1, 1)

    def observe(self, path, module, args, kwargs, output) -> None:
        if self.extract is not None:
            z = self.extract(module, args, output)
        else:
            z = first_tensor(args, kwargs) if self.read == "input" else output
        if not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.ndim < 2:
            what = (
                f"Tensor {z.dtype} {tuple(z.shape)}"
                if isinstance(z, torch.Tensor)
                else type(z).__name__
            )
            raise self.error(
                path,
                f"expected floating-point embeddings (N, D) or (B, T, D) as the module's "
                f"{self.read}, got {what}; pass extract=lambda module, args, output: embeddings",
            )
        z = _rows(z)
        self._move(z.device)
        finite = torch.isfinite(z).all(1)
        self.window["counts"].add("skipped_nonfinite", (~finite).sum())
        z = torch.where(finite[:, None], z, 0.0)
        zeros = torch.zeros(z.shape[0], dtype=torch.int64, device=z.device)
        self.window["moments"].update(self._project(z), zeros, finite)
        unit = z.to(_F64) / z.to(_F64).norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.window["unit"].update(unit, zeros, finite)

    def _resolve_reference(self, device) -> None:
        ref = self._reference_input
        if ref is None or self.reference is not None:
            return
        if isinstance(ref, torch.Tensor):
            mean, cov = R.mean_and_covariance(self._project(_rows(ref).to(device)))
        else:
            mean, cov = (t.to(device=device, dtype=_F64) for t in ref)
        self.reference = (mean, cov)

    def compute(self, group=None) -> dict[str, float]:
        win = self._synced(group)
        m, u = win["moments"], win["unit"]
        n = int(m.count.sum())
        out = {"samples": float(n), "skipped_nonfinite": float(win["counts"]["skipped_nonfinite"])}
        if n < 2:
            return out
        scatter = m.within_class_scatter()
        spec = R.spectrum_metrics(n, m.means()[0], scatter)
        self._spectrum = spec["eigenvalues"]
        out.update(
            erank=spec["erank"],
            rankme=spec["rankme"],
            norm_std=R.norm_std_from_moments(n, u.within_class_scatter()),
        )
        if self._reference_input is not None:
            self._resolve_reference(scatter.device)
            ref_mean, ref_cov = self.reference
            if ref_cov.shape != scatter.shape:
                raise ValueError(
                    f"{self!r}: reference covariance {tuple(ref_cov.shape)} does not match the "
                    f"embeddings' {tuple(scatter.shape)}"
                )
            cov = scatter / (n - 1)
            out["variance_ratio"] = (cov.trace() / ref_cov.trace()).item()
            out["frechet_distance"] = R.frechet_distance(m.means()[0], cov, ref_mean, ref_cov)
        return out

    def histograms(self) -> dict[str, torch.Tensor]:
        return {} if self._spectrum is None else {"spectrum": self._spectrum}

    def pictures(self) -> dict[str, Picture]:
        if self._spectrum is None or not self._spectrum.sum() > 0:
            return {}
        lam = self._spectrum.sort(descending=True).values
        return {
            "eigen_spectrum": Picture(
                "spectrum",
                lam / lam.sum(),
                "eigen-spectrum of the embedding covariance (fraction of the variance)",
                "eigenvalue index",
                "lambda_i / sum lambda",
            )
        }


class PosteriorCollapse(WindowedProbe):
    """Posterior collapse of a VAE encoder with a diagonal Gaussian posterior and N(0, I) prior.

    Reads ``(mu, logvar)`` from the module's output: a tuple/list of two tensors, a dict with
    ``mu`` and ``logvar`` (or ``log_var``), or a ``torch.distributions.Normal`` (also inside
    ``Independent``); ``extract(module, args, output) -> (mu, logvar)`` otherwise.

    Args:
        module: path of the encoder (or of its posterior head).
        active_threshold: Burda's activity cut-off on ``Var_x(mu_j)`` (unbiased), for a unit prior.
        num_smallest: how many of the lowest per-dimension KLs to log as ``kl/dim_<j>`` scalars.
        passive_delta, active_delta, polarised_fraction: see
            :func:`monitor.functional.posterior_collapse`.

    Reports ``kl_total`` (nats, ``E_x sum_j KL_j``), ``kl/dim_<j>`` for the ``num_smallest`` lowest,
    ``active_units``, ``active_fraction``, ``units_passive`` / ``units_active`` / ``units_mixed``
    (polarised regime), ``collapsed_units`` (``KL_j < 0.01``), ``samples``, ``skipped_nonfinite``;
    histograms ``kl`` (per dimension) and ``log10_activity`` (Burda's bimodal plot).
    """

    every_step = True  # O(B*D) per update

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
        self._last: dict | None = None

    def new_window(self) -> dict:
        return {"mu": ClassMoments(1, diagonal=True), "sums": _PosteriorSums()}

    def default_rules(self) -> list[Rule]:
        return [
            Rule(
                f"collapse/{self.name}/active_fraction",
                0.5,
                "below",
                patience=2,
                name=f"{self.name}/active_below",
                message="most latent units are inactive: try KL annealing or free bits",
            ),
        ]

    def _posterior(self, path, module, args, output):
        if self.extract is not None:
            found = self.extract(module, args, output)
        else:
            found = _mu_logvar(output)
        if found is None or len(found) != 2 or not all(isinstance(t, torch.Tensor) for t in found):
            raise self.error(
                path,
                "expected (mu, logvar): a tuple/list of two tensors, a dict with 'mu' and "
                "'logvar', or a torch.distributions.Normal; pass extract=lambda module, args, "
                "output: (mu, logvar)",
            )
        mu, logvar = found
        if mu.shape != logvar.shape or mu.ndim < 1 or not mu.is_floating_point():
            raise self.error(
                path,
                f"mu {tuple(mu.shape)} {mu.dtype} and logvar {tuple(logvar.shape)} must be "
                "floating tensors of one shape",
            )
        d = mu.shape[-1]
        return mu.detach().reshape(-1, d), logvar.detach().reshape(-1, d)

    def observe(self, path, module, args, kwargs, output) -> None:
        mu, logvar = self._posterior(path, module, args, output)
        self._move(mu.device)
        finite = torch.isfinite(mu).all(1) & torch.isfinite(logvar).all(1)
        mu = torch.where(finite[:, None], mu, 0.0)
        logvar = torch.where(finite[:, None], logvar, 0.0)
        zeros = torch.zeros(mu.shape[0], dtype=torch.int64, device=mu.device)
        self.window["mu"].update(mu, zeros, finite)
        self.window["sums"].add(mu, logvar, finite, self.passive_delta, self.active_delta)

    def compute(self, group=None) -> dict[str, float]:
        win = self._synced(group)
        m, sums = win["mu"], win["sums"]
        n = int(m.count.sum())
        if n < 2:
            self._last = None
            return {"samples": float(n), "skipped_nonfinite": float(sums.skipped)}
        summary = R.summarise_posterior(
            n,
            sums.kl / n,
            m.within_class_scatter() / (n - 1),
            sums.passive_like.to(_F64) / n,
            sums.active_like.to(_F64) / n,
            self.active_threshold,
            self.polarised_fraction,
        )
        self._last = summary
        kl = summary["kl_per_dim"]
        out = {k: float(v) for k, v in summary.items() if not isinstance(v, torch.Tensor)}
        out["skipped_nonfinite"] = float(sums.skipped)
        for j in kl.argsort()[: self.num_smallest].tolist():
            out[f"kl/dim_{j}"] = kl[j].item()
        return out

    def histograms(self) -> dict[str, torch.Tensor]:
        if self._last is None:
            return {}
        return {
            "kl": self._last["kl_per_dim"],
            "log10_activity": self._last["activity"].clamp_min(1e-30).log10(),
        }

    def pictures(self) -> dict[str, Picture]:
        if self._last is None:
            return {}
        return {
            "kl_per_dim": Picture(
                "bars",
                self._last["kl_per_dim"],
                "KL(q(z_j|x) || p(z_j)) per latent dimension (0: unused)",
                "latent dimension",
                "nats",
            )
        }


class _PosteriorSums(SumStatistic):
    """Per-dimension sums for posterior collapse: ``sum_x KL_j(x)`` and polarisation counts."""

    def __init__(self) -> None:
        super().__init__()
        self.dim = 0
        self.add_state("kl", lambda st: (st.dim,), _F64)
        self.add_state("passive_like", lambda st: (st.dim,), torch.int64)
        self.add_state("active_like", lambda st: (st.dim,), torch.int64)
        self.add_state("skipped", (), torch.int64)

    def add(self, mu, logvar, valid, passive_delta, active_delta) -> None:
        if not self.dim:
            self.dim = mu.shape[1]
            self.device = mu.device
            self.reset()
        elif mu.shape[1] != self.dim:
            raise ValueError(f"latent dimension changed from {self.dim} to {mu.shape[1]}")
        w = valid[:, None]
        self.kl += torch.where(w, R.gaussian_kl_per_dim(mu, logvar), 0.0).sum(0)
        var = logvar.to(_F64).exp()
        self.passive_like += (w & (var > 1 - passive_delta)).sum(0)
        self.active_like += (w & (var < active_delta)).sum(0)
        self.skipped += (~valid).sum()

    def load_state_dict(self, state) -> None:
        self.dim = state["kl"].shape[0]
        self.reset()
        super().load_state_dict(state)

    def all_reduce(self, group=None):
        dim = torch.tensor([self.dim], device=self.device)
        _dist.all_reduce_max_(dim, group)
        if not self.dim:
            self.dim = int(dim)
            self.reset()
        return super().all_reduce(group)


def _mu_logvar(output):
    dist = output
    if isinstance(dist, torch.distributions.Independent):
        dist = dist.base_dist
    if isinstance(dist, torch.distributions.Normal):
        return dist.loc, 2 * dist.scale.log()
    if isinstance(output, Mapping):
        logvar = output.get("logvar", output.get("log_var"))
        return None if "mu" not in output or logvar is None else (output["mu"], logvar)
    if isinstance(output, (tuple, list)) and len(output) == 2:
        return tuple(output)
    return None


__all__ = ["PosteriorCollapse", "RepresentationRank"]
