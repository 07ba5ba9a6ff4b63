"""Neural-collapse metrics (Papyan, Han & Donoho 2020; Galanti et al. 2022), docs/metrics.md#neuralcollapse.

``neural_collapse`` is the whole-tensor, float64, two-pass reference. ``metrics_from_class_statistics``
is the readout shared with the streaming probe: it turns class counts, class means and the pooled
within-class scatter into the metrics of the conventions table.
"""

from __future__ import annotations

import math

import torch

from . import _precision

_F64 = torch.float64
_EPS = torch.finfo(_F64).eps
_Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


# the additive pair sums the exact pairwise metrics are made of, in this order
_PAIR_SUMS = ("abs_dev", "dev_sum", "dev_sq", "pairs", "cdnv_sum", "cdnv_pairs")


def _pair_parts(centred: torch.Tensor, variances: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(centred, squared norms, norms, variances)`` of some classes: one side of the pairs."""
    sq = (centred * centred).sum(1)
    return centred, sq, sq.sqrt().clamp_min(torch.finfo(_F64).tiny), variances


def _pair_blocks(a, b, etf_cos):
    """The pairwise values of the classes of ``a`` x those of ``b`` (each from
    :func:`_pair_parts`): cosine minus the simplex-ETF cosine, and the CDNV ratio with its
    validity mask. In-place passes over the tile: the readout's time is these passes and the
    GEMM."""
    (ca, sa, na, va), (cb, sb, nb, vb) = a, b
    gram = ca @ cb.T
    dist2 = torch.add(sa[:, None], sb[None, :]).sub_(gram, alpha=2)
    # pairs whose means coincide to rounding have no defined CDNV: skipped and counted
    ok = dist2 > torch.add(sa[:, None], sb[None, :]).mul_(64 * _EPS)
    # std is shift invariant; accumulating cos - etf_cos (~0 near the ETF) avoids cancellation
    dev = gram.div_(na[:, None]).div_(nb[None, :]).sub_(etf_cos)
    ratio = torch.add(va[:, None], vb[None, :]).div_(dist2).mul_(0.5)
    return dev, torch.where(ok, ratio, 0.0), ok


def _block_sums(dev, ratio, ok) -> torch.Tensor:
    """The pair sums of one tile but the pair count (the caller counts it on the host)."""
    flat = dev.reshape(-1)
    return torch.stack(
        [
            torch.linalg.vector_norm(flat, 1),
            flat.sum(),
            torch.dot(flat, flat),
            ratio.sum(),
            ok.sum().to(_F64),
        ]
    )


def _with_pairs(sums: torch.Tensor, pairs: int) -> torch.Tensor:
    """:data:`_PAIR_SUMS` from :func:`_block_sums`'s five and the pair count."""
    count = torch.tensor([float(pairs)], dtype=_F64).to(sums.device)
    return torch.cat([sums[:3], count, sums[3:]])


def _slice(parts, rows: slice) -> tuple[torch.Tensor, ...]:
    return tuple(t[rows] for t in parts)


def pair_tiles(num_classes: int, tile: int, share: tuple[int, int] = (0, 1)):
    """The tiles ``(i0, j0)`` (``j0 >= i0``) of the class-pair triangle that part ``share =
    (rank, world)`` computes. Each tile, in row-major order, goes to the part with the fewest
    pairs so far (lowest rank on ties): ``world`` ranks split the pairwise work evenly, compute
    every pair exactly once, and all know who does what without a message."""
    rank, world = share
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    load = [0] * world
    for i0 in range(0, num_classes, tile):
        rows = min(tile, num_classes - i0)
        for j0 in range(i0, num_classes, tile):
            cols = min(tile, num_classes - j0)
            owner = load.index(min(load))
            load[owner] += rows * (rows - 1) // 2 if i0 == j0 else rows * cols
            if owner == rank:
                yield i0, j0


def pairwise_sums(
    centred: torch.Tensor,
    variances: torch.Tensor,
    tile: int = 256,
    share: tuple[int, int] = (0, 1),
    etf_cos: float | None = None,
) -> torch.Tensor:
    """The additive sums behind equiangularity, cosine spread and CDNV over the class pairs
    ``c < c'`` of part ``share`` (see :func:`pair_tiles`): ``(6,)`` float64 in the order
    ``abs_dev, dev_sum, dev_sq, pairs, cdnv_sum, cdnv_pairs``. Parts add up: the sums of all
    parts of one ``world`` are the sums of ``share=(0, 1)``; :func:`pairwise_metrics` finishes.

    Args:
        centred: ``(C, D)`` class means minus the global mean, float64.
        variances: ``(C,)`` ``Var_c`` for CDNV.
        tile: rows per tile; memory is ``O(tile^2)`` whatever ``C`` is.
        etf_cos: the simplex-ETF cosine the deviations are taken from; ``-1/(C-1)`` by
            default (these classes are all the classes).
    """
    C = centred.shape[0]
    etf_cos = -1.0 / (C - 1) if etf_cos is None else etf_cos
    parts = _pair_parts(centred, variances)
    sums, pairs = torch.zeros(5, dtype=_F64, device=centred.device), 0
    for i0, j0 in pair_tiles(C, tile, share):
        rows, cols = slice(i0, min(i0 + tile, C)), slice(j0, min(j0 + tile, C))
        dev, ratio, ok = _pair_blocks(_slice(parts, rows), _slice(parts, cols), etf_cos)
        if i0 == j0:
            upper = torch.ones_like(ok).triu_(1)
            dev, ratio, ok = dev[upper], ratio[upper], ok & upper
        sums += _block_sums(dev, ratio, ok)
        pairs += dev.numel()
    return _with_pairs(sums, pairs)


def cross_pairwise_sums(a, b, etf_cos: float, tile: int = 256) -> torch.Tensor:
    """:func:`pairwise_sums` over every pair of one class of ``a`` and one of ``b`` (two
    disjoint sets of classes, each ``(centred (n, D), variances (n,))``)."""
    pa, pb = _pair_parts(*a), _pair_parts(*b)
    sums = torch.zeros(5, dtype=_F64, device=a[0].device)
    for i0 in range(0, a[0].shape[0], tile):
        for j0 in range(0, b[0].shape[0], tile):
            blocks = _pair_blocks(
                _slice(pa, slice(i0, i0 + tile)), _slice(pb, slice(j0, j0 + tile)), etf_cos
            )
            sums += _block_sums(*blocks)
    return _with_pairs(sums, a[0].shape[0] * b[0].shape[0])


def pairwise_metrics(sums: torch.Tensor) -> dict[str, float]:
    """``equiangular``, ``cos_std``, ``cdnv`` and ``cdnv_pairs_skipped`` from the sums of
    :func:`pairwise_sums` over all pairs (docs/metrics.md#neuralcollapse)."""
    abs_dev, dev_sum, dev_sq, pairs, cdnv_sum, cdnv_pairs = sums.tolist()
    out = {"equiangular": abs_dev / pairs, "cdnv_pairs_skipped": pairs - cdnv_pairs}
    if pairs > 1:
        out["cos_std"] = math.sqrt(max(dev_sq - dev_sum * dev_sum / pairs, 0.0) / (pairs - 1))
    if cdnv_pairs:
        out["cdnv"] = cdnv_sum / cdnv_pairs
    return out


def sampled_pairwise_metrics(
    centred: torch.Tensor,
    variances: torch.Tensor,
    pairs: int,
    generator: torch.Generator | None = None,
    chunk: int = 8192,
) -> dict[str, float]:
    """Equiangularity, cosine spread and CDNV estimated on random class pairs, with 95%
    confidence intervals: for a head whose exact readout (``C^2/2`` pairs) is too slow.

    ``pairs`` unordered pairs ``c != c'`` are drawn uniformly with replacement, so each cosine
    metric's estimate is a mean (``equiangular``) or a standard deviation (``cos_std``) of i.i.d.
    draws from the population of all pairs. CDNV's terms ``(Var_c + Var_c') / (2 ||mu_c -
    mu_c'||^2)`` are dominated by the classes of large spread, so ``pairs`` more pairs are drawn
    by importance sampling, ``c`` with probability ``Var_c / sum Var`` and ``c'`` uniformly
    (pair probability ``∝ Var_c + Var_c'``), each term weighted by the uniform probability
    over this one: the mean stays unbiased and the term is ``mean(Var) / ||mu_c - mu_c'||^2``,
    without the spread of the variances, so its interval is narrower and keeps its coverage
    when the variances are uneven. The intervals are ``estimate +- 1.96 se`` with the sample's
    standard error (for ``cos_std`` by the delta method on the sample variance: ``se(s) =
    sqrt((m4 - s^4) / n) / (2 s)``; for ``cdnv``, a mean over the pairs with a defined ratio,
    by the delta method on the ratio of the two means). Cost ``O(pairs * D)``, whatever ``C``
    is.

    Args:
        centred: ``(C, D)`` centred class means, float64; variances: ``(C,)`` ``Var_c``.
        pairs: pairs to draw of each kind (uniform, and by spread for CDNV: ``2 * pairs`` in
            all; ``pairs_sampled`` reports ``pairs``), ``>= 2``.
        generator: for the draw (ranks that draw with equal generators agree).
        chunk: pairs per block (memory ``2 * chunk * D`` floats).

    Returns:
        ``equiangular_sampled``, ``cos_std_sampled``, ``cdnv_sampled``, each with
        ``<key>_ci95`` (the interval's half width), and ``pairs_sampled``.

    Raises:
        ValueError: ``pairs < 2`` or fewer than two classes.

    Example:
        >>> import torch
        >>> from collapse_monitor.functional import sampled_pairwise_metrics
        >>> etf = torch.eye(4, dtype=torch.float64) - 0.25  # centred means of a simplex ETF
        >>> got = sampled_pairwise_metrics(etf, torch.ones(4, dtype=torch.float64), 100)
        >>> round(got["equiangular_sampled"], 12), got["cdnv_sampled"], got["cdnv_sampled_ci95"]
        (0.0, 0.5, 0.0)
    """
    C = centred.shape[0]
    if pairs < 2 or C < 2:
        raise ValueError(
            f"a sampled pairwise readout needs >= 2 pairs of >= 2 classes, got {pairs}, {C}"
        )
    spread = variances.clamp_min(0.0).cpu()
    total = spread.sum().item()
    i = torch.randint(C, (pairs,), generator=generator)
    weighted = math.isfinite(total) and total > 0  # else: an infinite or zero CDNV, any draw
    if weighted:
        i = torch.cat([i, torch.multinomial(spread, pairs, True, generator=generator)])
    else:
        i = torch.cat([i, torch.randint(C, (pairs,), generator=generator)])
    j = torch.randint(C - 1, (2 * pairs,), generator=generator)
    j += j >= i  # uniform over c' != c
    i, j = i.to(centred.device), j.to(centred.device)
    _, sq, norms, _ = _pair_parts(centred, variances)
    dot = torch.cat(
        [
            torch.linalg.vecdot(centred[i[s : s + chunk]], centred[j[s : s + chunk]])
            for s in range(0, 2 * pairs, chunk)
        ]
    )
    dist2 = sq[i] + sq[j] - 2 * dot
    ok = dist2 > 64 * _EPS * (sq[i] + sq[j])  # as in the exact readout
    dev = dot[:pairs] / (norms[i[:pairs]] * norms[j[:pairs]]) + 1.0 / (C - 1)
    a, b = i[pairs:], j[pairs:]
    ratio = (variances[a] + variances[b]) / (2 * torch.where(ok[pairs:], dist2[pairs:], 1.0))
    if weighted:  # times the uniform pair probability 2 / (C (C - 1)) over the drawn one,
        # (Var_c + Var_c') / (sum Var (C - 1))
        spread = spread.to(centred.device)
        ratio *= 2 * total / C / (spread[a] + spread[b])
    ratio = torch.where(ok[pairs:], ratio, 0.0)
    n = float(pairs)
    out = {"pairs_sampled": n}
    gap = dev.abs()
    out["equiangular_sampled"] = gap.mean().item()
    out["equiangular_sampled_ci95"] = _Z95 * (gap.std() / math.sqrt(n)).item()
    centred_dev = dev - dev.mean()
    var = centred_dev.pow(2).sum() / (n - 1)
    out["cos_std_sampled"] = var.sqrt().item()
    m4 = centred_dev.pow(4).mean()
    se = ((m4 - var * var).clamp_min(0.0) / n).sqrt() / (2 * var.sqrt().clamp_min(_EPS))
    out["cos_std_sampled_ci95"] = _Z95 * se.item()
    # cdnv = (sum of the defined terms / all pairs) / (the fraction of pairs defined)
    defined = ok[:pairs].to(_F64)
    share = defined.mean().item()
    if defined.sum() > 1 and ok[pairs:].sum() > 1:  # else no CDNV, not a certain 0
        num, num_var = ratio.mean().item(), ratio.var().item() / n
        share_var = defined.var().item() / n
        out["cdnv_sampled"] = num / share
        se = math.sqrt(num_var / share**2 + num**2 * share_var / share**4)
        out["cdnv_sampled_ci95"] = _Z95 * se
    return out


def _coefficient_of_variation(values: torch.Tensor) -> float:
    return (values.std(unbiased=True) / values.mean()).item()


def _nc1(evals, evecs, scatter, n_within, Cu: int, centred=None) -> dict[str, float]:
    """``nc1`` = tr(Sigma_W Sigma_B^+) / C and ``nc1_rank`` from the eigenpairs (ascending, as
    ``eigh`` gives them) of ``Sigma_B`` (``D x D``), or of the class Gram matrix
    ``centred centred' / C`` (``Cu x Cu``, ``Cu <= D``: pass ``centred`` to lift its vectors).
    ``Sigma_W = scatter / n_within`` enters through its quadratic forms on ``Sigma_B``'s
    eigenvectors only (``O(D^2 r)``, no ``D x D`` pass: its rounding asymmetry cancels there)."""
    D = scatter.shape[0]
    evals, evecs = evals.flip(0), evecs.flip(1)  # descending
    tol = D * _EPS * evals[0].clamp_min(0)
    keep = (evals > tol) & (torch.arange(evals.numel(), device=evals.device) < min(Cu - 1, D))
    lam, vec = evals[keep], evecs[:, keep]
    if centred is not None:
        vec = centred.T @ vec / (Cu * lam).sqrt()
    projected = ((scatter @ vec) * vec).sum(0) / n_within
    return {"nc1": ((projected / lam).sum() / Cu).item(), "nc1_rank": float(lam.numel())}


def share_rows(n: int, share: tuple[int, int]) -> slice:
    """Rank ``share[0]``'s contiguous part of ``n`` rows split over ``share[1]`` ranks."""
    rank, world = share
    return slice(n * rank // world, n * (rank + 1) // world)


def used_class_means(
    counts: torch.Tensor, means: torch.Tensor, min_class_count: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classes with at least ``min_class_count`` samples, ``used (C,) bool``, and their means
    centred on the global mean, ``centred (Cu, D)`` float64 (the global mean is the unweighted
    mean of the class means, as in Papyan et al.)."""
    used = counts.to(means.device) >= max(min_class_count, 1)
    mu = means[used].to(_F64)
    return used, mu - mu.mean(0)


def class_gram(centred: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
    """``sum_c m_c m_c'`` ``(D, D)`` over the centred class means ``centred[rows]``: parts over
    disjoint rows add up to the whole (``Sigma_B = gram / C``)."""
    part = centred[rows]
    return part.T @ part


def metrics_from_class_statistics(
    counts: torch.Tensor,
    means: torch.Tensor,
    within_scatter: torch.Tensor,
    class_variances: torch.Tensor,
    weight: torch.Tensor | None = None,
    min_class_count: int = 2,
    tile_size: int = 256,
    pair_sample: int | None = None,
    generator: torch.Generator | None = None,
    n_within: float | None = None,
    gram: torch.Tensor | None = None,
    pair_sums: torch.Tensor | None = None,
) -> dict[str, float]:
    """NC1-NC3 and CDNV from class statistics.

    Args:
        counts: ``(C,)`` samples per class.
        means: ``(C, D)`` class means (rows of unseen classes ignored).
        within_scatter: ``(D, D)`` ``sum_c sum_{i in c} (h_i - mu_c)(h_i - mu_c)'``.
        class_variances: ``(C,)`` ``(1/n_c) sum_{i in c} ||h_i - mu_c||^2``.
        weight: optional ``(C, D)`` classifier weight ``W`` (NC2 weights, NC3).
        min_class_count: classes with fewer samples are dropped from the class-level metrics.
            ``Sigma_W`` pools every class with at least two samples (a singleton has no scatter),
            so with the default of 2 a dropped class's samples are dropped too.
        tile_size: tile for the pairwise metrics (memory ``tile_size^2`` floats).
        pair_sample: when the used classes have more pairs than this, the pairwise metrics are
            estimated on ``pair_sample`` random pairs (:func:`sampled_pairwise_metrics`, keys
            ``*_sampled`` with ``*_sampled_ci95``) instead of computed over all pairs;
            ``generator`` draws them.
        n_within: the samples behind ``within_scatter`` (of the classes with at least two),
            when ``counts`` does not hold every class.
        gram: :func:`class_gram` of the used classes' centred means, when already summed (over
            the parts of several ranks); computed here otherwise (it is needed when the used
            classes outnumber the dimensions).
        pair_sums: :func:`pairwise_sums` of the used classes, when already summed; computed
            here otherwise.

    Returns:
        ``classes_used`` always; the other keys only where defined (at least two classes used):
        ``nc1``, ``nc1_rank``, ``nc1_quotient``, ``equinorm_features``, ``equiangular``,
        ``cos_std``, ``cdnv``, ``cdnv_pairs_skipped`` (or their sampled estimates), and with
        ``weight`` ``equinorm_weights``, ``self_duality``.
    """
    used, centred = used_class_means(counts, means, min_class_count)
    counts = counts.to(means.device)
    Cu, D = centred.shape
    out: dict[str, float] = {"classes_used": float(Cu)}
    if Cu < 2:
        return out

    if n_within is None:
        n_within = counts[counts >= 2].sum().item()
    if n_within > 0:
        scatter = within_scatter.to(_F64)
        # eigenpairs of Sigma_B = Mt'Mt / C through whichever Gram matrix is smaller
        if Cu <= D:
            evals, evecs = torch.linalg.eigh(centred @ centred.T / Cu)
        else:  # O(Cu D^2)
            evals, evecs = torch.linalg.eigh((class_gram(centred) if gram is None else gram) / Cu)
        out.update(_nc1(evals, evecs, scatter, n_within, Cu, centred if Cu <= D else None))
        trace_b = (centred * centred).sum() / Cu
        out["nc1_quotient"] = (scatter.trace() / n_within / trace_b).item()

    out["equinorm_features"] = _coefficient_of_variation(centred.norm(dim=1))
    variances = class_variances.to(means.device)[used].to(_F64)
    if pair_sample is not None and Cu * (Cu - 1) // 2 > pair_sample:
        out.update(sampled_pairwise_metrics(centred, variances, pair_sample, generator))
    else:
        if pair_sums is None:
            pair_sums = pairwise_sums(centred, variances, tile_size)
        out.update(pairwise_metrics(pair_sums))
    if weight is not None:
        w = weight.detach().to(device=centred.device, dtype=_F64)[used]
        out["equinorm_weights"] = _coefficient_of_variation(w.norm(dim=1))
        out["self_duality"] = (w / w.norm() - centred / centred.norm()).norm().item()
    return out


def nearest_class_center(
    features: torch.Tensor,
    centers: torch.Tensor,
    center_classes: torch.Tensor,
    center_sq: torch.Tensor | None = None,
    matmul_dtype: torch.dtype = _F64,
) -> torch.Tensor:
    """The class of the nearest centre (Euclidean) of each row: ``(N,)`` from ``features (N, D)``,
    ``centers (K, D)`` of classes ``center_classes (K,)``; ``center_sq (K,)`` their squared norms
    when known. Ties go to the lowest index. Float64, the GEMM in ``matmul_dtype`` (``None``:
    the device's default, :mod:`~collapse_monitor.functional._precision`): in float32 rows and
    centres are first moved by the centres' mean (the distances' order is unchanged, the common
    offset no longer costs digits), and a row whose two nearest centres are closer than the
    rounding of ``|x - m| |c - m|`` may pick either. Rows must be finite.

    Raises:
        ValueError: a ``matmul_dtype`` other than None, float32 or float64."""
    x, centers = features.to(_F64), centers.to(_F64)
    matmul_dtype = _precision.matmul_dtype(matmul_dtype, x.device)
    if matmul_dtype != _F64:
        mean = centers.mean(0)
        x, centers, center_sq = x - mean, centers - mean, None
    return _nearest(x, centers, center_classes, center_sq, matmul_dtype)


def _nearest(x, centers, center_classes, center_sq, matmul_dtype) -> torch.Tensor:
    if center_sq is None:
        center_sq = (centers * centers).sum(1)
    return center_classes[
        (center_sq - 2 * _precision.matmul64(x, centers.T, matmul_dtype)).argmin(1)
    ]


def nearest_class_center_mismatch(
    features: torch.Tensor,
    centers: torch.Tensor,
    center_classes: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk: int = 4096,
    matmul_dtype: torch.dtype = _F64,
) -> torch.Tensor:
    """Per-sample NC4 disagreement between the network and the nearest class centre.

    Args:
        features: ``(N, D)``.
        centers: ``(K, D)`` class centres, ``center_classes``: ``(K,)`` their class ids.
        weight, bias: classifier ``(C, D)`` and ``(C,)``; the network predicts
            ``argmax(W h + b)`` (with bias, as in Papyan's code).
        matmul_dtype: the GEMMs' dtype, as for :func:`nearest_class_center` (in float32 the
            logits are ``W (h - m)`` plus ``W m + b`` in float64); rows must be finite.

    Returns:
        ``(N,)`` bool, true where the two decisions differ. Ties go to the lowest index.
    """
    x = features.to(_F64)
    centers = centers.to(_F64)
    w = weight.detach().to(_F64)
    b = None if bias is None else bias.detach().to(_F64)
    matmul_dtype = _precision.matmul_dtype(matmul_dtype, x.device)
    if matmul_dtype != _F64:  # move rows and centres by the centres' mean (see above)
        mean = centers.mean(0)
        x, centers = x - mean, centers - mean
        b = w @ mean if b is None else b + w @ mean
    center_sq = (centers * centers).sum(1)
    out = []
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk]
        ncc = _nearest(xs, centers, center_classes, center_sq, matmul_dtype)
        logits = _precision.matmul64(xs, w.T, matmul_dtype)
        out.append(ncc != (logits if b is None else logits + b).argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def neural_collapse(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    min_class_count: int = 2,
    tile_size: int = 256,
) -> dict[str, float]:
    """Neural-collapse metrics of a whole data set, in float64 (the reference semantics).

    Args:
        features: ``(N, D)`` penultimate features (or ``(..., D)``, flattened).
        labels: ``(N,)`` (or ``(...)``) int in ``[0, num_classes)``.
        num_classes: ``C``.
        weight, bias: optional classifier ``W (C, D)`` and ``b (C,)``.
        min_class_count: see :func:`metrics_from_class_statistics`.

    Returns:
        The keys of :func:`metrics_from_class_statistics` plus ``ncc_mismatch`` (NC4, exact:
        class centres of the whole set, samples of the used classes) when ``weight`` is given.
    """
    if features.ndim < 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    x = features.detach().reshape(-1, features.shape[-1]).to(_F64)
    y = labels.detach().reshape(-1).to(device=x.device, dtype=torch.int64)
    if y.numel() != x.shape[0]:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match features {tuple(features.shape)}"
        )
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or Inf")
    C, D = num_classes, x.shape[1]
    counts = torch.bincount(y, minlength=C)
    sums = torch.zeros(C, D, dtype=_F64, device=x.device).index_add_(0, y, x)
    means = sums / counts.clamp_min(1)[:, None]
    centred = x - means[y]  # second pass: scatter around the exact class means
    within = centred[(counts >= 2)[y]]
    scatter = within.T @ within
    variances = torch.zeros(C, dtype=_F64, device=x.device).index_add_(
        0, y, (centred * centred).sum(1)
    ) / counts.clamp_min(1)
    out = metrics_from_class_statistics(
        counts, means, scatter, variances, weight, min_class_count, tile_size
    )
    if weight is not None and out["classes_used"] >= 2:
        used = counts >= max(min_class_count, 1)
        classes = torch.arange(C, device=x.device)[used]
        rows = used[y]
        mismatch = nearest_class_center_mismatch(x[rows], means[used], classes, weight, bias)
        out["ncc_mismatch"] = mismatch.to(_F64).mean().item()
    return out


def group_variance_ratio(
    counts: torch.Tensor, means: torch.Tensor, within_scatter: torch.Tensor
) -> float:
    """``tr(S_B) / tr(S_T)``: the fraction of the total feature variance explained by group means.

    ``S_B = sum_g n_g (mu_g - mu)(mu_g - mu)'`` with the sample-weighted grand mean ``mu``,
    ``S_T = S_B + S_W``: 0 when groups do not matter, 1 when features are constant within each
    group. NaN with fewer than two samples.

    Args:
        counts: ``(G,)``; means: ``(G, D)``; within_scatter: ``(D, D)`` (or its diagonal).
    """
    n = counts.to(_F64)
    if n.sum() < 2:
        return float("nan")
    grand = (n[:, None] * means).sum(0) / n.sum()
    between = (n * (means - grand).pow(2).sum(1)).sum()
    within = within_scatter.diagonal().sum() if within_scatter.ndim == 2 else within_scatter.sum()
    return (between / (between + within)).item()


def group_collapse(
    features: torch.Tensor, groups: torch.Tensor, num_groups: int, min_class_count: int = 2
) -> dict[str, float]:
    """:func:`neural_collapse` over nuisance groups plus ``group_variance_ratio`` (the reference
    of ``probes.GroupCollapse``)."""
    out = neural_collapse(features, groups, num_groups, min_class_count=min_class_count)
    x = features.detach().reshape(-1, features.shape[-1]).to(_F64)
    g = groups.detach().reshape(-1).to(device=x.device, dtype=torch.int64)
    counts = torch.bincount(g, minlength=num_groups)
    means = torch.zeros(num_groups, x.shape[1], dtype=_F64, device=x.device).index_add_(0, g, x)
    means = means / counts.clamp_min(1)[:, None]
    centred = x - means[g]
    out["group_variance_ratio"] = group_variance_ratio(counts, means, centred.T @ centred)
    return out
