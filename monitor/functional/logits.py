"""Softmax collapse and output-logit health (Prieto et al. 2025; Wortsman et al. 2023):
docs/metrics.md#logithealth. Whole-tensor references and the readout the probe shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_F64 = torch.float64


def softmax_collapsed(logits: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per row: true when ``sum_j exp(z_j - max z) == 1`` exactly in ``dtype`` (default: the
    logits' own), i.e. every non-maximal term was absorbed (from a gap of about 17 nats in
    float32) or underflowed: the top probability is exactly 1, the loss and the correct class's
    gradient exactly 0, the other classes' gradients below ``exp(-gap)`` (Prieto et al. 2025).

    Args:
        logits: ``(..., C)``. Returns ``(...)`` bool.
    """
    z = logits.to(dtype or logits.dtype)
    shifted = z - z.amax(-1, keepdim=True)
    return torch.exp(shifted).sum(-1) == 1


def stablemax_collapsed(logits: torch.Tensor) -> torch.Tensor:
    """Per row: true when the StableMax probability of the top class is exactly 1 in float64 (the
    dtype StableMax cross-entropy is computed in): its gradient then vanishes as softmax's does."""
    from ..losses import stablemax

    return stablemax(logits).amax(-1) == 1


def zero_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    dtype: torch.dtype | None = None,
    loss: str = "softmax",
) -> torch.Tensor:
    """Per row: true when the cross-entropy (``loss="softmax"``, computed in ``dtype``) or the
    StableMax cross-entropy (float64) is exactly 0. ``(N, C)``, ``(N,)``."""
    if loss == "stablemax":
        from ..losses import stablemax

        return stablemax(logits).gather(1, targets[:, None])[:, 0] == 1
    z = logits.to(dtype or logits.dtype)
    return F.cross_entropy(z, targets, reduction="none") == 0


def training_dtype(logits: torch.Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype the training softmax runs in: ``dtype``, or the logits' own promoted to at least
    float32 (what ``cross_entropy`` computes in under autocast)."""
    return dtype or torch.promote_types(logits.dtype, torch.float32)


def logit_rows(
    logits: torch.Tensor,
    dtype: torch.dtype | None = None,
    loss: str = "softmax",
    targets: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-row statistics of logits ``(N, C)`` (shared by :func:`logit_health` and the probe).

    Args:
        dtype: see :func:`training_dtype`; loss: ``"softmax"`` or ``"stablemax"``;
        targets: ``(N,)`` int, ``-1`` where a row has no target (a value outside ``[0, C)``
            is no target either: it names no class).

    Returns:
        ``collapsed`` ``(N,)`` bool (softmax or StableMax saturated), ``log_z`` and ``norm``
        ``(N,)`` float64 (``logsumexp`` and L2 norm of the row); with targets ``has_target`` and
        ``zero_loss`` ``(N,)`` bool.
    """
    dtype = training_dtype(logits, dtype)
    z64 = logits.to(_F64)
    out = {
        "collapsed": (
            stablemax_collapsed(logits) if loss == "stablemax" else softmax_collapsed(logits, dtype)
        ),
        "log_z": torch.logsumexp(z64, -1),
        "norm": z64.norm(dim=-1),
    }
    if targets is not None:
        has = (targets >= 0) & (targets < logits.shape[-1])
        out["has_target"] = has
        out["zero_loss"] = zero_loss(logits, torch.where(has, targets, 0), dtype, loss) & has
    return out


def logit_health(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    ignore_index: int = -100,
    loss: str = "softmax",
) -> dict:
    """Softmax collapse and logit statistics of a whole set of logits (the reference).

    Args:
        logits: ``(..., C)``; targets: ``(...)`` int (``ignore_index`` skipped; any other
            value outside ``[0, C)`` counted in ``out_of_range``, its row kept without a target);
        dtype: the training softmax's dtype (see :func:`training_dtype`);
        loss: ``"softmax"`` or ``"stablemax"`` (Prieto et al.).

    Returns:
        See :func:`logit_health_from_sums`. Rows with NaN or Inf are left out (``skipped``).
    """
    z = logits.reshape(-1, logits.shape[-1])
    finite = torch.isfinite(z).all(1)
    y, outside = None, 0
    if targets is not None:
        y = targets.reshape(-1)
        outside = ((y != ignore_index) & ((y < 0) | (y >= z.shape[1]))).sum()
        y = torch.where(y != ignore_index, y, -1)[finite]
    z = z[finite]
    rows = logit_rows(z, dtype, loss, y)
    return logit_health_from_sums(
        rows=z.shape[0],
        collapsed=rows["collapsed"].sum(),
        log_z=rows["log_z"].sum(),
        log_z_max=rows["log_z"].max() if z.shape[0] else -float("inf"),
        logit_max=z.double().max() if z.shape[0] else -float("inf"),
        logit_norm=rows["norm"].sum(),
        target_rows=None if y is None else rows["has_target"].sum(),
        zero_loss=None if y is None else rows["zero_loss"].sum(),
        skipped=(~finite).sum(),
        out_of_range=outside,
    )


def logit_health_from_sums(
    rows,
    collapsed,
    log_z,
    log_z_max,
    logit_max,
    logit_norm,
    target_rows=None,
    zero_loss=None,
    skipped=0,
    out_of_range=0,
) -> dict:
    """The readout shared by :func:`logit_health` and the streaming probe.

    Args:
        rows: logit rows counted; collapsed: of them, softmax-collapsed rows;
        log_z: the sum of their ``logsumexp`` (nats); log_z_max: its maximum;
        logit_max: the largest logit; logit_norm: the sum of the rows' L2 norms;
        target_rows: rows with a target (None: no targets), zero_loss: of them, rows whose
        cross-entropy is exactly 0; skipped: rows left out for NaN or Inf; out_of_range:
        targets outside the classes (not ``ignore_index``), their rows kept without one.

    Returns:
        ``samples`` (rows), ``skipped`` and ``out_of_range``; when there are rows
        ``softmax_collapse`` (fraction collapsed), ``log_z_mean``, ``log_z_max``,
        ``logit_max``, ``logit_norm`` (mean L2 norm); with targets ``zero_loss_fraction``.
    """
    n = float(rows)
    out = {"samples": n, "skipped": float(skipped), "out_of_range": float(out_of_range)}
    if n:
        out.update(
            softmax_collapse=float(collapsed) / n,
            log_z_mean=float(log_z) / n,
            log_z_max=float(log_z_max),
            logit_max=float(logit_max),
            logit_norm=float(logit_norm) / n,
        )
    if target_rows is not None and float(target_rows):
        out["zero_loss_fraction"] = float(zero_loss) / float(target_rows)
    return out
