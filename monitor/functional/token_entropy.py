"""Predictive entropy of a language model's next-token distribution (docs/metrics.md#tokenentropy):
the float64 whole-tensor reference, the chunked kernel the probe runs, and the readout they share.

The entropy of ``softmax(z)`` over a vocabulary of ``V`` is ``H = logsumexp(z) - sum_j p_j z_j``
nats (0: one certain token, ``log V``: uniform), as TRL's ``entropy_from_logits`` and torchtitan
compute it. Policy-entropy collapse in RL post-training is this mean falling towards 0 (Cui et al.
2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import torch

_F64 = torch.float64
#: the histogram behind the quantiles: bins of this width (nats) from 0 to HIST_BINS * width
#: (16 nats: a uniform distribution over 8.9 M tokens); a quantile is exact to one bin
HIST_WIDTH = 0.01
HIST_BINS = 1600


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row's softmax, in float64: the reference.

    Args:
        logits: ``(..., V)`` of any floating dtype; ``-inf`` entries are tokens with probability 0.

    Returns:
        ``(...)`` float64 ``logsumexp(z) - sum_j softmax(z)_j z_j``.
    """
    z = logits.to(_F64)
    lse = z.logsumexp(-1, keepdim=True)
    p = (z - lse).exp()
    return lse[..., 0] - torch.where(p > 0, p * z, 0.0).sum(-1)


