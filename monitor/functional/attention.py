"""Attention entropy (Zhai et al. 2023), entropic overload (Jha & Reagen 2025) and attention-logit
growth (Wortsman et al. 2023): METRICS.md section 3."""

from __future__ import annotations

import torch

_F64 = torch.float64


def causal_allowed(
    q_len: int, k_len: int, device=None, queries: torch.Tensor | None = None
) -> torch.Tensor:
    """``(Lq, Lk)`` bool, key ``j`` allowed for query ``i`` iff ``j <= i`` (top-left aligned, as
    ``scaled_dot_product_attention(is_causal=True)``); rows ``queries`` only when given."""
    rows = torch.arange(q_len, device=device) if queries is None else queries
    return torch.arange(k_len, device=device)[None, :] <= rows[:, None]


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
    probs: torch.Tensor, allowed: torch.Tensor | None = None, overload_threshold: float = 0.9
) -> dict:
    """Per-head attention entropy of explicit probabilities ``(B, H, Lq, Lk)`` (the reference).

    Args:
        probs: attention probabilities, e.g. ``need_weights=True, average_attn_weights=False``.
        allowed: bool broadcastable to ``probs``; masked keys (causal, padding) are excluded from
            ``n_i``. Queries with no allowed key are skipped.

    Returns:
        ``entropy`` ``(H,)`` mean raw entropy over queries (nats); ``entropy_norm`` ``(H,)`` mean of
        ``H_i / log n_i`` over queries with ``n_i >= 2``; ``entropy_norm_min`` (min over heads);
        ``overload_fraction`` (fraction of heads with ``entropy_norm >= overload_threshold``).
    """
    H, n = entropy_from_probs(probs, allowed)
    heads = H.shape[1]
    H, n = H.transpose(0, 1).reshape(heads, -1), n.transpose(0, 1).reshape(heads, -1)
    valid = n >= 1
    h, norm_ok = normalised(H, n)
    ent = (H * valid).sum(1) / valid.sum(1)
    ent_norm = h.sum(1) / norm_ok.sum(1)
    return {
        "entropy": ent,
        "entropy_norm": ent_norm,
        "entropy_norm_min": ent_norm.min().item(),
        "overload_fraction": (ent_norm >= overload_threshold).to(_F64).mean().item(),
    }


def normalised(H: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H / log n, n >= 2)``: the normalised entropy and where it is defined."""
    ok = n >= 2
    return torch.where(ok, H / torch.log(torch.where(ok, n, 2).to(H.dtype)), 0.0), ok


__all__ = [
    "attention_entropy",
    "causal_allowed",
    "entropy_from_logits",
    "entropy_from_probs",
    "normalised",
]
