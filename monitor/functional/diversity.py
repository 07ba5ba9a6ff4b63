"""Diversity of the completions sampled for one prompt (docs/metrics.md#generationdiversity):
the reference (plain sets, one group at a time) and the fixed-size tensor kernel the probe runs.

Within a group of ``G`` completions of one prompt (GRPO's ``num_generations``):
``distinct_n`` = distinct n-grams / all n-grams of the group (Li et al. 2016's distinct-n, taken
within the group), ``pairwise_overlap`` = the mean over pairs of the Jaccard index of their
2-gram sets, ``identical_fraction`` = the share of pairs whose completions are the same token
sequence. A collapsed policy samples one completion G times: distinct-n ``1/G``, overlap 1,
identical 1.
"""

from __future__ import annotations

import itertools
import math

import torch

_F64 = torch.float64
NGRAMS = (1, 2)


def _completions(ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(r[m].tolist()) for r, m in zip(ids, mask.bool())]


def _ngrams(seq: tuple[int, ...], n: int) -> list[tuple[int, ...]]:
    return [seq[i : i + n] for i in range(len(seq) - n + 1)]


def generation_diversity(
    ids: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor
) -> dict[str, float]:
    """The reference: every metric over the groups of ``ids (B, T)``, counting the tokens where
    ``mask (B, T)`` is true (completion tokens, in order), rows grouped by ``groups (B,)``.

    Returns the mean over groups of ``distinct_1``, ``distinct_2`` (groups with an n-gram),
    ``pairwise_overlap`` (pairs with a 2-gram), ``identical_fraction`` (all pairs), and
    ``groups``, ``completions``; NaN where nothing defines a mean.
    """
    seqs = _completions(ids, mask)
    by_group: dict[int, list[tuple[int, ...]]] = {}
    for g, seq in zip(groups.tolist(), seqs):
        by_group.setdefault(g, []).append(seq)
    sums = {f"distinct_{n}": [] for n in NGRAMS}
    overlaps, identical = [], []
    for members in by_group.values():
        for n in NGRAMS:
            grams = [x for s in members for x in _ngrams(s, n)]
            if grams:
                sums[f"distinct_{n}"].append(len(set(grams)) / len(grams))
        pairs = list(itertools.combinations(members, 2))
        for a, b in pairs:
            sa, sb = set(_ngrams(a, 2)), set(_ngrams(b, 2))
            if sa | sb:
                overlaps.append(len(sa & sb) / len(sa | sb))
        if pairs:
            identical.append(sum(a == b for a, b in pairs) / len(pairs))

    def mean(v):
        return sum(v) / len(v) if v else math.nan

    out = {k: mean(v) for k, v in sums.items()}
    out["pairwise_overlap"] = mean(overlaps)
    out["identical_fraction"] = mean(identical)
    out["groups"] = float(len(by_group))
    out["completions"] = float(len(seqs))
    return out


