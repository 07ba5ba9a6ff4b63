"""Neural-collapse readouts of class statistics, with the work split over the ranks.

:func:`~collapse_monitor.functional.metrics_from_class_statistics` computes the metrics of
whole statistics in one process; its costly parts are sums over classes (the between-class
Gram matrix, ``O(C D^2)``) and over class pairs (``O(C^2 D)``). Here each rank of a process
group computes its share of those sums with the same ``functional`` building blocks, the shares
are all-reduced, and every rank finishes the same readout: the numbers of one process, in
``1/world`` of the time.

- :func:`shared_class_metrics`: every rank holds all the (reduced) class statistics and does
  ``1/world`` of the sums (replicated statistics).
- :func:`sharded_class_metrics`: each rank holds its own classes only
  (:class:`~collapse_monitor.stats.ShardedClassMoments`).
- :func:`class_moment_metrics`: either, for a reduced :class:`ClassMoments`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch

from .. import _dist
from .class_moments import ClassMoments, ShardedClassMoments

# the module (``functional.neural_collapse`` is also the name of a function there)
NC = importlib.import_module("..functional.neural_collapse", __package__)
_F64 = torch.float64
Share = tuple[int, int]


def _nan_sums(like: torch.Tensor) -> torch.Tensor:
    return torch.full((len(NC._PAIR_SUMS),), float("nan"), dtype=_F64, device=like.device)


def shared_class_metrics(
    *args, share: Share = (0, 1), combine: Callable[[torch.Tensor], None] | None = None, **kwargs
) -> dict[str, float]:
    """:func:`~collapse_monitor.functional.metrics_from_class_statistics` (the same arguments
    and keys) with its sums split: part ``share = (rank, world)`` computes ``1/world`` of the
    between-class Gram matrix (when the used classes outnumber the dimensions) and of the exact
    class pairs (:func:`~collapse_monitor.functional.pair_tiles`); ``combine`` sums each
    part over the parts in place (an all-reduce), in that order, so that every part gets the
    same metrics. A part whose Gram matrix or pair sums fail still joins the combine (with
    NaN: every part's metrics from them are then undefined) and raises after it: no rank is
    left waiting.
    """
    if combine is None or share[1] == 1:
        return NC.metrics_from_class_statistics(*args, **kwargs)
    bound = inspect.signature(NC.metrics_from_class_statistics).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    counts = a["counts"]
    used, centred = NC.used_class_means(counts, a["means"], a["min_class_count"])
    Cu, D = centred.shape
    if Cu >= 2:
        if a["n_within"] is None:
            a["n_within"] = counts[counts >= 2].sum().item()
        if a["n_within"] > 0 and Cu > D:
            a["gram"] = _joined(
                combine,
                lambda: NC.class_gram(centred, NC.share_rows(Cu, share)),
                lambda: torch.full((D, D), float("nan"), dtype=_F64, device=centred.device),
            )
        pair_sample = a["pair_sample"]
        if pair_sample is None or Cu * (Cu - 1) // 2 <= pair_sample:
            variances = a["class_variances"].to(centred.device)[used].to(_F64)
            a["pair_sums"] = _joined(
                combine,
                lambda: NC.pairwise_sums(centred, variances, a["tile_size"], share),
                lambda: _nan_sums(centred),
            )
    return NC.metrics_from_class_statistics(**a)


def _joined(combine: Callable[[torch.Tensor], None], compute, failed):
    """``compute()`` combined over the parts. A part where it fails still joins the combine
    (with ``failed()``, NaN: every part's result is then undefined) and raises after it, so
    no rank is left waiting."""
    error = None
    try:
        value = compute()
    except Exception as exc:  # noqa: BLE001 - re-raised after the collective
        error, value = exc, failed()
    combine(value)
    if error is not None:
        raise error
    return value


def sharded_class_metrics(
    moments: ShardedClassMoments,
    means: torch.Tensor,
    weight: torch.Tensor | None = None,
    min_class_count: int = 2,
    tile_size: int = 256,
    group=None,
) -> dict[str, float]:
    """:func:`~collapse_monitor.functional.metrics_from_class_statistics` computed together by
    the ranks of ``group``, each holding the statistics of its own classes (class-sharded
    statistics, :class:`~collapse_monitor.stats.ShardedClassMoments`). A collective: every rank
    calls it and all get the same metrics, those of one process over all classes (to rounding).

    Each rank does ``1/world`` of the work: its classes' ``O(C D^2)`` terms and ``1/world`` of
    the ``O(C^2 D)`` class pairs, for which the ranks send their used classes' centred means to
    ``world/2`` others (point to point; a ring schedule in which every pair of blocks meets
    once). Collectives: an all-gather of the used counts, three all-reduces (the global mean;
    the Gram matrix with the scatter, ``2 D^2``; the spreads with the pair sums). When the used
    classes number at most ``D`` they are gathered instead (``Cu x (2D + 1)`` values at most)
    and :func:`shared_class_metrics` splits them.

    Args:
        moments: this rank's class statistics (``R`` classes): its counts, class variances
            and part of the pooled within-class scatter (the parts of all ranks sum to it;
            summed here with the Gram matrix, one all-reduce).
        means: ``(R, D)`` their class means; weight: ``(R, D)`` their classifier rows or None.
        min_class_count, tile_size: as in
            :func:`~collapse_monitor.functional.metrics_from_class_statistics`.
        group: the ``torch.distributed`` process group (``None``: the default one).

    Returns:
        The keys of ``metrics_from_class_statistics`` and ``samples`` (all ranks' counts).
    """
    rank, world = _dist.rank(group), _dist.world_size(group)
    wire = _dist.collective_device(group, means.device)
    counts, means = moments.count.to(wire), means.to(device=wire, dtype=_F64)
    used = counts >= max(min_class_count, 1)
    mu, var = means[used], moments.class_variances().to(device=wire, dtype=_F64)[used]
    w = None if weight is None else weight.detach().to(device=wire, dtype=_F64)[used]
    D = means.shape[1]
    head = torch.cat([mu.sum(0), torch.stack([counts.sum(), counts[counts >= 2].sum()]).to(_F64)])
    sizes = [int(n) for n in _dist.all_gather_rows(used.sum().reshape(1), [1] * world, group)]
    _dist.all_reduce_sum_(head, group)
    Cu, samples, n_within = sum(sizes), head[D].item(), head[D + 1].item()
    if Cu < 2:
        return {"classes_used": float(Cu), "samples": samples}

    def combine(t: torch.Tensor) -> None:
        _dist.all_reduce_sum_(t, group)

    scatter = moments.within_class_scatter().to(device=wire, dtype=_F64).reshape(-1)
    if Cu <= D:  # small: every rank gets all used classes
        combine(scatter)
        rows = torch.cat([mu, var[:, None]] + ([] if w is None else [w]), 1)
        rows = torch.cat(_dist.all_gather_rows(rows, sizes, group))
        out = shared_class_metrics(
            torch.full((Cu,), max(min_class_count, 1), device=wire),
            rows[:, :D],
            scatter.reshape(D, D),
            rows[:, D],
            None if w is None else rows[:, D + 1 :],
            min_class_count,
            tile_size,
            n_within=n_within,
            share=(rank, world),
            combine=combine,
        )
        return {**out, "samples": samples}
    centred = mu - head[:D] / Cu  # global mean = unweighted mean of class means (Papyan)
    norms = centred.norm(dim=1)
    sq_c = (centred * centred).sum()
    gram = torch.cat([(centred.T @ centred).reshape(-1), torch.stack([norms.sum(), sq_c]), scatter])
    if w is not None:
        w_norms = w.norm(dim=1)
        gram = torch.cat([gram, torch.stack([w_norms.sum(), (w * w).sum()])])
    combine(gram)
    scatter = gram[D * D + 2 : 2 * D * D + 2].reshape(D, D)
    out: dict[str, float] = {"classes_used": float(Cu), "samples": samples}
    if n_within > 0:
        evals, evecs = torch.linalg.eigh(gram[: D * D].reshape(D, D) / Cu)
        out.update(NC._nc1(evals, evecs, scatter, n_within, Cu))
        out["nc1_quotient"] = (scatter.trace() / n_within * Cu / gram[D * D + 1]).item()
    # second pass: spreads around the global means of the first, and the pairs
    mean_norm = gram[D * D] / Cu
    tail = [((norms - mean_norm) ** 2).sum()]
    if w is not None:
        w_mean = gram[-2] / Cu
        dual = w / gram[-1].sqrt() - centred / gram[D * D + 1].sqrt()
        tail += [((w_norms - w_mean) ** 2).sum(), (dual * dual).sum()]
    pair_sums, error = _shard_pair_sums(centred, var, sizes, tile_size, group)
    tail = torch.cat([torch.stack(tail), pair_sums])
    combine(tail)
    if error is not None:  # raised after the collectives: no rank is left waiting
        raise error
    out["equinorm_features"] = (tail[0] / (Cu - 1)).sqrt().item() / mean_norm.item()
    if w is not None:
        out["equinorm_weights"] = (tail[1] / (Cu - 1)).sqrt().item() / w_mean.item()
        out["self_duality"] = tail[2].sqrt().item()
    out.update(NC.pairwise_metrics(tail[-len(NC._PAIR_SUMS) :]))
    return out


def _shard_pair_sums(centred, variances, sizes, tile, group):
    """This rank's share of the pair sums of all ranks' classes (rows of ``centred``: this
    rank's; ``sizes``: every rank's count). Its own pairs, then at hop ``h = 1 .. world/2``
    its classes against those of rank ``rank - h``; at the middle hop of an even world the two
    ranks of a pair of blocks take half of its pairs each.

    Returns ``(sums, error)``: a rank whose own work fails (out of memory) still makes every
    exchange, with NaN sums, and hands the error back to raise after the last collective."""
    rank, world = _dist.rank(group), _dist.world_size(group)
    etf_cos = -1.0 / (sum(sizes) - 1)
    error = None

    def guarded(fn, *args):
        nonlocal error
        if error is None:
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001 - re-raised after the collectives
                error = exc
        return _nan_sums(centred)

    sums = guarded(NC.pairwise_sums, centred, variances, tile, (0, 1), etf_cos)
    own = torch.cat([centred, variances[:, None]], 1)
    for hop in range(1, world // 2 + 1):
        send, rows = own, sizes[(rank - hop) % world]
        if 2 * hop == world:
            # the blocks of ranks a < world/2 and b = a + world/2 meet at both: a takes its
            # classes against the first half of b's (all b sends), b its second half against
            # all of a's
            if rank < hop:
                rows //= 2
            else:
                send = own[: own.shape[0] // 2]
        theirs = _dist.shift_exchange(send, hop, rows, group)
        a, b = own, theirs
        if 2 * hop == world and rank >= hop:
            a = own[own.shape[0] // 2 :]
        if a.shape[0] and b.shape[0]:
            pairs = ((a[:, :-1], a[:, -1]), (b[:, :-1], b[:, -1]), etf_cos, tile)
            sums = sums + guarded(NC.cross_pairwise_sums, *pairs)
    return sums, error


def shared_within_scatter(
    moments: ClassMoments, share: Share, combine: Callable[[torch.Tensor], None]
) -> torch.Tensor:
    """:meth:`ClassMoments.within_class_scatter` with its ``O(C D^2)`` class term split: part
    ``share`` sums its ``1/world`` of the classes and ``combine`` sums the parts in place."""
    between = moments.between_class_term(NC.share_rows(moments.num_classes, share))
    combine(between)
    return moments.scatter_from(between)


def class_moment_metrics(
    moments: ClassMoments,
    means: torch.Tensor,
    weight: torch.Tensor | None,
    min_class_count: int = 2,
    tile_size: int = 256,
    pair_sample: int | None = None,
    generator: torch.Generator | None = None,
    group=None,
) -> dict[str, float]:
    """The neural-collapse metrics of a reduced window's class moments (``means``: its
    :meth:`~ClassMoments.means`, computed once by the caller), the work split over the ranks of
    ``group``: a collective under ``torch.distributed`` (every rank calls it, all get the same
    metrics). ``weight``: the classifier rows of the moments' classes (``None``: none)."""
    if isinstance(moments, ShardedClassMoments):
        return sharded_class_metrics(moments, means, weight, min_class_count, tile_size, group)
    share = (_dist.rank(group), _dist.world_size(group))

    def combine(t: torch.Tensor) -> None:  # (a no-op in one process)
        _dist.all_reduce_sum_(t, group)

    return shared_class_metrics(
        moments.count,
        means,
        shared_within_scatter(moments, share, combine),
        moments.class_variances(),
        weight,
        min_class_count,
        tile_size,
        pair_sample,
        generator,
        share=share,
        combine=combine,
    )
