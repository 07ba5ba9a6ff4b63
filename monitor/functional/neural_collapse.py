"""Neural-collapse metrics (Papyan, Han & Donoho 2020; Galanti et al. 2022), METRICS.md section 1.

``neural_collapse`` is the whole-tensor, float64, two-pass reference. ``metrics_from_class_statistics``
is the readout shared with the streaming probe: it turns class counts, class means and the pooled
within-class scatter into the metrics of the conventions table.
"""

from __future__ import annotations

import math

import torch

_F64 = torch.float64
_EPS = torch.finfo(_F64).eps


def _pairwise_class_geometry(centred: torch.Tensor, variances: torch.Tensor, tile: int) -> dict:
    """Equiangularity, cosine spread and CDNV over all pairs ``c < c'`` by tiled GEMM.

    Args:
        centred: ``(C, D)`` class means minus the global mean, float64.
        variances: ``(C,)`` ``Var_c`` for CDNV.
        tile: rows per tile; memory is ``O(tile^2)`` whatever ``C`` is.
    """
    C = centred.shape[0]
    sq = (centred * centred).sum(1)
    norms = sq.sqrt().clamp_min(torch.finfo(_F64).tiny)
    etf_cos = -1.0 / (C - 1)
    # std is shift invariant; accumulating cos - etf_cos (~0 near the ETF) avoids cancellation
    abs_dev = dev_sum = dev_sq = cdnv_sum = 0.0
    pairs = cdnv_pairs = 0
    for i0 in range(0, C, tile):
        i1 = min(i0 + tile, C)
        for j0 in range(i0, C, tile):
            j1 = min(j0 + tile, C)
            gram = centred[i0:i1] @ centred[j0:j1].T
            cos = gram / (norms[i0:i1, None] * norms[None, j0:j1])
            dist2 = sq[i0:i1, None] + sq[None, j0:j1] - 2 * gram
            if i0 == j0:
                mask = torch.ones_like(gram, dtype=torch.bool).triu_(1)
            else:
                mask = torch.ones_like(gram, dtype=torch.bool)
            dev = (cos - etf_cos)[mask]
            abs_dev += dev.abs().sum().item()
            dev_sum += dev.sum().item()
            dev_sq += (dev * dev).sum().item()
            pairs += dev.numel()
            # pairs whose means coincide to rounding have no defined CDNV: skipped and counted
            floor = 64 * _EPS * (sq[i0:i1, None] + sq[None, j0:j1])
            ok = mask & (dist2 > floor)
            ratio = (variances[i0:i1, None] + variances[None, j0:j1]) / (2 * dist2)
            cdnv_sum += ratio[ok].sum().item()
            cdnv_pairs += int(ok.sum().item())
    out = {"equiangular": abs_dev / pairs, "cdnv_pairs_skipped": pairs - cdnv_pairs}
    if pairs > 1:
        out["cos_std"] = math.sqrt(max(dev_sq - dev_sum * dev_sum / pairs, 0.0) / (pairs - 1))
    if cdnv_pairs:
        out["cdnv"] = cdnv_sum / cdnv_pairs
    return out


def _coefficient_of_variation(values: torch.Tensor) -> float:
    return (values.std(unbiased=True) / values.mean()).item()


def metrics_from_class_statistics(
    counts: torch.Tensor,
    means: torch.Tensor,
    within_scatter: torch.Tensor,
    class_variances: torch.Tensor,
    weight: torch.Tensor | None = None,
    min_class_count: int = 2,
    tile_size: int = 1024,
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

    Returns:
        ``classes_used`` always; the other keys only where defined (at least two classes used):
        ``nc1``, ``nc1_rank``, ``nc1_quotient``, ``equinorm_features``, ``equiangular``,
        ``cos_std``, ``cdnv``, ``cdnv_pairs_skipped``, and with ``weight`` ``equinorm_weights``,
        ``self_duality``.
    """
    counts = counts.to(means.device)
    used = counts >= max(min_class_count, 1)
    Cu = int(used.sum().item())
    out: dict[str, float] = {"classes_used": float(Cu)}
    if Cu < 2:
        return out
    mu = means[used].to(_F64)
    D = mu.shape[1]
    centred = mu - mu.mean(0)  # global mean = unweighted mean of class means (Papyan)

    n_within = counts[counts >= 2].sum().item()
    if n_within > 0:
        sigma_w = within_scatter.to(_F64) / n_within
        # eigenpairs of Sigma_B = Mt'Mt / C through whichever Gram matrix is smaller
        if Cu <= D:
            evals, evecs = torch.linalg.eigh(centred @ centred.T / Cu)
        else:
            evals, evecs = torch.linalg.eigh(centred.T @ centred / Cu)
        evals, evecs = evals.flip(0), evecs.flip(1)  # descending
        tol = D * _EPS * evals[0].clamp_min(0)
        keep = (evals > tol) & (torch.arange(evals.numel(), device=evals.device) < min(Cu - 1, D))
        lam, vec = evals[keep], evecs[:, keep]
        if Cu <= D:
            vec = centred.T @ vec / (Cu * lam).sqrt()
        projected = ((sigma_w @ vec) * vec).sum(0)
        out["nc1"] = ((projected / lam).sum() / Cu).item()
        out["nc1_rank"] = float(lam.numel())
        trace_b = (centred * centred).sum() / Cu
        out["nc1_quotient"] = (sigma_w.trace() / trace_b).item()

    out["equinorm_features"] = _coefficient_of_variation(centred.norm(dim=1))
    out.update(_pairwise_class_geometry(centred, class_variances[used].to(_F64), tile_size))
    if weight is not None:
        w = weight.detach().to(device=mu.device, dtype=_F64)[used]
        out["equinorm_weights"] = _coefficient_of_variation(w.norm(dim=1))
        out["self_duality"] = (w / w.norm() - centred / centred.norm()).norm().item()
    return out


def nearest_class_center(
    features: torch.Tensor,
    centers: torch.Tensor,
    center_classes: torch.Tensor,
    center_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """The class of the nearest centre (Euclidean) of each row: ``(N,)`` from ``features (N, D)``,
    ``centers (K, D)`` of classes ``center_classes (K,)``; ``center_sq (K,)`` their squared norms
    when known. Ties go to the lowest index. Float64."""
    centers = centers.to(_F64)
    if center_sq is None:
        center_sq = (centers * centers).sum(1)
    return center_classes[(center_sq - 2 * features.to(_F64) @ centers.T).argmin(1)]


def nearest_class_center_mismatch(
    features: torch.Tensor,
    centers: torch.Tensor,
    center_classes: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """Per-sample NC4 disagreement between the network and the nearest class centre.

    Args:
        features: ``(N, D)``.
        centers: ``(K, D)`` class centres, ``center_classes``: ``(K,)`` their class ids.
        weight, bias: classifier ``(C, D)`` and ``(C,)``; the network predicts
            ``argmax(W h + b)`` (with bias, as in Papyan's code).

    Returns:
        ``(N,)`` bool, true where the two decisions differ. Ties go to the lowest index.
    """
    x = features.to(_F64)
    centers = centers.to(_F64)
    w = weight.detach().to(_F64)
    b = None if bias is None else bias.detach().to(_F64)
    center_sq = (centers * centers).sum(1)
    out = []
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk]
        ncc = nearest_class_center(xs, centers, center_classes, center_sq)
        logits = xs @ w.T if b is None else torch.addmm(b, xs, w.T)
        out.append(ncc != logits.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def neural_collapse(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    min_class_count: int = 2,
    tile_size: int = 1024,
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