def chunked_entropy(
    rows: torch.Tensor,
    chunk: int = 16384,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    target: torch.Tensor | None = None,
    low_rank: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_entropy` of ``rows (N, V)`` in at least float32, ``chunk`` vocabulary entries at
    a time (an online log-sum-exp), so that memory is ``N * chunk``, not ``N * V``. With
    ``weight (V, D)`` (and ``bias (V,)``), ``rows`` are an LM head's inputs ``(N, D)`` and each
    chunk's logits are made from them (``rows W' + b``): the full logits never exist. Logits are
    divided by ``temperature``. ``low_rank``: pairs ``(U (D, r), B (V, r))`` whose ``(rows U) B'``
    the logits add (a LoRA-adapted head, never made whole). With ``target (N,)`` token ids, also
    returns each row's log-probability of its target, ``z_target - logsumexp(z)``:
    ``(entropy, log_prob)``.

    With ``m`` the running maximum, ``s = sum exp(z - m)`` and ``t = sum exp(z - m) (z - m)``:
    ``H = log s - t / s``; a new maximum ``m'`` rescales both (``s e^(m - m')`` and
    ``(t + s (m - m')) e^(m - m')``). Returns ``(N,)`` in the compute dtype.
    """
    wide = torch.promote_types(rows.dtype, torch.float32)
    if weight is not None:
        wide = torch.promote_types(wide, weight.dtype)
        rows = rows.to(wide)
    N = rows.shape[0]
    m = torch.full((N,), -math.inf, dtype=wide, device=rows.device)
    s = torch.zeros(N, dtype=wide, device=rows.device)
    t = torch.zeros(N, dtype=wide, device=rows.device)
    picked = torch.zeros(N, dtype=wide, device=rows.device)  # the target's logit
    found = torch.zeros(N, dtype=torch.bool, device=rows.device)
    V = rows.shape[-1] if weight is None else weight.shape[0]
    reduced = [(rows @ U.to(wide), B) for U, B in low_rank]  # (N, r) each, once
    for lo in range(0, V, chunk):
        if weight is None:
            z = rows[:, lo : lo + chunk].to(wide)
        else:
            z = rows @ weight[lo : lo + chunk].to(wide).T
            if bias is not None:
                z = z + bias[lo : lo + chunk].to(wide)
            for xu, B in reduced:
                z = z + xu @ B[lo : lo + chunk].to(wide).T
        if temperature != 1.0:
            z = z / temperature
        if target is not None:
            inside = (target >= lo) & (target < lo + z.shape[1])
            col = (target - lo).clamp(0, z.shape[1] - 1)[:, None]
            picked = picked + torch.where(inside, z.gather(1, col)[:, 0], 0.0)
            found |= inside
        new = torch.maximum(m, z.amax(-1))
        safe = torch.where(torch.isfinite(new), new, 0.0)  # rows of -inf only so far
        scale = torch.where(torch.isfinite(m), (m - safe).exp(), 0.0)
        t = (t + s * torch.where(torch.isfinite(m), m - safe, 0.0)) * scale
        s = s * scale
        e = (z - safe[:, None]).exp()
        s = s + e.sum(-1)
        t = t + torch.where(e > 0, e * (z - safe[:, None]), 0.0).sum(-1)
        m = new
    entropy = s.log() - t / s
    if target is None:
        return entropy
    # a target outside the vocabulary has no probability: NaN (its row is skipped)
    return entropy, torch.where(found, picked - (m + s.log()), math.nan)


def _t_central(t: float, dof: int) -> float:
    """``P(|T| <= t)`` for Student's t with an integer ``dof`` (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(dof))
    c2, total = math.cos(theta) ** 2, 0.0
    if dof % 2 == 0:  # sin(theta) (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ... up to cos^(dof-2))
        term = total = 1.0
        for k in range(2, dof - 1, 2):
            term *= (k - 1) / k * c2
            total += term
        return math.sin(theta) * total
    if dof > 1:  # 2/pi (theta + sin(theta) (cos + 2/3 cos^3 + ... up to cos^(dof-2)))
        term = total = math.cos(theta)
        for k in range(3, dof - 1, 2):
            term *= (k - 1) / k * c2
            total += term
    return 2 / math.pi * (theta + math.sin(theta) * total)


def t_quantile(dof: float, p: float = 0.975) -> float:
    """Student's t ``p`` quantile with ``dof`` degrees of freedom: exact for an integer ``dof``
    up to 30 (the distribution's closed form, inverted by bisection), else the Cornish-Fisher
    expansion to ``1/dof^3`` (for 0.975 within 2e-6 of the exact quantile from 31 on, poor at a
    fractional ``dof`` under 5); the normal quantile at ``dof = inf``."""
    if p < 0.5:
        return -t_quantile(dof, 1 - p)
    z = NormalDist().inv_cdf(p)
    if not dof > 0 or math.isinf(dof) or p == 0.5:
        return z
    if dof <= 30 and dof == int(dof):
        target, lo, hi = 2 * p - 1, 0.0, 1.0
        while _t_central(hi, int(dof)) < target:
            hi *= 2
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _t_central(mid, int(dof)) < target else (lo, mid)
        return (lo + hi) / 2
    g = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
    )
    return z + sum(c / dof ** (i + 1) for i, c in enumerate(g))


def entropy_from_sums(
    tokens: float,
    total: float,
    variance: float,
    hist: torch.Tensor,
    certain: float,
    high: float,
    sampled: float,
    skipped: float,
    dof: float = math.inf,
    unknown: bool = False,
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9),
    logprob: tuple[float, float] | None = None,
    advantage: tuple[float, float, float, float] | None = None,
    square: float | None = None,
) -> dict[str, float]:
    """The window's metrics from its sums (shared by the probe and :func:`token_entropy_metrics`).

    Args:
        tokens: the tokens that count (estimated from the sampled rows' weights; exact when every
            row is computed).
        total: the weighted sum of their entropies (nats).
        variance: the variance of ``total`` under the row sampling (0 when exact).
        hist: ``(HIST_BINS,)`` weighted counts of entropies per bin.
        certain, high: the weighted counts below / above the two entropy bounds.
        sampled: rows whose (finite) entropy was computed; skipped: rows with NaN or Inf
            logits.
        dof: the degrees of freedom of ``variance`` (the sampled rows less one per call): the
            interval uses Student's t quantile. ``unknown``: a sampled part of the window whose
            variance cannot be estimated (one row drawn): the interval is NaN.
        logprob: ``(weight, weighted sum)`` of the target tokens' log-probabilities.
        advantage: ``(weight, sum lp, sum A, sum lp A)`` over tokens with an advantage.
        square: the weighted sum of squared entropies (nats^2): with it, ``entropy_std`` and
            ``entropy_upper95`` (NaN: a window whose sum is unknown).

    Returns:
        ``entropy_mean`` (nats) and its 95% half-width ``entropy_mean_ci95``, with ``square``
        ``entropy_std`` (nats: the spread of token entropy over the window's tokens; NaN below
        2 rows computed) and ``entropy_upper95`` (nats: a one-sided 95% upper bound on the
        policy's mean entropy; NaN too where the interval is), ``entropy_q<10·q>``,
        ``certain_fraction``, ``high_fraction``, ``tokens``, ``sampled``, ``skipped``; NaN where
        no token counted.
    """
    out = {"tokens": float(tokens), "sampled": float(sampled), "skipped": float(skipped)}
    if logprob is not None and logprob[0] > 0:
        out["logprob_mean"] = logprob[1] / logprob[0]
    if advantage is not None and advantage[0] > 0:
        n, lp, a, lpa = advantage
        out["logprob_advantage_cov"] = lpa / n - (lp / n) * (a / n)
    if not tokens > 0:
        nan = math.nan
        out.update(entropy_mean=nan, entropy_mean_ci95=nan, certain_fraction=nan, high_fraction=nan)
        if square is not None:
            out.update(entropy_std=nan, entropy_upper95=nan)
        out.update({f"entropy_q{round(q * 100)}": nan for q in quantiles})
        return out
    out["entropy_mean"] = total / tokens
    half = t_quantile(dof) * math.sqrt(max(variance, 0.0)) / tokens
    out["entropy_mean_ci95"] = math.nan if unknown else half
    if square is not None:
        # the window's tokens as a sample of the policy's: the mean's variance about the
        # policy's expected entropy is s^2 / N (tokens taken as independent) plus the row
        # sampling's, s^2 / k together for k rows computed; s^2 from those k rows, k - 1 degrees
        # of freedom for both its Bessel factor and the one-sided t bound
        k, nan = sampled, math.nan
        spread = square / tokens - out["entropy_mean"] ** 2
        spread = max(spread, 0.0) * k / (k - 1) if k >= 2 and math.isfinite(spread) else nan
        out["entropy_std"] = math.sqrt(spread)
        se = math.sqrt(spread / tokens + max(variance, 0.0) / tokens**2)
        bound = out["entropy_mean"] + t_quantile(k - 1, 0.95) * se
        out["entropy_upper95"] = nan if unknown else bound
    out["certain_fraction"] = certain / tokens
    out["high_fraction"] = high / tokens
    cum = hist.to(_F64).cumsum(0)
    for q in quantiles:
        # the bin where the cumulative weight reaches q, interpolated linearly inside it
        target = q * float(cum[-1])
        b = int(
            torch.searchsorted(cum, torch.tensor([target], dtype=_F64))[0].clamp(max=len(cum) - 1)
        )
        below = float(cum[b - 1]) if b else 0.0
        inside = float(cum[b]) - below
        frac = (target - below) / inside if inside > 0 else 0.0
        out[f"entropy_q{round(q * 100)}"] = (b + frac) * HIST_WIDTH
    return out


def histogram_bins(entropy: torch.Tensor) -> torch.Tensor:
    """The histogram bin of each entropy (nats), clamped to the last bin."""
    return (entropy / HIST_WIDTH).floor().clamp(0, HIST_BINS - 1).to(torch.int64)


def token_entropy_metrics(
    logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    certain: float = 0.01,
    high: float = 0.672,
    targets: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
) -> dict[str, float]:
    """Every :class:`~collapse_monitor.probes.TokenEntropy` metric of ``logits (..., V)`` over the
    rows where ``mask (...)`` is true, in float64 on the whole tensor (the reference).

    ``entropy_mean`` is exact; the quantiles are read from the same 0.01-nat histogram as the
    probe's. Rows with NaN or Inf logits are left out and counted in ``skipped``. With
    ``targets (...)`` (the token each row predicts; a row whose target is outside ``[0, V)``
    is left out and counted in ``out_of_range``), also ``logprob_mean`` (the mean of
    ``log softmax(z)[target]``); with ``advantages (...)`` too, ``logprob_advantage_cov``, the
    covariance over the tokens of that log-probability with the token's advantage (Cui et al.
    2025: the entropy change under policy gradient is driven by minus this covariance)."""
    z = logits.reshape(-1, logits.shape[-1])
    keep = torch.ones(z.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    outside = torch.zeros_like(keep)
    if targets is not None:
        y = targets.reshape(-1)
        outside = keep & ((y < 0) | (y >= z.shape[1]))
        keep = keep & ~outside
    h = token_entropy(z)
    finite = torch.isfinite(h)
    use = keep & finite
    h = h[use]
    hist = torch.bincount(histogram_bins(h), minlength=HIST_BINS).to(_F64)
    extra = {"out_of_range": float(outside.sum())}
    if targets is not None:
        y = targets.reshape(-1, 1).clamp(0, z.shape[1] - 1)
        lp = torch.log_softmax(z.to(_F64), -1).gather(1, y)[:, 0]
        lp = lp[use]
        extra["logprob_mean"] = float(lp.mean()) if len(lp) else math.nan
        if advantages is not None:
            a = advantages.reshape(-1).to(_F64)[use]
            extra["logprob_advantage_cov"] = (
                float(((lp - lp.mean()) * (a - a.mean())).mean()) if len(lp) else math.nan
            )
    return extra | entropy_from_sums(
        float(use.sum()),
        float(h.sum()),
        0.0,
        hist,
        float((h < certain).sum()),
        float((h > high).sum()),
        float(use.sum()),
        float((keep & ~finite).sum()),
        square=float((h * h).sum()),
    )
