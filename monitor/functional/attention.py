"""Attention entropy (Zhai et al. 2023), entropic overload (Jha & Reagen 2025) and attention-logit
growth (Wortsman et al. 2023): docs/metrics.md#attentionentropy."""

from __future__ import annotations

import math

import torch

_F64 = torch.float64


def causal_allowed(
    q_len: int, k_len: int, device=None, queries: torch.Tensor | None = None
) -> torch.Tensor:
    """``(Lq, Lk)`` bool, key ``j`` allowed for query ``i`` iff ``j <= i`` (top-left aligned, as
    ``scaled_dot_product_attention(is_causal=True)``); rows ``queries`` only when given."""
    rows = torch.arange(q_len, device=device) if queries is None else queries
    return torch.arange(k_len, device=device)[None, :] <= rows[:, None]


def attendable(
    scores: torch.Tensor | None, bias: torch.Tensor, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Keys an additive attention bias leaves attendable, whatever its convention.

    Code masks keys with ``-inf``, ``finfo.min``, ``-1e9`` or ``-1e4`` (BERT's
    ``(1 - mask) * -10000.0``). A key is masked here when its bias makes its probability
    negligible: the bias lies so far below the row's largest bias that, whatever the scores
    ``q k' * scale`` of the row, the key's probability is below ``tiny`` times another key's,
    ``tiny`` the smallest normal number of the computation's dtype (float32 or wider, as
    attention kernels accumulate): ``b_j < max_k b_k - (max s - min s) - log(1 / tiny)``, i.e.
    87 nats below in float32 plus the spread of the scores. A learned bias within that margin
    (T5's relative positions, ALiBi over short distances) masks nothing; ALiBi keys farther back
    than ``87 / slope`` tokens carry under ``1e-38`` of the weight and are counted as masked
    (they leave ``n_i``, so a long-context ALiBi head's ``entropy_norm`` is over the keys it
    can still reach).

    Args:
        scores: ``(..., Lk)`` the logits without the bias, or None (spread 0: a padding mask
            with no scores, e.g. ``key_padding_mask``).
        bias: additive bias broadcastable to ``scores``.
        allowed: bool broadcastable to them: keys already allowed (causal, boolean masks).

    Returns:
        bool, the broadcast shape: keys that are attendable.
    """
    wide = (
        torch.float64
        if bias.dtype == _F64 or (scores is not None and scores.dtype == _F64)
        else torch.float32
    )
    b = bias.to(wide)
    shape = torch.broadcast_shapes(
        b.shape,
        *(() if scores is None else (scores.shape,)),
        *(() if allowed is None else (allowed.shape,)),
    )
    ok = (b > torch.finfo(bias.dtype).min / 2).expand(shape)  # -inf, finfo.min
    if allowed is not None:
        ok = ok & allowed
    b = b.expand(shape)
    top = torch.where(ok, b, -float("inf")).amax(-1, keepdim=True)
    margin = torch.full_like(top, -math.log(torch.finfo(wide).tiny))
    if scores is not None:
        s = scores.to(wide).expand(shape)
        hi = torch.where(ok, s, -float("inf")).amax(-1, keepdim=True)
        lo = torch.where(ok, s, float("inf")).amin(-1, keepdim=True)
        margin = margin + torch.where(hi >= lo, hi - lo, 0.0)
    return ok & (b >= top - margin)


def entropy_from_logits(
    logits: torch.Tensor, allowed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row entropies of ``softmax(logits)`` over allowed keys, without an epsilon.

    ``H_i = logsumexp_j s_ij - sum_j A_ij s_ij`` in float32 or wider.

    Args:
        logits: ``(..., Lk)`` attention logits (masks already added).
        allowed: bool, broadcastable to ``logits``: keys a query may attend to.

    Returns:
        ``(H, n)``: entropies ``(...)`` in nats (0 for rows with no allowed key) and the number
        of allowed keys per row.
    """
    s = logits if logits.dtype in (torch.float32, _F64) else logits.float()
    allowed = allowed.expand_as(s)
    n = allowed.sum(-1)
    # shift each row by its maximum: with |s| ~ 1e4 (collapsed attention) lse and sum p*s agree to
    # ~1e-3 nats in float32 and their difference would be noise (even negative). With t = s - max:
    # H = log Z - sum_j e^t_j t_j / Z, Z = sum_j e^t_j (one exp per entry)
    top = torch.where(n > 0, torch.where(allowed, s, -float("inf")).amax(-1), 0.0)
    t = torch.where(allowed, s - top[..., None], 0.0)
    e = torch.where(allowed, t.exp(), 0.0)
    Z = e.sum(-1)
    H = Z.log() - (e * t).sum(-1) / Z
    return torch.where(n > 0, H, 0.0), n


def entropy_from_probs(probs: torch.Tensor, allowed: torch.Tensor | None = None):
    """Row entropies ``-sum p log p`` (``0 log 0 = 0``) of explicit probabilities ``(..., Lk)``.

    Returns ``(H, n)`` with ``n`` the allowed keys per row (all keys when ``allowed`` is None).
    """
    p = probs.to(_F64)
    if allowed is None:
        allowed = torch.ones_like(p, dtype=torch.bool)
    allowed = allowed.expand_as(p)
    terms = torch.where(allowed & (p > 0), -p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(-1), allowed.sum(-1)


def attention_entropy(
    probs: torch.Tensor,
    allowed: torch.Tensor | None = None,
    overload_threshold: float = 0.9,
    queries: torch.Tensor | None = None,
) -> dict:
    """Per-head attention entropy of explicit probabilities ``(B, H, Lq, Lk)`` (the reference).

    Args:
        probs: attention probabilities, e.g. ``need_weights=True, average_attn_weights=False``.
        allowed: bool broadcastable to ``probs``; masked keys (causal, padding) are excluded from
            ``n_i``. Queries with no allowed key are skipped.
        queries: ``(B, Lq)`` bool, true for real query rows; padded rows are skipped.

    Returns:
        See :func:`entropy_from_sums`.
    """
    H, n = entropy_from_probs(probs, allowed)
    if queries is not None:
        n = torch.where(queries[:, None, :].to(n.device), n, 0)
    heads = H.shape[1]
    H, n = H.transpose(0, 1).reshape(heads, -1), n.transpose(0, 1).reshape(heads, -1)
    valid = n >= 1
    h, norm_ok = normalised(H, n)
    return entropy_from_sums(
        valid.sum(1), (H * valid).sum(1), norm_ok.sum(1), h.sum(1), overload_threshold
    )


def entropy_from_sums(
    queries: torch.Tensor,
    entropy: torch.Tensor,
    queries_norm: torch.Tensor,
    entropy_norm: torch.Tensor,
    overload_threshold: float = 0.9,
) -> dict:
    """The per-head readout shared by :func:`attention_entropy` and the streaming probe.

    Args:
        queries: ``(H,)`` query rows with at least one allowed key; ``entropy``: ``(H,)`` the sum
            of their entropies (nats); ``queries_norm``: ``(H,)`` rows with ``n_i >= 2`` allowed
            keys; ``entropy_norm``: ``(H,)`` the sum of ``H_i / log n_i`` over those rows.
        overload_threshold: a head is overloaded when its mean normalised entropy is at least
            this (entropic overload, Jha & Reagen 2025).

    Returns:
        ``entropy`` ``(H,)`` mean raw entropy (nats); ``entropy_norm`` ``(H,)`` mean normalised
        entropy (NaN for a head with no such row); over the heads where it is defined:
        ``entropy_norm_mean``, ``entropy_norm_min`` and ``overload_fraction`` (NaN when none is).
    """
    ent = entropy.to(_F64) / queries.to(_F64)
    ent_norm = entropy_norm.to(_F64) / queries_norm.to(_F64)
    finite = ent_norm[torch.isfinite(ent_norm)]
    nan = float("nan")
    return {
        "entropy": ent,
        "entropy_norm": ent_norm,
        "entropy_norm_mean": finite.mean().item() if finite.numel() else nan,
        "entropy_norm_min": finite.min().item() if finite.numel() else nan,
        "overload_fraction": (
            (finite >= overload_threshold).to(_F64).mean().item() if finite.numel() else nan
        ),
    }


def normalised(H: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H / log n, n >= 2)``: the normalised entropy and where it is defined."""
    ok = n >= 2
    return torch.where(ok, H / torch.log(torch.where(ok, n, 2).to(H.dtype)), 0.0), ok


__all__ = [
    "attendable",
    "attention_entropy",
    "entropy_from_sums",
    "causal_allowed",
    "entropy_from_logits",
    "entropy_from_probs",
    "normalised",
]
