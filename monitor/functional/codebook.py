"""Codebook usage (docs/metrics.md#codebookusage): perplexity and utilisation from pooled counts."""

from __future__ import annotations

import math

import torch

_F64 = torch.float64


def usage_from_counts(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Perplexity and utilisation of each codebook from pooled hit counts.

    Args:
        counts: ``(H, K)`` hits per code for ``H`` codebooks (heads) of ``K`` codes.

    Returns:
        ``perplexity`` ``(H,)``: ``exp(H)`` with ``H = log T - (1/T) sum_j n_j log n_j``
        (``0 log 0 = 0``; no epsilon), in ``[1, K]``; ``usage`` ``(H,)``: fraction of codes with at
        least one hit; ``samples`` ``(H,)``: ``T``; ``usage_uniform`` ``(H,)``:
        :func:`uniform_usage` of ``T``. A codebook with no hits has perplexity NaN.
    """
    n = counts.to(_F64)
    total = n.sum(-1)
    n_log_n = torch.where(n > 0, n * torch.log(torch.where(n > 0, n, 1.0)), 0.0).sum(-1)
    entropy = torch.log(total) - n_log_n / total
    return {
        "perplexity": torch.exp(entropy),
        "usage": (n > 0).to(_F64).mean(-1),
        "samples": total,
        "usage_uniform": uniform_usage(total, n.shape[-1]),
    }


def uniform_usage(samples: torch.Tensor, num_codes: int) -> torch.Tensor:
    """The expected usage of a uniform codebook after ``samples`` assignments:
    ``1 - (1 - 1/K)^T`` (about ``1 - exp(-T/K)``), the most a window of ``T`` assignments can
    show. A usage threshold says something only where this is well above it.

    Args:
        samples: ``T``, assignments per codebook (any shape).
        num_codes: ``K``.

    Returns:
        float64, the shape of ``samples``.
    """
    T = samples.to(_F64)
    return -torch.expm1(T * math.log1p(-1.0 / num_codes)) if num_codes > 1 else (T > 0).to(_F64)


def dead_codes(ema_hits: torch.Tensor, ema_rows: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(H, K)`` bool: codes whose smoothed usage, in hits per index of their head
    (``ema_hits / ema_rows``), is below ``threshold`` (docs/metrics.md#codebookusage: EMA usage below threshold)."""
    return ema_hits < threshold * ema_rows[:, None]


def codebook_usage(
    indices: torch.Tensor, num_codes: int, heads: int = 1
) -> dict[str, torch.Tensor]:
    """Usage of a whole stream of code indices (the reference for the streamed probe).

    Args:
        indices: integer tensor in ``[0, num_codes)``; with ``heads > 1`` its last dimension is
            the head (``(..., H)``), otherwise every entry counts for the one codebook.
        num_codes: ``K``.

    Returns:
        :func:`usage_from_counts` of the pooled counts, plus ``counts`` ``(H, K)``.
    """
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise ValueError(f"code indices must be integers, got {indices.dtype}")
    idx = indices.reshape(-1, heads) if heads > 1 else indices.reshape(-1, 1)
    if heads > 1 and indices.shape[-1] != heads:
        raise ValueError(f"expected indices of shape (..., {heads}), got {tuple(indices.shape)}")
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_codes):
        raise ValueError(
            f"code indices must lie in [0, {num_codes}), got [{idx.min()}, {idx.max()}]"
        )
    counts = torch.stack(
        [torch.bincount(idx[:, h], minlength=num_codes) for h in range(idx.shape[1])]
    )
    return {**usage_from_counts(counts), "counts": counts}


def fire_rate(counts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean active latents per row (L0): ``counts (H, L)`` fires over ``rows (H,)``."""
    return counts.sum(-1).to(_F64) / rows.to(_F64)


def latent_usage(activations: torch.Tensor, threshold: float = 0.0) -> dict[str, torch.Tensor]:
    """Usage of sparse-autoencoder latents over a whole set of activations ``(..., L)`` (the
    reference of ``probes.LatentUsage``): a latent fires where its activation is above
    ``threshold``.

    Returns:
        :func:`usage_from_counts` of the fires per latent (``samples`` is then fires), plus
        ``fire_rate`` ``(1,)`` (:func:`fire_rate`), ``rows`` ``(1,)`` and ``dead`` ``(1, L)``
        (latents that never fired).
    """
    fires = activations.detach().reshape(-1, activations.shape[-1]) > threshold
    counts = fires.sum(0, dtype=torch.int64)[None]
    rows = torch.tensor([fires.shape[0]])
    return {
        **usage_from_counts(counts),
        "fire_rate": fire_rate(counts, rows),
        "rows": rows,
        "dead": counts == 0,
    }