def _packed(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(R, T)`` int64: each row's completion tokens packed to the front in order, ``-1`` after
    them (the unigram codes)."""
    order = torch.argsort((~mask.bool()).to(torch.int8), dim=1, stable=True)  # tokens first
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    inside = pos < mask.bool().sum(1, keepdim=True)
    return torch.where(inside, ids.gather(1, order).to(torch.int64), -1)


def _codes(tok: torch.Tensor, n: int, base: int) -> torch.Tensor:
    """``(R, T)`` int64: the n-grams of packed tokens (:func:`_packed`) as exact integer codes in
    base ``base``, ``-1`` where there is none (fewer than n tokens left)."""
    code = tok.clamp_min(0)
    for k in range(1, n):
        code = code * base + torch.roll(tok, -k, dims=1).clamp_min(0)
    # valid where the n-gram's last token is a token (packing puts the -1s at the end)
    last = torch.roll(tok, -(n - 1), dims=1)
    pos = torch.arange(tok.shape[1], device=tok.device)[None]
    return torch.where((last >= 0) & (pos + n <= tok.shape[1]), code, -1)


def _distinct(codes: torch.Tensor) -> torch.Tensor:
    """``(R,)`` the number of distinct non-negative values in each row."""
    s = codes.sort(dim=1).values
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    return (new & (s >= 0)).sum(1)


def group_keys(ids: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """``(B,)`` int64: a key of each row's tokens before its first completion token (the prompt,
    with its left padding; the padding after a shorter completion is not part of it): the
    completions of one prompt share it. A row without a completion token (all masked: TRL's
    ``mask_truncated_completions``) is keyed on its tokens before the earliest first completion
    token of the others (where left-padded prompts all end). A polynomial hash with int64
    wrap-around (a collision of two prompts in one batch is negligible)."""
    B, T = ids.shape
    powers = torch.full((T,), 1_000_003, dtype=torch.int64, device=ids.device)
    powers = torch.cumprod(powers, 0)  # wraps around: still a fixed, distinct weight per place
    completion = completion.bool()
    first = torch.where(completion.any(1), completion.to(torch.int8).argmax(1), T)
    end = torch.where(first < T, first, first.amin())  # (T when no row has a completion)
    before = torch.arange(T, device=ids.device) < end[:, None]
    prompt = torch.where(before, ids.to(torch.int64) + 1, 0)
    return (prompt * powers).sum(1)


def group_sums(
    ids: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    base: int,
    valid: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The probe's kernel: sums over the groups of ``group_size`` consecutive rows of ``ids``
    (``B`` a multiple of it), with fixed-size tensor operations only (no host sync): per
    metric the sum of per-group values and the number of groups (or pairs) that define it.
    N-grams are exact integer codes in base ``base`` (the vocabulary size). ``valid (groups,)``:
    the groups that count (others are left out of every sum)."""
    B, T = ids.shape
    G = group_size
    ngroups = B // G
    if valid is None:
        valid = torch.ones(ngroups, dtype=torch.bool, device=ids.device)
    out: dict[str, torch.Tensor] = {}
    tok = _packed(ids, mask)
    i, j = torch.triu_indices(G, G, 1, device=ids.device)  # the pairs of a group
    for n in NGRAMS:
        codes = _codes(tok, n, base)  # (B, T)
        total = (codes >= 0).reshape(ngroups, G * T).sum(1)
        distinct = _distinct(codes.reshape(ngroups, G * T))
        has = (total > 0) & valid
        ratio = distinct.to(_F64) / total.clamp_min(1).to(_F64)
        out[f"distinct_{n}"] = torch.where(has, ratio, 0.0).sum()
        out[f"distinct_{n}_count"] = has.sum().to(_F64)
        if n == 2:
            # 2-gram sets per row, deduplicated: |A|, and |A u B| of each pair by one sort
            rows = codes.reshape(ngroups, G, T)
            size = _distinct(codes).reshape(ngroups, G)
            union = _distinct(torch.cat([rows[:, i], rows[:, j]], dim=2).reshape(-1, 2 * T))
            union = union.reshape(ngroups, -1)
            inter = size[:, i] + size[:, j] - union
            ok = (union > 0) & valid[:, None]
            jaccard = inter.to(_F64) / union.clamp_min(1).to(_F64)
            out["pairwise_overlap"] = torch.where(ok, jaccard, 0.0).sum()
            out["pairwise_overlap_count"] = ok.sum().to(_F64)
    # identical completions: the same packed tokens (the same length, the same tokens in order)
    tok = tok.reshape(ngroups, G, T)
    same = (tok[:, i] == tok[:, j]).all(-1).to(_F64)  # (groups, pairs)
    counted = valid.to(_F64)
    out["identical_fraction"] = (same.mean(1) * counted).sum()
    out["identical_fraction_count"] = counted.sum()
    out["groups"] = counted.sum()
    out["completions"] = counted.sum() * G
    return out
