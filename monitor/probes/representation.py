"""Dimensional collapse of embeddings (RankMe, effective rank, SimSiam's std), docs/metrics.md#representationrank."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..contracts import Readout
from ..functional import _precision
from ..functional import representation as R
from ..pictures import Picture
from ..reading import Reading, feature_rows, finite_rows, floating, token_mask
from ..rules import RuleSpec
from ..stats import Counter, Moments, Window, WindowView, to_device
from .base import Probe

_F64 = torch.float64


def _has_states(value) -> bool:
    """A ``transformers`` model output with ``last_hidden_state`` (a backbone's)."""
    return isinstance(value, Mapping) and isinstance(value.get("last_hidden_state"), torch.Tensor)


class RepresentationRank(Probe):
    """Dimensional collapse of embeddings: effective rank, RankMe and SimSiam's normalised std.

    Embeddings are the module's output (``read="input"`` for its input; a ``transformers``
    backbone's ``last_hidden_state``), ``(N, D)`` or ``(B, T, D)`` (flattened; padded tokens, from
    ``observe(mask=)`` or the model's ``attention_mask``, left out). Per window the probe keeps the count, mean and centred second moment
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
            ``frechet_distance`` (docs/metrics.md#representationrank). Sketched along with the embeddings.
        ssl: the embeddings are the outputs of a self-supervised projector (SimSiam, BYOL, ...):
            SimSiam's absolute bound ``norm_std < 0.5`` applies (rule ``norm_std_below``; the
            probe reports ``ssl_embedding = 1``). On any signed embeddings the rule
            ``norm_std_drop`` fires when ``norm_std`` falls below a tenth of its highest value.
        pool: see :class:`~collapse_monitor.probes.Probe`.
        per_sequence: the rows are sequences, not tokens: each ``(B, T, D)`` call gives ``B``
            embeddings, the float64 mean of each sequence's tokens that count (those whose
            label is not ``ignore_index`` with ``observe(targets=labels)``, aligned token by
            token as transformers passes ``labels = input_ids``; not padding, from
            ``observe(mask=)`` or the model's ``attention_mask``; every token otherwise). A
            sequence without one is left out. On a language model's last hidden states these are
            the completions' embeddings: their effective rank falls as a policy's completions
            become alike. Raises ``ValueError`` at the call for other shapes.
        ignore_index: the label of a token that does not count (``per_sequence``).
        matmul_dtype: the dtype of the GEMMs of a recorded step (the Gram, the sketch):
            ``None`` (default) float64 on the CPU and on GPUs with fast float64, IEEE float32
            on the others; the statistics stay float64 (docs/metrics.md#precision).

    Reports ``erank`` (Roy & Vetterli, centred covariance), ``rankme`` (uncentred singular values
    from the streamed ``Z'Z``), ``norm_std`` (≈1 healthy, →0 collapsed), ``samples``,
    ``skipped_nonfinite``, and the covariance ``spectrum`` as a histogram
    (:func:`~collapse_monitor.functional.representation_rank`). The second moment resolves
    singular values down to about ``sqrt(D * eps64) * sigma_max``; below that (exactly
    rank-deficient float32 embeddings) RankMe is that of embeddings within that relative distance
    of the input (see :func:`~collapse_monitor.functional.representation.spectrum_metrics`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from collapse_monitor import CollapseMonitor, probes
        >>> model = nn.Sequential(nn.Identity())
        >>> mon = CollapseMonitor(model, [probes.RepresentationRank("0", name="emb")], 1)
        >>> with mon.observe():  # every embedding on one line: complete collapse
        ...     _ = model(torch.linspace(1, 2, 50)[:, None] * torch.ones(1, 8))
        >>> round(mon.step()["collapse/emb/erank"], 6)
        1.0
        >>> mon.close()
    """

    headline = ("erank", "norm_std")
    # token states (B, T, D): padding from observe(mask=) or the model's attention_mask
    keywords = {"mask": False}
    uses_token_mask = True

    reads = Reading(
        "floating-point embeddings (N, D) or (B, T, D)",
        floating(2),
        find=lambda v: v["last_hidden_state"] if _has_states(v) else v,  # a backbone's output
        hint="embeddings (N, D)",
    )
    rules = (
        # SimSiam's criterion is for the signed (roughly centred) outputs of an SSL projector:
        # non-negative features (after a ReLU) sit low by construction, and a classifier's hidden
        # layer clusters by class (0.4 at step 550 of a healthy MLP), so the absolute bound
        # waits for embeddings marked ssl=True (the probe then reports ssl_embedding = 1)
        RuleSpec(
            "norm_std",
            0.5,
            "below",
            name="norm_std_below",
            severe=0.25,
            requires=(("negative_mass", "above", 0.1), ("ssl_embedding", "above", 0.5)),
            message="embeddings are collapsing to a point (SimSiam criterion)",
        ),
        # on any signed embeddings: armed by the run's own values, a fall below a tenth of the
        # highest norm_std seen is a collapse to a point whatever the layer
        RuleSpec(
            "norm_std",
            0.9,
            "drop",
            name="norm_std_drop",
            requires=("negative_mass", "above", 0.1),
            message="embeddings collapsed to a point: norm_std fell below a tenth of its own "
            "earlier level",
        ),
    )

    def __init__(
        self,
        module: str,
        read: str = "output",
        sketch_dim: int = 4096,
        reference=None,
        ssl: bool = False,
        seed: int = 0,
        name: str | None = None,
        extract=None,
        pool: bool = False,
        per_sequence: bool = False,
        ignore_index: int = -100,
        matmul_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(module, name, extract, read, pool)
        self.matmul_dtype = _precision.check_matmul_dtype(matmul_dtype)
        if sketch_dim < 1:
            raise ValueError(f"sketch_dim must be >= 1, got {sketch_dim}")
        self.per_sequence = bool(per_sequence)
        self.ignore_index = ignore_index
        if self.per_sequence:  # which tokens of a sequence count: labels and padding
            self.keywords = {"targets": False, "mask": False}
        self.sketch_dim = int(sketch_dim)
        self.seed = seed
        self.ssl = bool(ssl)
        self._reference_input = reference
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sketch: torch.Tensor | None = None  # P, made when D > sketch_dim is first seen

    def new_window(self) -> Window:
        return Window(
            {
                "moments": Moments(matmul_dtype=self.matmul_dtype),
                "unit": Moments(diagonal=True),
                # negative parts of z/||z||: how much of each embedding is signed
                "negative": Moments(diagonal=True),
                "counts": Counter(("skipped_nonfinite",)),
            }
        )

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """``z (N, D)``, or its sketch ``z P (N, k)`` when ``D > sketch_dim``."""
        D = z.shape[1]
        if D <= self.sketch_dim:
            return z
        if self.sketch is None or self.sketch.shape[0] != D:
            g = torch.Generator().manual_seed(self.seed)
            self.sketch = torch.randn(D, self.sketch_dim, generator=g, dtype=_F64)
            self.sketch /= self.sketch_dim**0.5
        self.sketch = to_device(self.sketch, z.device)
        return _precision.matmul64(
            z, self.sketch, _precision.matmul_dtype(self.matmul_dtype, z.device)
        )

    def frozen(self, group=None, scope: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean (D,), covariance (D, D))`` float64 of the current window over all ranks (a
        collective: call it on every rank): a reference for later runs. ``scope``: the module,
        for a glob kept per module."""
        if self._driver is None:
            raise RuntimeError(f"{self!r} is not attached to a monitor: nothing recorded yet")
        m = WindowView(self._driver.window.reduced(group), scope)["moments"]
        return m.mean(), m.scatter() / max(m.n - 1, 1)

    def _sequence_means(self, z: torch.Tensor, call) -> torch.Tensor:
        """``(B, T, D)`` token states to ``(B', D)`` float64 means over each sequence's
        tokens that count (``per_sequence``; sequences without one left out)."""
        if z.ndim != 3:
            raise call.error(
                f"per_sequence=True needs (B, T, D) token states, got {tuple(z.shape)}"
            )
        B, T = z.shape[:2]
        keep = token_mask(call, B, T, z.device)
        keep = torch.ones(B, T, dtype=torch.bool, device=z.device) if keep is None else keep
        labels = call.keyword("targets")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if tuple(labels.shape[:2]) != (B, T) or labels.ndim != 2:
                raise call.error(
                    f"targets of shape {tuple(labels.shape)} for {B} sequences of {T} tokens: "
                    f"expected ({B}, {T}), one label per token"
                )
            keep = keep & (to_device(labels, z.device) != self.ignore_index)
        w = keep.to(_F64)
        n = w.sum(1)
        means = (z.detach().to(_F64) * w[..., None]).sum(1) / n.clamp_min(1.0)[:, None]
        return means[n > 0]

    def update(self, window, z, call) -> None:
        real = None
        if self.per_sequence:
            z = self._sequence_means(z, call)
        elif z.ndim == 3:  # token states: padded positions are not embeddings
            real = token_mask(call, z.shape[0], z.shape[1], z.device)
        feature_rows(z, call, "embeddings")
        z = z.detach().reshape(-1, z.shape[-1])
        finite = finite_rows(z)
        real = None if real is None else real.reshape(-1)
        bad = ~finite if real is None else real & ~finite
        call.nonfinite_rows(bad, real)  # (one NaN feature spoils every row: the run diverged)
        window["counts"].add("skipped_nonfinite", bad.sum())
        keep = finite if real is None else finite & real  # (padding: not a sample)
        z = torch.where(keep[:, None], z, 0.0)
        window["moments"].update(self.project(z), keep)
        unit = z.to(_F64) / z.to(_F64).norm(dim=1, keepdim=True).clamp_min(1e-12)
        window["unit"].update(unit, keep)
        window["negative"].update(unit.clamp_max(0), keep)

    def _resolved_reference(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference is None:
            ref = self._reference_input
            if isinstance(ref, torch.Tensor):
                z = ref.detach().reshape(-1, ref.shape[-1]).to(device)
                self.reference = R.mean_and_covariance(self.project(z))
            else:
                self.reference = tuple(t.to(device=device, dtype=_F64) for t in ref)
        return self.reference

    def readout(self, window) -> Readout:
        m, u = window["moments"], window["unit"]
        n = m.n
        out = {
            "samples": float(n),
            "skipped_nonfinite": float(window["counts"]["skipped_nonfinite"]),
        }
        if self.ssl:
            out["ssl_embedding"] = 1.0
        if n < 2:
            return Readout({self.key(k): v for k, v in out.items()})
        scatter = m.scatter()
        spec = R.spectrum_metrics(n, m.mean(), scatter)
        out.update(
            erank=spec["erank"],
            rankme=spec["rankme"],
            norm_std=R.norm_std_from_moments(n, u.scatter()),
            negative_mass=float(
                (window["negative"].scatter() / n + window["negative"].mean() ** 2).sum()
            ),
        )
        if self._reference_input is not None:
            ref_mean, ref_cov = self._resolved_reference(scatter.device)
            if ref_cov.shape != scatter.shape:
                raise ValueError(
                    f"{self!r}: reference covariance {tuple(ref_cov.shape)} does not match the "
                    f"embeddings' {tuple(scatter.shape)}"
                )
            cov = scatter / (n - 1)
            out["variance_ratio"] = R.variance_ratio(cov, ref_cov)
            out["frechet_distance"] = R.frechet_distance(m.mean(), cov, ref_mean, ref_cov)
        lam = spec["eigenvalues"]
        pictures = {}
        if lam.sum() > 0:
            pictures[self.key("eigen_spectrum")] = Picture(
                "spectrum",
                lam / lam.sum(),
                "eigen-spectrum of the embedding covariance (fraction of the variance)",
                "eigenvalue index",
                "lambda_i / sum lambda",
            )
        return Readout(
            {self.key(k): v for k, v in out.items()},
            histograms={self.key("spectrum"): lam},
            pictures=pictures,
        )
